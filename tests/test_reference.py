"""The dense interpreter against the spec's table, read pair by pair in plain Python."""
import math

import numpy as np
from hypothesis import given, strategies as st

import sparsec
from sparsec.ir.random import random_keys
from sparsec.ir.tiles import Grid

from conftest import patterns


def spec_allows(prim: str, a: tuple, p: int, j: int, n_k: int) -> bool:
    """Section 3 of the spec, one pair at a time (p is the query position i + q_offset)."""
    if prim == "full":
        return True
    if prim == "causal":
        return j <= p
    if prim == "band1":
        return abs(p - j) <= a[0]
    if prim == "band2":
        return p - a[0] <= j <= p + a[1]
    if prim == "dilated":
        w, d = a
        return abs(p - j) <= w * d and (p - j) % d == 0
    if prim == "stride":
        return (p - j) % a[0] == 0
    if prim == "chunk":
        return p // a[0] == j // a[0]
    if prim == "global":
        return p < a[0] or j < a[0]
    if prim == "globalset":
        return p in a or j in a
    if prim == "last":
        return p >= n_k - a[0] or j >= n_k - a[0]
    if prim == "sink":
        return j < a[0]
    if prim == "logsparse":
        d = p - j
        return d >= 0 and (d == 0 or (d & (d - 1)) == 0)
    raise KeyError(prim)


SOURCES = {
    "full": lambda a: "full", "causal": lambda a: "causal", "logsparse": lambda a: "logsparse",
    "band1": lambda a: f"band({a[0]})", "band2": lambda a: f"band({a[0]}, {a[1]})",
    "dilated": lambda a: f"dilated({a[0]}, {a[1]})", "stride": lambda a: f"stride({a[0]})",
    "chunk": lambda a: f"chunk({a[0]})", "global": lambda a: f"global({a[0]})",
    "globalset": lambda a: f"global([{', '.join(map(str, a))}])", "last": lambda a: f"last({a[0]})",
    "sink": lambda a: f"sink({a[0]})",
}
ARGS = {
    "full": st.just(()), "causal": st.just(()), "logsparse": st.just(()),
    "band1": st.tuples(st.integers(0, 12)), "band2": st.tuples(st.integers(-4, 12), st.integers(-4, 12)).filter(lambda t: sum(t) >= 0),
    "dilated": st.tuples(st.integers(0, 5), st.integers(1, 4)), "stride": st.tuples(st.integers(1, 9)),
    "chunk": st.tuples(st.integers(1, 9)), "global": st.tuples(st.integers(0, 9)),
    "globalset": st.lists(st.integers(0, 30), min_size=1, max_size=4).map(tuple),
    "last": st.tuples(st.integers(0, 9)), "sink": st.tuples(st.integers(0, 9)),
}


@given(st.sampled_from(sorted(SOURCES)).flatmap(lambda p: st.tuples(st.just(p), ARGS[p])),
       st.integers(1, 40), st.integers(1, 40), st.one_of(st.none(), st.integers(-5, 30)))
def test_primitives_match_the_spec_table(prim_args, n_q, n_k, offset):
    prim, a = prim_args
    kern = sparsec.compile(f"pattern p = {SOURCES[prim](a)}")
    got = kern.mask(n_q, n_k, q_offset=offset).numpy()[0, 0]
    off = n_k - n_q if offset is None else offset
    want = np.array([[spec_allows(prim, a, i + off, j, n_k) for j in range(n_k)] for i in range(n_q)])
    assert (got == want).all()


