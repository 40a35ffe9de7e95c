"""SparseSelfAttention: the module equals its own projections around dense masked attention; GQA,
segment_ids and a KV cache pass through; gradients reach every parameter."""
import math

import pytest
import torch

import sparsec
from sparsec import SparseSelfAttention

from test_kernel import dense_attention


def reference(mod, x, mask):
    """The module's computation written out with float64 dense attention."""
    B, n, E = x.shape
    split = lambda y, h: y.double().view(B, -1, h, mod.head_dim).transpose(1, 2)
    q, k, v = split(mod.q_proj(x), mod.num_heads), split(mod.k_proj(x), mod.num_kv_heads), split(mod.v_proj(x), mod.num_kv_heads)
    o, _ = dense_attention(mask, q, k, v, 1 / math.sqrt(mod.head_dim))
    return torch.nn.functional.linear(o.transpose(1, 2).reshape(B, n, E), mod.out_proj.weight.double(),
                                      mod.out_proj.bias.double())


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_module_matches_dense_attention_and_trains(backend, heads, kv_heads, monkeypatch):
    monkeypatch.setenv("SPARSEC_BACKEND", backend)
    mod = SparseSelfAttention("patterns/longformer.sa", 64, heads, kv_heads, pattern_name="longformer", w=3, g=2)
    x = torch.randn(2, 30, 64)
    y = mod(x)
    assert y.shape == x.shape
    want = reference(mod, x, mod.kernel.mask(30, 30, heads=heads))
    assert torch.allclose(y.double(), want, atol=1e-5)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


def test_segment_ids_and_kv_cache_pass_through():
    mod = SparseSelfAttention("pattern p = document & causal & band(8)", 32, 2)
    x = torch.randn(1, 24, 32)
    seg = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([5, 12, 7]))[None]
    full = mod(x, segment_ids=seg)
    assert torch.allclose(full.double(), reference(mod, x, mod.kernel.mask(24, 24, heads=2, segment_ids=seg)),
                          atol=1e-5)
    # decoding: the first 20 tokens fill the cache, then 4 one-token steps reproduce the last rows
    _, cache = mod(x[:, :20], segment_ids=seg[:, :20], use_cache=True)
    for t in range(20, 24):
        y, cache = mod(x[:, t: t + 1], segment_ids=seg[:, : t + 1], past_kv=cache, use_cache=True)
        assert torch.allclose(y, full[:, t: t + 1], atol=1e-5)


def test_module_argument_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        SparseSelfAttention("pattern p = causal", 30, 4)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        SparseSelfAttention("pattern p = causal", 32, 4, 3)
    with pytest.raises(ValueError, match="pattern is already compiled"):
        SparseSelfAttention(sparsec.compile("pattern p = causal"), 32, 4, w=3)
    mod = SparseSelfAttention("pattern p = causal", 32, 2)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, n, embed_dim=32\)"):
        mod(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"past_kv must be two tensors of shape"):
        mod(torch.randn(1, 1, 32), past_kv=(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)))
