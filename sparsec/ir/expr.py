"""Integer, real and boolean expressions of the IR: printer, type, evaluator and sympy view per operator."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sympy

from ..errors import Span, SparsecError
from .limits import EXACT, INT_MAX


@dataclass(frozen=True)
class Expr:
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Const(Expr):
    value: int | float | bool


@dataclass(frozen=True)
class Var(Expr):
    name: str  # a param or let, n / n_q / n_k, or i / j / h inside where(...)


@dataclass(frozen=True)
class Apply(Expr):
    op: str
    args: tuple[Expr, ...]


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
}
FUNCTIONS = tuple(name for name, op in OPS.items() if op.infix is None)


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


def once_per_node(fn):
    """fn(e, *args, memo=...) computed once per operation object: lets make an expression a DAG,
    whose tree can be exponentially larger than the program. The memo keeps each node alive, so
    its id stays its own while the memo is in use."""
    @functools.wraps(fn)
    def run(e, *args, memo: dict | None = None):
        if not isinstance(e, Apply):
            return fn(e, *args, memo=memo)
        memo = {} if memo is None else memo
        if id(e) not in memo:
            memo[id(e)] = (fn(e, *args, memo=memo), e)
        return memo[id(e)][0]
    return run


def bounds(e: Expr, ranges: dict[str, tuple]) -> tuple:
    """(lowest, highest) value of e when each name lies in its range, checking every integer
    sub-expression stays within the 64-bit integers and every divisor, isqrt, ilog2, sqrt and
    log2 argument within its domain over those ranges (a located error otherwise). Booleans are
    (0, 1). Exact for one variable at a time, conservative for several (interval arithmetic)."""
    return _bounds(e, ranges)[0]


@once_per_node
def _bounds(e: Expr, ranges: dict[str, tuple], memo=None) -> tuple[tuple, bool]:
    """(range, whether e is real)."""
    if isinstance(e, Const):
        real = isinstance(e.value, float)
        if not real and abs(e.value) > INT_MAX:
            raise SparsecError(f"{_short(e.value)} does not fit the 64-bit integers where(...) computes with",
                               e.span)
        return (e.value, e.value), real
    if isinstance(e, Var):
        if e.name not in ranges:
            raise SparsecError(f"'{e.name}' has no value here", e.span)
        return ranges[e.name], False
    parts = [_bounds(a, ranges, memo=memo) for a in e.args]
    real = e.op in ("sqrt", "log2") or (any(r for _, r in parts) and e.op not in ("ceil", "floor", "isqrt", "ilog2"))
    op = OPS[e.op]
    if e.op in ("//", "%", "ceil_div"):
        _nonzero(parts[1][0], e.args[1].span or e.span)
    out = (0, 1) if op.kind == "bool" else op.interval(e.span, *(r for r, _ in parts))
    if real and not all(math.isfinite(x) for x in out):
        raise SparsecError(f"this real expression is not finite here (it ranges over {_range(out)})", e.span)
    if not real and not (-INT_MAX <= out[0] and out[1] <= INT_MAX):
        raise SparsecError(f"integer overflow: {show(e)} ranges over {_range(out)} here, beyond the 64-bit "
                           f"integers the language computes with", e.span)
    return out, real


# ---- views --------------------------------------------------------------------------------------

def precedence(e: Expr) -> int:
    if isinstance(e, Apply) and OPS[e.op].infix:
        return OPS[e.op].infix[1]
    if isinstance(e, Const) and not isinstance(e.value, bool) and e.value < 0:
        return 8  # prints as a unary minus
    return 10


def show(e: Expr) -> str:
    """Source text that parses back to an equal expression."""
    if isinstance(e, Const):
        if isinstance(e.value, bool):
            return "true" if e.value else "false"
        if isinstance(e.value, float):  # only folding of sqrt/log2 makes these; keep them exact-ish
            raise ValueError("real constants have no source form; fold leaves them unevaluated")
        return str(e.value)
    if isinstance(e, Var):
        return e.name
    op = OPS[e.op]
    if op.infix is None:
        return f"{e.op}({', '.join(show(a) for a in e.args)})"
    symbol, prec = op.infix

    def wrap(a: Expr, need: int) -> str:
        return f"({show(a)})" if precedence(a) < need else show(a)

    if e.op == "neg":
        return "-" + wrap(e.args[0], 8)
    if e.op == "not":
        return "not " + wrap(e.args[0], 3)
    if e.op == "**":  # right associative; the grammar wants an atom on the left
        return f"{wrap(e.args[0], 10)} ** {wrap(e.args[1], 8)}"
    if prec == 4:  # comparisons do not chain
        return f"{wrap(e.args[0], 5)} {symbol} {wrap(e.args[1], 5)}"
    if e.op in ("and", "or"):  # n-ary: a nested and/or keeps its parentheses, so it parses back nested
        return f" {symbol} ".join(wrap(a, prec + 1) for a in e.args)
    return f"{wrap(e.args[0], prec)} {symbol} {wrap(e.args[1], prec + 1)}"


def kind(e: Expr) -> str:
    """'num' or 'bool' (checked when the expression was built)."""
    if isinstance(e, Const):
        return "bool" if isinstance(e.value, bool) else "num"
    if isinstance(e, Var):
        return "num"
    return OPS[e.op].kind


@once_per_node
def names(e: Expr, memo=None) -> frozenset[str]:
    if isinstance(e, Var):
        return frozenset([e.name])
    if not isinstance(e, Apply):
        return frozenset()
    return frozenset().union(*(names(a, memo=memo) for a in e.args))


def checked(value, e: Expr):
    """value, unless it is an integer of EXACT or more in magnitude (a located error)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and abs(value) >= EXACT:
        raise SparsecError(f"integer overflow: {show(e)} is {_short(int(value))}; constants and arguments must "
                           f"stay below 2**256", e.span)
    return value


