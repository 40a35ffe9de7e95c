"""`sparsec check`: a pattern's layout and kernels against the dense reference, exhaustively at small n and on sampled rows (O(n) memory) at large n."""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from .. import passes
from ..compiled import CompiledPattern
from ..ir.tiles import EMPTY, FULL, PARTIAL
from ..layout import tile_classes
from ..reference import attention, dense_mask

DENSE_PAIRS = 1 << 26     # heads x n x n above this: sampled rows instead of the dense mask (float64 scores: 512 MB)
SAMPLED_TILES = 32        # query tiles whose whole rows are checked at large n (the first, the last, random ones)
SAMPLED_ROWS = 4          # rows of each sampled tile compared against float64 attention
TOLERANCE = 1e-4          # max |O - O_ref|, and relative gradient error, in fp32


def bar(total: int, desc: str):
    """A progress bar on stderr (tqdm), for the steps of a long check."""
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="step", leave=False)


def _verdict(what: str, errors: list[float]) -> int:
    if not all(e < TOLERANCE for e in errors):   # NaN fails too
        print(f"FAILED: {what} (a sparsec bug; please report it)")
        return 1
    return 0


# ---- the layout ----

def layout_report(pairs: list[tuple[np.ndarray, np.ndarray]], sampled: str = "") -> int:
    """Compare true tile classes with the listed ones, per share: (truth, listed) broadcastable."""
    truth = np.concatenate([t.ravel() for t, _ in pairs])
    got = np.concatenate([np.broadcast_to(g, t.shape).ravel() for t, g in pairs])
    missed = int(((truth > EMPTY) & (got == EMPTY)).sum())
    false_full = int(((got == FULL) & (truth != FULL)).sum())
    loose = int(((got == PARTIAL) & (truth != PARTIAL)).sum())
    tiles = pairs[0][0].size
    print(f"tiles visited{sampled}: {int((got > EMPTY).sum())} of {tiles} ({(got > EMPTY).sum() / tiles:.2%}), "
          f"{int((got == FULL).sum())} FULL, {int((got == PARTIAL).sum())} PARTIAL")
    print(f"layout vs dense reference{sampled}: {missed} allowed tiles missed, {false_full} tiles wrongly FULL, "
          f"{loose} listed PARTIAL that are EMPTY or FULL")
    if missed or false_full:
        print("FAILED: the layout is unsound for this pattern (a sparsec bug; please report it)")
        return 1
    return 0


def dense_layout_pairs(kern: CompiledPattern, n: int, heads: int, block, inputs: dict, mask: np.ndarray) -> list:
    """(true classes, listed classes) per share, from the dense mask; content-based patterns give
    the layouts a call builds, each share in its own order."""
    if "q" not in inputs:
        declared = {name: x for name, x in _declared(kern, inputs, "cpu").items() if name not in kern.score_only}
        lay = kern.layout(n, n, block[0], block[1], heads=heads, segment_ids=inputs.get("segment_ids"), **declared)
        return [(tile_classes(mask, *block), lay.classes())]
    q, k = (torch.as_tensor(inputs[x], dtype=torch.float32) for x in ("q", "k"))
    seg = {"segment_ids": torch.as_tensor(inputs["segment_ids"])} if "segment_ids" in inputs else {}
    seg.update({name: x for name, x in _declared(kern, inputs, "cpu").items() if name not in kern.score_only})
    out = []
    for i, (share, lay, order) in enumerate(kern.share_layouts(q, k, *block, **seg)):
        part = kern.mask(n, heads=heads, share=i, **inputs).numpy()
        if order is not None:   # the share's pairs in its sorted order, where its tiles are
            part = np.take_along_axis(np.take_along_axis(part, order[0][..., None], 2), order[1][:, :, None, :], 3)
        out.append((tile_classes(part, *block), lay.classes()))
        print(f"share {i} ({'positional order' if order is None else 'sorted by ' + share.key.show()}): "
              f"{share.body.show()}")
    return out


def row_masks(kern: CompiledPattern, n: int, heads: int, rows: np.ndarray, inputs: dict) -> np.ndarray:
    """bool (heads, len(rows), n): the reference mask on these query rows only (O(rows x n))."""
    body = passes.specialize(kern.ir, n, n, 0, heads)
    seg = {"segment_ids": inputs["segment_ids"]} if "segment_ids" in inputs else {}
    return dense_mask(body, n, n, 0, heads, 1, seg, rows)[0].numpy()


def _declared(kern: CompiledPattern, inputs: dict, device) -> dict:
    """The pattern's declared inputs among `inputs`, as tensors on device (floats in fp32)."""
    out = {}
    for d in kern.ir.inputs:
        x = torch.as_tensor(inputs[d.name])
        out[d.name] = (x.float() if x.is_floating_point() else x).to(device)
    return out


# ---- the kernels ----

