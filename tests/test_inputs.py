"""Call-time inputs (spec section 6) in where(...): `input` declarations and NAME[...] reads parse,
print back and fail with located errors; the dense reference applies them (checked against numpy
formulas written here); layouts classify tiles from the inputs' values (sound: every allowed pair in
a listed tile, every FULL tile fully allowed), and the CPU path and the generated kernels (under
Triton's interpreter) run them, forward and backward, against float64, as do Flex's mask_mod,
BlockMask and backend='flex'."""
import numpy as np
import pytest
import torch

import sparsec
from sparsec import testing
from sparsec.passes import PASSES

PROGRAM = """
param w = 16
input span(b, h, n_k) int
input keep(b, h, ceil_div(n_q, w), ceil_div(n_k, w)) bool
input valid(b, n_k) bool
input sigma(b, h, ceil_div(n_q, w)) int
input rel(h, 2 * w + 1) float
pattern expire = causal & where(i - j < span[b, h, j])
pattern learned = blocks(w, where(keep[b, h, i, j]))
pattern padded = (band(8) + global(2)) & where(valid[b, j])
pattern sinkhorn = blocks(w, band(0) + where(j == sigma[b, h, i]))
pattern biased = band(w) & where(rel[h, j - i + w] > 0)
"""
NAMES = ["expire", "learned", "padded", "sinkhorn", "biased"]


def reparse(d):
    return sparsec.compile(d.show(), pattern=d.name).source_ir


@pytest.mark.parametrize("name", NAMES)
def test_programs_with_inputs_round_trip_through_every_pass(name):
    d = sparsec.compile(PROGRAM, pattern=name).source_ir
    assert d.inputs and reparse(d) == d
    for _, run in PASSES:
        d = run(d)
        assert reparse(d) == d
    assert "w" not in d.show().split("pattern")[0]   # the dims' params are folded with the body's


def test_only_the_inputs_a_pattern_reads_are_its_own():
    kern = sparsec.compile(PROGRAM, pattern="padded")
    assert [d.name for d in kern.ir.inputs] == ["valid"] and kern.needs == {"valid"}
    assert sparsec.compile(PROGRAM, pattern="padded", w=4).ir == kern.ir   # w does not reach it