@once_per_node
def evaluate(e: Expr, env: dict[str, Any], memo=None):
    """Value of `e` with the names in env; numpy arrays broadcast (used by where(...)). Every
    scalar integer is checked against EXACT; arrays are only evaluated after `bounds` has checked
    them."""
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Var):
        if e.name not in env:
            raise SparsecError(f"'{e.name}' has no value here", e.span)
        return env[e.name]
    return checked(OPS[e.op].evaluate(e.span, *(evaluate(a, env, memo=memo) for a in e.args)), e)


@once_per_node
def substitute(e: Expr, env: dict[str, Expr], memo=None) -> Expr:
    """Replace names by expressions, then fold every sub-expression that became constant. A
    name used twice stays one shared sub-expression, so let chains cost their length."""
    if isinstance(e, Var):
        return env.get(e.name, e)
    if isinstance(e, Const):
        return e
    args = tuple(substitute(a, env, memo=memo) for a in e.args)
    if all(isinstance(a, Const) for a in args):
        value = checked(OPS[e.op].evaluate(e.span, *(a.value for a in args)), e)
        if isinstance(value, (bool, np.bool_)):
            return Const(bool(value), span=e.span)
        if isinstance(value, (int, np.integer)):
            return Const(int(value), span=e.span)
    return Apply(e.op, args, span=e.span)  # reals stay symbolic until an integer is needed


@once_per_node
def size(e: Expr, memo=None) -> int:
    """Operations in e written out as a tree (a shared sub-expression counts each time)."""
    return 1 + sum(size(a, memo=memo) for a in e.args) if isinstance(e, Apply) else 1


def integer(e: Expr, env: dict[str, Any], memo: dict | None = None) -> int:
    """An argument's value where an integer is needed: reals are rounded down (spec section 2)."""
    value = evaluate(e, env, memo=memo)
    if isinstance(value, (bool, np.bool_)):
        raise SparsecError("expected an integer, found a boolean", e.span)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise SparsecError(f"expected a finite number, found {value}", e.span)
        return checked(math.floor(value), e)
    return int(value)


@once_per_node
def to_sympy(e: Expr, symbols: dict[str, Any], memo=None):
    if isinstance(e, Const):
        return sympy.true if e.value is True else sympy.false if e.value is False else sympy.Integer(e.value)
    if isinstance(e, Var):
        return symbols.get(e.name, sympy.Symbol(e.name, integer=True))
    return OPS[e.op].sympy(*(to_sympy(a, symbols, memo=memo) for a in e.args))


def to_triton(e: Expr, names: dict[str, str], bind: Callable[[str], str] = lambda s: s, fan_in: int = 8) -> str:
    """Triton source for e, with each free name replaced by the Triton expression in `names`.
    `//` and `%` go through floor helpers (Triton's own truncate toward zero). bind(source) may
    return a name bound to a sub-expression (the lowering keeps statements shallow with it); the
    operands of an n-ary and, or, min, max are combined at most fan_in at a time."""
    if isinstance(e, Const):
        if isinstance(e.value, bool):
            return "True" if e.value else "False"
        return repr(e.value)
    if isinstance(e, Var):
        if e.name not in names:
            raise SparsecError(f"'{e.name}' has no value inside a kernel", e.span)
        return names[e.name]
    if e.op == "**":
        base, power = e.args
        if not (isinstance(power, Const) and isinstance(power.value, int) and 0 <= power.value <= 64):
            raise SparsecError("inside a kernel, ** needs a constant exponent between 0 and 64", e.span)
        if not power.value:
            return "1"
        base = bind(to_triton(base, names, bind, fan_in))
        return bind("(" + " * ".join([base] * power.value) + ")")
    args = [to_triton(a, names, bind, fan_in) for a in e.args]
    while len(args) > fan_in:   # n-ary: groups of fan_in, each bound
        args = [bind(OPS[e.op].triton(*args[k:k + fan_in])) if len(args[k:k + fan_in]) > 1 else args[k]
                for k in range(0, len(args), fan_in)]
    return bind(OPS[e.op].triton(*args) if len(args) > 1 or OPS[e.op].arity[0] == 1 else args[0])
