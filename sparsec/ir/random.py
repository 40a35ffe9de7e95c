"""random(r, seed): each row attends to keys drawn by a counter hash, the same on every device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import expr as E
from .limits import INT_MAX
from .pattern import Pattern, value
from .tiles import TileSet, tiles_of_pairs


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
