"""The operators of the language's expressions: per operator its printer, type, evaluator, interval
and sympy and Triton forms (one table, OPS), with the scalar and range arithmetic they share."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import sympy

from ..errors import SparsecError


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray)


def _divisor(b, span):
    if (np.any(b == 0) if _is_array(b) else b == 0):
        raise SparsecError("division by zero", span)
    return b


def _isqrt(x, span):
    if np.any(np.asarray(x) < 0):
        raise SparsecError("isqrt of a negative number", span)
    if _is_array(x):
        r = np.floor(np.sqrt(x.astype(np.float64))).astype(np.int64)
        r -= (r * r > x)            # float sqrt can land one above the exact root
        return r + ((r + 1) * (r + 1) <= x)
    return math.isqrt(int(x))


def _ilog2(x, span):
    if np.any(np.asarray(x) < 1):
        raise SparsecError("ilog2 needs a positive argument", span)
    if _is_array(x):
        return np.floor(np.log2(x.astype(np.float64))).astype(np.int64)
    return int(x).bit_length() - 1


def _real(fn, name, ok):
    def apply(x, span):
        if not np.all(ok(np.asarray(x, dtype=np.float64 if not _is_array(x) else None))):
            raise SparsecError(f"{name} outside its domain", span)
        return fn(x) if _is_array(x) else float(fn(float(x)))   # a scalar: Python ints of any size
    return apply


def _ceil(x, span):
    return np.ceil(x).astype(np.int64) if _is_array(x) else math.ceil(_finite(x, span))


def _floor(x, span):
    return np.floor(x).astype(np.int64) if _is_array(x) else math.floor(_finite(x, span))


def _finite(x, span):
    if not math.isfinite(x):
        raise SparsecError(f"expected a finite number, found {x}", span)
    return x


@dataclass(frozen=True)
class Op:
    """One operator, all of its views together."""
    arity: tuple[int, int]             # (min, max) argument count; max -1: any
    kind: str                          # result: "num" or "bool"
    operands: str                      # "num" or "bool" or "any"
    evaluate: Callable[..., Any]       # (span, *values) -> value; floor semantics for // and %
    sympy: Callable[..., Any] | None   # (*sympy args) -> sympy expr
    infix: tuple[str, int] | None = None  # (symbol, precedence) for operators
    triton: Callable[..., str] | None = None  # (*Triton source of args) -> Triton source; floor // and %
    interval: Callable[..., Any] | None = None  # (span, *argument ranges) -> range; see `bounds`


# precedence, loosest first: or 1, and 2, not 3, comparison 4, + - 5, & 6, * // % 7, unary - 8, ** 9
OPS: dict[str, Op] = {
    "+": Op((2, 2), "num", "num", lambda s, a, b: a + b, lambda a, b: a + b, ("+", 5),
       triton=lambda a, b: f"({a} + {b})",
       interval=lambda s, a, b: (a[0] + b[0], a[1] + b[1])),
    "-": Op((2, 2), "num", "num", lambda s, a, b: a - b, lambda a, b: a - b, ("-", 5),
       triton=lambda a, b: f"({a} - {b})",
       interval=lambda s, a, b: (a[0] - b[1], a[1] - b[0])),
    "*": Op((2, 2), "num", "num", lambda s, a, b: a * b, lambda a, b: a * b, ("*", 7),
       triton=lambda a, b: f"({a} * {b})",
       interval=lambda s, a, b: _corners(lambda x, y: x * y, a, b)),
    "//": Op((2, 2), "num", "num", lambda s, a, b: a // _divisor(b, s),
             lambda a, b: sympy.floor(a / b), ("//", 7),
       triton=lambda a, b: f"_floordiv({a}, {b})",
       interval=lambda s, a, b: _corners(lambda x, y: x // y, a, b)),
    "%": Op((2, 2), "num", "num", lambda s, a, b: a % _divisor(b, s), sympy.Mod, ("%", 7),
       triton=lambda a, b: f"_mod({a}, {b})",
       interval=lambda s, a, b: _modulo_range(b)),
    "**": Op((2, 2), "num", "num", lambda s, a, b: _power(a, b, s), lambda a, b: a ** b, ("**", 9),
       interval=lambda s, a, b: _power_range(a, b, s)),
    "neg": Op((1, 1), "num", "num", lambda s, a: -a, lambda a: -a, ("-", 8),
       triton=lambda a: f"(-{a})",
       interval=lambda s, a: (-a[1], -a[0])),
    "==": Op((2, 2), "bool", "num", lambda s, a, b: a == b, sympy.Eq, ("==", 4),
       triton=lambda a, b: f"({a} == {b})"),
    "!=": Op((2, 2), "bool", "num", lambda s, a, b: a != b, sympy.Ne, ("!=", 4),
       triton=lambda a, b: f"({a} != {b})"),
    "<": Op((2, 2), "bool", "num", lambda s, a, b: a < b, sympy.Lt, ("<", 4),
       triton=lambda a, b: f"({a} < {b})"),
    "<=": Op((2, 2), "bool", "num", lambda s, a, b: a <= b, sympy.Le, ("<=", 4),
       triton=lambda a, b: f"({a} <= {b})"),
    ">": Op((2, 2), "bool", "num", lambda s, a, b: a > b, sympy.Gt, (">", 4),
       triton=lambda a, b: f"({a} > {b})"),
    ">=": Op((2, 2), "bool", "num", lambda s, a, b: a >= b, sympy.Ge, (">=", 4),
       triton=lambda a, b: f"({a} >= {b})"),
    # and / or are n-ary: a chain `a or b or c` is one node (no short cut: every operand is evaluated)
    "and": Op((2, -1), "bool", "bool", lambda s, *a: functools.reduce(np.logical_and, a), sympy.And, ("and", 2),
       triton=lambda *a: f"({' & '.join(a)})"),
    "or": Op((2, -1), "bool", "bool", lambda s, *a: functools.reduce(np.logical_or, a), sympy.Or, ("or", 1),
       triton=lambda *a: f"({' | '.join(a)})"),
    "not": Op((1, 1), "bool", "bool", lambda s, a: np.logical_not(a), sympy.Not, ("not", 3),
       triton=lambda a: f"({a} == 0)"),
    "min": Op((2, -1), "num", "num", lambda s, *a: _fold(np.minimum, min, a), sympy.Min,
       triton=lambda *a: _nest("tl.minimum", a),
       interval=lambda s, *a: (min(x[0] for x in a), min(x[1] for x in a))),
    "max": Op((2, -1), "num", "num", lambda s, *a: _fold(np.maximum, max, a), sympy.Max,
       triton=lambda *a: _nest("tl.maximum", a),
       interval=lambda s, *a: (max(x[0] for x in a), max(x[1] for x in a))),
    "abs": Op((1, 1), "num", "num", lambda s, a: abs(a), sympy.Abs,
       triton=lambda a: f"tl.abs({a})",
       interval=lambda s, a: (max(0, a[0], -a[1]), max(-a[0], a[1]))),
    "isqrt": Op((1, 1), "num", "num", lambda s, a: _isqrt(a, s), lambda a: sympy.floor(sympy.sqrt(a)),
       triton=lambda a: f"_isqrt({a})",
       interval=lambda s, a: tuple(math.isqrt(int(x)) for x in _domain(a, 0, "isqrt", s, below=1 << 62))),
    "ilog2": Op((1, 1), "num", "num", lambda s, a: _ilog2(a, s), lambda a: sympy.floor(sympy.log(a, 2)),
       triton=lambda a: f"_ilog2({a})",
       interval=lambda s, a: tuple(int(x).bit_length() - 1 for x in _domain(a, 1, "ilog2", s, below=1 << 62))),
    "ceil_div": Op((2, 2), "num", "num", lambda s, a, b: -((-a) // _divisor(b, s)),
                   lambda a, b: sympy.ceiling(a / b),
       triton=lambda a, b: f"(-_floordiv(-{a}, {b}))",
       interval=lambda s, a, b: _corners(lambda x, y: -((-x) // y), a, b)),
    "sqrt": Op((1, 1), "num", "num", lambda s, a: _real(np.sqrt, "sqrt", lambda x: x >= 0)(a, s), sympy.sqrt,
       triton=lambda a: f"tl.sqrt(_real({a}))",
       interval=lambda s, a: tuple(math.sqrt(x) for x in _domain(a, 0, "sqrt", s))),
    "log2": Op((1, 1), "num", "num", lambda s, a: _real(np.log2, "log2", lambda x: x > 0)(a, s),
               lambda a: sympy.log(a, 2),
       triton=lambda a: f"tl.log2(_real({a}))",
       interval=lambda s, a: tuple(math.log2(x) for x in _domain(a, 0, "log2", s, strict=True))),
    "ceil": Op((1, 1), "num", "num", lambda s, a: _ceil(a, s), sympy.ceiling,
       triton=lambda a: f"tl.ceil(_real({a})).to(tl.int64)",
       interval=lambda s, a: (math.ceil(a[0]), math.ceil(a[1]))),
    "floor": Op((1, 1), "num", "num", lambda s, a: _floor(a, s), sympy.floor,
       triton=lambda a: f"tl.floor(_real({a})).to(tl.int64)",
       interval=lambda s, a: (math.floor(a[0]), math.floor(a[1]))),
    # real operators (spec section 7, for score expressions; where(...) may use them too)
    "/": Op((2, 2), "num", "num", lambda s, a, b: _true_divide(a, _divisor(b, s)), lambda a, b: a / b, ("/", 7),
       triton=lambda a, b: f"(_real({a}) / _real({b}))",
       interval=lambda s, a, b: _corners(lambda x, y: x / y, a, _nonzero(b, s))),
    "exp": Op((1, 1), "num", "num", lambda s, a: _real(np.exp, "exp", lambda x: x == x)(a, s), sympy.exp,
       triton=lambda a: f"tl.exp(_real({a}))",
       interval=lambda s, a: _monotone(math.exp, a, s)),
    "log": Op((1, 1), "num", "num", lambda s, a: _real(np.log, "log", lambda x: x > 0)(a, s), sympy.log,
       triton=lambda a: f"tl.log(_real({a}))",
       interval=lambda s, a: tuple(math.log(x) for x in _domain(a, 0, "log", s, strict=True))),
    "tanh": Op((1, 1), "num", "num", lambda s, a: _real(np.tanh, "tanh", lambda x: x == x)(a, s), sympy.tanh,
       triton=lambda a: f"_tanh(_real({a}))",
       interval=lambda s, a: _monotone(math.tanh, a, s)),
    "sigmoid": Op((1, 1), "num", "num", lambda s, a: _real(_sigmoid, "sigmoid", lambda x: x == x)(a, s),
                  lambda a: 1 / (1 + sympy.exp(-a)),
       triton=lambda a: f"_sigmoid(_real({a}))",
       interval=lambda s, a: _monotone(_sigmoid, a, s)),
    "softplus": Op((1, 1), "num", "num", lambda s, a: _real(_softplus, "softplus", lambda x: x == x)(a, s),
                   lambda a: sympy.log(1 + sympy.exp(a)),
       triton=lambda a: f"_softplus(_real({a}))",
       interval=lambda s, a: _monotone(_softplus, a, s)),
    "clamp": Op((3, 3), "num", "num",
                lambda s, a, lo, hi: _fold(np.minimum, min, (_fold(np.maximum, max, (a, lo)), hi)),
                lambda a, lo, hi: sympy.Min(sympy.Max(a, lo), hi),
       triton=lambda a, lo, hi: f"tl.minimum(tl.maximum({a}, {lo}), {hi})",
       interval=lambda s, a, lo, hi: (min(max(a[0], lo[0]), hi[0]), min(max(a[1], lo[1]), hi[1]))),
    # select(cond, a, b): a where cond holds, else b (its first operand is a condition)
    "select": Op((3, 3), "num", "any", lambda s, c, a, b: np.where(c, a, b) if _is_array(c) else (a if c else b),
                 lambda c, a, b: sympy.Piecewise((a, c), (b, True)),
       triton=lambda c, a, b: f"tl.where({c}, {a}, {b})",
       interval=lambda s, c, a, b: (min(a[0], b[0]), max(a[1], b[1]))),
}
REAL_OPS = frozenset({"sqrt", "log2", "/", "exp", "log", "tanh", "sigmoid", "softplus"})   # results are reals
FUNCTIONS = tuple(name for name, op in OPS.items() if op.infix is None)


def _sigmoid(x):
    """1 / (1 + e^-x) without overflow on either side."""
    if not _is_array(x):
        return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softplus(x):
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)."""
    if not _is_array(x):
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _true_divide(a, b):
    if _is_array(a) or _is_array(b):
        return np.true_divide(a, b)
    try:
        return a / b
    except OverflowError:   # Python ints past the float range
        return float("inf") if (a > 0) == (b > 0) else float("-inf")


