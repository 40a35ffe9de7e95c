"""Kernels against dense attention in float64: the generated Triton kernel (interpreter) and the CPU path."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsec

from conftest import KERNEL_EXAMPLES, patterns

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |O - O_ref| / max(1, max |O_ref|): fp32 far under 1e-3; fp16/bf16 round P and O to 11/8 bits
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def dense_attention(mask, q, k, v, scale):
    """Masked softmax attention in float64, written from the definition (spec section 1).
    Differentiable everywhere: rows with no allowed key take their softmax over zeros, which
    `where` then discards, so their gradients are 0 rather than NaN."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    some = mask.any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(some, s.masked_fill(~mask, float("-inf")), 0.0), -1, keepdim=True)
    p = torch.where(mask, torch.exp(s - lse), 0.0)
    return p @ v, torch.where(some, lse, float("-inf")).squeeze(-1)


def synthetic_inputs(kern, batch, n_k, rng):
    if "segment_ids" not in kern.needs:
        return {}
    # packed documents: sorted ids, a few lengths drawn fresh
    return {"segment_ids": torch.as_tensor(np.sort(rng.integers(0, 4, (batch, n_k)), axis=1))}


def check(kern, backend, B, Hq, Hkv, n_q, n_k, D, dtype, q_offset=None, scale=None, seed=None, inputs=None,
          call_inputs=None):
    """O and LSE against dense attention under kern.mask, on fresh Gaussian q, k, v (or `inputs`)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    q = torch.randn(B, Hq, n_q, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, n_k, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, n_k, D, generator=gen).to(dtype)
    if inputs is not None:
        q, k, v = inputs
    call_inputs = synthetic_inputs(kern, B, n_k, rng) if call_inputs is None else call_inputs
    content = {"q": q, "k": k} if {"q", "k"} & kern.needs else {}
    mask = kern.mask(n_q, n_k, heads=Hq, q_offset=q_offset, **content, **call_inputs)
    want_o, want_lse = dense_attention(mask, q, k, v, scale or 1 / math.sqrt(D))
    o, lse = kern(q, k, v, scale=scale, q_offset=q_offset, return_lse=True, backend=backend, **call_inputs)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == (B, Hq, n_q) and lse.dtype == torch.float32
    assert o.is_contiguous() and lse.is_contiguous()
    assert not o.isnan().any() and not lse.isnan().any(), "NaN in the output"
    err = (o.double() - want_o).abs().max().item() / max(1.0, want_o.abs().max().item())
    assert err < TOLERANCE[dtype], f"{backend} {dtype}: relative error {err:.2e}"
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with no allowed key must have LSE = -inf"
    assert (o[empty] == 0).all(), "rows with no allowed key must be 0"
    assert torch.allclose(lse[~empty].double(), want_lse[~empty], atol=1e-4, rtol=1e-4)
    return o


def compiled(src):
    try:
        return sparsec.compile(f"pattern p = {src}")
    except sparsec.SparsecError:
        return None


def drawn_case(src, shape):
    """(kernel, check's arguments after the backend) for a drawn pattern and shape, or None when
    the pattern is rejected or its arguments only go bad for these lengths (band(n_q - 9))."""
    kern = compiled(src)
    if kern is None:
        return None
    B, (Hq, Hkv), n_q, n_k, D, dtype, q_offset = shape
    try:
        kern.mask(n_q, n_k, heads=Hq, q_offset=q_offset)
    except sparsec.SparsecError:
        return None
    return kern, (B, Hq, Hkv, n_q, n_k, D, DTYPES[dtype], q_offset)


kernel_shapes = st.tuples(
    st.integers(1, 2),                     # B
    st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)]),  # (Hq, Hkv): MHA, MQA, GQA
    st.integers(1, 40), st.integers(1, 40),                        # n_q, n_k: odd, unequal
    st.sampled_from([16, 24, 32]),         # D, 24 padded to 32
    st.sampled_from(list(DTYPES)),
    st.one_of(st.none(), st.integers(-3, 40)),                     # q_offset
)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@settings(max_examples=KERNEL_EXAMPLES)
@given(src=patterns, shape=kernel_shapes)
def test_random_patterns_match_dense_attention(backend, src, shape):
    case = drawn_case(src, shape)
    if case is not None:
        check(case[0], backend, *case[1])


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@pytest.mark.parametrize("src", [
    "document & causal", "document & band(3)", "lsh(4, rounds=2) & causal", "cluster(3, iters=2) + band(1)",
    "topk(2, block=8) + chunk(8)", "causal & (topk(2, block=8, causal=true) + chunk(8))",
    "where(isqrt(i) == isqrt(j) or ilog2(j + 1) == 3)", "band(isqrt(n)) & causal", "heads(band(2), stride(3), full)",
    "blocks(8, band(1) + global(1) + last(1) + random(3))", "global([0, 7, 33]) + sink(2) - band(1, -1)",
])
def test_synthetic_inputs_and_tables(backend, src):
    kern = sparsec.compile(f"pattern p = {src}")
    for n_q, n_k in ((37, 37), (29, 45)):
        check(kern, backend, 2, 4, 2, n_q, n_k, 16, torch.float32)


# one compiled pattern called with heads, batch, dtype and length changing in turn: every cache
# kept per shape (plans, tables, layouts, schedules) must see each change (issue 20)
CALL_SEQUENCE = [   # (B, Hq, Hkv, n_q, n_k, dtype)
    (1, 4, 4, 40, 40, torch.float32), (1, 4, 2, 40, 40, torch.float32), (1, 4, 1, 40, 40, torch.float32),
    (2, 4, 2, 40, 40, torch.float32), (2, 4, 2, 40, 40, torch.float16), (1, 2, 2, 40, 40, torch.bfloat16),
    (1, 4, 2, 33, 47, torch.float32), (3, 4, 4, 33, 47, torch.float32), (1, 4, 4, 40, 40, torch.float32),
]


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("src", ["band(5) + global(2) + random(2)", "document & causal", "lsh(4) & causal",
                                 "causal & (topk(1, block=8, causal=true) + chunk(8))", "heads(band(3), stride(4))"])
def test_one_kernel_serves_every_shape_in_turn(backend, src):
    kern = sparsec.compile(f"pattern p = {src}")
    for B, Hq, Hkv, n_q, n_k, dtype in CALL_SEQUENCE:
        check(kern, backend, B, Hq, Hkv, n_q, n_k, 16, dtype)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_empty_rows_are_zero_with_lse_minus_inf(backend):
    kern = sparsec.compile("pattern p = band(2) - where(i % 5 == 0)")   # rows 0, 5, 10, ... see nothing
    o = check(kern, backend, 1, 2, 2, 23, 23, 16, torch.float32)
    assert (o[:, :, ::5] == 0).all()


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_decode_steps_are_the_last_rows_of_the_full_computation(backend):
    kern = sparsec.compile("patterns/longformer.sa")
    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    full = kern(q, k, v, backend=backend)
    for n_q in (1, 3, 16):
        step = kern(q[:, :, -n_q:], k, v, backend=backend)
        assert torch.allclose(step, full[:, :, -n_q:], atol=1e-5)


@pytest.mark.parametrize("src", ["band(40) + global(3)", "causal & random(4, seed=2)", "document & causal",
                                 "where(j % 3 == 0) - full"])
def test_split_key_decoding_merges_to_the_full_rows(src):
    """Decoding with one to 16 query rows: the generated forward splits each row of key tiles over
    several programs (flash-decoding) and merges them by LSE; rows still equal the full computation."""
    from sparsec.layout import DeviceLayout
    from sparsec.runtime.launch import decode_splits
    from sparsec.runtime.call import check_call
    kern = sparsec.compile(f"pattern p = {src}")
    seg = {"segment_ids": torch.as_tensor(np.repeat([0, 1, 2], [50, 90, 60]))[None]} if "document" in src else {}
    q, k, v = torch.randn(1, 2, 200, 16), torch.randn(1, 1, 200, 16), torch.randn(1, 1, 200, 16)
    full, full_lse = kern(q, k, v, return_lse=True, backend="cpu", **seg)
    for n_q in (1, 5, 16):
        call = check_call("p", kern.needs, q[:, :, -n_q:], k, v, None, None, seg)
        lay = DeviceLayout.of(kern.layout(n_q, 200, 16, 16, **seg), torch.device("cpu"))
        assert decode_splits(call, lay, interpret=True) > 1 or lay.longest_row <= 1   # (nothing to split)
        o, lse = kern(q[:, :, -n_q:], k, v, return_lse=True, backend="interpret", **seg)
        assert torch.allclose(o, full[:, :, -n_q:], atol=1e-5) and (o[lse.isneginf()] == 0).all()
        assert torch.equal(lse.isneginf(), full_lse[:, :, -n_q:].isneginf())
        assert torch.allclose(lse[~lse.isneginf()], full_lse[:, :, -n_q:][~lse.isneginf()], atol=1e-5)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_non_contiguous_inputs_and_scale(backend):
    kern = sparsec.compile("pattern p = band(4) + global(2)")
    q, k, v = (torch.randn(2, 33, 3, 20).transpose(1, 2) for _ in range(3))   # (B, H, n, D) views
    assert not q.is_contiguous()
    got = kern(q, k, v, scale=0.3, backend=backend)
    want = kern(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3, backend=backend)
    assert torch.allclose(got, want, atol=1e-6)
    mask = kern.mask(33, 33, heads=3)
    assert torch.allclose(got.double(), dense_attention(mask, q, k, v, 0.3)[0], atol=1e-5)


def test_backend_from_the_environment(monkeypatch):
    kern = sparsec.compile("pattern p = causal")
    q = torch.randn(1, 1, 5, 16)
    monkeypatch.setenv("SPARSEC_BACKEND", "interpret")
    assert torch.allclose(kern(q, q, q), kern(q, q, q, backend="cpu"), atol=1e-6)
    monkeypatch.setenv("SPARSEC_BACKEND", "gpu")
    with pytest.raises(ValueError, match="backend must be one of triton, interpret, cpu"):
        kern(q, q, q)


@pytest.mark.parametrize("call, error, message", [
    (lambda f, q: f(q.numpy(), q, q), TypeError, r"q must be a torch.Tensor of shape \(B, H, n, D\)"),
    (lambda f, q: f(q[0], q, q), ValueError, r"q must have 4 dimensions \(B, H, n, D\), got shape \(2, 8, 16\)"),
    (lambda f, q: f(q, q.double(), q), TypeError, "k must be float32, float16 or bfloat16"),
    (lambda f, q: f(q, q.half(), q.half()), TypeError, "q, k and v must share a dtype"),
    (lambda f, q: f(q, q.to("meta"), q), ValueError, "q, k and v must be on one device"),
    (lambda f, q: f(q, q[:, :, :, :8], q), ValueError, r"k must be \(B=1, Hkv, n_k, D=16\)"),
    (lambda f, q: f(q, q, q[:, :, :3]), ValueError, r"v must have k's shape \(1, 2, 8, 16\)"),
    (lambda f, q: f(q, *[torch.randn(1, 3, 8, 16)] * 2), ValueError, r"q's heads \(2\) must be a multiple of"),
    (lambda f, q: f(q[..., :8], q[..., :8], q[..., :8]), ValueError, "head dim D must be between 16 and 256"),
    (lambda f, q: f(q, q, q, scale="big"), TypeError, "scale must be a finite float"),
    (lambda f, q: f(q, q, q, q_offset=1.5), TypeError, "q_offset must be an int"),
    (lambda f, q: f(q, q, q, segment=1), TypeError, "unexpected keyword argument segment="),
    (lambda f, q: f(q, q, q, backend="triton"), ValueError, "backend='triton' needs CUDA tensors"),
    (lambda f, q: f(q, q, q, segment_ids=torch.zeros(1, 8, dtype=torch.long)), ValueError, "has no document part"),
])
def test_bad_arguments_name_what_was_expected(call, error, message):
    kern = sparsec.compile("pattern p = causal")
    with pytest.raises(error, match=message):
        call(kern, torch.randn(1, 2, 8, 16))


def test_runtime_input_errors():
    doc = sparsec.compile("pattern p = document")
    q = torch.randn(2, 1, 8, 16)
    with pytest.raises(ValueError, match=r"pass segment_ids= of shape \(B=2, n_k=8\)"):
        doc(q, q, q)
    with pytest.raises(ValueError, match=r"segment_ids must be an integer tensor of shape \(B=2, n_k=8\)"):
        doc(q, q, q, segment_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="document: query positions"):
        doc(q, q, q, q_offset=3, segment_ids=torch.zeros(2, 8, dtype=torch.long))
    lsh = sparsec.compile("pattern p = lsh(4)")
    with pytest.raises(ValueError, match=r"rotations must be a tensor of shape \(rounds, D=16, buckets/2\)"):
        lsh(q, q, q, rotations=torch.randn(1, 8, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("src", ["band(256) + global(16)", "blocks(64, band(1) + global(1) + last(1) + random(3))",
                                 "causal & heads(band(64), stride(64))", "document & causal & band(100)",
                                 "lsh(16) & causal"])
def test_gpu_kernels_match_dense_attention(src, dtype):
    kern = sparsec.compile(f"pattern p = {src}")
    for (n_q, n_k, D) in ((1000, 1000, 64), (777, 2049, 128), (3, 2048, 96)):
        rng = np.random.default_rng()
        q = torch.randn(2, 4, n_q, D, device="cuda").to(dtype)
        k, v = (torch.randn(2, 2, n_k, D, device="cuda").to(dtype) for _ in range(2))
        call_inputs = {k_: x.cuda() for k_, x in synthetic_inputs(kern, 2, n_k, rng).items()}
        content = {"q": q, "k": k} if {"q", "k"} & kern.needs else {}
        mask = kern.mask(n_q, n_k, heads=4, **content, **call_inputs).cuda()
        want, want_lse = dense_attention(mask, q, k, v, 1 / math.sqrt(D))
        o, lse = kern(q, k, v, return_lse=True, **call_inputs)
        err = (o.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        tol = 3e-3 if dtype == torch.float32 else TOLERANCE[dtype]   # fp32 dots may run as tf32
        assert not o.isnan().any() and err < tol, f"relative error {err:.2e}"
