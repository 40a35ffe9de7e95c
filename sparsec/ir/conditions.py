"""Tiles of where(...) from the shape of its condition, so that its layout costs the tiles visited.

A condition of the rows alone (i, h and lengths), of the keys alone (j, h, lengths), and an
equality f(i) == g(j) of a row key and a column key are classified from 1-D evaluations: O(n)
values, then per tile an any/all or a min/max. `and`, `or` and `not` combine them as intersection,
union and complement (negations pushed to the leaves), so the layout algebra enumerates only the
sparsest part (pattern.Intersection). What is left, a comparison that mixes i and j otherwise,
is evaluated pair by pair on the candidate tiles (PairCondition: the documented fallback).

These nodes are internal: Where keeps its condition for printing, masks and kernels, and asks
`plan(cond)` only for tiles, classes and estimates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import expr as E
from . import intervals
from .pattern import CHUNK_PAIRS, Pattern
from .combinators import Difference, Intersection, Union
from .positional import Full
from .tiles import EMPTY, FULL, PARTIAL, TileSet, all_tiles, expand_ranges


def _uses(e: E.Expr) -> tuple[bool, bool]:
    names = E.names(e)
    return "i" in names, "j" in names


def _negated(e: E.Expr, negate: bool) -> E.Expr:
    return E.Apply("not", (e,), span=e.span) if negate else e


def plan(cond: E.Expr, negate: bool = False) -> Pattern:
    """A pattern of the nodes below with the pairs of where(cond) (of where(not cond) when negate)."""
    rows, cols = _uses(cond)
    if not cols:
        return LineCondition(_negated(cond, negate), "i")
    if not rows:
        return LineCondition(_negated(cond, negate), "j")
    if isinstance(cond, E.Apply) and cond.op == "not":
        return plan(cond.args[0], not negate)
    if isinstance(cond, E.Apply) and cond.op in ("and", "or"):
        parts = tuple(plan(a, negate) for a in cond.args)
        return Intersection(parts) if (cond.op == "and") != negate else Union(parts)   # De Morgan
    if isinstance(cond, E.Apply) and cond.op in ("==", "!="):
        a, b = cond.args
        sides = {_uses(a): a, _uses(b): b}
        if set(sides) == {(True, False), (False, True)}:
            match = KeyMatch(sides[True, False], sides[False, True])
            return match if (cond.op == "==") != negate else Difference(Full(), match)
    return PairCondition(_negated(cond, negate))


def env(where, **names) -> dict:
    """What an expression of where(...) reads on a Grid or Tiling: the head, the lengths, the
    batch row and the declared inputs, and the given coordinates."""
    x = where.inputs
    return {"h": where.head, "b": x.batch, "n": where.n_k, "n_q": where.n_q, "n_k": where.n_k, **x.declared,
            **names}


def _values(e: E.Expr, name: str, at: np.ndarray, where) -> np.ndarray:
    """e evaluated at every coordinate `at` of one variable (a row or a key condition or key)."""
    return np.broadcast_to(np.asarray(E.evaluate(e, env(where, **{name: at}))), at.shape)


def _first(at: np.ndarray) -> int:
    return int(at[0]) if len(at) else 0


def coordinates(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every coordinate from the first tile's start to the last tile's end (tiles are ordered)."""
    return np.arange(int(lo.min()), int(hi.max()) + 1, dtype=np.int64) if len(lo) else np.zeros(0, np.int64)


