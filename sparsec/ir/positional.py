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


def tile_classes(nonempty: np.ndarray, full: np.ndarray) -> np.ndarray:
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
        return tile_classes(dmax >= 0, dmin >= 0)

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
        return tile_classes((dmax >= lo) & (dmin <= hi), (dmin >= lo) & (dmax <= hi))

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
        return tile_classes(_has_multiple(lo, hi, s), inside & ((s == 1) | ((dmin == dmax) & (dmin % s == 0))))

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
        return tile_classes(_has_multiple(dmin, dmax, s), (s == 1) | ((dmin == dmax) & (dmin % s == 0)))

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
        return tile_classes(nonempty, (dmin >= 0) & ((dmax <= 2) | single_power))

    def offset_ranges(self, t):
        reach = int(t.q_hi.max() - t.k_lo.min()) if len(t.q_hi) and len(t.k_lo) else 0
        return [(0, 0)] + [(1 << k, 1 << k) for k in range(max(reach, 1).bit_length())]

    def cost(self, env):
        n = env["n"]
        return n * (1 + sympy.log(n, 2))

    def lower_offset(self, cx, d):
        # a power of two has one bit set: d & (d - 1) clears it
        return f"(({d} == 0) | (({d} > 0) & (({d} & ({d} - 1)) == 0)))"


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
        return tile_classes((q1 >= k0) & (k1 >= q0), (q0 == q1) & (k0 == k1) & (q0 == k0))

    def key_ranges(self, t):
        c = value(self.c)
        return [t.key_tiles((t.q_lo // c) * c, (t.q_hi // c) * c + c - 1)]

    def cost(self, env):
        return env["n"] * self.sym(self.c, env)

    def lower(self, cx):
        c = cx.num(self.c)
        rows = cx.let(f"_floordiv({cx.rows}, {c})", "chunk_rows", hoist=True)
        return f"({rows}[:, None] == _floordiv({cx.cols}, {c})[None, :])"
