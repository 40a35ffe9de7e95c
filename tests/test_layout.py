"""Block layouts: sound against the dense reference for random trees, exact for primitives, CSR consistent."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import sparsec
from sparsec.layout import build as layout_build
from sparsec.ir.tiles import EMPTY, FULL, PARTIAL
from sparsec.layout import tile_classes

from conftest import EXACT_LEAVES, LEAVES, patterns, shapes, tiles


def compiled(src):
    try:
        return sparsec.compile(f"pattern p = {src}")
    except sparsec.SparsecError:
        return None


def layout_and_truth(kern, shape, tile):
    n_q, n_k, offset, heads = shape
    mask = kern.mask(n_q, n_k, heads=heads, q_offset=offset).numpy()
    lay = kern.layout(n_q, n_k, *tile, heads=heads, q_offset=offset)
    truth = tile_classes(mask, *tile)
    return lay, np.broadcast_to(lay.classes(), truth.shape), truth, mask


def expand(lay, classes, mask):
    """The layout's own dense expansion: FULL tiles all allowed, PARTIAL tiles read the mask, EMPTY none."""
    bm, bn = lay.block_m, lay.block_n
    tokens = np.repeat(np.repeat(classes, bm, axis=-2), bn, axis=-1)[..., :lay.n_q, :lay.n_k]
    return np.where(tokens == FULL, True, np.where(tokens == PARTIAL, mask, False))


@given(patterns, shapes(), tiles)
def test_layouts_are_sound(src, shape, tile):
    kern = compiled(src)
    if kern is None:
        return
    lay, got, truth, mask = layout_and_truth(kern, shape, tile)
    assert not ((truth > EMPTY) & (got == EMPTY)).any(), "an allowed pair lies in an unlisted tile"
    assert not ((got == FULL) & (truth != FULL)).any(), "a FULL tile holds a pair that is not allowed"
    assert (expand(lay, got, mask) == mask).all()


@given(st.one_of(EXACT_LEAVES), shapes(), tiles, st.integers(1, 4))
def test_primitive_layouts_are_exact(leaf, shape, tile, b):
    """A primitive's tiles are classified exactly, token level and inside blocks(b, ...); where(...)
    of the rows alone or the keys alone too (other conditions are sound: test_layouts_are_sound)."""
    for src in (leaf, f"blocks({b}, {leaf})"):
        kern = compiled(src)
        if kern is None:
            continue
        _, got, truth, _ = layout_and_truth(kern, shape, tile)
        assert (got == truth).all(), src


@given(patterns, shapes(), tiles)
def test_layouts_built_a_band_at_a_time_are_the_same(src, shape, tile):
    """build_layout classifies query tiles in bands (memory: one band's); bands of one query tile
    must give the layout built in one piece."""
    kern = compiled(src)
    if kern is None:
        return
    n_q, n_k, offset, heads = shape
    whole = kern.layout(n_q, n_k, *tile, heads=heads, q_offset=offset)
    saved = layout_build.CHUNK_CANDIDATES
    layout_build.CHUNK_CANDIDATES = 1
    try:
        banded = kern.layout(n_q, n_k, *tile, heads=heads, q_offset=offset)
    finally:
        layout_build.CHUNK_CANDIDATES = saved
    for a, b in ((whole.full, banded.full), (whole.partial, banded.partial)):
        assert np.array_equal(a.ptr, b.ptr) and np.array_equal(a.indices, b.indices)


@given(patterns, shapes(), tiles)
def test_transposed_lists_hold_the_same_tiles(src, shape, tile):
    kern = compiled(src)
    if kern is None:
        return
    n_q, n_k, offset, heads = shape
    lay = kern.layout(n_q, n_k, *tile, heads=heads, q_offset=offset)
    b, h, tq, tk = lay.shape
    for rows, cols in ((lay.full, lay.full_t), (lay.partial, lay.partial_t)):
        by_q = {(bb, hh, t, int(x)) for bb in range(b) for hh in range(h) for t in range(tq) for x in rows.row(bb, hh, t)}
        by_k = {(bb, hh, int(x), t) for bb in range(b) for hh in range(h) for t in range(tk) for x in cols.row(bb, hh, t)}
        assert by_q == by_k
        for r in range(b * h * tq):  # indices ascend within a row
            seg = rows.indices[rows.ptr[r]:rows.ptr[r + 1]]
            assert (np.diff(seg) > 0).all()


def test_document_layout_with_packed_and_unsorted_ids():
    kern = sparsec.compile("pattern p = document & causal")
    rng = np.random.default_rng()
    n = 77
    packed = np.sort(rng.integers(0, 6, n))
    shuffled = rng.integers(0, 3, n)
    seg = np.stack([packed, shuffled])
    mask = kern.mask(n, segment_ids=seg).numpy()
    lay = kern.layout(n, block_m=8, block_n=16, segment_ids=seg)
    truth = tile_classes(mask, 8, 16)
    got = lay.classes()
    assert got.shape[0] == 2
    assert not ((truth > EMPTY) & (got == EMPTY)).any()
    assert not ((got == FULL) & (truth != FULL)).any()
    assert (got[0] == truth[0]).all()  # sorted ids: exact


def test_head_independent_layouts_broadcast_and_dependent_ones_do_not():
    assert sparsec.compile("pattern p = band(4)").layout(64, heads=8).shape[:2] == (1, 1)
    assert sparsec.compile("pattern p = band(4) + random(1)").layout(64, heads=8).shape[:2] == (1, 8)


