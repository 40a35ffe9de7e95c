"""Symbolic derivatives of score expressions: a rule per operator (a table), giving IR expressions."""
from __future__ import annotations

from . import expr as E

ZERO, ONE = E.Const(0), E.Const(1)


def _is(e: E.Expr, value) -> bool:
    return isinstance(e, E.Const) and not isinstance(e.value, bool) and e.value == value


# smart constructors: the zeros and ones of the chain rule fold away, so d(score + c)/d score is 1
def add(a, b):
    return b if _is(a, 0) else a if _is(b, 0) else E.Apply("+", (a, b))


def sub(a, b):
    return a if _is(b, 0) else neg(b) if _is(a, 0) else E.Apply("-", (a, b))


def neg(a):
    return ZERO if _is(a, 0) else E.Apply("neg", (a,))


def mul(a, b):
    if _is(a, 0) or _is(b, 0):
        return ZERO
    return b if _is(a, 1) else a if _is(b, 1) else E.Apply("*", (a, b))


def div(a, b):
    return ZERO if _is(a, 0) else E.Apply("/", (a, b))


def select(c, a, b):
    return a if a == b else E.Apply("select", (c, a, b))


def call(op, *args):
    return E.Apply(op, tuple(args))


def _power(e, d):
    """d a**b: b a**(b - 1) da, plus a**b log(a) db when the exponent varies too."""
    a, b = e.args
    da, db = d(a), d(b)
    lower = E.Const(b.value - 1) if isinstance(b, E.Const) and type(b.value) is int else sub(b, ONE)
    out = ZERO if _is(b, 0) else mul(mul(b, a if _is(lower, 1) else call("**", a, lower)), da)
    if not _is(db, 0):
        out = add(out, mul(e, mul(db, call("log", a))))
    return out


def _fold_pick(pick_first: str):
    """min / max as the torch rules compute them (a fold of pairwise picks, the first operand
    kept at ties): the derivative of the operand each pick keeps."""
    def rule(e, d):
        acc, dacc = e.args[0], d(e.args[0])
        for x in e.args[1:]:
            dacc = select(call(pick_first, acc, x), dacc, d(x))
            acc = call("min" if pick_first == "<=" else "max", acc, x)
        return dacc
    return rule


def _clamp(e, d):
    x, lo, hi = e.args
    low = select(call(">=", x, lo), d(x), d(lo))
    return select(call("<=", call("max", x, lo), hi), low, d(hi))


def _abs(e, d):
    a = e.args[0]
    return select(call(">", a, ZERO), d(a), select(call("<", a, ZERO), neg(d(a)), ZERO))


LN2 = E.Const(0.6931471805599453)
PIECEWISE_CONSTANT = ("//", "%", "ceil_div", "floor", "ceil", "isqrt", "ilog2")   # derivative 0 where defined

# op -> rule(e, d): d EXPR given d, the derivative of a sub-expression
RULES = {
    "+": lambda e, d: add(d(e.args[0]), d(e.args[1])),
    "-": lambda e, d: sub(d(e.args[0]), d(e.args[1])),
    "neg": lambda e, d: neg(d(e.args[0])),
    "*": lambda e, d: add(mul(d(e.args[0]), e.args[1]), mul(e.args[0], d(e.args[1]))),
    "/": lambda e, d: sub(div(d(e.args[0]), e.args[1]),
                          div(mul(e.args[0], d(e.args[1])), mul(e.args[1], e.args[1]))),
    "**": _power,
    "exp": lambda e, d: mul(e, d(e.args[0])),
    "log": lambda e, d: div(d(e.args[0]), e.args[0]),
    "log2": lambda e, d: div(d(e.args[0]), mul(e.args[0], LN2)),
    "sqrt": lambda e, d: div(d(e.args[0]), mul(E.Const(2), e)),
    "tanh": lambda e, d: mul(sub(ONE, mul(e, e)), d(e.args[0])),
    "sigmoid": lambda e, d: mul(mul(e, sub(ONE, e)), d(e.args[0])),
    "softplus": lambda e, d: mul(call("sigmoid", e.args[0]), d(e.args[0])),
    "abs": _abs,
    "min": _fold_pick("<="),
    "max": _fold_pick(">="),
    "clamp": _clamp,
    "select": lambda e, d: select(e.args[0], d(e.args[1]), d(e.args[2])),
    **{op: (lambda e, d: ZERO) for op in PIECEWISE_CONSTANT},
}


def derivative(e: E.Expr, target: E.Expr) -> E.Expr:
    """d e / d target, where target is the Var `score` or one Read of a float input (a read of
    the same input at another index is another variable). The result shares e's sub-expressions
    (a DAG), so it costs a constant factor of e."""
    memo: dict = {}

    def d(x: E.Expr) -> E.Expr:
        if x == target and isinstance(x, (E.Var, E.Read)):
            return ONE
        if not isinstance(x, E.Apply):
            return ZERO
        if id(x) not in memo:
            memo[id(x)] = (RULES[x.op](x, d), x)
        return memo[id(x)][0]
    return d(e)


def float_read_nodes(e: E.Expr) -> list[E.Read]:
    """The distinct reads of float inputs in e (equal reads once), in order of first use."""
    out, todo, seen = [], [e], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, E.Read):
            if x.decl.dtype == "float" and x not in out:
                out.append(x)
            todo.extend(reversed(x.index))
        elif isinstance(x, E.Apply):
            todo.extend(reversed(x.args))
    return out
