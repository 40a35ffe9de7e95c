"""Content-based patterns (lsh, cluster, topk) at call time: shares, ids computed on the device,
sorted layouts, and the kernels (interpreter and CPU path) against dense attention under the mask
the reference computes independently (numpy, ir/content.py) from the same q, k and inputs."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsec
from sparsec.layout import SortedOrder, selections
from sparsec.runtime import content as content_ids
from sparsec.ir.content import Cluster, Lsh, LshRound, TopK
from sparsec.ir.tiles import FULL, EMPTY, Grid, TableSpace
from sparsec.layout import build_layout, tile_classes
from sparsec.runtime.call import check_call

from conftest import KERNEL_EXAMPLES, LEAVES
from test_gradients import check_gradients
from test_kernel import DTYPES, check

CONTENT = [
    st.builds("lsh({}, rounds={}, seed={})".format, st.sampled_from([2, 4, 8]), st.integers(1, 3), st.integers(0, 3)),
    st.builds("cluster({}, iters={}, seed={})".format, st.integers(1, 5), st.integers(0, 3), st.integers(0, 3)),
    st.builds("topk({}, block={}, causal={})".format, st.integers(1, 3), st.sampled_from([4, 8]),
              st.sampled_from(["true", "false"])),
]
positional = st.one_of(LEAVES)
content = st.one_of(CONTENT)
content_patterns = st.one_of(
    content,
    st.builds("{} & {}".format, content, positional),
    st.builds("{} + {}".format, content, positional),
    st.builds("{} & ({} + {})".format, positional, content, positional),
    st.builds("({} + {}) - {}".format, content, content, positional),
    st.builds("{} & {} + {}".format, content, positional, content),
    st.builds("{} & heads({}, {})".format, positional, positional, content),
)


def draw_inputs(kind, B, Hq, Hkv, n_q, n_k, D, dtype, gen):
    """q, k, v of one kind: gaussian; heavy (most rows near one direction, so one bucket or
    cluster holds most tokens); ties (rows repeated from a few vectors of -1/0/1 entries, some
    zero: equal ids, tied scores and argmax ties)."""
    v = torch.randn(B, Hkv, n_k, D, generator=gen)
    if kind == "gaussian":
        q, k = torch.randn(B, Hq, n_q, D, generator=gen), torch.randn(B, Hkv, n_k, D, generator=gen)
    elif kind == "heavy":
        u = torch.randn(D, generator=gen)
        near = lambda *s: u + 0.1 * torch.randn(*s, D, generator=gen)
        q, k = near(B, Hq, n_q), near(B, Hkv, n_k)
        q[..., ::7, :] = torch.randn(q[..., ::7, :].shape, generator=gen)   # a few elsewhere
    else:
        pool = torch.randint(-1, 2, (4, D), generator=gen).float()
        pool[0] = 0.0
        pick = lambda *s: pool[torch.randint(0, 4, s, generator=gen)]
        q, k = pick(B, Hq, n_q), pick(B, Hkv, n_k)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference_masks(kern, share_bodies, n_q, n_k, q_offset, q, k):
    """The reference mask of each share body and of the whole body, (B, H, n_q, n_k) bool."""
    B, H = q.shape[:2]
    space = TableSpace(n_q, n_k, q_offset, H, B, inputs={"q": q, "k": k})
    pos, keys = np.arange(n_q) + q_offset, np.arange(n_k)
    body = sparsec.passes.specialize(kern.ir, n_q, n_k, q_offset, H)
    out = np.zeros((len(share_bodies) + 1, B, H, n_q, n_k), bool)
    for b in range(B):
        for h in range(H):
            grid = Grid(pos, keys, n_q, n_k, h, space.per_head(b, h))
            for s, p in enumerate([*share_bodies, body]):
                out[s, b, h] = p.mask(grid)
    return out[:-1], out[-1]


@settings(max_examples=max(60, 3 * KERNEL_EXAMPLES))
@given(src=content_patterns, n_q=st.integers(1, 30), n_k=st.integers(1, 30), offset=st.integers(0, 10),
       seed=st.integers(0, 1 << 30))
def test_shares_are_disjoint_and_cover_the_pattern(src, n_q, n_k, offset, seed):
    """Every allowed pair is in exactly one share, and no share has a pair the pattern lacks."""
    try:
        kern = sparsec.compile(f"pattern p = {src}")
        bodies = [sparsec.passes.specialize(s.body, n_q, n_k, offset, 2) for s in kern.shares]
    except sparsec.SparsecError:
        return
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2, n_q, 16, generator=gen), torch.randn(2, 2, n_k, 16, generator=gen)
    shares, whole = reference_masks(kern, bodies, n_q, n_k, offset, q.numpy(), k.numpy())
    assert np.array_equal(shares.sum(0), whole.astype(int))
    for share, s in zip(kern.shares, shares):
        if share.key is not None:    # a sorted share only has pairs its buckets agree on
            key = reference_masks(kern, [sparsec.passes.specialize(share.key, n_q, n_k, offset, 2)], n_q, n_k, offset, q.numpy(), k.numpy())[0][0]
            assert not (s & ~key).any()


def test_shares_of_the_library_shapes():
    split = lambda src: [(s.key and s.key.show(), s.body.show(), s.full)
                         for s in sparsec.compile(f"pattern p = {src}").shares]
    lsh1 = "lsh(8, rounds=1, seed=0)"
    assert split("lsh(8)") == [(lsh1, lsh1, True)]
    assert split("lsh(8) & causal") == [(lsh1, f"{lsh1} & causal", False)]
    r = [f"lsh(8, rounds=2, seed=0).round({i})" for i in range(2)]
    assert split("lsh(8, rounds=2)") == [(r[0], r[0], True), (r[1], f"{r[1]} - {r[0]}", False)]
    c = "cluster(4, iters=10, seed=0)"
    assert split("causal & (cluster(4) + band(16, 0))") == [
        (None, "band(16, 0)", False), (c, f"causal & {c} - band(16, 0)", False)]
    moba = "causal & (topk(2, block=16, causal=true) + chunk(16))"   # one order: positions
    assert split(moba) == [(None, moba, False)]
    assert split("heads(band(3), cluster(4))") == [   # the Routing Transformer's local / routing heads
        (None, "heads(band(3), empty)", False), (c, f"heads(empty, {c}) - heads(band(3), empty)", False)]
    assert split("(lsh(4) + band(2)) - causal")[1][1] == "lsh(4, rounds=1, seed=0) - causal - (band(2) - causal)"
    assert len(split("band(3) - cluster(2)")) == 1   # a bucketing on the right of - stays positional


def test_share_masks_and_their_errors():
    """kern.mask(share=i) is share i's pairs: together the shares' masks are the pattern's."""
    kern = sparsec.compile("pattern p = causal & (cluster(3) + band(4, 0))")
    q, k = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    masks = [kern.mask(30, heads=2, q=q, k=k, share=i) for i in range(len(kern.shares))]
    assert len(masks) == 2 and torch.equal(sum(m.int() for m in masks), kern.mask(30, heads=2, q=q, k=k).int())
    with pytest.raises(ValueError, match=r"share must be below 2 \(pattern p runs as 2 shares\), got 2"):
        kern.mask(30, heads=2, q=q, k=k, share=2)


