"""Content-based primitives (lsh, cluster, topk): their reference masks, predicates and tables.

The reference computes ids and selections here in numpy, float64, from q and k. At call time the
runtime computes the same on the tensors' device (runtime/content.py) and hands them over in
`CallInputs.content` / `TableSpace.inputs["content"]`; the rules below then read those instead."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import SparsecError
from . import expr as E
from .limits import INT_MAX
from .pattern import Pattern, value
from .tiles import FULL, PARTIAL, TileSet, all_tiles, expand_ranges, input_value


def rotations(seed: int, rounds: int, dim: int, buckets: int) -> np.ndarray:
    """The seeded LSH rotations, shape (rounds, dim, buckets/2), one Gaussian matrix per (seed, round)."""
    return np.stack([np.random.default_rng([seed, r]).standard_normal((dim, buckets // 2))
                     for r in range(rounds)])


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def spherical_start(seed: int, clusters: int, dim: int) -> np.ndarray:
    """k-means' first centroids (clusters, D): unit Gaussian vectors from `seed`."""
    return unit(np.random.default_rng([seed]).standard_normal((clusters, dim)))


def spherical_kmeans(keys: np.ndarray, clusters: int, iters: int, seed: int) -> np.ndarray:
    """Centroids (clusters, D): spherical_start, then `iters` rounds of assigning unit keys to
    their nearest centroid by cosine and renormalizing each cluster's sum; a cluster that
    receives no key keeps its centroid."""
    mu = spherical_start(seed, clusters, keys.shape[-1])
    k = unit(keys.astype(np.float64))
    for _ in range(iters):
        assign = np.argmax(k @ mu.T, axis=1)
        sums = np.zeros_like(mu)
        np.add.at(sums, assign, k)
        moved = np.linalg.norm(sums, axis=1) > 0
        mu = np.where(moved[:, None], unit(sums), mu)
    return mu