@given(st.integers(1, 6), st.integers(1, 50), st.integers(1, 50))
def test_blocks_reads_the_body_on_block_indices(b, n_q, n_k):
    kern = sparsec.compile(f"pattern p = blocks({b}, band(1, 0) + global(1) + last(1))")
    got = kern.mask(n_q, n_k).numpy()[0, 0]
    nb = math.ceil(n_k / b)
    off = n_k - n_q
    want = np.array([[(0 <= (i + off) // b - j // b <= 1) or (i + off) // b < 1 or j // b < 1
                      or (i + off) // b >= nb - 1 or j // b >= nb - 1
                      for j in range(n_k)] for i in range(n_q)])
    assert (got == want).all()


def test_where_uses_floor_semantics_and_lengths():
    kern = sparsec.compile("pattern p = where((i - j) // 3 == -1 or (j - i) % 5 == 4 and n_q < n_k)")
    got = kern.mask(7, 9, q_offset=0).numpy()[0, 0]
    want = np.array([[(i - j) // 3 == -1 or ((j - i) % 5 == 4 and 7 < 9) for j in range(9)] for i in range(7)])
    assert (got == want).all()


def test_heads_cycle_through_their_parts():
    kern = sparsec.compile("pattern p = heads(causal, sink(2), full)")
    m = kern.mask(6, heads=5).numpy()[0]
    parts = [sparsec.compile(f"pattern p = {s}").mask(6).numpy()[0, 0] for s in ("causal", "sink(2)", "full")]
    for h in range(5):
        assert (m[h] == parts[h % 3]).all()


@given(st.integers(0, 5), st.integers(0, 3), st.integers(0, 2), st.integers(1, 40))
def test_random_draws_exactly_r_distinct_keys_per_row(r, seed, head, n_k):
    rows = np.arange(-3, 60)
    picks = random_keys(seed, head, rows, r, n_k)
    assert picks.shape == (len(rows), min(r, n_k))
    assert ((picks >= 0) & (picks < n_k)).all()
    assert all(len(set(row)) == len(row) for row in picks.tolist())
    # a row's draw depends on (seed, head, row) only: drawing it alone gives the same keys
    assert (random_keys(seed, head, rows[7:8], r, n_k) == picks[7:8]).all()


def test_random_is_uniform_over_keys():
    picks = random_keys(0, 0, np.arange(20000), 3, 10)
    counts = np.bincount(picks.ravel(), minlength=10)
    expected = 20000 * 3 / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # 99.9th percentile of chi-square with 9 degrees of freedom


def test_random_mask_rows_and_heads():
    kern = sparsec.compile("pattern p = random(3, seed=4)")
    m = kern.mask(50, 40, heads=2).numpy()[0]
    assert (m.sum(axis=-1) == 3).all()
    assert not (m[0] == m[1]).all()  # heads draw independently


def test_document_mask_follows_segment_ids():
    seg = np.array([[0, 0, 1, 1, 1, 2, 7, 7], [3, 3, 3, 3, 3, 3, 3, 3]])
    m = sparsec.compile("pattern p = document & causal").mask(8, segment_ids=seg).numpy()
    for b in range(2):
        want = np.array([[seg[b, i] == seg[b, j] and j <= i for j in range(8)] for i in range(8)])
        assert (m[b, 0] == want).all()


def test_lsh_mask_matches_bucket_definition():
    rng = np.random.default_rng()
    q, k = rng.standard_normal((1, 2, 12, 8)), rng.standard_normal((1, 1, 12, 8))
    rot = rng.standard_normal((2, 8, 3))
    m = sparsec.compile("pattern p = lsh(6, rounds=2)").mask(12, heads=2, q=q, k=k, rotations=rot).numpy()

    def bucket(x, r):
        y = x @ rot[r]
        return int(np.argmax(np.concatenate([y, -y])))
    for h in range(2):
        want = np.array([[any(bucket(q[0, h, i], r) == bucket(k[0, 0, j], r) for r in range(2))
                          for j in range(12)] for i in range(12)])
        assert (m[0, h] == want).all()


def test_cluster_mask_with_given_centroids():
    rng = np.random.default_rng()
    q, k, mu = rng.standard_normal((1, 1, 10, 4)), rng.standard_normal((1, 1, 10, 4)), rng.standard_normal((1, 3, 4))
    m = sparsec.compile("pattern p = cluster(3)").mask(10, q=q, k=k, centroids=mu).numpy()[0, 0]
    # the scale of q and k does not matter for the cosine argmax
    assign = lambda x: int(np.argmax(mu[0] @ (x / np.linalg.norm(x))))
    want = np.array([[assign(q[0, 0, i]) == assign(k[0, 0, j]) for j in range(10)] for i in range(10)])
    assert (m == want).all()


def test_topk_selects_blocks_by_mean_scores():
    rng = np.random.default_rng()
    q, k = rng.standard_normal((1, 1, 16, 4)), rng.standard_normal((1, 1, 16, 4))
    m = sparsec.compile("pattern p = topk(2, block=4, causal=true)").mask(16, q=q, k=k).numpy()[0, 0]
    qm = q[0, 0].reshape(4, 4, 4).mean(axis=1)
    km = k[0, 0].reshape(4, 4, 4).mean(axis=1)
    for bi in range(4):
        cands = sorted(range(bi), key=lambda c: (-(qm[bi] @ km[c]), c))[:2]
        want_cols = np.isin(np.arange(16) // 4, cands)
        assert (m[bi * 4:(bi + 1) * 4] == want_cols[None, :]).all()


def test_empty_rows_exist_and_are_all_false():
    m = sparsec.compile("pattern p = band(2, -1)").mask(5).numpy()[0, 0]
    assert m.sum(axis=1).tolist() == [0, 1, 2, 2, 2]  # strictly-before window: row 0 sees nothing
    assert not sparsec.compile("pattern p = sink(3) - full").mask(5).numpy().any()


@given(src=patterns, n_q=st.integers(1, 30), n_k=st.integers(1, 30), offset=st.integers(0, 20),
       seed=st.integers(0, 1 << 30))
def test_masks_read_positions_in_any_order(src, n_q, n_k, offset, seed):
    """A sorted share evaluates the reference on its tiles' scattered positions: every rule must
    give the same pairs whatever the order of the grid's positions and keys."""
    try:
        kern = sparsec.compile(f"pattern p = {src}")
        body = sparsec.passes.specialize(kern.ir, n_q, n_k, offset, 2)
    except sparsec.SparsecError:
        return
    rng = np.random.default_rng(seed)
    pos, keys = np.arange(n_q) + offset, np.arange(n_k)
    rows, cols = rng.permutation(n_q), rng.permutation(n_k)
    for head in range(2):
        want = body.mask(Grid(pos, keys, n_q, n_k, head))
        got = body.mask(Grid(pos[rows], keys[cols], n_q, n_k, head))
        assert np.array_equal(got, want[rows][:, cols])