def _monotone(fn, a, span):
    """(fn(lo), fn(hi)) of an increasing fn; a located error where it overflows."""
    try:
        return fn(a[0]), fn(a[1])
    except OverflowError:
        raise SparsecError(f"this real expression overflows here (its argument ranges over {_range(a)})",
                           span) from None


def _nest(fn: str, args) -> str:
    out = args[0]
    for a in args[1:]:
        out = f"{fn}({out}, {a})"
    return out


def _fold(array_fn, scalar_fn, values):
    if any(_is_array(v) for v in values):
        out = values[0]
        for v in values[1:]:
            out = array_fn(out, v)
        return out
    return scalar_fn(values)


NEGATIVE_POWER = "** needs an exponent of at least 0 here (a negative power of an integer is not an integer)"


def _power(a, b, span):
    if _is_array(b) or _is_array(a):
        if np.any(np.asarray(b) < 0):
            raise SparsecError(NEGATIVE_POWER, span)
        return np.power(a, b)
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        if abs(a) > 1 and b * math.log2(abs(a)) > 257:   # past EXACT: no need to compute it
            raise SparsecError(f"integer overflow: the power is about 2**{int(b * math.log2(abs(a)))}; constants "
                               f"and arguments must stay below 2**256", span)
        return a ** b
    if a == 0 and b < 0:
        raise SparsecError("division by zero", span)
    try:
        return float(a) ** float(b)
    except (OverflowError, ValueError):
        raise SparsecError("this power is not a finite real number", span) from None


