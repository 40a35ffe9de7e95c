"""Tile classes of a where(...) condition that reads call-time inputs, by interval arithmetic over all tiles at once.

For each tile, i and j range over its rows and keys and each input read over the values it can
take there; the condition's interval then says FULL (true for every pair), EMPTY (false for
every pair) or PARTIAL. Sound for any condition; tight when the condition is monotone in each
variable and each read depends on one of i and j (Expire-Span's `i - j < span[b, h, j]`, key
padding). Cost: O(n) values per read and O(1) per tile, never a pair. What the rules below do
not cover (reals computed from reals, non-constant divisors, the number functions) is unknown:
PARTIAL, which is always sound.
"""
from __future__ import annotations

import numpy as np

from . import expr as E
from .tiles import EMPTY, FULL, PARTIAL


def tile_classes(cond: E.Expr, t, qt: np.ndarray, kt: np.ndarray, env: dict) -> np.ndarray:
    """Classes of the tiles (qt, kt) of tiling t; env: what conditions.env gives (inputs, head)."""
    ranges = {"i": (t.q_lo[qt], t.q_hi[qt]), "j": (t.k_lo[kt], t.k_hi[kt])}
    ranges.update({name: (env[name], env[name]) for name in ("h", "b", "n", "n_q", "n_k")})
    lo, hi = _truth(_interval(cond, _Context(t, qt, kt, env, ranges), {}))
    lo, hi = np.broadcast_to(lo, qt.shape), np.broadcast_to(hi, qt.shape)
    return np.where(lo == 1, FULL, np.where(hi == 0, EMPTY, PARTIAL)).astype(np.int8)


class _Context:
    def __init__(self, t, qt, kt, env, ranges):
        self.t, self.qt, self.kt, self.env, self.ranges = t, qt, kt, env, ranges


def _truth(iv):
    return (0, 1) if iv is None else iv


def _is_real(iv) -> bool:
    return any(np.asarray(x).dtype.kind == "f" for x in iv)


def _interval(e: E.Expr, cx: _Context, memo: dict):
    if id(e) in memo:
        return memo[id(e)][0]
    if isinstance(e, E.Const):
        out = (int(e.value), int(e.value)) if isinstance(e.value, bool) else (e.value, e.value)
    elif isinstance(e, E.Var):
        out = cx.ranges.get(e.name)
    elif isinstance(e, E.Read):
        out = _read(e, cx)
    else:
        args = [_interval(a, cx, memo) for a in e.args]
        rule = RULES.get(e.op)
        if e.op in ("and", "or", "not"):
            out = rule(*(_truth(a) for a in args))
        elif rule is None or any(a is None for a in args):
            out = None
        elif e.op in ARITHMETIC and any(_is_real(a) for a in args):
            out = None   # reals computed from reals are rounded: no exact bound
        else:
            out = rule(*args)
    memo[id(e)] = (out, e)
    return out


def _read(e: E.Read, cx: _Context):
    """The range of a read per tile: exact when its index uses neither i nor j, per tile from its
    values at every row (or key) when it uses one, the whole input's range (and 0, for reads
    outside it) when it uses both."""
    from .conditions import _first, _min_max, coordinates
    names = E.names(e)
    if "i" in names and "j" in names:
        area = int((cx.t.q_hi - cx.t.q_lo).max() + 1) * int((cx.t.k_hi - cx.t.k_lo).max() + 1)
        if area <= SMALL_TILE:   # blocks(B, ...) over a block-level input: its own elements, per tile
            return _read_on_tiles(e, cx)
        array = cx.env[e.decl.name]
        lo, hi = (array.min(), array.max()) if array.size else (0, 0)
        return (min(lo, 0), max(hi, 0))
    if "i" not in names and "j" not in names:
        value = np.asarray(E.evaluate(e, cx.env))
        return (value, value)
    var, lo, hi, pick = ("i", cx.t.q_lo, cx.t.q_hi, cx.qt) if "i" in names else ("j", cx.t.k_lo, cx.t.k_hi, cx.kt)
    at = coordinates(lo, hi)
    values = np.broadcast_to(np.asarray(E.evaluate(e, {**cx.env, var: at})), at.shape)
    if values.dtype == bool:
        values = values.astype(np.int64)
    tile_lo, tile_hi = _min_max(values, _first(at), lo, hi)
    return tile_lo[pick], tile_hi[pick]


SMALL_TILE = 256   # pairs per tile up to which a read of i and j is evaluated on the tile's pairs