def _any_all(ok: np.ndarray, base: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tile [lo, hi] (which may overlap, inside blocks), whether some / every entry of ok is set."""
    counts = np.concatenate([[0], np.cumsum(ok, dtype=np.int64)])
    hits = counts[hi - base + 1] - counts[lo - base]
    return hits > 0, hits == hi - lo + 1


def _min_max(values: np.ndarray, base: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tile, the least and greatest value: a (tiles, widest tile) gather, O(n) in all."""
    if not len(lo):
        return values[:0], values[:0]
    width = int((hi - lo).max()) + 1
    at = np.minimum(lo[:, None] + np.arange(width), hi[:, None]) - base
    picked = values[at]
    return picked.min(axis=1), picked.max(axis=1)


def _product(rows: np.ndarray, cols: np.ndarray, full: np.ndarray) -> TileSet:
    """The tiles rows x cols (sorted, unique), FULL where `full` (rows x cols) says so."""
    qt, kt = np.repeat(rows, len(cols)), np.tile(cols, len(rows))
    return TileSet(qt, kt, np.where(full.ravel(), FULL, PARTIAL).astype(np.int8))


@dataclass(frozen=True, eq=False)
class LineCondition(Pattern):
    """cond of the rows alone (on = "i", with h and the lengths: whole query rows allowed or not)
    or of the keys alone (on = "j": whole key columns)."""
    cond: E.Expr
    on: str
    keyword: ClassVar[str] = "where"

    def lines(self, t) -> tuple[np.ndarray, np.ndarray]:
        """Whether some / every row (or key) of each query (key) tile is allowed."""
        lo, hi = (t.q_lo, t.q_hi) if self.on == "i" else (t.k_lo, t.k_hi)
        at = coordinates(lo, hi)
        return _any_all(_values(self.cond, self.on, at, t).astype(bool), _first(at), lo, hi)

    def mask(self, grid):
        ok = _values(self.cond, self.on, grid.pos if self.on == "i" else grid.keys, grid).astype(bool)
        return np.broadcast_to(ok[:, None] if self.on == "i" else ok[None, :], (len(grid.pos), len(grid.keys))).copy()

    def tiles(self, t):
        some, every = self.lines(t)
        hit = np.flatnonzero(some)
        tq, tk = t.shape
        if self.on == "i":
            return _product(hit, np.arange(tk), np.repeat(every[hit], tk))
        return _product(np.arange(tq), hit, np.tile(every[hit], tq))

    def classify(self, t, qt, kt):
        some, every = self.lines(t)
        at = qt if self.on == "i" else kt
        return np.where(every[at], FULL, np.where(some[at], PARTIAL, EMPTY)).astype(np.int8)

    def estimate(self, t):
        return int(self.lines(t)[0].sum()) * t.shape[1 if self.on == "i" else 0]


@dataclass(frozen=True)
class Sides:
    """A key match read on one tiling: the row coordinates `rows` with their keys `f`, the key
    coordinates `cols` with theirs `g`, and each tile's least and greatest key on either side."""
    rows: np.ndarray
    f: np.ndarray
    cols: np.ndarray
    g: np.ndarray
    f_lo: np.ndarray
    f_hi: np.ndarray
    g_lo: np.ndarray
    g_hi: np.ndarray

    @staticmethod
    def of(t, rows, f, cols, g) -> "Sides":
        return Sides(rows, f, cols, g, *_min_max(f, _first(rows), t.q_lo, t.q_hi),
                     *_min_max(g, _first(cols), t.k_lo, t.k_hi))

    def classes(self, qt, kt, meet=None) -> np.ndarray:
        """EMPTY where the tiles' key ranges miss each other, FULL where both hold one and the
        same key, else PARTIAL (meet: already known to meet)."""
        same = (self.f_lo[qt] == self.f_hi[qt]) & (self.g_lo[kt] == self.g_hi[kt]) & (self.f_lo[qt] == self.g_lo[kt])
        if meet is None:
            meet = (self.f_lo[qt] <= self.g_hi[kt]) & (self.g_lo[kt] <= self.f_hi[qt])
        return np.where(same, FULL, np.where(meet, PARTIAL, EMPTY)).astype(np.int8)

    def candidates(self, t):
        """("rows", (first, last) key tiles per query tile) when g never decreases, ("cols", query
        tiles per key tile) when f never does (found by binary search), else (None, None)."""
        if len(self.g) and bool((self.g[1:] >= self.g[:-1]).all()):
            base = _first(self.cols)
            lo = np.searchsorted(self.g, self.f_lo, side="left") + base
            hi = np.searchsorted(self.g, self.f_hi, side="right") - 1 + base
            return "rows", t.key_tiles(lo, hi)
        if len(self.f) and bool((self.f[1:] >= self.f[:-1]).all()):
            base = _first(self.rows)
            lo = np.searchsorted(self.f, self.g_lo, side="left") + base
            hi = np.searchsorted(self.f, self.g_hi, side="right") - 1 + base
            return "cols", t.query_tiles(lo, hi)
        return None, None

    def tiles(self, t) -> TileSet:
        how, ranges = self.candidates(t)
        if how == "rows":   # each candidate holds a key of the query tile's range: they meet
            qt, kt = expand_ranges(*ranges)
            cls = self.classes(qt, kt, meet=True)
        elif how == "cols":
            kt, qt = expand_ranges(*ranges)
            order = np.lexsort((kt, qt))
            qt, kt = qt[order], kt[order]
            cls = self.classes(qt, kt, meet=True)
        else:
            qt, kt = all_tiles(t)
            cls = self.classes(qt, kt)
        keep = cls > EMPTY
        return TileSet(qt[keep], kt[keep], cls[keep]) if not keep.all() else TileSet(qt, kt, cls)

    def estimate(self, t) -> int:
        how, ranges = self.candidates(t)
        return int((ranges[1] - ranges[0]).sum()) if how else t.shape[0] * t.shape[1]


class MatchedKeys:
    """The tile views of a pattern read as a key match: it gives its Sides on a tiling."""

    def sides(self, t) -> Sides:
        raise NotImplementedError

    def classify(self, t, qt, kt):
        return self.sides(t).classes(qt, kt)

    def tiles(self, t):
        return self.sides(t).tiles(t)

    def estimate(self, t):
        return self.sides(t).estimate(t)

    def key_range(self, t):
        how, ranges = self.sides(t).candidates(t)
        return ranges if how == "rows" else None


@dataclass(frozen=True, eq=False)
class KeyMatch(MatchedKeys, Pattern):
    """f(i) == g(j): a row key equals a column key (chunks, segments, periodic classes). A tile
    is EMPTY when its ranges of f and g miss each other, FULL when both are one and the same
    value. When g (or f) never decreases, each query (key) tile meets one range of the other side,
    found by binary search: chunk-like and segment-like keys cost their tiles."""
    f: E.Expr
    g: E.Expr
    keyword: ClassVar[str] = "where"

    def sides(self, t) -> Sides:
        rows, cols = coordinates(t.q_lo, t.q_hi), coordinates(t.k_lo, t.k_hi)
        return Sides.of(t, rows, _values(self.f, "i", rows, t), cols, _values(self.g, "j", cols, t))

    def mask(self, grid):
        fv = _values(self.f, "i", grid.pos, grid)
        gv = _values(self.g, "j", grid.keys, grid)
        return fv[:, None] == gv[None, :]


def _tile_pairs(t, qt, kt):
    """Padded token coordinates of each tile: rows (C, BM, 1), cols (C, 1, BN) and their validity."""
    bm = int((t.q_hi - t.q_lo).max()) + 1
    bn = int((t.k_hi - t.k_lo).max()) + 1
    rows = t.q_lo[qt][:, None] + np.arange(bm)
    cols = t.k_lo[kt][:, None] + np.arange(bn)
    valid = (rows <= t.q_hi[qt][:, None])[:, :, None] & (cols <= t.k_hi[kt][:, None])[:, None, :]
    return rows[:, :, None], cols[:, None, :], valid


@dataclass(frozen=True, eq=False)
class PairCondition(Pattern):
    """Any other condition of i and j: evaluated on every pair of the tiles it is asked about,
    in chunks of CHUNK_PAIRS pairs (its own tiles are every tile: the fallback is quadratic);
    one that reads inputs is classified by intervals instead (intervals.py), pairs only where a
    tile is one pair (blocks(B, ...) at B x B tiles: the input's own elements)."""
    cond: E.Expr
    keyword: ClassVar[str] = "where"

    def _eval(self, rows, cols, where):
        out = E.evaluate(self.cond, env(where, i=rows, j=cols))
        return np.broadcast_to(np.asarray(out, bool), np.broadcast_shapes(np.shape(rows), np.shape(cols)))

    def mask(self, grid):
        return self._eval(grid.pos[:, None], grid.keys[None, :], grid).copy()

    def classify(self, t, qt, kt):
        out = np.empty(len(qt), np.int8)
        if not len(qt):
            return out
        area = int((t.q_hi - t.q_lo).max() + 1) * int((t.k_hi - t.k_lo).max() + 1)
        if area > 1 and E.reads(self.cond):   # an input: never pair by pair (one pair per tile is its own tensor)
            return intervals.tile_classes(self.cond, t, qt, kt, env(t))
        step = max(1, CHUNK_PAIRS // area)
        for s in range(0, len(qt), step):
            rows, cols, valid = _tile_pairs(t, qt[s:s + step], kt[s:s + step])
            ok = self._eval(rows, cols, t)
            some = (ok & valid).any(axis=(1, 2))
            every = (ok | ~valid).all(axis=(1, 2))
            out[s:s + step] = np.where(every, FULL, np.where(some, PARTIAL, EMPTY))
        return out