def reference_ids(node, q, k, **inputs):
    """The reference's (numpy) q ids and k ids, or top-k choices, of every (b, h), stacked as the
    runtime's: (B, H, ...)."""
    B, H = q.shape[:2]
    space = TableSpace(q.shape[2], k.shape[2], 0, H, B, inputs={"q": q, "k": k, **inputs})
    per_head = [[space.per_head(b, h) for h in range(H)] for b in range(B)]
    if isinstance(node, TopK):
        return (np.array([[node.selection(r)[1] for r in row] for row in per_head]),)
    ids = [[node.compute_ids(r) for r in row] for row in per_head]
    return tuple(np.array([[x[side] for x in row] for row in ids]) for side in (0, 1))


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "ties"])
@pytest.mark.parametrize("node, given", [
    (Lsh(*map(sparsec.ir.expr.Const, (8, 3, 5))), None),
    (Lsh(*map(sparsec.ir.expr.Const, (4, 2, 0))), "rotations"),
    (LshRound(*map(sparsec.ir.expr.Const, (6, 3, 1)), 2), None),
    (Cluster(*map(sparsec.ir.expr.Const, (5, 4, 2))), None),
    (Cluster(*map(sparsec.ir.expr.Const, (3, 0, 0))), "centroids"),
    (TopK(*map(sparsec.ir.expr.Const, (2, 8, True))), None),
    (TopK(*map(sparsec.ir.expr.Const, (3, 4, False))), None),
])
def test_device_ids_equal_the_reference(node, given, kind):
    """ids and selections computed in torch (routing.py) equal the numpy reference exactly."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, _ = draw_inputs(kind, 2, 4, 2, 45, 37, 16, torch.float32, gen)
    inputs = {}
    if given == "rotations":
        inputs["rotations"] = torch.randn(2, 16, 2, generator=gen)
    if given == "centroids":
        inputs["centroids"] = torch.randn(4, 3, 16, generator=gen)
    call = check_call("p", frozenset({"q", "k"}), q, k, k, None, 0, inputs)
    got = content_ids.content_values([node], q, k, call, inputs)[node]
    want = reference_ids(node, q.numpy(), k.numpy(), **{name: x.numpy() for name, x in inputs.items()})
    assert np.array_equal(got[0].numpy(), want[0])
    if isinstance(node, TopK):
        table = got[1].numpy()   # each row lists exactly its chosen blocks, padded with -1
        for row, chosen in zip(table.reshape(-1, table.shape[-1]), want[0].reshape(-1, want[0].shape[-1])):
            assert sorted(row[row >= 0]) == list(np.flatnonzero(chosen))
    else:
        assert np.array_equal(got[1].numpy(), want[1])


@pytest.mark.parametrize("src", ["lsh(4)", "lsh(4) & causal", "lsh(8, rounds=3) & band(20)", "lsh(2) & band(9, -4)",
                                 "cluster(3) + band(2)", "cluster(5, iters=1) & chunk(16) + lsh(2)",
                                 "causal & heads(band(4, 0), cluster(3))"])
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "ties"])
def test_sorted_layouts_are_sound(src, kind):
    """In its sorted order, a share's layout visits every tile holding one of its pairs, and its
    FULL tiles hold only allowed pairs."""
    kern = sparsec.compile(f"pattern p = {src}")
    n_q, n_k, bm, bn = 53, 61, 8, 16
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, _ = draw_inputs(kind, 2, 2, 1, n_q, n_k, 16, torch.float32, gen)
    bodies = [sparsec.passes.specialize(s.body, n_q, n_k, n_k - n_q, 2) for s in kern.shares]
    masks, _ = reference_masks(kern, bodies, n_q, n_k, n_k - n_q, q.numpy(), k.numpy())
    for (share, lay, order), mask in zip(kern.share_layouts(q, k, bm, bn), masks):   # what a call builds
        if order is None:
            continue
        in_order = np.take_along_axis(np.take_along_axis(mask, order[0][..., None], 2), order[1][:, :, None, :], 3)
        want, got = tile_classes(in_order, bm, bn), lay.classes()
        assert not ((want > EMPTY) & (got == EMPTY)).any(), "a tile with allowed pairs is skipped"
        assert not ((got == FULL) & (want != FULL)).any(), "a FULL tile has a pair that is not allowed"
        if share.full:
            assert (got == FULL).any() or not (want == FULL).any()
        if "heads" in src:   # heads whose slot is empty in this share get no tiles at all
            assert (got[:, 0::2] == EMPTY).all() and (got[:, 1::2] > EMPTY).any()


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@settings(max_examples=KERNEL_EXAMPLES)
@given(src=content_patterns, kind=st.sampled_from(["gaussian", "heavy", "ties"]),
       shape=st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 40),
                       st.integers(1, 40), st.sampled_from([16, 24]), st.sampled_from(list(DTYPES)),
                       st.one_of(st.none(), st.integers(0, 30))),
       seed=st.integers(0, 1 << 30))
def test_content_patterns_match_dense_attention(backend, src, kind, shape, seed):
    """Forward and gradients against float64 dense attention under the reference mask."""
    B, (Hq, Hkv), n_q, n_k, D, dtype, q_offset = shape
    try:
        kern = sparsec.compile(f"pattern p = {src}")
        kern.mask(n_q, n_k, heads=Hq, q_offset=q_offset, q=torch.zeros(B, Hq, n_q, D), k=torch.zeros(B, Hkv, n_k, D))
    except sparsec.SparsecError:
        return
    gen = torch.Generator().manual_seed(seed)
    inputs = draw_inputs(kind, B, Hq, Hkv, n_q, n_k, D, DTYPES[dtype], gen)
    args = (kern, backend, B, Hq, Hkv, n_q, n_k, D, DTYPES[dtype], q_offset)
    check(*args, inputs=inputs, call_inputs={})
    check_gradients(*args, inputs=inputs, call_inputs={})


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_given_rotations_and_centroids_override_the_seeded_ones(backend):
    """Learned routing: rotations= and centroids= at call time decide the buckets."""
    kern = sparsec.compile("pattern p = lsh(4, rounds=2) & causal + cluster(3)")
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, v = draw_inputs("gaussian", 2, 4, 2, 40, 40, 16, torch.float32, gen)
    given = {"rotations": torch.randn(2, 16, 2, generator=gen), "centroids": torch.randn(4, 3, 16, generator=gen)}
    check(kern, backend, 2, 4, 2, 40, 40, 16, torch.float32, inputs=(q, k, v), call_inputs=given)
    check_gradients(kern, backend, 2, 4, 2, 40, 40, 16, torch.float32, inputs=(q, k, v), call_inputs=given)
    assert not torch.equal(kern(q, k, v, backend=backend, **given), kern(q, k, v, backend=backend))


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_rows_with_no_allowed_key(backend):
    """lsh & chunk: a query whose bucket no key of its chunk shares sees nothing: O = 0, LSE = -inf,
    dq = 0 (checked inside check/check_gradients against the reference's empty rows)."""
    kern = sparsec.compile("pattern p = lsh(8) & chunk(4)")
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, v = draw_inputs("gaussian", 1, 2, 2, 33, 33, 16, torch.float32, gen)
    mask = kern.mask(33, heads=2, q=q, k=k)
    assert not mask.any(-1).all(), "the draw should leave some rows empty"
    check(kern, backend, 1, 2, 2, 33, 33, 16, torch.float32, inputs=(q, k, v), call_inputs={})
    check_gradients(kern, backend, 1, 2, 2, 33, 33, 16, torch.float32, inputs=(q, k, v), call_inputs={})


def test_sorted_shares_visit_about_their_density():
    """lsh(16) at n = 512 with 16-row tiles: the sorted layout visits a small share of the tiles
    (bucket ranges), where the positional order would visit them all."""
    kern = sparsec.compile("pattern p = lsh(16)")
    q, k = torch.randn(1, 1, 512, 32), torch.randn(1, 1, 512, 32)
    call = check_call("p", kern.needs, q, k, k, None, None, {})
    node = sparsec.passes.specialize(kern.shares[0].key, 512, 512, 0, 1)
    order = SortedOrder.of(content_ids.content_values([node], q, k, call, {})[node])
    lay = order.layout(16, 16, True).to_host(512, 512, 0)
    assert lay.tile_density() < 0.2, lay
    assert lay.tiles_visited() >= kern.mask(512, q=q, k=k).float().mean() * 32 * 32


@pytest.mark.parametrize("src", ["topk(2, block=8)", "causal & (topk(2, block=16, causal=true) + chunk(16))",
                                 "topk(1, block=4) & band(9) + global(2)", "topk(3, block=12) - causal",
                                 "heads(band(3), stride(2)) - topk(1, block=8) + topk(2, block=4, causal=true)"])
@pytest.mark.parametrize("kind", ["gaussian", "ties"])
def test_topk_layouts_from_the_selection_are_sound(src, kind):
    """Layouts built from the runtime's top-k selection visit every tile with an allowed pair and
    mark FULL only tiles whose pairs are all allowed; they skip most of the rest."""
    kern = sparsec.compile(f"pattern p = {src}")
    n_q, n_k, q_offset = 50, 70, 20
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, _ = draw_inputs(kind, 2, 2, 1, n_q, n_k, 16, torch.float32, gen)
    call = check_call("p", kern.needs, q, k, k, None, q_offset, {})
    body = sparsec.passes.specialize(kern.ir, n_q, n_k, q_offset, 2)
    space = TableSpace(n_q, n_k, q_offset, 2, 2, inputs={"content": content_ids.content_values(body.walk(), q, k, call, {})})
    for bm, bn in ((8, 8), (16, 4)):
        host = build_layout(body, n_q, n_k, bm, bn, q_offset, 2, space=space).classes()
        device = selections.SelectionLayouts.of(body, n_q, n_k, q_offset, bm, bn, 2, torch.device("cpu"))
        device = device.build(space.inputs["content"], 2).to_host(n_q, n_k, q_offset).classes()
        want = tile_classes(kern.mask(n_q, n_k, heads=2, q_offset=q_offset, q=q, k=k).numpy(), bm, bn)
        for got in (host, device):   # on the host through the IR's rules, and in torch (what calls use)
            assert not ((want > EMPTY) & (got == EMPTY)).any(), "a tile with allowed pairs is skipped"
            assert not ((got == FULL) & (want != FULL)).any(), "a FULL tile has a pair that is not allowed"
            assert (got > EMPTY).sum() < got.size
        assert np.array_equal(device, host)


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
@pytest.mark.parametrize("src", ["document & lsh(4) & causal", "document & (cluster(3) + band(2)) + topk(1, block=8)"])
def test_documents_inside_sorted_shares(backend, src):
    """The document predicate reads segment ids at the original positions of sorted rows."""
    kern = sparsec.compile(f"pattern p = {src}")
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, v = draw_inputs("gaussian", 2, 2, 1, 45, 45, 16, torch.float32, gen)
    seg = {"segment_ids": torch.sort(torch.randint(0, 4, (2, 45), generator=gen), dim=1).values}
    check(kern, backend, 2, 2, 1, 45, 45, 16, torch.float32, inputs=(q, k, v), call_inputs=seg)
    check_gradients(kern, backend, 2, 2, 1, 45, 45, 16, torch.float32, inputs=(q, k, v), call_inputs=seg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("src", ["lsh(16) & causal", "lsh(8, rounds=2)", "causal & (cluster(8) + band(64, 0))",
                                 "causal & (topk(3, block=64, causal=true) + chunk(64))"])
def test_gpu_content_patterns_match_dense(src, dtype):
    """The sorted shares and topk layouts through the generated kernels on a GPU, GQA and odd
    lengths: O and the gradients against float64 dense attention under the reference mask."""
    import math
    from test_kernel import TOLERANCE, dense_attention
    from test_gradients import GRAD_TOLERANCE
    kern = sparsec.compile(f"pattern p = {src}")
    for n_q, n_k, D in ((1000, 1000, 64), (777, 2049, 128)):
        q = torch.randn(2, 4, n_q, D, device="cuda").to(dtype)
        k, v = (torch.randn(2, 2, n_k, D, device="cuda").to(dtype) for _ in range(2))
        do = torch.randn(2, 4, n_q, D, device="cuda", dtype=torch.float64)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = kern(*leaves)
        got = torch.autograd.grad(o, leaves, do.to(dtype))
        ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
        want, _ = dense_attention(kern.mask(n_q, n_k, heads=4, q=q, k=k).cuda(), *ref, 1 / math.sqrt(D))
        wanted = torch.autograd.grad(want, ref, do)
        for name, g, w in (("o", o, want), *zip(("dq", "dk", "dv"), got, wanted)):
            err = (g.double() - w).abs().max().item() / max(1.0, w.abs().max().item())
            tol = TOLERANCE[dtype] if name == "o" else GRAD_TOLERANCE[dtype]
            assert not g.isnan().any() and err < tol, f"{name}: relative error {err:.2e}"


def test_a_content_based_pattern_has_no_layout_of_its_own():
    """kern.layout listed every tile PARTIAL for lsh/cluster/topk (16.7M tiles at 256K); it now
    says where the layouts are: share_layouts(q, k), the ones a call builds."""
    kern = sparsec.compile("pattern p = lsh(8) & causal + band(2)")
    with pytest.raises(ValueError, match=r"content-based.*share_layouts\(q, k\)"):
        kern.layout(64)
    q = torch.randn(1, 1, 64, 16)
    assert len(kern.share_layouts(q, q)) == 2


@pytest.mark.parametrize("src", ["lsh(8, rounds=2)", "cluster(5, iters=3)", "topk(2, block=4)",
                                 "topk(3, block=3, causal=true)"])
def test_ids_and_selections_a_block_of_rows_at_a_time_are_the_same(src, monkeypatch):
    """content_values scores ROWS_AT_ONCE rows (and SCORES_AT_ONCE top-k scores) at a time so its
    memory does not grow with n x buckets or n x clusters; tiny blocks must give the same ids
    (integer-valued inputs: every product and sum is exact, whatever the order)."""
    kern = sparsec.compile(f"pattern p = {src}")
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, _ = draw_inputs("ties", 2, 4, 2, 37, 41, 16, torch.float32, gen)
    call = check_call("p", kern.needs, q, k, k, None, None, {})
    body = sparsec.passes.specialize(kern.ir, 37, 41, call.q_offset, 4)
    given = {"rotations": torch.randint(-2, 3, (2, 16, 4), generator=gen).float()} if "lsh" in src else {}
    whole = content_ids.content_values(list(body.nodes()), q, k, call, given)
    monkeypatch.setattr(content_ids, "ROWS_AT_ONCE", 5)
    monkeypatch.setattr(content_ids, "SCORES_AT_ONCE", 7)
    blocked = content_ids.content_values(list(body.nodes()), q, k, call, given)
    for node in whole:
        for a, b in zip(whole[node], blocked[node]):
            assert torch.equal(a, b), src