def draw(rng, B=2, H=3, n=50, w=16):
    t = -(-n // w)
    return dict(span=rng.integers(0, 20, (B, H, n)), keep=rng.random((B, 1, t, t)) < 0.4,
                valid=rng.random((B, n)) < 0.8, sigma=rng.integers(-1, t + 1, (B, H, t)),
                rel=rng.normal(size=(H, 2 * w + 1)))


def expected(name, x, B=2, H=3, n=50, w=16):
    """Each pattern's mask written with numpy alone, (B, H, n, n)."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    blocks = lambda m: np.repeat(np.repeat(m, w, -2), w, -1)[..., :n, :n]
    if name == "expire":
        out = (i >= j) & ((i - j) < x["span"][:, :, None, :])
    elif name == "learned":
        out = blocks(x["keep"])
    elif name == "padded":
        out = ((np.abs(i - j) <= 8) | (i < 2) | (j < 2)) & x["valid"][:, None, None, :]
    elif name == "sinkhorn":   # block row I keeps its own block and block sigma[I] (out of range: none)
        t = -(-n // w)
        I, J = np.arange(t)[:, None], np.arange(t)[None, :]
        out = blocks((I == J) | (J == x["sigma"][:, :, :, None]))
    else:   # rel[h, j - i + w] > 0 inside the band, 0 (false) for an index out of range
        at = j - i + w
        inside = (at >= 0) & (at <= 2 * w)
        out = (np.abs(i - j) <= w) & inside & (x["rel"][:, np.clip(at, 0, 2 * w)] > 0)[None]
    return np.broadcast_to(out, (B, H, n, n))


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_mask_reads_the_inputs(name):
    rng = np.random.default_rng()
    x = draw(rng)
    kern = sparsec.compile(PROGRAM, pattern=name)
    mine = {d.name: x[d.name] for d in kern.ir.inputs}
    got = kern.mask(50, heads=3, **mine).numpy()
    assert np.array_equal(np.broadcast_to(got, (2, 3, 50, 50)), expected(name, x))


def test_reads_out_of_range_are_false_and_size_one_axes_broadcast():
    kern = sparsec.compile("input g(b, h, 8) bool\npattern p = where(g[b, h, i])")
    g = np.ones((1, 1, 8), bool)
    m = kern.mask(12, heads=2, g=g).numpy()
    assert m.shape == (1, 2, 12, 12) and m[:, :, :8].all() and not m[:, :, 8:].any()
    ints = sparsec.compile("input s(n_k) int\npattern p = where(s[j + 3] == 0)")
    m = ints.mask(10, s=np.arange(1, 11)).numpy()   # s > 0 inside; a read past the end is 0
    assert np.array_equal(m[0, 0, 0], np.arange(10) >= 7)


def test_the_float64_reference_attention_uses_them():
    kern = sparsec.compile(PROGRAM, pattern="padded")
    q, k, v = (torch.randn(2, 3, 50, 16, dtype=torch.float64) for _ in range(3))
    valid = np.random.default_rng().random((2, 50)) < 0.8
    o, lse = testing.reference(kern, q, k, v, valid=torch.as_tensor(valid))
    mask = torch.as_tensor(expected("padded", {"valid": valid}).copy())
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask, -torch.inf)
    want = torch.nan_to_num(torch.softmax(s, -1)) @ v
    torch.testing.assert_close(o, want)


ERRORS = [   # (program, message, line:col)
    ("input x(b, n_k) bool\npattern p = where(y[b, j])", "unknown input 'y'", "2:19"),
    ("input x(b, n_k) bool\npattern p = where(x[b, j, i])", "'x' has 2 dim(s) (b, n_k), indexed here with 3",
     "2:19"),
    ("input x(b, n_k) bool\npattern p = where(x[b, j] + 1 > 0)", "'x' is a bool input, used here as a number",
     "2:19"),
    ("input x(b, n_k) int\npattern p = where(x[b, j])", "'x' is an int input, used here as a condition", "2:19"),
    ("input x(b, n_k) bool\npattern p = band(x[b, 0])", "inputs are read inside where(...) and with expressions only", "2:18"),
    ("input x(b, n_k) bool\npattern p = where(b == 0)", "'b' (the batch row) is only defined in the index", "2:19"),
    ("input x(b, i) bool\npattern p = full", "not 'i'", "1:12"),
    ("input x(b) double\npattern p = full", "an input's type is one of bool, int, float, found 'double'", "1:12"),
    ("input x(b) bool\ninput x(h) int\npattern p = full", "'x' is already defined", "2:1"),
    ("input x(b, n_k) bool\npattern p = where(x)", "'x' is an input: read one element, x[...]", "2:19"),
    ("pattern p = band(2)\npattern q = where(p[i])", "'p' is a pattern, not an input", "2:19"),
]


@pytest.mark.parametrize("src, message, where", ERRORS)
def test_misuse_is_a_located_error(src, message, where):
    with pytest.raises(sparsec.SparsecError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as e:
        sparsec.compile(src)
    assert f"<string>:{where}:" in str(e.value)


@pytest.mark.parametrize("dim", ["n_k - 40", "2147483647", "9223372036854775808"])
def test_an_input_dim_beyond_its_limits_is_located(dim):
    """Dims lie within 0..2**30 (reads index positions and blocks): the fuzzer's 2**63 and
    2**31 - 1 were a torch overflow and a 34 GB allocation."""
    kern = sparsec.compile(f"input big(b, {dim}) int\npattern p = where(big[b, j] > 0)")
    with pytest.raises(sparsec.SparsecError, match=r"dims must be within 0\.\.2\*\*30") as info:
        kern.mask(20, big=np.zeros((1, 1), np.int64))   # checked before its shape
    assert info.value.span is not None and info.value.span.line == 1


def test_inputs_are_checked_by_name_shape_and_type():
    kern = sparsec.compile(PROGRAM, pattern="expire")
    span = np.zeros((2, 3, 40), np.int64)
    with pytest.raises(ValueError, match=r"reads the input span: pass span= \(span\(b, h, n_k\) int\)"):
        kern.mask(40, heads=3)
    with pytest.raises(ValueError, match="valid= given, but pattern expire reads no input of that name"):
        kern.mask(40, heads=3, span=span, valid=np.ones((2, 40), bool))
    with pytest.raises(ValueError, match=r"span must have shape \(b=2, h=3, 40\) \(b and h may be 1\), got \(2, 3, 39\)"):
        kern.mask(40, heads=3, span=span[..., :39])
    with pytest.raises(TypeError, match="span is declared int, got an array of float64"):
        kern.mask(40, heads=3, span=span.astype(float))
    with pytest.raises(ValueError, match=r"int inputs hold values within \+-\(2\*\*31 - 1\)"):
        kern.mask(40, heads=3, span=span + 2**40)
    assert kern.mask(40, heads=3, span=span[:1, :1]).shape == (1, 3, 40, 40)   # b and h broadcast


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("block", [8, 16, 32])
def test_layouts_from_inputs_are_sound(name, block):
    from sparsec.ir.tiles import EMPTY, FULL
    from sparsec.layout.build import tile_classes
    x = draw(np.random.default_rng())
    kern = sparsec.compile(PROGRAM, pattern=name)
    mine = {d.name: x[d.name] for d in kern.ir.inputs}
    lay = kern.layout(50, block_m=block, block_n=block, heads=3, **mine)
    got = np.broadcast_to(lay.classes(), (2, 3, *lay.shape[2:]))
    true = tile_classes(expected(name, x), block, block)
    assert ((true == EMPTY) | (got > EMPTY)).all(), "an allowed pair outside every listed tile"
    assert ((got != FULL) | (true == FULL)).all(), "a FULL tile with a pair not allowed"


def test_expire_span_tiles_come_from_per_tile_extremes():
    """causal & i - j < span[j] with every span 10: tiles 16 wide beyond one tile of the diagonal
    are EMPTY, found from each key tile's span range, not from any pair."""
    kern = sparsec.compile(PROGRAM, pattern="expire")
    lay = kern.layout(160, block_m=16, block_n=16, span=np.full((1, 1, 160), 10))
    cls = lay.classes()[0, 0]
    t = np.arange(10)
    assert (cls[t[:, None] - t[None, :] >= 2] == 0).all() and (cls[t, t] > 0).all()


def test_a_read_that_can_leave_its_input_counts_its_zero():
    """rel > 0 everywhere, read at j - i + 4: outside 0..8 the read is 0, so far tiles are EMPTY and
    none of the tiles the index leaves inside is FULL."""
    from sparsec.ir.tiles import FULL
    from sparsec.layout.build import tile_classes
    kern = sparsec.compile("input rel(9) float\npattern p = where(rel[j - i + 4] > 0)")
    rel = np.random.default_rng().uniform(0.5, 1.0, 9)
    lay = kern.layout(64, block_m=8, block_n=8, rel=rel)
    true = tile_classes(kern.mask(64, rel=rel).numpy(), 8, 8)
    assert ((lay.classes() != FULL) | (true == FULL)).all() and (true > 0).sum() < true.size


# ---- the device build (layout/input_tiles.py): per call, on the inputs' device ----

LIBRARY_READS = [("sparsebert", "sparsebert"), ("adaptive", "adaptive"), ("sinkhorn", "sinkhorn_causal"),
                 ("sinkhorn", "sinkhorn"), ("expire_span", "expire"), ("expire_span", "expire_span")]


def both_layouts(kern, inputs: dict, heads: int, n_q: int, n_k: int, block_m: int, block_n: int, batch: int = 2):
    """(builder name, host layout, device layout as host lists) of one call's share 0."""
    from sparsec import pipeline
    from sparsec.layout.choose import choose
    from sparsec.runtime.call import check_call
    q, k = torch.zeros(batch, heads, n_q, 16), torch.zeros(batch, heads, n_k, 16)
    call = check_call(kern.name, kern.needs, q, k, k, None, None, inputs)
    values, bodies, _ = kern._prepare(call, q, k, inputs)
    r = kern._request(0, bodies[0], call, values, None, block_m, block_n)
    cache = {}
    cached = lambda key, make: cache[key] if key in cache else cache.setdefault(key, make())
    host = pipeline.build_layout(r, cached, "host")
    return choose(r, cached).name, host, pipeline.build_layout(r, cached, "device").to_host(n_q, n_k, n_k - n_q)


def assert_sound_and_no_looser(kern, inputs, heads, n_q, n_k, block_m, block_n):
    """The device layout covers every allowed pair, its FULL tiles hold only allowed pairs, and it
    lists no tile the host build leaves out nor calls FULL a tile the host calls PARTIAL."""
    from sparsec.ir.tiles import EMPTY, FULL
    from sparsec.layout.build import tile_classes
    name, host, dev = both_layouts(kern, inputs, heads, n_q, n_k, block_m, block_n)
    assert name == "declared inputs on the device"
    shape = (2, heads, *dev.shape[2:])
    got, hosts = np.broadcast_to(dev.classes(), shape), np.broadcast_to(host.classes(), shape)
    mask = np.broadcast_to(kern.mask(n_q, n_k, heads=heads, **inputs).numpy(), (2, heads, n_q, n_k))
    true = tile_classes(mask, block_m, block_n)
    assert ((true == EMPTY) | (got > EMPTY)).all(), "an allowed pair outside every listed tile"
    assert ((got != FULL) | (true == FULL)).all(), "a FULL tile with a pair not allowed"
    assert ((got == EMPTY) | (hosts > EMPTY)).all() and ((got != FULL) | (hosts == FULL)).all()
    return got, hosts, true


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("block_m, block_n, n_q, n_k", [(8, 8, 50, 50), (16, 8, 37, 61), (8, 32, 50, 50),
                                                        (32, 16, 29, 70)])
def test_device_layouts_from_inputs_are_sound_and_no_looser_than_the_host(name, block_m, block_n, n_q, n_k):
    """Inputs drawn fresh, unequal tiles and lengths (q_offset = n_k - n_q); against the dense
    reference mask and the host build (ir/intervals.py), an independent walk of the same rules."""
    rng = np.random.default_rng()
    t_q, t_k = -(-n_q // 16), -(-n_k // 16)   # keep's and sigma's block rows are the query positions'
    x = dict(span=rng.integers(0, 20, (2, 3, n_k)), keep=rng.random((2, 1, t_q, t_k)) < 0.4,
             valid=rng.random((2, n_k)) < 0.8, sigma=rng.integers(-1, t_k + 1, (2, 3, t_q)),
             rel=rng.normal(size=(3, 33)))
    kern = sparsec.compile(PROGRAM, pattern=name)
    mine = {d.name: torch.as_tensor(x[d.name]) for d in kern.ir.inputs}
    assert_sound_and_no_looser(kern, mine, 3, n_q, n_k, block_m, block_n)


@pytest.mark.parametrize("path, name", LIBRARY_READS)
def test_library_layouts_from_inputs_are_built_on_the_device(path, name):
    """The library's learned and adaptive patterns (blocks of 16 here) take the device build; for
    block-level inputs at tiles of the block size it lists exactly the true tiles."""
    kern = sparsec.compile(path, pattern=name, block=16) if "span" not in path else sparsec.compile(
        path, pattern=name, ramp=4)
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    inputs = testing.draw_inputs(kern, 2, 3, {"n": 80, "n_q": 80, "n_k": 80}, gen)
    mine = {n: x for n, x in inputs.items() if n not in kern.score_only}   # expire_span's gate reads it in with
    got, _, true = assert_sound_and_no_looser(kern, mine, 3, 80, 80, 16, 16)
    if "span" not in path:
        assert (got == true).all()


def test_device_layouts_cost_the_tiles_not_the_pairs():
    """At n = 2^18 (2^36 pairs: a dense mask could not be made here) Expire-Span's and Sinkhorn's
    layouts come from per-tile extremes and one key per block row (spans below 300: 4 tiles a row)."""
    n, rng = 1 << 18, np.random.default_rng()
    expire = sparsec.compile(PROGRAM, pattern="expire")
    span = torch.as_tensor(rng.integers(0, 300, (1, 1, n)))
    _, host, dev = both_layouts(expire, {"span": span}, 1, n, n, 128, 128, batch=1)
    assert dev.tiles_visited() <= 4 * (n // 128) and dev.tiles_visited() == host.tiles_visited()
    sinkhorn = sparsec.compile("patterns/sinkhorn.sa", pattern="sinkhorn")
    sigma = torch.as_tensor(rng.integers(0, n // 64, (1, 2, n // 64)))
    _, _, dev = both_layouts(sinkhorn, {"sigma": sigma}, 2, n, n, 64, 64, batch=1)
    assert dev.tiles_visited() <= 2 * 2 * (n // 64)


GLOBAL_TOKENS = "input g(b, n_k) bool\npattern p = band(4) + where(g[b, i] or g[b, j])"


@pytest.mark.parametrize("block_m, block_n, n_q, n_k", [(8, 8, 60, 60), (16, 8, 37, 61)])
def test_runtime_global_tokens_are_lines_of_tiles(block_m, block_n, n_q, n_k):
    """where(g[b, i] or g[b, j]): a row condition and a key condition, each classified per query
    or key tile and listed across; sound, and no looser than the host build."""
    kern = sparsec.compile(GLOBAL_TOKENS)
    g = torch.as_tensor(np.random.default_rng().random((2, n_k)) < 0.05)
    assert_sound_and_no_looser(kern, {"g": g}, 1, n_q, n_k, block_m, block_n)


def test_line_conditions_never_classify_every_tile(monkeypatch):
    """At n = 2^18 (a 2048 x 2048 grid of 128-tiles), three global tokens list the band and their
    rows and columns; the all-tiles rule is never reached."""
    from sparsec.layout import input_tiles

    def every_tile(sp):
        raise AssertionError("classified every tile")
    monkeypatch.setattr(input_tiles, "_all_tiles", every_tile)
    n = 1 << 18
    g = torch.zeros(1, n, dtype=torch.bool)
    g[0, [5, 70000, 200000]] = True
    _, host, dev = both_layouts(sparsec.compile(GLOBAL_TOKENS), {"g": g}, 1, n, n, 128, 128, batch=1)
    tiles = n // 128
    assert dev.tiles_visited() <= 3 * tiles + 2 * 3 * tiles and dev.tiles_visited() == host.tiles_visited()


def test_input_parts_without_a_device_rule_keep_the_host_build():
    kern = sparsec.compile("input valid(b, n_k) bool\npattern p = band(8) - where(valid[b, j])")
    valid = torch.as_tensor(np.random.default_rng().random((2, 40)) < 0.5)
    name, host, dev = both_layouts(kern, {"valid": valid}, 1, 40, 40, 8, 8)
    assert name == "declared inputs" and (host.classes() == dev.classes()).all()


CALLS = [   # (pattern, heads, kv_heads, n_q, n_k)
    ("expire", 4, 2, 50, 50), ("learned", 2, 2, 37, 61), ("padded", 3, 1, 50, 50), ("sinkhorn", 2, 1, 50, 50),
    ("biased", 2, 2, 45, 70), ("edges", 2, 1, 40, 40),
]
EDGE = "input edge(h, 9) float\npattern edges = where(edge[h, j - i + 4] > 0 or i == j)\n"


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("name, heads, kv_heads, n_q, n_k", CALLS)
def test_calls_read_them_forward_and_backward(name, heads, kv_heads, n_q, n_k, backend):
    """The CPU path and the generated kernels (forward, dQ, dK/dV) against float64 autograd of
    the reference, inputs drawn fresh; `edges` reads outside its input at most pairs."""
    rng = np.random.default_rng()
    t_q, t_k = -(-n_q // 16), -(-n_k // 16)
    inputs = dict(span=rng.integers(0, 30, (2, heads, n_k)), keep=rng.random((2, heads, t_q, t_k)) < 0.4,
                  valid=rng.random((1, n_k)) < 0.8, sigma=rng.integers(-1, t_k + 1, (2, heads, t_q)),
                  rel=rng.normal(size=(heads, 33)), edge=rng.uniform(0.5, 1, (1, 9)))
    kern = sparsec.compile(PROGRAM + EDGE, pattern=name)
    mine = {d.name: torch.as_tensor(inputs[d.name]) for d in kern.ir.inputs}
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    q = torch.randn(2, heads, n_q, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, n_k, 16, generator=gen) for _ in range(2))
    testing.assert_matches_reference(kern, q, k, v, backend=backend, **mine)


@pytest.mark.parametrize("name", NAMES + ["edges"])
def test_flex_reads_them(name):
    """Flex's mask_mod (through Flex's create_mask) and BlockMask are kern.mask; backend='flex'
    (compiled Flex under that mask) is the CPU path."""
    from torch.nn.attention.flex_attention import create_mask
    rng = np.random.default_rng()
    x = {**draw(rng), "edge": rng.uniform(0.5, 1, (1, 9))}
    kern = sparsec.compile(PROGRAM + EDGE, pattern=name)
    mine = {d.name: torch.as_tensor(x[d.name]) for d in kern.ir.inputs}
    want = torch.as_tensor(np.broadcast_to(kern.mask(50, heads=3, **mine).numpy(), (2, 3, 50, 50)).copy())
    assert torch.equal(create_mask(kern.mask_mod(50, heads=3, **mine), 2, 3, 50, 50, device="cpu"), want)
    bm = kern.block_mask(50, heads=3, batch=2, block=16, **mine)
    assert torch.equal(create_mask(bm.mask_mod, 2, 3, 50, 50, device="cpu"), want)
    visited = bm.to_dense().bool().repeat_interleave(16, 2).repeat_interleave(16, 3)[..., :50, :50]
    assert not (want & ~visited).any()   # every allowed pair in a listed tile
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(kern(q, k, v, backend="flex", **mine), kern(q, k, v, backend="cpu", **mine))


def test_calls_check_inputs_from_shape_dtype_and_extremes():
    """A call checks a tensor input from its metadata and an int input's two extremes
    (runtime/call.TensorFacts), never a host copy of the whole; the messages name torch's dtype."""
    kern = sparsec.compile(PROGRAM, pattern="expire")
    q = torch.randn(2, 3, 40, 16)
    span = torch.zeros(2, 3, 40, dtype=torch.int64)
    with pytest.raises(TypeError, match="span is declared int, got an array of float32"):
        kern(q, q, q, span=span.float())
    with pytest.raises(ValueError, match=r"span must have shape \(b=2, h=3, 40\)"):
        kern(q, q, q, span=span[..., :39])
    with pytest.raises(ValueError, match=r"int inputs hold values within \+-\(2\*\*31 - 1\), got -3..1099511627776"):
        kern(q, q, q, span=torch.cat([span[..., :1] - 3, span[..., 1:] + 2**40], -1))
    from sparsec.runtime.call import TensorFacts
    facts = TensorFacts(torch.tensor([[5, -2], [7, 1]]))
    assert (facts.min(), facts.max(), facts.shape, facts.dtype.kind) == (-2, 7, (2, 2), "i")


def test_calls_check_the_inputs():
    kern = sparsec.compile(PROGRAM, pattern="padded")
    q = torch.randn(1, 1, 32, 16)
    valid = torch.ones(1, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"valid must have shape \(b=1, 32\)"):
        kern(q, q, q, valid=valid[:, :31])
    with pytest.raises(TypeError, match="unexpected keyword argument span="):
        kern(q, q, q, valid=valid, span=valid)
    with pytest.raises(ValueError, match="reads the input valid: pass valid="):
        kern(q, q, q)
    with pytest.raises(ValueError, match="b axes have size 2, but q has batch 1"):
        kern(q, q, q, valid=torch.ones(2, 32, dtype=torch.bool))
    layouts = kern.share_layouts(q, q, valid=valid)
    assert len(layouts) == 1 and layouts[0][1].shape[0] == 1


# ---- topk(k, block=B, by=NAME): key blocks ranked by a given tensor ----

TOPK_BY = """input s(b, h, ceil_div(n_q, 16), ceil_div(n_k, 16)) float
pattern p = topk(1, block=16, by=s)"""


def test_topk_by_keeps_the_highest_ranked_block_and_ties_go_to_the_smaller():
    """The mask against the rule written out: query block I keeps key block argmax_J s[b, h, I - I0, J]
    (the first of equal ones), I0 the call's first query block."""
    kern = sparsec.compile(TOPK_BY)
    base = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.1, 0.0], [-1.0, -2.0, -3.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    q = k = torch.randn(1, 1, 64, 16)
    for q_offset, n_q in ((0, 64), (16, 48), (20, 44), (63, 1)):
        s = base[:-(-n_q // 16)][None, None]   # (1, 1, ceil_div(n_q, 16), 4)
        got = kern.mask(n_q, 64, q_offset=q_offset, q=q[:, :, :n_q], k=k, s=s)[0, 0].numpy()
        row = (np.arange(n_q) + q_offset) // 16 - q_offset // 16
        keep = base.numpy()[row].argmax(axis=1)   # argmax takes the first of equal values
        want = (np.arange(64)[None, :] // 16) == keep[:, None]
        assert (got == want).all(), (q_offset, n_q)


def test_sparsek_example_of_the_spec_runs_on_both_backends():
    """Spec section 7's sparsek: a causal window, blocks chosen by blockscore, a gate in with; O,
    LSE and the gradients of q, k, v and the gate against float64 autograd of the reference."""
    src = ("input gate(b, h, n_k) float\ninput blockscore(b, h, ceil_div(n_q, 16), ceil_div(n_k, 16)) float\n"
           "pattern sparsek = causal & (band(16, 0) + topk(2, block=16, by=blockscore)) with score + log(gate[b, h, j])")
    kern = sparsec.compile(src)
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, v = (torch.randn(2, 2, 90, 16, generator=gen) for _ in range(3))
    gate = torch.rand(2, 2, 90, generator=gen) * 0.9 + 0.1
    blockscore = torch.randn(2, 1, 6, 6, generator=gen)   # the h axis broadcast
    want = [x.double().requires_grad_() for x in (q, k, v, gate)]
    want_o, _ = testing.reference(kern, *want[:3], gate=want[3], blockscore=blockscore.double())
    do = torch.randn(want_o.shape, dtype=torch.float64, generator=gen)
    want_grads = torch.autograd.grad(want_o, want, do)
    for backend in ("cpu", "interpret"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
        o = kern(*leaves[:3], gate=leaves[3], blockscore=blockscore, backend=backend)
        assert torch.allclose(o.double(), want_o, atol=2e-5), backend
        for g, w in zip(torch.autograd.grad(o, leaves, do.float()), want_grads):
            assert torch.allclose(g.double(), w, atol=2e-4), backend


@pytest.mark.parametrize("src, message", [
    ("pattern p = topk(1, block=16, by=nothing)", "by= takes the name of a declared input"),
    ("input s(b, h, n_q) float\npattern p = topk(1, block=16, by=s)", "by=s: topk ranks key blocks by a float input"),
    ("input s(b, h, 4, 4) int\npattern p = topk(1, block=16, by=s)", "by=s: topk ranks key blocks by a float input"),
])
def test_topk_by_misuse_is_a_located_error(src, message):
    with pytest.raises(sparsec.SparsecError, match=message) as info:
        sparsec.compile(src)
    assert info.value.span.line == src.count("\n") + 1 and src.splitlines()[-1][info.value.span.column - 1:].startswith(
        src.split("by=")[1].split(")")[0])
