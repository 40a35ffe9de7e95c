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

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import expr as E
from .tiles import EMPTY, FULL, PARTIAL


@dataclass(frozen=True)
class Arrays:
    """The array operations the rules use, so that one set of rules classifies tiles on the host
    (numpy, here) and on a device (torch, layout/input_tiles.py) without this module importing torch."""
    asarray: Callable      # a Python scalar or array -> an array (ints int64, reals float64)
    where: Callable
    minimum: Callable
    maximum: Callable
    abs: Callable
    ints: Callable         # a bool or int array -> int64
    is_real: Callable      # whether an array (or scalar) holds reals


NUMPY = Arrays(np.asarray, np.where, np.minimum, np.maximum, np.abs, lambda x: np.asarray(x).astype(np.int64),
               lambda x: np.asarray(x).dtype.kind == "f")


def tile_classes(cond: E.Expr, t, qt: np.ndarray, kt: np.ndarray, env: dict) -> np.ndarray:
    """Classes of the tiles (qt, kt) of tiling t; env: what conditions.env gives (inputs, head)."""
    ranges = {"i": (t.q_lo[qt], t.q_hi[qt]), "j": (t.k_lo[kt], t.k_hi[kt])}
    ranges.update({name: (env[name], env[name]) for name in ("h", "b", "n", "n_q", "n_k")})
    lo, hi = condition_interval(cond, ranges, lambda e: _read(e, _Context(t, qt, kt, env)), NUMPY)
    lo, hi = np.broadcast_to(lo, qt.shape), np.broadcast_to(hi, qt.shape)
    return np.where(lo == 1, FULL, np.where(hi == 0, EMPTY, PARTIAL)).astype(np.int8)


def condition_interval(cond: E.Expr, ranges: dict, read: Callable, xp: Arrays):
    """(lo, hi) of a condition per tile, 1 and 0 for true and false: ranges gives each variable's
    (lo, hi) per tile, read(e) each input read's, in the arrays of xp."""
    return _truth(_interval(cond, ranges, read, xp, {}))


@dataclass(frozen=True)
class _Context:
    t: object
    qt: np.ndarray
    kt: np.ndarray
    env: dict


def _truth(iv):
    return (0, 1) if iv is None else iv


def _interval(e: E.Expr, ranges: dict, read: Callable, xp: Arrays, memo: dict):
    if id(e) in memo:
        return memo[id(e)][0]
    if isinstance(e, E.Const):
        out = (int(e.value), int(e.value)) if isinstance(e.value, bool) else (e.value, e.value)
    elif isinstance(e, E.Var):
        out = ranges.get(e.name)
    elif isinstance(e, E.Read):
        out = read(e)
    else:
        args = [_interval(a, ranges, read, xp, memo) for a in e.args]
        rule = RULES.get(e.op)
        if e.op in ("and", "or", "not"):
            out = rule(xp, *(_truth(a) for a in args))
        elif rule is None or any(a is None for a in args):
            out = None
        elif e.op in ARITHMETIC and any(xp.is_real(x) for a in args for x in a):
            out = None   # reals computed from reals are rounded: no exact bound
        else:
            out = rule(xp, *args)
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


def _constant_positive(xp: Arrays, b) -> int | None:
    lo, hi = b
    if np.ndim(lo) == 0 and np.ndim(hi) == 0 and not xp.is_real(lo) and lo == hi and lo > 0:
        return int(lo)
    return None


def _floordiv(xp, a, b):
    d = _constant_positive(xp, b)
    return None if d is None else (a[0] // d, a[1] // d)   # monotone in a for a positive d


def _ceil_div(xp, a, b):
    d = _constant_positive(xp, b)
    return None if d is None else (-((-a[0]) // d), -((-a[1]) // d))


def _mod(xp, a, b):
    d = _constant_positive(xp, b)
    if d is None:
        return None
    lo, hi = xp.asarray(a[0]), xp.asarray(a[1])
    same = (lo // d) == (hi // d)   # no wrap inside the range: exact
    return xp.where(same, lo % d, xp.asarray(0)), xp.where(same, hi % d, xp.asarray(d - 1))


def _fold(pick, parts):
    lo, hi = parts[0]
    for p in parts[1:]:
        lo, hi = pick(lo, p[0]), pick(hi, p[1])
    return lo, hi


def _times(xp, a, b):
    corners = [xp.asarray(x * y) for x in a for y in b]
    return functools.reduce(xp.minimum, corners), functools.reduce(xp.maximum, corners)


def _least(xp, *parts):
    """min (and `and`, of truth intervals): the least of the lows and the least of the highs."""
    return _fold(lambda x, y: xp.minimum(xp.asarray(x), xp.asarray(y)), parts)


def _greatest(xp, *parts):
    return _fold(lambda x, y: xp.maximum(xp.asarray(x), xp.asarray(y)), parts)


def _abs(xp, a):
    lo, hi = xp.asarray(a[0]), xp.asarray(a[1])
    zero = xp.asarray(0)
    return xp.where(lo > 0, lo, xp.where(hi < 0, -hi, zero)), xp.maximum(xp.abs(lo), xp.abs(hi))


def _bools(xp, true, false):
    """A condition's interval from where it surely holds and where it surely fails."""
    return xp.ints(true), xp.ints(~xp.asarray(false))


def _less(xp, a, b, strict: bool):
    """a < b (a <= b when not strict): sure where a's greatest is below b's least."""
    a_hi, b_lo, a_lo, b_hi = (xp.asarray(x) for x in (a[1], b[0], a[0], b[1]))
    return _bools(xp, a_hi < b_lo, a_lo >= b_hi) if strict else _bools(xp, a_hi <= b_lo, a_lo > b_hi)


def _equal(xp, a, b):
    a0, a1, b0, b1 = (xp.asarray(x) for x in (*a, *b))
    return _bools(xp, (a0 == a1) & (b0 == b1) & (a0 == b0), (a1 < b0) | (b1 < a0))


ARITHMETIC = ("+", "-", "*", "neg", "//", "%", "ceil_div", "abs", "min", "max")
RULES = {   # operator -> interval of its result from its operands' intervals (lo, hi), in xp's arrays
    "+": lambda xp, a, b: (a[0] + b[0], a[1] + b[1]),
    "-": lambda xp, a, b: (a[0] - b[1], a[1] - b[0]),
    "neg": lambda xp, a: (-xp.asarray(a[1]), -xp.asarray(a[0])),
    "*": _times,
    "//": _floordiv,
    "ceil_div": _ceil_div,
    "%": _mod,
    "abs": _abs,
    "min": _least,
    "max": _greatest,
    "<": lambda xp, a, b: _less(xp, a, b, True),
    "<=": lambda xp, a, b: _less(xp, a, b, False),
    ">": lambda xp, a, b: _less(xp, b, a, True),
    ">=": lambda xp, a, b: _less(xp, b, a, False),
    "==": _equal,
    "!=": lambda xp, a, b: tuple(1 - x for x in reversed(_equal(xp, a, b))),
    "and": _least,
    "or": _greatest,
    "not": lambda xp, a: (1 - xp.asarray(a[1]), 1 - xp.asarray(a[0])),
}
