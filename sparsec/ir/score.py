"""A pattern's score modification (spec section 7): its with expression, specialized and checked for one call."""
from __future__ import annotations

from ..errors import SparsecError
from . import expr as E
from .limits import SATURATED

PAIR_NAMES = ("score", "i", "j", "h", "b")   # the names a with expression has beyond params and lengths


def float_reads(e: E.Expr) -> tuple:
    """The float inputs the expression reads: those that receive gradients."""
    return tuple(d for d in E.reads(e) if d.dtype == "float")


def _integer(e: E.Expr, memo: dict) -> bool:
    """Whether e is computed in integers: no score, float read, real literal or real operator in it."""
    if id(e) not in memo:
        if isinstance(e, E.Const):
            out = not isinstance(e.value, float)
        elif isinstance(e, E.Var):
            out = e.name != "score"
        elif isinstance(e, E.Read):
            out = e.decl.dtype != "float" and all(_integer(a, memo) for a in e.index)
        else:
            out = e.op not in E.REAL_OPS and all(_integer(a, memo) for a in e.args)
        memo[id(e)] = (out, e)
    return memo[id(e)][0]


def integer_parts(e: E.Expr) -> list[E.Expr]:
    """The largest sub-expressions computed in integers (i - j, n - i, idx[b, j] + 1, a param's
    value): the parts whose 64-bit range must be checked; the rest is real arithmetic."""
    memo, out, todo = {}, [], [e]
    while todo:
        x = todo.pop()
        if isinstance(x, (E.Apply, E.Read, E.Const)) and E.kind(x) == "num" and _integer(x, memo):
            out.append(x)
        elif isinstance(x, E.Apply):
            todo.extend(x.args)
        elif isinstance(x, E.Read):
            todo.extend(x.index)
    return out


def specialize(score: E.Expr, n_q: int, n_k: int, q_offset: int, heads: int) -> E.Expr:
    """The expression with n, n_q and n_k substituted, its integer parts checked over the call's
    rows (positions), keys and heads as where(...) is (a located error otherwise)."""
    known = {"n": E.Const(n_k), "n_k": E.Const(n_k), "n_q": E.Const(n_q)}
    expr = E.substitute(score, known)
    ranges = {"i": (q_offset, q_offset + n_q - 1), "j": (0, n_k - 1), "h": (0, heads - 1), "b": (0, SATURATED)}
    for part in integer_parts(expr):
        try:
            E.bounds(part, ranges)
        except SparsecError as e:
            raise SparsecError(f"{e.message} (where rows i are {ranges['i'][0]}..{ranges['i'][1]}, keys j "
                               f"0..{ranges['j'][1]} and heads h 0..{ranges['h'][1]})", e.span) from None
    return expr
