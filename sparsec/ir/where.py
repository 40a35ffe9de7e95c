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
        return read_load(e, index, lambda key, pointer, dtype="int32": cx.table(self, f"in_{key}", pointer, dtype),
                         cx.shallow, READ_DTYPES)

    def tables(self, space):
        out = {}
        for decl in E.reads(self.cond):
            out.update({f"in_{decl.name}{key}": v for key, v in read_tables(decl, space.inputs[decl.name]).items()})
        return out


def read_element(e: E.Read, index: list[str], table, shallow) -> tuple[str, str | None]:
    """(offset, inside) of one read in the contiguous copy of its input the kernel gets: per axis
    the index times its stride; inside, the bound check of the axes other than b and h (which
    are in range by construction), or None when there are none. table(key, pointer, dtype) names
    a kernel parameter (read_tables' keys, after the input's name)."""
    offset, inside = [], []
    for k, (dim, at) in enumerate(zip(e.decl.dims, index)):
        offset.append(f"({at}) * {table(f'{e.decl.name}_stride{k}', False)}")
        if dim not in ("b", "h"):
            inside.append(f"(({at}) >= 0) & (({at}) < {table(f'{e.decl.name}_size{k}', False)})")
    return " + ".join(offset) or "0", (shallow(" & ".join(inside)) if inside else None)


def read_load(e: E.Read, index: list[str], table, shallow, dtypes: dict) -> str:
    """A masked load of one element per index (0 outside the extent), from the input's table."""
    ptr = table(e.decl.name, True, dtypes[e.decl.dtype])
    offset, inside = read_element(e, index, table, shallow)
    load = f"tl.load({ptr} + {offset})" if inside is None else \
        f"tl.load({ptr} + tl.where({inside}, {offset}, 0), mask={inside}, other=0)"
    return f"({load} != 0)" if e.decl.dtype == "bool" else load


def read_tables(decl, x) -> dict:
    """An input's kernel tables: the tensor (key ""), and per axis k its size ("_size{k}") and its
    stride in the contiguous copy the kernel gets ("_stride{k}", 0 for a b or h axis of size 1:
    broadcast). Reads in where(...) and in a with expression (codegen/score.py) both use them."""
    out = {"": x}
    stride = 1
    for k in range(len(decl.dims) - 1, -1, -1):
        size = int(x.shape[k])
        out[f"_size{k}"] = size
        out[f"_stride{k}"] = 0 if size == 1 and decl.dims[k] in ("b", "h") else stride
        stride *= size
    return out


