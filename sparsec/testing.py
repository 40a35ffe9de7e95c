"""A kit for testing your own patterns: the float64 reference, a hypothesis strategy of valid calls, and an assertion."""
from __future__ import annotations

import math

import torch

from . import reference as ref
from .compiled import CompiledPattern
from .ir.inputs import expected_shape

# Max |got - want| allowed, relative to max(1, |want|), by dtype: O and LSE, then the gradients.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 5e-2), torch.bfloat16: (6e-2, 1.5e-1)}


def reference(kern: CompiledPattern, q, k, v, scale: float | None = None, q_offset: int | None = None,
              **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (O, LSE) of the call kern(q, k, v, ...) by dense masked attention under kern.mask,
    the package's one reference: (B, Hq, n_q, D) and (B, Hq, n_q); rows with no allowed key have
    O = 0 and LSE = -inf. Differentiable in q, k and v, and in the float inputs a with
    expression reads (its S' = EXPR is applied on the dense scores)."""
    B, H, n_q, D = q.shape
    content = {"q": q, "k": k} if {"q", "k"} & kern.needs else {}
    given = {name: x for name, x in inputs.items() if x is not None}
    mask = kern.mask(n_q, k.shape[2], heads=H, q_offset=q_offset, **content, **given)
    scale = 1 / math.sqrt(D) if scale is None else scale
    reals = {n: x.double() if torch.is_tensor(x) and x.is_floating_point() else x for n, x in given.items()}
    score = kern.score_function(n_q, k.shape[2], heads=H, q_offset=q_offset, **reals)
    return ref.attention(q.double(), k.double(), v.double(), mask.to(q.device), scale, score)


def _worst(name: str, got, want, tol: float, where: str) -> str | None:
    """None when got matches want within tol (relative to max(1, |want|)), else the worst entry."""
    got, want = got.detach().double(), want.detach().double()
    both_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    err = torch.where(both_inf, 0.0, (got - want).abs()).nan_to_num(float("inf"))
    bound = tol * max(1.0, float(want[torch.isfinite(want)].abs().max()) if torch.isfinite(want).any() else 1.0)
    if float(err.max()) <= bound:
        return None
    at = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return (f"{name}: worst |got - want| = {float(err[at]):.3e} at {where} {at} (got {float(got[at]):.6g}, "
            f"want {float(want[at]):.6g}); tolerance {bound:.3e} ({tol:g} x max(1, |want|))")


def assert_matches_reference(kern: CompiledPattern, q, k, v, scale: float | None = None, q_offset: int | None = None,
                             backend: str | None = None, gradients: bool = True, tolerance: tuple | None = None,
                             **inputs) -> None:
    """kern(q, k, v, ...) against `reference`: O and LSE, and with gradients=True dQ, dK, dV of a
    random cotangent, within TOLERANCE[dtype] (or tolerance=(outputs, gradients)). Raises an
    AssertionError naming the worst entry, its (b, h, row[, col]) and the tolerance used."""
    out_tol, grad_tol = tolerance or TOLERANCE[q.dtype]
    leaves = [x.detach().clone().requires_grad_(gradients) for x in (q, k, v)]
    o, lse = kern(*leaves, scale=scale, q_offset=q_offset, backend=backend, return_lse=True, **inputs)
    wants = [x.detach().double().requires_grad_(gradients) for x in (q, k, v)]
    want_o, want_lse = reference(kern, *wants, scale=scale, q_offset=q_offset, **inputs)
    problems = [_worst("O", o, want_o, out_tol, "(b, h, row, d)"),
                _worst("LSE", lse, want_lse, out_tol, "(b, h, row)")]
    if gradients:
        do = torch.randn(o.shape, dtype=torch.float64, device=o.device)
        got = torch.autograd.grad(o, leaves, do.to(o.dtype))
        want = torch.autograd.grad(want_o, wants, do)
        problems += [_worst(f"d{name}", g, w, grad_tol, "(b, h, row, d)")
                     for name, g, w in zip("qkv", got, want)]
    problems = [p for p in problems if p]
    if problems:
        raise AssertionError(f"pattern {kern.name} ({tuple(q.shape)} x {tuple(k.shape)}, {q.dtype}, q_offset="
                             f"{q_offset}):\n  " + "\n  ".join(problems))


def draw_inputs(kern: CompiledPattern, batch: int, heads: int, lengths: dict, gen: torch.Generator) -> dict:
    """Values for the pattern's declared inputs (spec section 6), on the CPU: bools true with
    probability 1/2, ints below the input's largest length axis (as key or block indices are),
    floats in [0.05, 1) (positive: gates, spans). lengths: n, n_q and n_k."""
    out = {}
    for d in kern.ir.inputs:
        shape = expected_shape(d, batch, heads, lengths)
        extent = max([size for dim, size in zip(d.dims, shape) if dim not in ("b", "h")], default=lengths["n_k"])
        out[d.name] = (torch.rand(shape, generator=gen) < 0.5 if d.dtype == "bool" else
                       torch.randint(0, max(1, extent), shape, generator=gen) if d.dtype == "int" else
                       torch.rand(shape, generator=gen) * 0.95 + 0.05)
    return out


def attention_inputs(kern: CompiledPattern, max_n: int = 96, dims=(16, 32), dtypes=(torch.float32,),
                     device: str = "cpu"):
    """A hypothesis strategy of valid calls of kern: dicts of q, k, v, q_offset and the inputs the
    pattern reads (sorted segment_ids for documents), with odd and unequal lengths (n_q <= n_k,
    decoding's n_q = 1 included), GQA (Hq = G x Hkv), every dtype in dtypes, and the pattern's
    declared inputs (draw_inputs). Use it as
    `@given(attention_inputs(kern)) def test(call): assert_matches_reference(kern, **call)`."""
    from hypothesis import strategies as st   # optional: pip install sparsec[testing]

    @st.composite
    def calls(draw):
        B, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        n_k = draw(st.integers(1, max_n))
        n_q = draw(st.one_of(st.just(1), st.integers(1, n_k)))
        D, dtype = draw(st.sampled_from(dims)), draw(st.sampled_from(dtypes))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        call = dict(q=rand(B, kv_heads * group, n_q, D), k=rand(B, kv_heads, n_k, D), v=rand(B, kv_heads, n_k, D))
        if "segment_ids" in kern.needs:   # documents: queries must lie within the keys' ids
            cuts = torch.randint(0, 4, (B, n_k), generator=gen)
            call["segment_ids"] = cuts.sort(-1).values.to(device)
            call["q_offset"] = draw(st.integers(0, n_k - n_q))
        else:
            call["q_offset"] = draw(st.one_of(st.none(), st.integers(-4, n_k)))
        lengths = {"n": n_k, "n_q": n_q, "n_k": n_k}
        call.update({name: x.to(device) for name, x in draw_inputs(kern, B, kv_heads * group, lengths, gen).items()})
        return call
    return calls()
