"""IR expressions in torch ops, int64 or float64 on any device: the device form of ir/expr.evaluate,
shared by the device layout builders, the CPU path's scores and Flex's mask_mod and score_mod."""
from __future__ import annotations

import functools
import math

import torch

from ..ir.expr import Apply, Const, Read, Var


def _scalar_or(tensor_fn, scalar_fn):
    return lambda a: tensor_fn(a) if torch.is_tensor(a) else scalar_fn(a)


def _real(a):
    return a.double() if not a.is_floating_point() else a


def _isqrt(a):
    r = torch.floor(torch.sqrt(a.double())).long()
    r = r - (r * r > a).long()                 # float sqrt can land one above the exact root
    return r + ((r + 1) * (r + 1) <= a).long()


def _pick(cond, a, b):
    return torch.where(cond, a, b) if torch.is_tensor(cond) else (a if cond else b)


def _fold(pick_first):
    return lambda *args: functools.reduce(lambda a, b: _pick(pick_first(a, b), a, b), args)


TORCH_OPS = {   # operator name -> torch form (floor // and %, as the language means them)
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "//": lambda a, b: a // b, "%": lambda a, b: a % b, "**": lambda a, b: a ** b, "neg": lambda a: -a,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "and": lambda *a: functools.reduce(lambda x, y: x & y, a),
    "or": lambda *a: functools.reduce(lambda x, y: x | y, a),
    "not": _scalar_or(lambda a: ~a, lambda a: not a),
    "min": _fold(lambda a, b: a <= b), "max": _fold(lambda a, b: a >= b), "abs": abs,
    "isqrt": _scalar_or(_isqrt, lambda a: math.isqrt(int(a))),
    "ilog2": _scalar_or(lambda a: torch.floor(torch.log2(a.double())).long(), lambda a: int(a).bit_length() - 1),
    "ceil_div": lambda a, b: -((-a) // b),
    "sqrt": _scalar_or(lambda a: torch.sqrt(_real(a)), math.sqrt),
    "log2": _scalar_or(lambda a: torch.log2(_real(a)), math.log2),
    "ceil": _scalar_or(lambda a: torch.ceil(_real(a)).long(), math.ceil),
    "floor": _scalar_or(lambda a: torch.floor(_real(a)).long(), math.floor),
    "/": lambda a, b: (_real(a) if torch.is_tensor(a) else a) / b,
    "exp": _scalar_or(lambda a: torch.exp(_real(a)), math.exp),
    "log": _scalar_or(lambda a: torch.log(_real(a)), math.log),
    "tanh": _scalar_or(lambda a: torch.tanh(_real(a)), math.tanh),
    "sigmoid": _scalar_or(lambda a: torch.sigmoid(_real(a)), lambda a: 1 / (1 + math.exp(-a)) if a >= 0 else
                          math.exp(a) / (1 + math.exp(a))),
    "softplus": _scalar_or(lambda a: torch.logaddexp(_real(a), torch.zeros((), dtype=_real(a).dtype)),
                           lambda a: max(a, 0.0) + math.log1p(math.exp(-abs(a)))),
    "clamp": lambda a, lo, hi: _fold(lambda x, y: x <= y)(_fold(lambda x, y: x >= y)(a, lo), hi),
    "select": _pick,
}


def to_torch(e, names: dict, memo: dict | None = None):
    """The expression's value in torch ops, each free name bound by `names` (a DAG's shared
    sub-expressions are computed once; memo: shared by calls over the same names)."""
    memo = {} if memo is None else memo

    def run(e):
        if isinstance(e, Const):
            return e.value
        if isinstance(e, Var):
            return names[e.name]
        if id(e) not in memo:
            memo[id(e)] = (_read(e, names[e.decl.name], [run(a) for a in e.index]) if isinstance(e, Read) else
                           TORCH_OPS[e.op](*(run(a) for a in e.args)), e)   # e kept alive: its id stays its own
        return memo[id(e)][0]
    assert isinstance(e, (Const, Var, Apply, Read))
    return run(e)


def _read(e: Read, x: torch.Tensor, index: list):
    """x[index] in one element read (compiled Flex on CPU misreads chained ones), 0 / false
    outside the extent; a b or h axis given as 1 is read at 0."""
    ok, at = None, []
    for i, size, dim in zip(index, x.shape, e.decl.dims):
        if dim in ("b", "h"):
            at.append(0 if size == 1 else i)
            continue
        inside = (i >= 0) & (i < size)
        ok = inside if ok is None else ok & inside
        at.append(i.clamp(0, size - 1) if torch.is_tensor(i) else min(max(i, 0), size - 1))
    value = x[tuple(at)]
    return value if ok is None else torch.where(ok, value, torch.zeros((), dtype=x.dtype, device=x.device))