def test_decode_rows_are_the_last_rows_of_the_full_layout():
    kern = sparsec.compile("pattern p = blocks(16, band(1) + global(1) + random(2)) + band(40, 0)")
    full = kern.layout(1000, 1000, 1, 32, heads=2).classes()
    step = kern.layout(1, 1000, 1, 32, heads=2).classes()  # q_offset defaults to n_k - n_q
    assert (step[:, :, 0] == full[:, :, -1]).all()


def test_million_token_layout_is_analytic():
    """n = 2^20 with 128-tiles: built from intervals, never from the 10^12 pairs."""
    kern = sparsec.compile("pattern p = band(256) + global(16) + blocks(64, random(2))")
    lay = kern.layout(1 << 20, block_m=128, block_n=128)
    tq = (1 << 20) // 128
    counts = lay.full.counts() + lay.partial.counts()
    # band(256) meets 5 key tiles per interior query tile (offsets -256..256 span 513 + 127 keys)
    assert (counts[0, 0, 1:-1] >= 5).all()
    assert counts[0, 0, 0] == tq  # the global rows of tile 0 see every key tile
    # at most 5 band tiles, the global row and column, and 2 block rows x 2 random key blocks per query tile
    assert 7 * tq <= lay.tiles_visited() <= (5 + 2 + 4) * tq


def test_layout_argument_errors():
    kern = sparsec.compile("pattern p = document")
    with pytest.raises(ValueError, match="segment_ids="):
        kern.layout(16)
    with pytest.raises(ValueError, match=r"segment_ids must be integers of shape \(B, n_k=16\)"):
        kern.layout(16, segment_ids=np.zeros((1, 15), int))
    with pytest.raises(ValueError, match="block_m must be at least 1"):
        sparsec.compile("pattern p = full").layout(16, block_m=0)
    with pytest.raises(TypeError, match="n_q must be an int"):
        sparsec.compile("pattern p = full").layout(16.0)


def _device_classes(lay, transposed=False):
    """Dense (B, H, tq, tk) classes from a DeviceLayout's tensors (row lists, or the transposed ones)."""
    b, h, tq, tk = lay.shape
    out = np.zeros((b * h * (tk if transposed else tq), tq if transposed else tk), np.int8)
    for (ptr, idx), cls in (((lay.partial_t if transposed else lay.partial), PARTIAL),
                            ((lay.full_t if transposed else lay.full), FULL)):
        ptr = ptr.numpy()
        owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
        out[owner, idx.numpy()[:ptr[-1]]] = cls
    out = out.reshape(b, h, *((tk, tq) if transposed else (tq, tk)))
    return out.swapaxes(-1, -2) if transposed else out


@given(src=st.sampled_from(["document", "document & causal", "document & causal & band(7)",
                            "document & heads(band(3), stride(4))", "document & (band(2) + global(1))",
                            "blocks(2, band(1)) & document"]),
       lengths=st.lists(st.lists(st.integers(1, 20), min_size=1, max_size=6), min_size=1, max_size=3),
       shuffle=st.booleans(), tile=st.sampled_from([(1, 1), (4, 4), (3, 5), (16, 16)]), n_q=st.integers(1, 40))
def test_document_layouts_built_on_device_equal_the_host_ones(src, lengths, shuffle, tile, n_q):
    """DocumentLayouts (torch, the tensors' device) against build_layout (numpy, host) and the dense mask."""
    import torch
    from sparsec import passes
    from sparsec.layout.documents import DocumentLayouts, static_part
    from sparsec.layout import build_layout
    n = max(sum(row) for row in lengths)
    n_q = min(n_q, n)
    seg = np.stack([np.repeat(np.arange(len(row) + 1), row + [n - sum(row)]) for row in lengths])
    if shuffle:   # ids not sorted: a document need not be contiguous
        seg = np.random.default_rng(len(seg)).permutation(seg.T).T.copy()
    kern = sparsec.compile(f"pattern p = {src}")
    body = passes.specialize(kern.ir, n_q, n, n - n_q, 2)
    (static,) = static_part(body)
    heads = 2
    docs = DocumentLayouts.of(None if static is None else build_layout(static, n_q, n, *tile, n - n_q, heads),
                              n_q, n, n - n_q, *tile, torch.device("cpu"))
    lay = docs.build(torch.as_tensor(seg, dtype=torch.int32))
    got = _device_classes(lay)
    assert np.array_equal(_device_classes(lay, transposed=True), got)
    host = kern.layout(n_q, n, *tile, heads=heads, segment_ids=seg)
    assert np.array_equal(np.broadcast_to(got, (len(seg), heads, *got.shape[2:])),
                          np.broadcast_to(host.classes(), (len(seg), heads, *got.shape[2:])))
    truth = tile_classes(kern.mask(n_q, n, heads=heads, segment_ids=seg).numpy(), *tile)
    assert ((truth == EMPTY) | (np.broadcast_to(got, truth.shape) != EMPTY)).all()
    assert ((np.broadcast_to(got, truth.shape) != FULL) | (truth == FULL)).all()
    rows = (np.diff(lay.full[0].numpy()) + np.diff(lay.partial[0].numpy())).max(initial=0)
    assert rows <= lay.longest_row