def kernel_error(kern: CompiledPattern, inputs: dict, n: int, heads: int, backend: str) -> tuple[float, float]:
    """Run the kernel forward and backward on seeded fp32 inputs; return max |O - O_ref| and the
    largest relative gradient error max |g - g_ref| / max(1, max |g_ref|) over dq, dk, dv, against
    float64 autograd through masked softmax attention."""
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, heads, n, 64, generator=gen) for _ in range(4))
    if "q" in inputs:
        q, k = torch.as_tensor(inputs["q"], dtype=torch.float32), torch.as_tensor(inputs["k"], dtype=torch.float32)
    call_inputs = {"segment_ids": torch.as_tensor(inputs["segment_ids"]).to(device)} if "segment_ids" in inputs else {}
    declared = _declared(kern, inputs, "cpu")
    call_inputs.update({name: x.to(device) for name, x in declared.items()})
    mask = kern.mask(n, heads=heads, **inputs)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    score = kern.score_function(n, heads=heads, **{name: x.double() if x.is_floating_point() else x
                                                   for name, x in declared.items()})
    want = attention(*ref, mask, 1 / q.shape[-1] ** 0.5, score)[0]   # the kernel's default scale
    want_grads = torch.autograd.grad(want, ref, do.double())
    leaves = [x.clone().to(device).requires_grad_() for x in (q, k, v)]
    got = kern(*leaves, backend=backend, **call_inputs)
    grads = torch.autograd.grad(got, leaves, do.to(device))
    if got.isnan().any() or any(g.isnan().any() for g in grads):
        return float("nan"), float("nan")
    grad_err = max(float((g.cpu().double() - w).abs().max()) / max(1.0, float(w.abs().max()))
                   for g, w in zip(grads, want_grads))
    return float((got.detach().cpu().double() - want.detach()).abs().max()), grad_err


def sampled_kernel_error(kern: CompiledPattern, inputs: dict, n: int, heads: int, backend: str, rows: np.ndarray,
                         masks: np.ndarray) -> tuple[float, float, float]:
    """The kernel run at full n (forward and backward), its O, LSE and dQ on `rows` against float64
    attention of those rows alone under `masks` (their reference mask rows, (heads, rows, n)):
    (O error, LSE error, dQ relative error). A row's output and dQ depend on that row's query
    only, so autograd through the rows' reference gives their dQ exactly."""
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, heads, n, 64, generator=gen) for _ in range(4))
    call_inputs = {"segment_ids": torch.as_tensor(inputs["segment_ids"]).to(device)} if "segment_ids" in inputs else {}
    leaves = [x.clone().to(device).requires_grad_() for x in (q, k, v)]
    o, lse = kern(*leaves, backend=backend, return_lse=True, **call_inputs)
    dq = torch.autograd.grad(o, leaves[0], do.to(device))[0].cpu().double()[:, :, rows]
    o, lse = o.detach().cpu().double()[:, :, rows], lse.detach().cpu().double()[:, :, rows]
    q_rows = q[:, :, rows].double().requires_grad_()
    want_o, want_lse = attention(q_rows, k.double(), v.double(), torch.from_numpy(masks)[None], 1 / math.sqrt(64))
    want_dq = torch.autograd.grad(want_o, q_rows, do[:, :, rows].double())[0]
    both_inf = torch.isinf(lse) & torch.isinf(want_lse) & (lse == want_lse)
    errors = (float((o - want_o.detach()).abs().max()),
              float(torch.where(both_inf, 0.0, lse - want_lse.detach()).abs().max()),
              float((dq - want_dq).abs().max()) / max(1.0, float(want_dq.abs().max())))
    return errors


def _what(backend: str) -> str:
    return "CPU path" if backend == "cpu" else "generated Triton kernels" + (
        " (interpreter)" if backend == "interpret" else "")


# ---- the two checks ----

def dense(kern: CompiledPattern, n: int, heads: int, block, inputs: dict, backends: list[str]) -> int:
    """Every pair: the dense mask, every tile's class, the kernels against float64 autograd."""
    steps = bar(2 + len(backends), f"check {kern.name}")
    mask = kern.mask(n, heads=heads, **inputs).numpy()
    steps.update()
    print(f"density: {mask.mean():.6f} of pairs allowed")
    pairs = dense_layout_pairs(kern, n, heads, block, inputs, mask)
    steps.update()
    if layout_report(pairs):
        return 1
    errors = []
    for backend in backends:
        err, grad_err = kernel_error(kern, inputs, n, heads, backend)
        steps.update()
        errors += [err, grad_err]
        print(f"{_what(backend)}: max |O - O_ref| = {err:.2e}, gradients {grad_err:.2e} (relative) against dense "
              f"attention and autograd in float64 (fp32, D = 64)")
    steps.close()
    if _verdict("the kernel disagrees with the dense reference", errors):
        return 1
    print("OK: the layout covers the reference mask and the kernels match dense attention")
    return 0


