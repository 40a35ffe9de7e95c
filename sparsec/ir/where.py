"""where(cond): an arbitrary predicate over i, j, h and the lengths; its tiles come from the shape of cond."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import numpy as np

from ..errors import SparsecError
from . import conditions
from . import expr as E
from .limits import SATURATED
from .pattern import Pattern


READ_DTYPES = {"bool": "int8", "int": "int64", "float": "float64"}   # of an input's kernel table


@dataclass(frozen=True, eq=False)
class Where(Pattern):
    """An arbitrary predicate over i (the position), j, h, n_q and n_k. Its tiles come from the
    shape of the condition (conditions.plan); what mixes i and j otherwise is read pair by pair."""
    cond: E.Expr
    keyword: ClassVar[str] = "where"

    def show(self):
        return f"where({E.show(self.cond)})"

    def uses_head(self):
        return "h" in E.names(self.cond)

    @property
    def needs(self) -> frozenset[str]:
        """The declared inputs the condition reads."""
        return frozenset(decl.name for decl in E.reads(self.cond))

    def specialize(self, env):
        """n, n_q and n_k substituted; then every sub-expression checked over this call's rows,
        keys and heads (expr.bounds): a value beyond 64 bits, a divisor that can be 0, a root or
        logarithm outside its domain is an error here, never a wrapped or NaN value later."""
        known = {k: E.Const(v) for k, v in env.items() if k in ("n", "n_q", "n_k")}
        cond = E.substitute(self.cond, known)
        ranges = {"i": env["rows"], "j": (0, env["n_k"] - 1), "h": (0, env["heads"] - 1), "b": (0, SATURATED)}
        try:
            E.bounds(cond, ranges)
        except SparsecError as e:
            raise SparsecError(f"{e.message} (where rows i are {ranges['i'][0]}..{ranges['i'][1]}, keys j "
                               f"0..{ranges['j'][1]} and heads h 0..{ranges['h'][1]})", e.span) from None
        return replace(self, cond=cond)

    @cached_property
    def plan(self) -> Pattern:
        """The condition as row, column, key-match and pairwise parts (conditions.py), whose
        tiles cost what they visit; only the views of tiles use it."""
        return conditions.plan(self.cond)

    def mask(self, grid):
        out = E.evaluate(self.cond, conditions.env(grid, i=grid.pos[:, None], j=grid.keys[None, :]))
        return np.broadcast_to(np.asarray(out, bool), (len(grid.pos), len(grid.keys))).copy()

    def tiles(self, t):
        return self.plan.tiles(t)

    def classify(self, t, qt, kt):
        return self.plan.classify(t, qt, kt)

    def estimate(self, t):
        return self.plan.estimate(t)

    def key_range(self, t):
        return self.plan.key_range(t)

    def cost(self, env):
        return env["n"] ** 2  # no closed form: an upper bound

    def lower(self, cx):
        # int64 coordinates: products such as i * j overflow 32 bits at long lengths
        rows = cx.let(f"{cx.rows}.to(tl.int64)", "where_i", hoist=True)
        cols = cx.let(f"{cx.cols}.to(tl.int64)", "where_j")
        head = cx.let(f"({cx.head}).to(tl.int64)", "where_h", hoist=True)
        names = {"i": f"{rows}[:, None]", "j": f"{cols}[None, :]", "h": head}
        if self.needs:
            names["b"] = cx.let(f"({cx.batch}).to(tl.int64)", "where_b", hoist=True)
        cond = cx.wide(self.cond, names, lambda e, index: self._read(cx, e, index))
        return f"({cond} & {cx.constant(True)})"  # & broadcasts a condition of h alone to the tile

    def _read(self, cx, e, index: list[str]) -> str:
        """A masked load of one element per index (0 outside the extent), from the input's table:
        its pointer, and per axis its size and stride (0 on a b or h axis given as 1)."""
        name = e.decl.name
        ptr = cx.table(self, f"in_{name}", dtype=READ_DTYPES[e.decl.dtype])
        offset, inside = [], []
        for k, (dim, at) in enumerate(zip(e.decl.dims, index)):
            stride = cx.table(self, f"in_{name}_stride{k}", pointer=False)
            offset.append(f"({at}) * {stride}")
            if dim not in ("b", "h"):   # b and h are in range by construction
                inside.append(f"(({at}) >= 0) & (({at}) < {cx.table(self, f'in_{name}_size{k}', pointer=False)})")
        offset = " + ".join(offset) or "0"
        if not inside:
            load = f"tl.load({ptr} + {offset})"
        else:
            ok = cx.shallow(" & ".join(inside))
            load = f"tl.load({ptr} + tl.where({ok}, {offset}, 0), mask={ok}, other=0)"
        return f"({load} != 0)" if e.decl.dtype == "bool" else load

    def tables(self, space):
        """Per input read: the tensor, and per axis its size and its stride in the contiguous
        copy the kernel gets (0 for a b or h axis of size 1: broadcast)."""
        out = {}
        for decl in E.reads(self.cond):
            x = space.inputs[decl.name]
            out[f"in_{decl.name}"] = x
            stride = 1
            for k in range(len(decl.dims) - 1, -1, -1):
                size = int(x.shape[k])
                out[f"in_{decl.name}_size{k}"] = size
                out[f"in_{decl.name}_stride{k}"] = 0 if size == 1 and decl.dims[k] in ("b", "h") else stride
                stride *= size
        return out


