"""Positional primitives: predicates of the query position p and key index j, classified by intervals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import sympy

from ..errors import SparsecError
from . import expr as E
from .pattern import Pattern, value
from .tiles import EMPTY, FULL, PARTIAL, TileSet, Tiling, expand_ranges

INF = 1 << 61  # an offset beyond any sequence, still far from int64 overflow


def _classes(nonempty: np.ndarray, full: np.ndarray) -> np.ndarray:
    return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)


def _has_multiple(lo: np.ndarray, hi: np.ndarray, d: int) -> np.ndarray:
    """Whether [lo, hi] contains a multiple of d (empty intervals contain none)."""
    return (hi >= lo) & ((hi // d) * d >= lo)


class RangePattern(Pattern):
    """Candidates are ranges of key tiles per query tile; `classify` decides each candidate."""

    def key_ranges(self, t: Tiling) -> list[tuple[np.ndarray, np.ndarray]]:
        """[first, last) key tiles per query tile, one pair of arrays per covering range."""
        raise NotImplementedError

    def tiles(self, t):
        parts = [expand_ranges(first, last) for first, last in self.key_ranges(t)]
        qt = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        kt = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        return TileSet.build(t, qt, kt, self.classify(t, qt, kt))

    def estimate(self, t):
        return int(sum((last - first).sum() for first, last in self.key_ranges(t)))

    def key_range(self, t):
        ranges = self.key_ranges(t)
        return ranges[0] if len(ranges) == 1 else None


class OffsetPattern(RangePattern):
    """A predicate of the offset p - j alone. Over a tile the offsets are exactly the integers
    [q_lo - k_hi, q_hi - k_lo], so classifying a tile is a question about one interval."""

    def allowed(self, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def offset_class(self, dmin: np.ndarray, dmax: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def offset_ranges(self, t: Tiling) -> list[tuple[int, int]]:
        """Intervals of offsets that cover every allowed offset (the candidates to enumerate)."""
        raise NotImplementedError

    def mask(self, grid):
        return self.allowed(grid.offsets())

    def classify(self, t, qt, kt):
        return self.offset_class(t.q_lo[qt] - t.k_hi[kt], t.q_hi[qt] - t.k_lo[kt])

    def key_ranges(self, t):
        return [t.key_tiles(t.q_lo - hi, t.q_hi - lo) for lo, hi in self.offset_ranges(t)]

    def lower(self, cx):
        return self.lower_offset(cx, cx.offsets())

    def lower_offset(self, cx, d: str) -> str:
        """The predicate over the tile's offsets d = p - j, a (BLOCK_M, BLOCK_N) int tensor."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Full(OffsetPattern):
    keyword: ClassVar[str] = "full"

    def allowed(self, d):
        return np.ones(d.shape, bool)

    def offset_class(self, dmin, dmax):
        return np.full(dmin.shape, FULL, np.int8)

    def offset_ranges(self, t):
        return [(-INF, INF)]

    def cost(self, env):
        return env["n"] ** 2

    def lower_offset(self, cx, d):
        return cx.constant(True)


@dataclass(frozen=True, eq=False)
class Empty(OffsetPattern):
    """No pair at all: the language's `empty`, which canonical forms need to be printable."""
    keyword: ClassVar[str] = "empty"

    def allowed(self, d):
        return np.zeros(d.shape, bool)

    def offset_class(self, dmin, dmax):
        return np.full(dmin.shape, EMPTY, np.int8)

    def offset_ranges(self, t):
        return []

    def cost(self, env):
        return sympy.Integer(0)

    def lower_offset(self, cx, d):
        return cx.constant(False)


@dataclass(frozen=True, eq=False)
class Causal(OffsetPattern):
    keyword: ClassVar[str] = "causal"

    def allowed(self, d):
        return d >= 0

    def offset_class(self, dmin, dmax):
        return _classes(dmax >= 0, dmin >= 0)

    def offset_ranges(self, t):
        return [(0, INF)]

    def cost(self, env):
        n = env["n"]
        return n * (n + 1) / 2

    def lower_offset(self, cx, d):
        return f"({d} >= 0)"


@dataclass(frozen=True, eq=False)
class Band(OffsetPattern):
    """before <= p - j <= ... i.e. p - before <= j <= p + after; band(w) is band(w, w)."""
    before: E.Expr
    after: E.Expr
    keyword: ClassVar[str] = "band"

    def show(self):
        if self.before == self.after:
            return f"band({E.show(self.before)})"
        return f"band({E.show(self.before)}, {E.show(self.after)})"

    def check(self):
        b, a = self.before, self.after
        if self.before == self.after and isinstance(b, E.Const) and b.value < 0:
            raise SparsecError(f"band: w must be at least 0, got {b.value}", b.span or self.span)
        if isinstance(b, E.Const) and isinstance(a, E.Const) and b.value + a.value < 0:
            raise SparsecError(f"band: before + after must be at least 0 (the band would be empty), "
                               f"got {b.value} + {a.value}", self.span)

    def allowed(self, d):
        return (d >= -value(self.after)) & (d <= value(self.before))

    def offset_class(self, dmin, dmax):
        lo, hi = -value(self.after), value(self.before)
        return _classes((dmax >= lo) & (dmin <= hi), (dmin >= lo) & (dmax <= hi))

    def offset_ranges(self, t):
        return [(-value(self.after), value(self.before))]

    def cost(self, env):
        # sum over offsets d in [-after, before] of the n - |d| rows that have one (before, after >= 0)
        b, a, n = self.sym(self.before, env), self.sym(self.after, env), env["n"]
        return n * (a + b + 1) - (a * (a + 1) + b * (b + 1)) / 2

    def lower_offset(self, cx, d):
        return f"(({d} >= {cx.num(E.substitute(E.Apply('neg', (self.after,)), {}))}) & ({d} <= {cx.num(self.before)}))"


