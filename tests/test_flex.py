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

LOWERED = [   # every node type of runtime.mask_mods.MASK_MODS at least once; odd, unequal lengths
    "band(5) + global(2)", "causal & dilated(3, 2)", "dilated(3, 2) + sink(1)", "stride(4) + last(3)", "logsparse",
    "chunk(16) - sink(2)",
    "heads(band(4), causal & stride(3), full)", "blocks(8, band(1) + global(1) + last(1))", "full - band(2)",
    "empty + band(1)", "document & causal & band(8)", "band(n // 8) & causal", "blocks(4, heads(causal, chunk(3)))",
    "global([1, 5, 70, 70]) + band(2)", "blocks(8, global([0, 9]))",
    "random(3, seed=7) + band(1)", "blocks(8, random(2, seed=123456789012345))", "heads(random(4), causal)",
    "random(200)",   # r beyond n_k: every key
    "where((i * j + h) % 7 == 3 or abs(i - j) < isqrt(i + 1))",
    "where(ilog2(i + 1) == ilog2(j + 1) and not (i - j) // 3 == ceil_div(n_k, 50))",
    "where(max(i, j, 10) - min(i, j) <= ceil(sqrt(n_q)) + floor(log2(j + 2)) and i ** 2 >= j)",
    "where(h == 1) + band(1)",
]


@pytest.mark.parametrize("src", LOWERED)
def test_mask_mod_is_the_pattern(src):
    kern = sparsec.compile(f"pattern p = {src}")
    n_q, n_k, heads, batch = 77, 131, 3, 2
    seg = {"segment_ids": documents(batch, n_k, np.random.default_rng())} if "document" in src else {}
    got = create_mask(kern.mask_mod(n_q, n_k, heads=heads, **seg), batch, heads, n_q, n_k, device="cpu")
    assert torch.equal(got, kern.mask(n_q, n_k, heads=heads, **seg).expand(batch, heads, n_q, n_k))


SAMPLES = 50_000   # isqrt's float estimate lands one low for about 2 in 10**4 squares near 2**62


def draw_operands(name, op, rng):
    """Operands in the operator's domain, large enough to reach 64-bit corner cases."""
    count = op.arity[0] if op.arity[1] != -1 else 3
    if op.operands == "bool":
        return [rng.random(SAMPLES) < 0.5 for _ in range(count)]
    if name in ("sqrt", "log2", "ceil", "floor"):
        return [rng.uniform(0.5, 2.0 ** 50, SAMPLES) * rng.choice([1, 1e-12], SAMPLES)]
    if name in ("isqrt", "ilog2"):   # squares and powers of two, one off either side, up to 2**62
        base = rng.integers(1, 1 << 31, SAMPLES) ** 2 if name == "isqrt" else 1 << rng.integers(0, 62, SAMPLES)
        return [np.maximum(base + rng.integers(-1, 2, SAMPLES), 1)]
    if name == "**":
        return [rng.integers(-40, 40, SAMPLES), rng.integers(0, 11, SAMPLES)]
    if name in ("exp", "tanh", "sigmoid", "softplus"):   # the real functions of score expressions
        return [rng.uniform(-700, 700, SAMPLES) * rng.choice([1, 1e-3, 1e-9], SAMPLES)]
    if name == "log":
        return [rng.uniform(1e-300, 1, SAMPLES) * rng.choice([1, 1e10, 1e-200], SAMPLES)]
    if name == "/":
        return [rng.normal(0, 1e6, SAMPLES), rng.normal(0, 1, SAMPLES) + 1e-9]
    if name == "select":
        return [rng.random(SAMPLES) < 0.5, rng.integers(-99, 99, SAMPLES), rng.normal(0, 9, SAMPLES)]
    top = 1 << 31 if name == "*" else 1 << 60
    args = [rng.integers(-top, top, SAMPLES) for _ in range(count)]
    if name in ("//", "%", "ceil_div"):
        args[1] = args[1] >> rng.integers(0, 60, SAMPLES)
        args[1][args[1] == 0] = 7
    return args


TRANSCENDENTAL = ("exp", "log", "tanh", "sigmoid", "softplus")


def test_torch_ops_are_the_operators():
    """layout.expressions.TORCH_OPS against ir/operators.py's evaluators, operator by operator."""
    from sparsec.ir.operators import OPS
    from sparsec.layout.expressions import TORCH_OPS
    assert set(TORCH_OPS) == set(OPS)
    rng = np.random.default_rng()
    for name, op in OPS.items():
        args = draw_operands(name, op, rng)
        want = np.asarray(op.evaluate(None, *args))
        got = TORCH_OPS[name](*(torch.as_tensor(a) for a in args)).numpy()
        if want.dtype.kind == "f":   # torch's vectorized float64 sqrt on CPU rounds 1 ulp low at times;
            np.testing.assert_array_max_ulp(got, want, maxulp=1 if name not in TRANSCENDENTAL else 4)  # SLEEF's exp
        else:
            assert got.dtype == want.dtype and np.array_equal(got, want), (name, [a[got != want][:3] for a in args])


def test_every_node_type_is_lowered_or_declared():
    from sparsec.ir import nodes
    from sparsec.runtime.mask_mods import MASK_MODS, NO_MASK_MODS
    kinds = {getattr(nodes, name) for name in nodes.__all__} - {nodes.Pattern}
    assert kinds <= set(MASK_MODS) | set(NO_MASK_MODS) and not set(MASK_MODS) & set(NO_MASK_MODS)
    with pytest.raises(ValueError, match=r"lsh\(4, .*\) is content-based .* no mask_mod"):
        sparsec.compile("pattern p = band(3) & lsh(4)").mask_mod(64)


# ---- backend="flex": compiled FlexAttention under the layout's BlockMask ----

FLEX_CALLS = [   # (source, heads, kv_heads, n_q, n_k, documents): lowered and bits mask_mods, a sorted share
    ("band(20) + global(3)", 4, 4, 200, 200, False),
    ("causal & heads(band(8), stride(16) + sink(2))", 4, 2, 77, 203, False),   # GQA, n_q < n_k, per head
    ("document & causal", 2, 1, 190, 190, True),
    ("blocks(16, band(1) + random(2))", 2, 2, 250, 250, False),               # the int64 hash, compiled
    ("where((i + j) % 5 == 0 or i // 64 == j // 64)", 2, 2, 130, 170, False),
    ("lsh(16) & causal", 2, 1, 150, 150, False),                              # sorted: the tiles' bits
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
