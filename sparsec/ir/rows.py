"""Global rows and columns: global, global([..]), last and sink (a set of rows that see every key, and columns every row sees)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import SparsecError
from . import expr as E
from .pattern import Pattern, value
from .positional import tile_classes
from .tiles import TileSet


class RowsOrColumns(Pattern):
    """p in some set of rows or j in some set of columns (global, last, sink)."""

    def cost(self, env):
        """g rows that see every key and g columns every row sees: 2 g n pairs, the g x g corner once."""
        g, n = self.sym(self.g, env), env["n"]
        return 2 * g * n - g**2

    def row_count(self, n_k: int, lo, hi) -> np.ndarray:
        """How many positions in [lo, hi] are global rows."""
        raise NotImplementedError

    def column_count(self, n_k: int, lo, hi) -> np.ndarray:
        raise NotImplementedError

    def mask(self, grid):
        rows = self.row_count(grid.n_k, grid.pos, grid.pos) > 0
        cols = self.column_count(grid.n_k, grid.keys, grid.keys) > 0
        return rows[:, None] | cols[None, :]

    def _counts(self, t):
        rows = self.row_count(t.n_k, t.q_lo, t.q_hi)
        cols = self.column_count(t.n_k, t.k_lo, t.k_hi)
        return rows, rows == t.q_hi - t.q_lo + 1, cols, cols == t.k_hi - t.k_lo + 1

    def classify(self, t, qt, kt):
        rows, all_rows, cols, all_cols = self._counts(t)
        return tile_classes((rows[qt] > 0) | (cols[kt] > 0), all_rows[qt] | all_cols[kt])

    def tiles(self, t):
        rows, _, cols, _ = self._counts(t)
        tq, tk = t.shape
        row_tiles, col_tiles = np.flatnonzero(rows > 0), np.flatnonzero(cols > 0)
        qt = np.concatenate([np.repeat(row_tiles, tk), np.repeat(np.arange(tq), len(col_tiles))])
        kt = np.concatenate([np.tile(np.arange(tk), len(row_tiles)), np.tile(col_tiles, tq)])
        return TileSet.build(t, qt, kt, self.classify(t, qt, kt))

    def estimate(self, t):
        rows, _, cols, _ = self._counts(t)
        return int((rows > 0).sum() * t.shape[1] + (cols > 0).sum() * t.shape[0])

    def lower(self, cx):
        rows, cols = self.lower_rows(cx), self.lower_cols(cx)
        parts = ([f"{rows}[:, None]"] if rows else []) + ([f"{cols}[None, :]"] if cols else [])
        return "(" + " | ".join(parts) + ")" if parts else cx.constant(False)

    def lower_rows(self, cx) -> str | None:
        """(BLOCK_M,) bool: which rows of the tile are global rows (None: no row ever is)."""
        raise NotImplementedError

    def lower_cols(self, cx) -> str | None:
        raise NotImplementedError


def _count_below(lo, hi, g):
    """How many integers of [lo, hi] are < g."""
    return np.clip(np.minimum(hi, g - 1) - lo + 1, 0, None)


@dataclass(frozen=True, eq=False)
class Global(RowsOrColumns):
    """The first g positions attend everywhere and are attended from everywhere."""
    g: E.Expr
    keyword: ClassVar[str] = "global"
    limits: ClassVar = {"g": (0, "at least 0")}

    def row_count(self, n_k, lo, hi):
        return _count_below(lo, hi, value(self.g))

    column_count = row_count

    def lower_rows(self, cx):
        return cx.let(f"{cx.rows} < {cx.num(self.g)}", "global_rows", hoist=True)

    def lower_cols(self, cx):
        return cx.let(f"{cx.cols} < {cx.num(self.g)}", "global_cols")


@dataclass(frozen=True, eq=False)
class GlobalSet(RowsOrColumns):
    """global([a, b, ...]): the listed positions are global rows and columns."""
    positions: tuple[E.Expr, ...]
    keyword: ClassVar[str] = "global"

    def show(self):
        return f"global([{', '.join(E.show(p) for p in self.positions)}])"

    def check(self):
        for p in self.positions:
            if isinstance(p, E.Const) and p.value < 0:
                raise SparsecError(f"global: positions must be at least 0, got {p.value}", p.span or self.span)

    def members(self) -> np.ndarray:
        """The distinct positions, sorted."""
        return np.unique(np.array([value(p) for p in self.positions], np.int64))

    def row_count(self, n_k, lo, hi):
        members = self.members()
        return np.searchsorted(members, hi, side="right") - np.searchsorted(members, lo, side="left")

    column_count = row_count

    def cost(self, env):
        m = len(self.positions)
        return 2 * m * env["n"] - m**2

    def lower(self, cx):
        members, count = cx.table(self, "members"), cx.table(self, "count", pointer=False)
        rows = cx.let("tl.zeros([BLOCK_M], tl.int1)", "set_rows")
        cols = cx.let("tl.zeros([BLOCK_N], tl.int1)", "set_cols")
        cx.loop(f"for t in range({count}):", [
            f"member = tl.load({members} + t)",
            f"{rows} = {rows} | ({cx.rows} == member)",
            f"{cols} = {cols} | ({cx.cols} == member)"])
        return f"({rows}[:, None] | {cols}[None, :])"

    def tables(self, space):
        members = self.members()
        return {"members": members.astype(np.int32), "count": len(members)}


@dataclass(frozen=True, eq=False)
class Last(RowsOrColumns):
    """The last g key positions (n_k - g ...) as global rows and columns."""
    g: E.Expr
    keyword: ClassVar[str] = "last"
    limits: ClassVar = {"g": (0, "at least 0")}

    def row_count(self, n_k, lo, hi):
        first = n_k - value(self.g)
        return np.clip(hi - np.maximum(lo, first) + 1, 0, None)

    column_count = row_count

    def lower_rows(self, cx):
        return cx.let(f"{cx.rows} >= {self.first(cx)}", "last_rows", hoist=True)

    def lower_cols(self, cx):
        return cx.let(f"{cx.cols} >= {self.first(cx)}", "last_cols")

    def first(self, cx) -> str:
        """n_k - g, the first of the last g positions, as one saturated argument."""
        return cx.num(E.substitute(E.Apply("-", (E.Var("n_k"), self.g)), {}))


@dataclass(frozen=True, eq=False)
class Sink(RowsOrColumns):
    """j < g: the first g keys are seen by every query (attention sinks)."""
    g: E.Expr
    keyword: ClassVar[str] = "sink"
    limits: ClassVar = {"g": (0, "at least 0")}

    def row_count(self, n_k, lo, hi):
        return np.zeros(np.shape(lo), np.int64)

    def column_count(self, n_k, lo, hi):
        return _count_below(lo, hi, value(self.g))

    def cost(self, env):
        return self.sym(self.g, env) * env["n"]

    def lower_rows(self, cx):
        return None

    def lower_cols(self, cx):
        return cx.let(f"{cx.cols} < {cx.num(self.g)}", "sink_cols")