class ContentPattern(Pattern):
    """The mask depends on q and k of each (batch, head). Its tiles here are all PARTIAL (sound:
    the predicate decides pair by pair); the runtime sorts lsh and cluster shares by bucket and
    builds their layouts from bucket ranges (runtime/content.py)."""
    needs: ClassVar[frozenset[str]] = frozenset({"q", "k"})
    token_level: ClassVar[bool] = True
    head_dependent: ClassVar[bool] = True

    def classify(self, t, qt, kt):
        return np.full(len(qt), PARTIAL, np.int8)

    def tiles(self, t):
        qt, kt = all_tiles(t)
        return TileSet.build(t, qt, kt, PARTIAL)

    def lower(self, cx):
        """Equal bucket ids in some round: ids are computed per call (tables) and compared here."""
        q_ids, k_ids = cx.table(self, "q_ids"), cx.table(self, "k_ids")
        rounds = cx.table(self, "rounds", pointer=False)
        bh = f"({cx.batch} * {cx.heads} + {cx.head}).to(tl.int64) * {rounds}"
        row = cx.let(f"{cx.rows} - {cx.q_offset}", "query_row", hoist=True)
        hit = cx.let("tl.zeros([BLOCK_M, BLOCK_N], tl.int1)", self.keyword)
        n_q, n_k = cx.n_q, cx.n_k
        cx.loop(f"for r in range({rounds}):", [
            f"bq = tl.load({q_ids} + ({bh} + r) * {n_q} + {row}, mask=({row} >= 0) & ({row} < {n_q}), other=-1)",
            f"bk = tl.load({k_ids} + ({bh} + r) * {n_k} + {cx.cols}, mask={cx.cols} < {n_k}, other=-2)",
            f"{hit} = {hit} | (bq[:, None] == bk[None, :])"])
        return hit

    def ids(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        """Bucket ids of q and k, (rounds, n_q) and (rounds, n_k), for one (batch, head): the
        runtime's when it computed them, else the reference's."""
        if inputs.content and self in inputs.content:
            return inputs.content[self]
        return self.compute_ids(inputs)

    def compute_ids(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def mask(self, grid):
        bq, bk = self.ids(grid.inputs)
        rows = grid.pos - grid.inputs.q_offset
        return (bq[:, rows, None] == bk[:, None, grid.keys]).any(axis=0)

    def tables(self, space):
        computed = space.inputs.get("content") or {}
        if self in computed:   # (B, H, rounds, n) on the device already
            q_ids, k_ids = computed[self]
            return {"q_ids": q_ids, "k_ids": k_ids, "rounds": q_ids.shape[2]}
        q_ids, k_ids = [], []
        for b in range(space.batch):
            for h in range(space.heads):
                bq, bk = self.ids(space.per_head(b, h))
                q_ids.append(bq)
                k_ids.append(bk)
        return {"q_ids": np.stack(q_ids).astype(np.int32), "k_ids": np.stack(k_ids).astype(np.int32),
                "rounds": q_ids[0].shape[0]}

    def arrays(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        """q (n_q, D) and k (n_k, D) of this (batch, head), float64."""
        q = np.asarray(input_value(inputs, "q", self.keyword), np.float64)
        return q, np.asarray(input_value(inputs, "k", self.keyword), np.float64)


@dataclass(frozen=True, eq=False)
class Lsh(ContentPattern):
    buckets: E.Expr
    rounds: E.Expr
    seed: E.Expr
    keyword: ClassVar[str] = "lsh"
    limits: ClassVar = {"buckets": (2, "at least 2"), "rounds": (1, "at least 1"), "seed": (0, "at least 0")}
    ceilings: ClassVar = {"buckets": 1 << 16, "rounds": 64, "seed": INT_MAX}   # rotations: (rounds, D, buckets/2)

    def show(self):
        return f"lsh({E.show(self.buckets)}, rounds={E.show(self.rounds)}, seed={E.show(self.seed)})"

    def check(self):
        super().check()
        b = self.buckets
        if isinstance(b, E.Const) and b.value % 2:
            raise SparsecError(f"lsh: buckets must be even, got {b.value}", b.span or self.span)

    def compute_ids(self, inputs):
        q, k = self.arrays(inputs)
        rot = inputs.rotations
        if rot is None:
            rot = rotations(value(self.seed), value(self.rounds), q.shape[-1], value(self.buckets))
        bucket = lambda x, r: np.argmax(np.concatenate([x @ r, -(x @ r)], axis=-1), axis=-1)
        rot = np.asarray(rot, np.float64)
        return np.stack([bucket(q, r) for r in rot]), np.stack([bucket(k, r) for r in rot])

    def cost(self, env):
        return self.sym(self.rounds, env) * env["n"] ** 2 / self.sym(self.buckets, env)


@dataclass(frozen=True, eq=False)
class LshRound(Lsh):
    """Round `round` of an lsh alone: bucket equality in that round only. Compiler-internal, not
    source syntax: a multi-round lsh runs one share per round, each sorted by its own buckets."""
    round: int

    def show(self):
        return f"{super().show()}.round({self.round})"

    def compute_ids(self, inputs):
        bq, bk = super().compute_ids(inputs)
        return bq[self.round: self.round + 1], bk[self.round: self.round + 1]

    def cost(self, env):
        return env["n"] ** 2 / self.sym(self.buckets, env)


@dataclass(frozen=True, eq=False)
class Cluster(ContentPattern):
    k: E.Expr
    iters: E.Expr
    seed: E.Expr
    keyword: ClassVar[str] = "cluster"
    limits: ClassVar = {"k": (1, "at least 1"), "iters": (0, "at least 0"), "seed": (0, "at least 0")}
    ceilings: ClassVar = {"k": 1 << 16, "iters": 1000, "seed": INT_MAX}   # an iteration scores keys x k centroids

    def show(self):
        return f"cluster({E.show(self.k)}, iters={E.show(self.iters)}, seed={E.show(self.seed)})"

    def compute_ids(self, inputs):
        q, k = self.arrays(inputs)
        mu = inputs.centroids
        if mu is None:
            mu = spherical_kmeans(k, value(self.k), value(self.iters), value(self.seed))
        mu = np.asarray(mu, np.float64)
        return np.argmax(unit(q) @ mu.T, axis=-1)[None], np.argmax(unit(k) @ mu.T, axis=-1)[None]

    def cost(self, env):
        return env["n"] ** 2 / self.sym(self.k, env)


@dataclass(frozen=True, eq=False)
class TopK(ContentPattern):
    """Each query block I keeps the k key blocks J with the largest mean(q_I) . mean(k_J), or with
    by=NAME the largest NAME[b, h, I - I0, J] (I0: the call's first query block; reads past the
    input's extent are 0). Ties go to the smaller J either way."""
    k: E.Expr
    block: E.Expr
    causal: E.Expr
    by: str | None = None   # the ranking input's name (a declared float input), or None: rank by q and k
    keyword: ClassVar[str] = "topk"
    limits: ClassVar = {"k": (1, "at least 1"), "block": (1, "at least 1")}

    def show(self):
        by = "" if self.by is None else f", by={self.by}"
        return f"topk({E.show(self.k)}, block={E.show(self.block)}, causal={E.show(self.causal)}{by})"

    @property
    def needs(self) -> frozenset[str]:
        """q and k, as every content part (the runtime's selection machinery runs on them), and the
        ranking input when there is one."""
        return ContentPattern.needs | ({self.by} if self.by is not None else frozenset())

    def declarations(self) -> tuple[str, ...]:
        return () if self.by is None else (self.by,)

    def _given(self, inputs, rows: int, blocks: int) -> np.ndarray:
        """The ranking input of this (batch, head) as (rows, blocks) float64, 0 past its extent."""
        x = np.asarray(inputs.declared[self.by], np.float64)
        x = x[inputs.batch if x.shape[0] > 1 else 0, inputs.head if x.shape[1] > 1 else 0]
        out = np.zeros((rows, blocks))
        r, c = min(rows, x.shape[0]), min(blocks, x.shape[1])
        out[:r, :c] = x[:r, :c]
        return out

    def selection(self, inputs) -> tuple[int, np.ndarray]:
        """(first query block I0, chosen[I - I0, J]) over the query blocks of this call; a block's
        query mean is over the call's rows in it. The runtime's, when it computed them."""
        if inputs.content and self in inputs.content:
            return inputs.q_offset // value(self.block), inputs.content[self][0]
        q, k = self.arrays(inputs)
        b, top = value(self.block), value(self.k)
        qb = (np.arange(len(q)) + inputs.q_offset) // b
        rows, row_of = np.unique(qb, return_inverse=True)
        n_blocks = -(-len(k) // b)
        if self.by is not None:
            score = self._given(inputs, len(rows), n_blocks)
        else:
            # sum(q_I) . sum(k_J) / |J| ranks the J of one I as mean(q_I) . mean(k_J) does (|I| is
            # fixed), and is exact for small-integer inputs whatever the order of summation, so
            # exact ties stay ties on every device
            q_sum = np.stack([q[row_of == r].sum(axis=0) for r in range(len(rows))]) if len(rows) else q[:0]
            k_sum = np.stack([k[c * b:(c + 1) * b].sum(axis=0) for c in range(n_blocks)])
            k_count = np.minimum(len(k) - np.arange(n_blocks) * b, b)
            score = (q_sum @ k_sum.T) / k_count
        cols = np.arange(n_blocks)
        candidate = cols[None, :] < rows[:, None] if value(self.causal) else np.ones(score.shape, bool)
        score = np.where(candidate, score, -np.inf)
        rank = np.empty_like(score, dtype=np.int64)  # stable sort: equal scores keep the smaller J first
        rank[np.arange(len(rows))[:, None], np.argsort(-score, axis=1, kind="stable")] = cols[None, :]
        return int(rows[0]) if len(rows) else 0, candidate & (rank < top)

    def mask(self, grid):
        first, chosen = self.selection(grid.inputs)
        b = value(self.block)
        return chosen[grid.pos // b - first][:, grid.keys // b]

    def tiles(self, t):
        """With the runtime's selection: the tiles of the chosen (I, J) block pairs, FULL where a
        tile lies inside one such pair. Without it (the reference's layouts): every tile PARTIAL."""
        if not (t.inputs.content and self in t.inputs.content):
            return super().tiles(t)
        b = value(self.block)
        first, chosen = self.selection(t.inputs)
        i, j = np.nonzero(chosen)
        block_i, block_j = (i + first) * b, j * b
        qf, ql = t.query_tiles(block_i, block_i + b - 1)
        kf, kl = t.key_tiles(block_j, block_j + b - 1)
        width = kl - kf
        owner, at = expand_ranges(np.zeros(len(i), np.int64), (ql - qf) * width)
        qt = qf[owner] + at // np.maximum(width[owner], 1)
        kt = kf[owner] + at % np.maximum(width[owner], 1)
        inside = (t.q_lo[qt] >= block_i[owner]) & (t.q_hi[qt] < block_i[owner] + b) \
            & (t.k_lo[kt] >= block_j[owner]) & (t.k_hi[kt] < block_j[owner] + b)
        return TileSet.build(t, qt, kt, np.where(inside, FULL, PARTIAL))

    def classify(self, t, qt, kt):
        return self.tiles(t).lookup(t, qt, kt)

    def estimate(self, t):
        if not (t.inputs.content and self in t.inputs.content):
            return super().estimate(t)
        return len(self.tiles(t))

    def lower(self, cx):
        chosen, row0 = cx.table(self, "chosen"), cx.table(self, "row0", pointer=False)
        rows, count = cx.table(self, "rows", pointer=False), cx.table(self, "count", pointer=False)
        block = cx.num(self.block)
        at = cx.let(f"_floordiv({cx.rows}, {block}) - {row0}", "topk_at", hoist=True)
        ok = cx.let(f"({at} >= 0) & ({at} < {rows})", "topk_ok", hoist=True)
        mine = cx.let(f"{chosen} + (({cx.batch} * {cx.heads} + {cx.head}).to(tl.int64) * {rows} + {at}) * {count}",
                      "topk_row", hoist=True)
        key_block = cx.let(f"_floordiv({cx.cols}, {block})", "topk_key_block")
        hit = cx.let("tl.zeros([BLOCK_M, BLOCK_N], tl.int1)", "topk")
        cx.loop(f"for t in range({count}):", [
            f"picked = tl.load({mine} + t, mask={ok}, other=-1)",
            f"{hit} = {hit} | (picked[:, None] == {key_block}[None, :])"])
        return hit

    def tables(self, space):
        """chosen[b, h, I - I0, t]: the key blocks query block I keeps, padded with -1."""
        computed = space.inputs.get("content") or {}
        if self in computed:   # (B, H, rows, count) on the device already
            table = computed[self][1]
            return {"chosen": table, "row0": space.q_offset // value(self.block), "rows": table.shape[2],
                    "count": table.shape[3]}
        lists, first = [], 0
        for b in range(space.batch):
            for h in range(space.heads):
                first, chosen = self.selection(space.per_head(b, h))
                lists.append(chosen)
        width = max(1, max(int(c.sum(axis=1).max(initial=0)) for c in lists))
        out = np.full((len(lists), lists[0].shape[0], width), -1, np.int32)
        for n, c in enumerate(lists):
            for r, picked in enumerate(c):
                blocks = np.flatnonzero(picked)
                out[n, r, :len(blocks)] = blocks
        return {"chosen": out, "row0": first, "rows": out.shape[1], "count": width}

    def cost(self, env):
        return env["n"] * self.sym(self.k, env) * self.sym(self.block, env)
