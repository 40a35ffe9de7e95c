"""kern.block_mask: FlexAttention's BlockMask built from sparsec's layout. Through Flex's own
create_mask it must be kern.mask everywhere, and its block lists must be the layout's tiles."""
import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import sparsec
from sparsec.ir.tiles import EMPTY, FULL
from sparsec.tools.bench import documents

CASES = [   # (source, n_q, n_k, heads, batch, block, documents)
    ("band(20) + global(3)", 300, 300, 2, 1, 64, False),                       # static
    ("causal & heads(band(8), stride(16) + sink(2))", 150, 270, 2, 2, 32, False),   # per head, n_q < n_k
    ("document & causal", 257, 257, 3, 2, 64, True),                           # documents: per batch row
    ("blocks(16, band(1) + random(2))", 200, 200, 1, 1, 128, False),
]


@pytest.mark.parametrize("src, n_q, n_k, heads, batch, block, docs", CASES)
def test_block_mask_is_the_pattern(src, n_q, n_k, heads, batch, block, docs):
    kern = sparsec.compile(f"pattern p = {src}")
    seg = {"segment_ids": documents(batch, n_k, np.random.default_rng())} if docs else {}
    bm = kern.block_mask(n_q, n_k, heads=heads, batch=batch, block=block, **seg)
    got = create_mask(bm.mask_mod, batch, heads, n_q, n_k, device="cpu")
    want = kern.mask(n_q, n_k, heads=heads, **seg).expand(batch, heads, n_q, n_k)
    assert torch.equal(got, want)
    lay = kern.layout(n_q, n_k, block, block, heads=heads, **seg)
    classes = torch.as_tensor(np.broadcast_to(lay.classes(), (batch, heads, *lay.shape[2:])).copy())
    visited = bm.to_dense().bool()   # every listed tile, FULL or PARTIAL
    assert torch.equal(visited, classes > EMPTY)
    full = torch.zeros_like(visited)
    counts, indices = bm.full_kv_num_blocks, bm.full_kv_indices
    for b, h, t in np.ndindex(*counts.shape):
        full[b, h, t, indices[b, h, t, :counts[b, h, t]]] = True
    assert torch.equal(full, classes == FULL)


def test_block_mask_errors():
    with pytest.raises(ValueError, match="content-based"):
        sparsec.compile("pattern p = lsh(4)").block_mask(64)
    doc = sparsec.compile("pattern p = document")
    with pytest.raises(ValueError, match="batch=3, but segment_ids has 2 rows"):
        doc.block_mask(64, batch=3, segment_ids=torch.zeros(2, 64, dtype=torch.long))


# ---- kern.mask_mod: the IR lowered to torch ops ----

LOWERED = [   # every node type of runtime.flex.MASK_MODS at least once; odd, unequal lengths
    "band(5) + global(2)", "causal & dilated(3, 2)", "dilated(3, 2) + sink(1)", "stride(4) + last(3)", "logsparse",
    "chunk(16) - sink(2)",
    "heads(band(4), causal & stride(3), full)", "blocks(8, band(1) + global(1) + last(1))", "full - band(2)",
    "empty + band(1)", "document & causal & band(8)", "band(n // 8) & causal", "blocks(4, heads(causal, chunk(3)))",
    "global([1, 5, 70, 70]) + band(2)", "blocks(8, global([0, 9]))",
]


@pytest.mark.parametrize("src", LOWERED)
def test_mask_mod_is_the_pattern(src):
    kern = sparsec.compile(f"pattern p = {src}")
    n_q, n_k, heads, batch = 77, 131, 3, 2
    seg = {"segment_ids": documents(batch, n_k, np.random.default_rng())} if "document" in src else {}
    got = create_mask(kern.mask_mod(n_q, n_k, heads=heads, **seg), batch, heads, n_q, n_k, device="cpu")
    assert torch.equal(got, kern.mask(n_q, n_k, heads=heads, **seg).expand(batch, heads, n_q, n_k))


def test_every_node_type_is_lowered_or_declared():
    from sparsec.ir import nodes
    from sparsec.runtime.flex import MASK_MODS, NO_MASK_MODS
    kinds = {getattr(nodes, name) for name in nodes.__all__} - {nodes.Pattern}
    assert kinds <= set(MASK_MODS) | set(NO_MASK_MODS) and not set(MASK_MODS) & set(NO_MASK_MODS)
    with pytest.raises(ValueError, match=r"random\(2, seed=0\) has no torch lowering yet.*kern.block_mask"):
        sparsec.compile("pattern p = band(3) + random(2)").mask_mod(64)


# ---- backend="flex": compiled FlexAttention under the layout's BlockMask ----

FLEX_CALLS = [   # (source, heads, kv_heads, n_q, n_k, documents): lowered and bits mask_mods, a sorted share
    ("band(20) + global(3)", 4, 4, 200, 200, False),
    ("causal & heads(band(8), stride(16) + sink(2))", 4, 2, 77, 203, False),   # GQA, n_q < n_k, per head
    ("document & causal", 2, 1, 190, 190, True),
    ("blocks(16, band(1) + random(2))", 2, 2, 250, 250, False),               # no torch rule: the tiles' bits
    ("lsh(16) & causal", 2, 1, 150, 150, False),                              # one sorted share
]


@pytest.mark.parametrize("src, heads, kv_heads, n_q, n_k, docs", FLEX_CALLS)
def test_flex_backend_is_the_cpu_path(src, heads, kv_heads, n_q, n_k, docs):
    kern = sparsec.compile(f"pattern p = {src}")
    batch, gen = 2, torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    q = torch.randn(batch, heads, n_q, 32, generator=gen)
    k, v = (torch.randn(batch, kv_heads, n_k, 32, generator=gen) for _ in range(2))
    seg = {"segment_ids": documents(batch, n_k, np.random.default_rng())} if docs else {}
    with torch.no_grad():
        got = kern(q, k, v, scale=0.3, backend="flex", **seg)
    want = kern(q, k, v, scale=0.3, backend="cpu", **seg)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_flex_backend_on_cpu_refuses_what_needs_the_lse():
    q = torch.randn(1, 2, 64, 16)
    kern = sparsec.compile("pattern p = causal")
    with pytest.raises(ValueError, match="backend='flex' on CPU.*forward-only"):
        kern(q, q, q, backend="flex", return_lse=True)
    with pytest.raises(ValueError, match="backend='flex' on CPU"):
        kern(q.clone().requires_grad_(), q, q, backend="flex")
    with pytest.raises(ValueError, match="several shares"):
        sparsec.compile("pattern p = lsh(4) + band(2)")(q, q, q, backend="flex")