def sampled(kern: CompiledPattern, n: int, heads: int, block, inputs: dict, backends: list[str], seed: int) -> int:
    """At large n: SAMPLED_TILES query tiles checked over all their keys (tile classes), and
    SAMPLED_ROWS rows of each against float64 attention (O, LSE, dQ); memory O(n x block)."""
    lay = kern.layout(n, n, block[0], block[1], heads=heads, segment_ids=inputs.get("segment_ids"))
    tq = lay.shape[2]
    rng = np.random.default_rng(seed)
    tiles = np.unique(np.concatenate([[0, tq - 1], rng.choice(tq, size=min(tq, SAMPLED_TILES) - 2 if tq > 2 else 0,
                                                              replace=False)]))
    print(f"sampled: {len(tiles)} of {tq} query tiles (seed {seed}) checked over all {n} keys, {SAMPLED_ROWS} rows "
          f"of each against float64 attention; dK and dV are checked by the dense check (smaller --n)")
    steps = bar(len(tiles) + len(backends), f"check {kern.name}")
    truth, listed, rows, row_mask = [], [], [], []
    classes = np.broadcast_to(lay.classes()[0], (heads, *lay.shape[2:]))
    for t in tiles:
        block_rows = np.arange(t * block[0], min(n, (t + 1) * block[0]))
        m = row_masks(kern, n, heads, block_rows, inputs)
        truth.append(tile_classes(m, block[0], block[1])[:, 0])
        listed.append(classes[:, t])
        pick = rng.choice(len(block_rows), size=min(SAMPLED_ROWS, len(block_rows)), replace=False)
        rows.append(block_rows[pick])
        row_mask.append(m[:, pick])
        steps.update()
    if layout_report([(np.stack(truth, 1), np.stack(listed, 1))], " (sampled tiles)"):
        return 1
    rows, row_mask = np.concatenate(rows), np.concatenate(row_mask, 1)
    errors = []
    for backend in backends:
        e_o, e_lse, e_dq = sampled_kernel_error(kern, inputs, n, heads, backend, rows, row_mask)
        steps.update()
        errors += [e_o, e_lse, e_dq]
        print(f"{_what(backend)}: on {len(rows)} sampled rows, max |O - O_ref| = {e_o:.2e}, |LSE - LSE_ref| = "
              f"{e_lse:.2e}, dQ {e_dq:.2e} (relative) against float64 attention of those rows (fp32, D = 64)")
    steps.close()
    if _verdict("the kernel disagrees with the reference on a sampled row", errors):
        return 1
    print("OK: the sampled tiles' layout covers the reference mask and the kernels match dense attention on the "
          "sampled rows")
    return 0


def run(kern: CompiledPattern, n: int, heads: int, block, inputs: dict, backends: list[str] | None, seed: int) -> int:
    """`sparsec check FILE --n N`: dense up to DENSE_PAIRS pairs, sampled beyond. Content-based
    patterns are always checked dense (their reference mask needs every q and k), so only up to
    DENSE_PAIRS. backends None: triton with a GPU; else interpret and cpu, or at large n cpu
    alone (the interpreter would take minutes)."""
    large = heads * n * n > DENSE_PAIRS
    if large and "q" in inputs:
        raise ValueError(f"--n {n}: content-based patterns are checked against their dense mask, so up to "
                         f"{math.isqrt(DENSE_PAIRS // heads)} tokens at --heads {heads}")
    if large and kern.ir.score is not None:
        raise ValueError(f"--n {n}: patterns with a score expression are checked dense, so up to "
                         f"{math.isqrt(DENSE_PAIRS // heads)} tokens at --heads {heads}")
    if backends is None:
        backends = ["triton"] if torch.cuda.is_available() else ["cpu"] if large else ["interpret", "cpu"]
    print(f"pattern {kern.name}: {kern.ir.body.show()}")
    print(f"n = {n}, heads = {heads}, tile {block[0]}x{block[1]}")
    if large:
        return sampled(kern, n, heads, block, inputs, backends, seed)
    return dense(kern, n, heads, block, inputs, backends)


def examples(kern: CompiledPattern, count: int, backends: list[str] | None) -> int:
    """`check --examples N`: N calls drawn by sparsec.testing.attention_inputs (odd and unequal
    lengths, GQA, offsets, inputs) per backend, forward and backward against the float64 reference."""
    from hypothesis import HealthCheck, given, settings   # optional: pip install sparsec[testing]
    from .. import testing
    for backend in backends or (["triton"] if torch.cuda.is_available() else ["interpret", "cpu"]):
        device = "cuda" if backend == "triton" or torch.cuda.is_available() and backend == "flex" else "cpu"
        progress = tqdm(total=count, desc=f"{backend}: drawn calls", file=sys.stderr, unit="call")

        @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(testing.attention_inputs(kern, device=device))
        def one_call(call):
            testing.assert_matches_reference(kern, backend=backend, **call)
            progress.update(1)
        try:
            one_call()
        except AssertionError as e:
            progress.close()
            print(f"{backend}: FAILED on a drawn call (a sparsec bug; please report it)\n{e}")
            return 1
        progress.close()
        print(f"{backend}: {progress.n} drawn calls match the float64 reference, forward and backward")
    return 0
