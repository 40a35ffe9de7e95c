"""Gradients: dq, dk, dv of the generated backward kernels (interpreter) and of the CPU path against
autograd through dense masked attention in float64, on inputs drawn fresh each run."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsec

from conftest import KERNEL_EXAMPLES, patterns
from test_kernel import DTYPES, dense_attention, drawn_case, kernel_shapes, synthetic_inputs

# max |g - g_ref| / max(1, max |g_ref|): gradients pass through two more roundings of P and dS
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def check_gradients(kern, backend, B, Hq, Hkv, n_q, n_k, D, dtype, q_offset=None, seed=None, segment_ids=None,
                    lse_weight=True, inputs=None, call_inputs=None):
    """Loss = <O, dO> + <LSE, dLSE> over rows with an allowed key; its gradients in q, k, v (on
    fresh Gaussian inputs, or `inputs`; `runtime`: the call's inputs)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    q = torch.randn(B, Hq, n_q, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, n_k, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, n_k, D, generator=gen).to(dtype)
    if inputs is not None:
        q, k, v = inputs
    do = torch.randn(B, Hq, n_q, D, generator=gen)
    dlse = torch.randn(B, Hq, n_q, generator=gen) if lse_weight else torch.zeros(B, Hq, n_q)
    if call_inputs is None:
        call_inputs = synthetic_inputs(kern, B, n_k, rng) if segment_ids is None else {"segment_ids": segment_ids}
    content = {"q": q, "k": k} if {"q", "k"} & kern.needs else {}
    mask = kern.mask(n_q, n_k, heads=Hq, q_offset=q_offset, **content, **call_inputs)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = kern(*leaves, q_offset=q_offset, return_lse=True, backend=backend, **call_inputs)
    loss = (o.double() * do).sum()
    if lse_weight:
        loss = loss + (torch.where(torch.isneginf(lse), 0.0, lse).double() * dlse).sum()
    got = torch.autograd.grad(loss, leaves)

    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want_o, want_lse = dense_attention(mask, *ref, 1 / math.sqrt(D))
    ref_loss = (want_o * do).sum() + (torch.where(torch.isneginf(want_lse), 0.0, want_lse) * dlse).sum()
    want = torch.autograd.grad(ref_loss, ref)

    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype, f"{name}: {g.shape} {g.dtype}"
        assert not g.isnan().any(), f"{backend} {name}: NaN"
        err = (g.double() - w).abs().max().item() / max(1.0, w.abs().max().item())
        assert err < GRAD_TOLERANCE[dtype], f"{backend} {dtype} {name}: relative error {err:.2e}"
    empty = ~mask.any(-1)                      # (B or 1, Hq, n_q): rows with no allowed key
    assert (got[0][empty.expand(B, Hq, n_q)] == 0).all(), "rows with no allowed key must get dq = 0"
    return got


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@settings(max_examples=KERNEL_EXAMPLES)
@given(src=patterns, shape=kernel_shapes)
def test_random_pattern_gradients_match_dense_autograd(backend, src, shape):
    case = drawn_case(src, shape)
    if case is not None:
        check_gradients(case[0], backend, *case[1])


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@pytest.mark.parametrize("src", ["band(3) + global(2)", "blocks(8, band(1) + global(1) + random(2))",
                                 "heads(band(2), stride(3), full) & causal", "lsh(4, rounds=2) & causal",
                                 "causal & (topk(2, block=8, causal=true) + chunk(8))"])
def test_gradients_with_grouped_heads(backend, src):
    """GQA and MQA: dK/dV sum over the query heads that share a K/V head."""
    kern = sparsec.compile(f"pattern p = {src}")
    for Hq, Hkv in ((4, 2), (3, 1)):
        check_gradients(kern, backend, 2, Hq, Hkv, 37, 45, 16, torch.float32)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_gradients_of_empty_rows_are_zero(backend):
    kern = sparsec.compile("pattern p = band(2) - where(i % 5 == 0)")   # rows 0, 5, 10, ... see nothing
    dq, _, _ = check_gradients(kern, backend, 1, 2, 2, 23, 23, 16, torch.float32)
    assert (dq[:, :, ::5] == 0).all()


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@settings(max_examples=max(5, KERNEL_EXAMPLES // 3))
@given(lengths=st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=5), min_size=1, max_size=2),
       band=st.integers(0, 20), dtype=st.sampled_from(list(DTYPES)))
def test_document_causal_gradients_with_random_segments(backend, lengths, band, dtype):
    """Packed documents of random lengths (one layout per batch row) under document & causal & band."""
    n = max(sum(row) for row in lengths)
    # each batch row: its documents back to back, then one more filling the rest up to n
    seg = torch.as_tensor(np.stack([np.repeat(np.arange(len(row) + 1), row + [n - sum(row)]) for row in lengths]))
    kern = sparsec.compile(f"pattern p = document & causal & band({band})")
    check_gradients(kern, backend, len(lengths), 2, 1, n, n, 16, DTYPES[dtype], segment_ids=seg)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_lse_gradient_is_optional(backend):
    """Without LSE in the loss, the backward takes no dLSE (its gradient arrives as None)."""
    kern = sparsec.compile("pattern p = band(4) & causal")
    check_gradients(kern, backend, 1, 2, 2, 30, 30, 16, torch.float32, lse_weight=False)
    q, k, v = (torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(3))
    kern(q, k, v, backend=backend).sum().backward()
    assert all(x.grad is not None and not x.grad.isnan().any() for x in (q, k, v))


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_autograd_saves_outputs_not_scores(backend):
    """What the backward keeps: q, k, v, O and LSE (the layout lives with the runner), no n x n."""
    kern = sparsec.compile("pattern p = band(4) + global(1)")
    q, k, v = (torch.randn(1, 2, 300, 16, requires_grad=True) for _ in range(3))
    o = kern(q, k, v, backend=backend)
    saved = o.grad_fn.saved_tensors
    assert [tuple(x.shape) for x in saved] == [(1, 2, 300, 16)] * 4 + [(1, 2, 300)]


def test_no_graph_without_requires_grad():
    kern = sparsec.compile("pattern p = band(4)")
    q = torch.randn(1, 1, 20, 16)
    assert kern(q, q, q).grad_fn is None
    q.requires_grad_()
    assert kern(q, q, q).grad_fn is not None
    with torch.no_grad():
        assert kern(q, q, q).grad_fn is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("src", ["band(256) + global(16)", "blocks(64, band(1) + global(1) + last(1) + random(3))",
                                 "causal & heads(band(64), stride(64))", "document & causal & band(100)"])
def test_gpu_gradients_match_dense_autograd(src, dtype):
    """The generated backward kernels on the GPU, GQA and odd lengths, against float64 autograd."""
    kern = sparsec.compile(f"pattern p = {src}")
    for n_q, n_k, D in ((1000, 1000, 64), (777, 2049, 128)):
        q, k, v = torch.randn(2, 4, n_q, D, device="cuda"), *(torch.randn(2, 2, n_k, D, device="cuda") for _ in range(2))
        seg = {}
        if "document" in src:
            seg = {"segment_ids": torch.sort(torch.randint(0, 5, (2, n_k), device="cuda"), 1).values}
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        do = torch.randn(2, 4, n_q, D, device="cuda")
        o = kern(*leaves, **seg)
        got = torch.autograd.grad(o.float(), leaves, do)
        ref = [x.detach().double().requires_grad_() for x in leaves]
        want_o, _ = dense_attention(kern.mask(n_q, n_k, heads=4, **{k_: s.cpu() for k_, s in seg.items()}).cuda(),
                                    *ref, 1 / math.sqrt(D))
        want = torch.autograd.grad(want_o, ref, do.double())
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            err = (g.double() - w).abs().max().item() / max(1.0, w.abs().max().item())
            assert err < GRAD_TOLERANCE[dtype], f"{src} {dtype} {name}: {err:.2e}"