@dataclass(frozen=True, eq=False)
class Dilated(OffsetPattern):
    """|p - j| <= w * d and (p - j) % d == 0: w positions per side, every d-th."""
    w: E.Expr
    d: E.Expr
    keyword: ClassVar[str] = "dilated"
    limits: ClassVar = {"w": (0, "at least 0"), "d": (1, "at least 1")}

    def allowed(self, d):
        w, s = value(self.w), value(self.d)
        return (np.abs(d) <= w * s) & (d % s == 0)

    def offset_class(self, dmin, dmax):
        w, s = value(self.w), value(self.d)
        lo, hi = np.maximum(dmin, -w * s), np.minimum(dmax, w * s)
        inside = (dmin >= -w * s) & (dmax <= w * s)
        return _classes(_has_multiple(lo, hi, s), inside & ((s == 1) | ((dmin == dmax) & (dmin % s == 0))))

    def offset_ranges(self, t):
        reach = value(self.w) * value(self.d)
        return [(-reach, reach)]

    def cost(self, env):
        w, d, n = self.sym(self.w, env), self.sym(self.d, env), env["n"]
        return n * (2 * w + 1) - d * w * (w + 1)

    def lower_offset(self, cx, d):
        reach = cx.num(E.substitute(E.Apply("*", (self.w, self.d)), {}))   # one saturated product
        return f"((tl.abs({d}) <= {reach}) & (_mod({d}, {cx.num(self.d)}) == 0))"


@dataclass(frozen=True, eq=False)
class Stride(OffsetPattern):
    s: E.Expr
    keyword: ClassVar[str] = "stride"
    limits: ClassVar = {"s": (1, "at least 1")}

    def allowed(self, d):
        return d % value(self.s) == 0

    def offset_class(self, dmin, dmax):
        s = value(self.s)
        return _classes(_has_multiple(dmin, dmax, s), (s == 1) | ((dmin == dmax) & (dmin % s == 0)))

    def offset_ranges(self, t):
        return [(-INF, INF)]

    def cost(self, env):
        return env["n"] ** 2 / self.sym(self.s, env)

    def lower_offset(self, cx, d):
        return f"(_mod({d}, {cx.num(self.s)}) == 0)"


@dataclass(frozen=True, eq=False)
class LogSparse(OffsetPattern):
    """d = p - j is 0 or a power of two (LogSparse Transformer, causal)."""
    keyword: ClassVar[str] = "logsparse"

    def allowed(self, d):
        return (d == 0) | ((d > 0) & ((d & (d - 1)) == 0))

    def offset_class(self, dmin, dmax):
        lo = np.maximum(dmin, 0)
        top = np.left_shift(1, np.floor(np.log2(np.maximum(dmax, 1))).astype(np.int64))
        top = np.where(top > dmax, top // 2, np.where(2 * top <= dmax, 2 * top, top))  # float log2 slack
        top = np.where(dmax >= 1, top, 0)  # the largest power of two <= dmax
        nonempty = (dmax >= 0) & ((lo == 0) | (top >= lo))
        single_power = (dmin == dmax) & self.allowed(dmin)
        return _classes(nonempty, (dmin >= 0) & ((dmax <= 2) | single_power))

    def offset_ranges(self, t):
        reach = int(t.q_hi.max() - t.k_lo.min()) if len(t.q_hi) and len(t.k_lo) else 0
        return [(0, 0)] + [(1 << k, 1 << k) for k in range(max(reach, 1).bit_length())]

    def cost(self, env):
        n = env["n"]
        return n * (1 + sympy.log(n, 2))

    def lower_offset(self, cx, d):
        # a power of two has one bit set: d & (d - 1) clears it
        return f"(({d} == 0) | (({d} > 0) & (({d} & ({d} - 1)) == 0)))"


class RowsOrColumns(Pattern):
    """p in some set of rows or j in some set of columns (global, last, sink)."""

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
        return _classes((rows[qt] > 0) | (cols[kt] > 0), all_rows[qt] | all_cols[kt])

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

    def cost(self, env):
        g, n = self.sym(self.g, env), env["n"]
        return 2 * g * n - g**2

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

    def cost(self, env):
        g, n = self.sym(self.g, env), env["n"]
        return 2 * g * n - g**2

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


@dataclass(frozen=True, eq=False)
class Chunk(RangePattern):
    """p // c == j // c: attention within aligned chunks of c positions."""
    c: E.Expr
    keyword: ClassVar[str] = "chunk"
    limits: ClassVar = {"c": (1, "at least 1")}

    def mask(self, grid):
        c = value(self.c)
        return (grid.pos // c)[:, None] == (grid.keys // c)[None, :]

    def classify(self, t, qt, kt):
        c = value(self.c)
        q0, q1, k0, k1 = t.q_lo[qt] // c, t.q_hi[qt] // c, t.k_lo[kt] // c, t.k_hi[kt] // c
        return _classes((q1 >= k0) & (k1 >= q0), (q0 == q1) & (k0 == k1) & (q0 == k0))

    def key_ranges(self, t):
        c = value(self.c)
        return [t.key_tiles((t.q_lo // c) * c, (t.q_hi // c) * c + c - 1)]

    def cost(self, env):
        return env["n"] * self.sym(self.c, env)

    def lower(self, cx):
        c = cx.num(self.c)
        rows = cx.let(f"_floordiv({cx.rows}, {c})", "chunk_rows", hoist=True)
        return f"({rows}[:, None] == _floordiv({cx.cols}, {c})[None, :])"
