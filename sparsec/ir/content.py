"""Content-based primitives (lsh, cluster, topk): their reference masks; their layouts are runtime work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import SparsecError
from . import expr as E
from .pattern import Pattern, value
from .tiles import PARTIAL, TileSet, all_tiles, runtime_value


def rotations(seed: int, rounds: int, dim: int, buckets: int) -> np.ndarray:
    """The seeded LSH rotations, shape (rounds, dim, buckets/2), one Gaussian matrix per (seed, round)."""
    return np.stack([np.random.default_rng([seed, r]).standard_normal((dim, buckets // 2))
                     for r in range(rounds)])


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def spherical_kmeans(keys: np.ndarray, clusters: int, iters: int, seed: int) -> np.ndarray:
    """Centroids (clusters, D): unit Gaussian start from `seed`, then `iters` rounds of assigning
    unit keys to their nearest centroid by cosine and renormalizing each cluster's sum; a cluster
    that receives no key keeps its centroid."""
    mu = unit(np.random.default_rng([seed]).standard_normal((clusters, keys.shape[-1])))
    k = unit(keys.astype(np.float64))
    for _ in range(iters):
        assign = np.argmax(k @ mu.T, axis=1)
        sums = np.zeros_like(mu)
        np.add.at(sums, assign, k)
        moved = np.linalg.norm(sums, axis=1) > 0
        mu = np.where(moved[:, None], unit(sums), mu)
    return mu


class ContentPattern(Pattern):
    """The mask depends on q and k of each (batch, head). Until runtime layouts exist every tile
    is PARTIAL: sound, and the predicate decides pair by pair."""
    needs: ClassVar[frozenset[str]] = frozenset({"q", "k"})
    token_level: ClassVar[bool] = True
    head_dependent: ClassVar[bool] = True

    def classify(self, t, qt, kt):
        return np.full(len(qt), PARTIAL, np.int8)

    def tiles(self, t):
        qt, kt = all_tiles(t)
        return TileSet.build(t, qt, kt, PARTIAL)

    def inputs(self, grid):
        q = np.asarray(runtime_value(grid.runtime, "q", self.keyword), np.float64)
        k = np.asarray(runtime_value(grid.runtime, "k", self.keyword), np.float64)
        return q[grid.pos - grid.pos[0]] if len(grid.pos) else q[:0], k, k[grid.keys]


@dataclass(frozen=True)
class Lsh(ContentPattern):
    buckets: E.Expr
    rounds: E.Expr
    seed: E.Expr
    keyword: ClassVar[str] = "lsh"
    limits: ClassVar = {"buckets": (2, "at least 2"), "rounds": (1, "at least 1"), "seed": (0, "at least 0")}

    def show(self):
        return f"lsh({E.show(self.buckets)}, rounds={E.show(self.rounds)}, seed={E.show(self.seed)})"

    def check(self):
        super().check()
        b = self.buckets
        if isinstance(b, E.Const) and b.value % 2:
            raise SparsecError(f"lsh: buckets must be even, got {b.value}", b.span or self.span)

    def mask(self, grid):
        q, _, k = self.inputs(grid)
        rot = grid.runtime.rotations
        if rot is None:
            rot = rotations(value(self.seed), value(self.rounds), q.shape[-1], value(self.buckets))
        out = np.zeros((len(q), len(k)), bool)
        for r in np.asarray(rot, np.float64):
            bq = np.argmax(np.concatenate([q @ r, -(q @ r)], axis=-1), axis=-1)
            bk = np.argmax(np.concatenate([k @ r, -(k @ r)], axis=-1), axis=-1)
            out |= bq[:, None] == bk[None, :]
        return out

    def cost(self, env):
        return self.sym(self.rounds, env) * env["n"] ** 2 / self.sym(self.buckets, env)


@dataclass(frozen=True)
class Cluster(ContentPattern):
    k: E.Expr
    iters: E.Expr
    seed: E.Expr
    keyword: ClassVar[str] = "cluster"
    limits: ClassVar = {"k": (1, "at least 1"), "iters": (0, "at least 0"), "seed": (0, "at least 0")}

    def show(self):
        return f"cluster({E.show(self.k)}, iters={E.show(self.iters)}, seed={E.show(self.seed)})"

    def mask(self, grid):
        q, all_keys, k = self.inputs(grid)
        mu = grid.runtime.centroids
        if mu is None:
            mu = spherical_kmeans(all_keys, value(self.k), value(self.iters), value(self.seed))
        mu = np.asarray(mu, np.float64)
        cq = np.argmax(unit(q) @ mu.T, axis=-1)
        ck = np.argmax(unit(k) @ mu.T, axis=-1)
        return cq[:, None] == ck[None, :]

    def cost(self, env):
        return env["n"] ** 2 / self.sym(self.k, env)


@dataclass(frozen=True)
class TopK(ContentPattern):
    """Each query block I keeps the k key blocks J with the largest mean(q_I) . mean(k_J)."""
    k: E.Expr
    block: E.Expr
    causal: E.Expr
    keyword: ClassVar[str] = "topk"
    limits: ClassVar = {"k": (1, "at least 1"), "block": (1, "at least 1")}

    def show(self):
        return f"topk({E.show(self.k)}, block={E.show(self.block)}, causal={E.show(self.causal)})"

    def mask(self, grid):
        q, all_keys, _ = self.inputs(grid)
        b, top = value(self.block), value(self.k)
        qb = grid.pos // b
        rows, row_of = np.unique(qb, return_inverse=True)
        q_mean = np.stack([q[row_of == r].mean(axis=0) for r in range(len(rows))]) if len(rows) else q[:0]
        n_blocks = -(-len(all_keys) // b)
        k_mean = np.stack([all_keys[c * b:(c + 1) * b].mean(axis=0) for c in range(n_blocks)])
        score = q_mean @ k_mean.T
        cols = np.arange(n_blocks)
        candidate = cols[None, :] < rows[:, None] if value(self.causal) else np.ones(score.shape, bool)
        score = np.where(candidate, score, -np.inf)
        rank = np.empty_like(score, dtype=np.int64)  # stable sort: equal scores keep the smaller J first
        rank[np.arange(len(rows))[:, None], np.argsort(-score, axis=1, kind="stable")] = cols[None, :]
        chosen = candidate & (rank < top)
        return chosen[row_of][:, grid.keys // b]

    def cost(self, env):
        return env["n"] * self.sym(self.k, env) * self.sym(self.block, env)
