"""Integer, real and boolean expressions of the IR and their views (printer, kind, evaluator, bounds, sympy, Triton)."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sympy

from ..errors import Span, SparsecError
from .limits import EXACT, INT_MAX, SATURATED
from .operators import FUNCTIONS, OPS, REAL_OPS, Op, _nonzero, _range, _short  # noqa: F401 (E.OPS, E.FUNCTIONS, E.Op)


@dataclass(frozen=True)
class Expr:
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Const(Expr):
    value: int | float | bool


@dataclass(frozen=True)
class Var(Expr):
    name: str  # a param or let, n / n_q / n_k, i / j / h inside where(...), score in a with expression


@dataclass(frozen=True)
class Apply(Expr):
    op: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Read(Expr):
    """NAME[index, ...]: one element of a declared call-time input (ir/inputs.py)."""
    decl: Any   # InputDecl
    index: tuple[Expr, ...]


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
            raise SparsecError(f"{_short(e.value)} does not fit the 64-bit integers the language computes with",
                               e.span)
        return (e.value, e.value), real
    if isinstance(e, Var):
        if e.name not in ranges:
            raise SparsecError(f"'{e.name}' has no value here", e.span)
        return ranges[e.name], False
    if isinstance(e, Read):   # its index is checked too; its values: the declared type's range
        for a in e.index:
            _bounds(a, ranges, memo=memo)
        return READ_RANGES[e.decl.dtype], e.decl.dtype == "float"
    parts = [_bounds(a, ranges, memo=memo) for a in e.args]
    if e.op == "select":   # the condition's parts count for nothing real
        parts[0] = (parts[0][0], False)
    real = e.op in REAL_OPS or (any(r for _, r in parts) and e.op not in ("ceil", "floor", "isqrt", "ilog2"))
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


INPUT_INT_RANGE = (-SATURATED, SATURATED)   # int inputs hold int32 values (checked per call)
READ_RANGES = {"bool": (0, 1), "int": INPUT_INT_RANGE, "float": (-1e300, 1e300)}


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
        if isinstance(e.value, float):   # a real literal: repr reads back as the same float
            if not math.isfinite(e.value):
                raise ValueError("infinite and NaN reals have no source form")
            return repr(e.value)
        return str(e.value)
    if isinstance(e, Var):
        return e.name
    if isinstance(e, Read):
        return f"{e.decl.name}[{', '.join(show(a) for a in e.index)}]"
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
    if isinstance(e, Read):
        return "bool" if e.decl.dtype == "bool" else "num"
    return OPS[e.op].kind


@once_per_node
def names(e: Expr, memo=None) -> frozenset[str]:
    if isinstance(e, Var):
        return frozenset([e.name])
    if isinstance(e, Read):
        return frozenset().union(*(names(a, memo=memo) for a in e.index))
    if not isinstance(e, Apply):
        return frozenset()
    return frozenset().union(*(names(a, memo=memo) for a in e.args))


def reads(e: Expr) -> tuple:
    """The InputDecls that e reads, in order of first use."""
    out, todo, seen = {}, [e], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Read):
            out.setdefault(x.decl.name, x.decl)
            todo.extend(reversed(x.index))
        elif isinstance(x, Apply):
            todo.extend(reversed(x.args))
    return tuple(out.values())


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
    if isinstance(e, Read):
        from .inputs import read   # ir/inputs.py imports this module
        if e.decl.name not in env:
            raise SparsecError(f"the input '{e.decl.name}' has no value here", e.span)
        return read(env[e.decl.name], e.decl, [evaluate(a, env, memo=memo) for a in e.index])
    return checked(OPS[e.op].evaluate(e.span, *(evaluate(a, env, memo=memo) for a in e.args)), e)


@once_per_node
def substitute(e: Expr, env: dict[str, Expr], memo=None) -> Expr:
    """Replace names by expressions, then fold every sub-expression that became constant. A
    name used twice stays one shared sub-expression, so let chains cost their length."""
    if isinstance(e, Var):
        return env.get(e.name, e)
    if isinstance(e, Const):
        return e
    if isinstance(e, Read):   # the declaration's dims too: they may use params and lengths
        return Read(substitute_dims(e.decl, env, memo), tuple(substitute(a, env, memo=memo) for a in e.index),
                    span=e.span)
    args = tuple(substitute(a, env, memo=memo) for a in e.args)
    if all(isinstance(a, Const) for a in args):
        value = checked(OPS[e.op].evaluate(e.span, *(a.value for a in args)), e)
        if isinstance(value, (bool, np.bool_)):
            return Const(bool(value), span=e.span)
        if isinstance(value, (int, np.integer)):
            return Const(int(value), span=e.span)
    return Apply(e.op, args, span=e.span)  # reals stay symbolic until an integer is needed


def substitute_dims(decl, env: dict[str, Expr], memo: dict | None = None):
    """An InputDecl with `substitute` applied to its expression dims."""
    dims = tuple(d if isinstance(d, str) else substitute(d, env, memo=memo) for d in decl.dims)
    return decl if dims == decl.dims else dataclasses.replace(decl, dims=dims)


@once_per_node
def size(e: Expr, memo=None) -> int:
    """Operations in e written out as a tree (a shared sub-expression counts each time)."""
    if isinstance(e, Read):
        return 1 + sum(size(a, memo=memo) for a in e.index)
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
        if isinstance(e.value, float):
            return sympy.Float(e.value)
        return sympy.true if e.value is True else sympy.false if e.value is False else sympy.Integer(e.value)
    if isinstance(e, Var):
        return symbols.get(e.name, sympy.Symbol(e.name, integer=True))
    if isinstance(e, Read):   # an unknown function of its index
        return sympy.Function(e.decl.name)(*(to_sympy(a, symbols, memo=memo) for a in e.index))
    return OPS[e.op].sympy(*(to_sympy(a, symbols, memo=memo) for a in e.args))


def to_triton(e: Expr, names: dict[str, str], bind: Callable[[str], str] = lambda s: s, fan_in: int = 8,
              read: Callable[[Read, list[str]], str] | None = None) -> str:
    """Triton source for e, with each free name replaced by the Triton expression in `names`.
    `//` and `%` go through floor helpers (Triton's own truncate toward zero). bind(source) may
    return a name bound to a sub-expression (the lowering keeps statements shallow with it); the
    operands of an n-ary and, or, min, max are combined at most fan_in at a time. read(e, index
    sources) gives the source of an input read (the node that owns the input's tables)."""
    again = lambda x: to_triton(x, names, bind, fan_in, read)
    if isinstance(e, Const):
        if isinstance(e.value, bool):
            return "True" if e.value else "False"
        return repr(e.value)
    if isinstance(e, Var):
        if e.name not in names:
            raise SparsecError(f"'{e.name}' has no value inside a kernel", e.span)
        return names[e.name]
    if isinstance(e, Read):
        if read is None:
            raise SparsecError(f"the input read {e.decl.name}[...] has no tables here", e.span)
        return bind(read(e, [again(a) for a in e.index]))
    if e.op == "**":
        base, power = e.args
        if not (isinstance(power, Const) and isinstance(power.value, int) and 0 <= power.value <= 64):
            raise SparsecError("inside a kernel, ** needs a constant exponent between 0 and 64", e.span)
        if not power.value:
            return "1"
        base = bind(again(base))
        return bind("(" + " * ".join([base] * power.value) + ")")
    args = [again(a) for a in e.args]
    while len(args) > fan_in:   # n-ary: groups of fan_in, each bound
        args = [bind(OPS[e.op].triton(*args[k:k + fan_in])) if len(args[k:k + fan_in]) > 1 else args[k]
                for k in range(0, len(args), fan_in)]
    return bind(OPS[e.op].triton(*args) if len(args) > 1 or OPS[e.op].arity[0] == 1 else args[0])
