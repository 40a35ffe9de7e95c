"""Primitives read from tables rather than intervals: random keys, where(...) predicates, documents."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import numpy as np

from ..errors import SparsecError
from . import conditions
from . import expr as E
from .limits import INT_MAX
from .pattern import Pattern, value
from .tiles import TileSet, runtime_value, tiles_of_pairs

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs pass as independent uniforms."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_keys(seed: int, head: int, rows: np.ndarray, r: int, n_k: int) -> np.ndarray:
    """For each row position, min(r, n_k) distinct keys in [0, n_k), uniform over subsets.

    Floyd's algorithm, one step per column, all rows at once: at step t pick x uniform in [0, t];
    take x unless an earlier step took it, then take t. The uniform numbers come from a counter
    hash of (seed, head, row, t), so any row can be drawn alone and every device agrees."""
    m = min(r, n_k)
    rows = np.asarray(rows, np.int64)
    base = _mix(_mix(np.full(rows.shape, seed, np.int64).astype(np.uint64)) ^ np.uint64(head & 0xFFFFFFFF))
    base = _mix(base ^ rows.astype(np.uint64))
    picks = np.empty((len(rows), m), np.int64)
    with np.errstate(over="ignore"):
        for step, t in enumerate(range(n_k - m, n_k)):
            x = (_mix(base ^ np.uint64(t)) % np.uint64(t + 1)).astype(np.int64)
            taken = (picks[:, :step] == x[:, None]).any(axis=1)
            picks[:, step] = np.where(taken, t, x)
    return picks


@dataclass(frozen=True, eq=False)
class Random(Pattern):
    """Each row of each head allows exactly min(r, n_k) keys drawn by random_keys(seed, head, row)."""
    r: E.Expr
    seed: E.Expr
    keyword: ClassVar[str] = "random"
    limits: ClassVar = {"r": (0, "at least 0"), "seed": (0, "at least 0")}
    ceilings: ClassVar = {"seed": INT_MAX}   # the generator hashes 64-bit seeds
    head_dependent: ClassVar[bool] = True

    def show(self):
        return f"random({E.show(self.r)}, seed={E.show(self.seed)})"

    def mask(self, grid):
        picks = random_keys(value(self.seed), grid.head, grid.pos, value(self.r), grid.n_k)
        out = np.zeros((len(grid.pos), len(grid.keys)), bool)
        order = np.argsort(grid.keys, kind="stable")     # grid.keys are distinct, in any order
        keys = grid.keys[order]
        at = np.searchsorted(keys, picks)
        hit = (at < len(keys)) & (keys[np.minimum(at, len(keys) - 1)] == picks)
        rows = np.broadcast_to(np.arange(len(grid.pos))[:, None], picks.shape)
        out[rows[hit], order[at[hit]]] = True
        return out

    def tiles(self, t):
        if not len(t.q_lo):
            return TileSet.build(t, [], [], [])
        rows = np.arange(t.q_lo.min(), t.q_hi.max() + 1, dtype=np.int64)
        picks = random_keys(value(self.seed), t.head, rows, value(self.r), t.n_k)
        return tiles_of_pairs(t, np.repeat(rows, picks.shape[1]), picks.ravel())

    def estimate(self, t):
        return int((t.q_hi - t.q_lo + 1).sum()) * max(min(value(self.r), t.n_k), 0)

    def cost(self, env):
        return self.sym(self.r, env) * env["n"]

    def lower(self, cx):
        keys, row0 = cx.table(self, "keys"), cx.table(self, "row0", pointer=False)
        rows, count = cx.table(self, "rows", pointer=False), cx.table(self, "count", pointer=False)
        at = cx.let(f"{cx.rows} - {row0}", "random_at", hoist=True)
        ok = cx.let(f"({at} >= 0) & ({at} < {rows})", "random_ok", hoist=True)
        row_keys = cx.let(f"{keys} + ({cx.head}.to(tl.int64) * {rows} + {at}) * {count}", "random_row", hoist=True)
        hit = cx.let("tl.zeros([BLOCK_M, BLOCK_N], tl.int1)", "random")
        cx.loop(f"for t in range({count}):", [  # the row's t-th drawn key, compared with every column
            f"drawn = tl.load({row_keys} + t, mask={ok}, other=-1)",
            f"{hit} = {hit} | (drawn[:, None] == {cx.cols}[None, :])"])
        return hit

    def tables(self, space):
        """keys[h, row - row0, t]: the drawn keys of every row coordinate this call can meet."""
        rows = np.arange(space.first_row, space.last_row + 1, dtype=np.int64)
        m = min(value(self.r), space.keys)
        keys = np.stack([random_keys(value(self.seed), h, rows, m, space.keys) for h in range(space.heads)])
        return {"keys": keys.astype(np.int32), "row0": space.first_row, "rows": len(rows), "count": m}


@dataclass(frozen=True, eq=False)
class Where(Pattern):
    """An arbitrary predicate over i (the position), j, h, n_q and n_k. Its tiles come from the
    shape of the condition (conditions.plan); what mixes i and j otherwise is read pair by pair."""
    cond: E.Expr
    keyword: ClassVar[str] = "where"

    def show(self):
        return f"where({E.show(self.cond)})"

    def uses_head(self):
        return "h" in E.names(self.cond)

    def specialize(self, env):
        """n, n_q and n_k substituted; then every sub-expression checked over this call's rows,
        keys and heads (expr.bounds): a value beyond 64 bits, a divisor that can be 0, a root or
        logarithm outside its domain is an error here, never a wrapped or NaN value later."""
        known = {k: E.Const(v) for k, v in env.items() if k in ("n", "n_q", "n_k")}
        cond = E.substitute(self.cond, known)
        ranges = {"i": env["rows"], "j": (0, env["n_k"] - 1), "h": (0, env["heads"] - 1)}
        try:
            E.bounds(cond, ranges)
        except SparsecError as e:
            raise SparsecError(f"{e.message} (where rows i are {ranges['i'][0]}..{ranges['i'][1]}, keys j "
                               f"0..{ranges['j'][1]} and heads h 0..{ranges['h'][1]})", e.span) from None
        return replace(self, cond=cond)

    @cached_property
    def plan(self) -> Pattern:
        """The condition as row, column, key-match and pairwise parts (conditions.py), whose
        tiles cost what they visit; only the views of tiles use it."""
        return conditions.plan(self.cond)

    def mask(self, grid):
        out = E.evaluate(self.cond, {"i": grid.pos[:, None], "j": grid.keys[None, :], "h": grid.head,
                                     "n": grid.n_k, "n_q": grid.n_q, "n_k": grid.n_k})
        return np.broadcast_to(np.asarray(out, bool), (len(grid.pos), len(grid.keys))).copy()

    def tiles(self, t):
        return self.plan.tiles(t)

    def classify(self, t, qt, kt):
        return self.plan.classify(t, qt, kt)

    def estimate(self, t):
        return self.plan.estimate(t)

    def key_range(self, t):
        return self.plan.key_range(t)

    def cost(self, env):
        return env["n"] ** 2  # no closed form: an upper bound

    def lower(self, cx):
        # int64 coordinates: products such as i * j overflow 32 bits at long lengths
        rows = cx.let(f"{cx.rows}.to(tl.int64)", "where_i", hoist=True)
        cols = cx.let(f"{cx.cols}.to(tl.int64)", "where_j")
        head = cx.let(f"({cx.head}).to(tl.int64)", "where_h", hoist=True)
        cond = cx.wide(self.cond, {"i": f"{rows}[:, None]", "j": f"{cols}[None, :]", "h": head})
        return f"({cond} & {cx.constant(True)})"  # & broadcasts a condition of h alone to the tile


@dataclass(frozen=True, eq=False)
class Document(conditions.MatchedKeys, Pattern):
    """segment_ids[b, p] == segment_ids[b, j]: packed sequences attend within their document."""
    keyword: ClassVar[str] = "document"
    needs: ClassVar[frozenset[str]] = frozenset({"segment_ids"})
    token_level: ClassVar[bool] = True

    def _ids(self, runtime, lo, hi):
        seg = np.asarray(runtime_value(runtime, "segment_ids", "document"))
        if len(lo) and (lo.min() < 0 or hi.max() >= len(seg)):
            raise ValueError(f"document: query positions {lo.min()}..{hi.max()} fall outside segment_ids "
                             f"of length {len(seg)}; segment_ids must have shape (B, n_k) and q_offset >= 0")
        return seg

    def mask(self, grid):
        seg = self._ids(grid.runtime, grid.pos, grid.pos)
        return seg[grid.pos][:, None] == seg[grid.keys][None, :]

    def sides(self, t) -> conditions.Sides:
        """A key match of the ids at the query positions with the ids at the keys (conditions.py):
        packed (sorted) ids give each query tile one key range, found by binary search."""
        seg = self._ids(t.runtime, t.q_lo, t.q_hi)
        rows, keys = conditions.coordinates(t.q_lo, t.q_hi), np.arange(len(seg))
        return conditions.Sides.of(t, rows, seg[rows], keys, seg)

    def cost(self, env):
        return env["n"] ** 2  # depends on the documents: an upper bound

    def lower(self, cx):
        ids, stride = cx.table(self, "ids", dtype="int64"), cx.table(self, "stride", pointer=False)
        mine = cx.let(f"{ids} + {cx.batch}.to(tl.int64) * {stride}", "document_ids", hoist=True)
        rows = cx.let(f"tl.load({mine} + {cx.rows}, mask=({cx.rows} >= 0) & ({cx.rows} < {cx.n_k}), other=-1)",
                      "document_rows", hoist=True)
        cols = cx.let(f"tl.load({mine} + {cx.cols}, mask={cx.cols} < {cx.n_k}, other=-2)", "document_cols")
        return f"({rows}[:, None] == {cols}[None, :])"

    def tables(self, space):
        seg = space.inputs["segment_ids"]  # (B, n_k), int64 as given (never narrowed: ids may be huge)
        return {"ids": seg, "stride": seg.shape[1]}