# ---- ranges (where(...) is checked over its rows and keys before it is evaluated) -----------------

def _corners(fn, a, b):
    values = [fn(x, y) for x in a for y in b]
    return min(values), max(values)


def _nonzero(b, span):
    if b[0] <= 0 <= b[1]:
        raise SparsecError(f"this divisor can be 0 (it ranges over {_range(b)} here)", span)
    return b


def _modulo_range(b):
    return (0, b[1]) if b[0] > 0 else (b[0], 0)


def _domain(a, low, name, span, strict=False, below=None):
    """a, if it lies in the operator's domain; `below`: isqrt and ilog2 of 64-bit arrays take
    arguments under 2**62, where their float estimate and its correction cannot overflow."""
    if a[0] < low or (strict and a[0] <= low) or (below is not None and a[1] >= below):
        bound = f"above {low}" if strict else f"at least {low}"
        bound += " and below 2**62" if below is not None else ""
        raise SparsecError(f"{name} needs an argument {bound}, and this one ranges over {_range(a)} here", span)
    return a


def _power_range(a, b, span):
    if b[0] < 0:
        raise SparsecError(NEGATIVE_POWER, span)
    top = max(abs(a[0]), abs(a[1]))
    if top > 1 and b[1] * math.log2(top) > 64:
        raise SparsecError(f"integer overflow: this power reaches about 2**{int(b[1] * math.log2(top))} here, "
                           f"beyond the 64-bit integers the language computes with", span)
    values = [x ** y for x in a for y in b] + ([0] if a[0] <= 0 <= a[1] else [])
    return min(values), max(values)


def _range(r) -> str:
    return f"{_short(r[0])}..{_short(r[1])}"


def _short(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x) if abs(x) < 1 << 64 else f"about {'-' if x < 0 else ''}2**{abs(x).bit_length() - 1}"