def _read_on_tiles(e: E.Read, cx: _Context):
    """Per tile, the least and greatest value of the read over the tile's pairs, in chunks of
    CHUNK_PAIRS pairs (tiles this small are a block-level input's own elements)."""
    from .conditions import _tile_pairs
    from .pattern import CHUNK_PAIRS
    lo, hi = np.empty(len(cx.qt)), np.empty(len(cx.qt))
    area = int((cx.t.q_hi - cx.t.q_lo).max() + 1) * int((cx.t.k_hi - cx.t.k_lo).max() + 1)
    step = max(1, CHUNK_PAIRS // area)
    for s in range(0, len(cx.qt), step):
        rows, cols, valid = _tile_pairs(cx.t, cx.qt[s:s + step], cx.kt[s:s + step])
        values = np.broadcast_to(np.asarray(E.evaluate(e, {**cx.env, "i": rows, "j": cols}), np.float64),
                                 valid.shape)
        lo[s:s + step] = np.where(valid, values, np.inf).min(axis=(1, 2))
        hi[s:s + step] = np.where(valid, values, -np.inf).max(axis=(1, 2))
    if e.decl.dtype != "float":
        return lo.astype(np.int64), hi.astype(np.int64)
    return lo, hi


def _constant_positive(b) -> int | None:
    lo, hi = b
    if np.ndim(lo) == 0 and np.ndim(hi) == 0 and lo == hi and not isinstance(lo, float) and lo > 0:
        return int(lo)
    return None


def _floordiv(a, b):
    d = _constant_positive(b)
    return None if d is None else (a[0] // d, a[1] // d)   # monotone in a for a positive d


def _ceil_div(a, b):
    d = _constant_positive(b)
    return None if d is None else (-((-a[0]) // d), -((-a[1]) // d))


def _mod(a, b):
    d = _constant_positive(b)
    if d is None:
        return None
    same = (a[0] // d) == (a[1] // d)   # no wrap inside the range: exact
    return np.where(same, a[0] % d, 0), np.where(same, a[1] % d, d - 1)


def _times(a, b):
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return np.minimum.reduce(np.broadcast_arrays(*corners)), np.maximum.reduce(np.broadcast_arrays(*corners))


def _abs(a):
    lo = np.where(np.asarray(a[0]) > 0, a[0], np.where(np.asarray(a[1]) < 0, -np.asarray(a[1]), 0))
    return lo, np.maximum(np.abs(a[0]), np.abs(a[1]))


def _fold(pick, parts):
    lo, hi = parts[0]
    for p in parts[1:]:
        lo, hi = pick(lo, p[0]), pick(hi, p[1])
    return lo, hi


def _bools(true, false):
    """A condition's interval from where it surely holds and where it surely fails."""
    true, false = np.asarray(true), np.asarray(false)
    return true.astype(np.int64), (~false).astype(np.int64)


def _equal(a, b):
    one = (np.asarray(a[0]) == a[1]) & (np.asarray(b[0]) == b[1]) & (np.asarray(a[0]) == b[0])
    return _bools(one, (np.asarray(a[1]) < b[0]) | (np.asarray(b[1]) < a[0]))


ARITHMETIC = ("+", "-", "*", "neg", "//", "%", "ceil_div", "abs", "min", "max")
RULES = {   # operator -> interval of its result from its operands' intervals (lo, hi)
    "+": lambda a, b: (a[0] + b[0], a[1] + b[1]),
    "-": lambda a, b: (a[0] - b[1], a[1] - b[0]),
    "neg": lambda a: (-np.asarray(a[1]), -np.asarray(a[0])),
    "*": _times,
    "//": _floordiv,
    "ceil_div": _ceil_div,
    "%": _mod,
    "abs": _abs,
    "min": lambda *p: _fold(np.minimum, p),
    "max": lambda *p: _fold(np.maximum, p),
    "<": lambda a, b: _bools(np.asarray(a[1]) < b[0], np.asarray(a[0]) >= b[1]),
    "<=": lambda a, b: _bools(np.asarray(a[1]) <= b[0], np.asarray(a[0]) > b[1]),
    ">": lambda a, b: _bools(np.asarray(b[1]) < a[0], np.asarray(b[0]) >= a[1]),
    ">=": lambda a, b: _bools(np.asarray(b[1]) <= a[0], np.asarray(b[0]) > a[1]),
    "==": _equal,
    "!=": lambda a, b: tuple(1 - x for x in reversed(_equal(a, b))),
    "and": lambda *p: _fold(np.minimum, p),
    "or": lambda *p: _fold(np.maximum, p),
    "not": lambda a: (1 - np.asarray(a[1]), 1 - np.asarray(a[0])),
}
