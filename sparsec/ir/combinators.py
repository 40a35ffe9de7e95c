"""The patterns made of patterns: union, intersection, difference, heads(...) and blocks(...)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import sympy

from ..errors import SparsecError
from . import expr as E
from .pattern import CHUNK_TILES, Pattern, density, parenthesize, value
from .tiles import EMPTY, FULL, PARTIAL, TileSet, Tiling, expand_ranges

@dataclass(frozen=True, eq=False)
class Union(Pattern):
    parts: tuple[Pattern, ...]
    precedence: ClassVar[int] = 1

    def show(self):
        return " + ".join(parenthesize(p, 1 if k == 0 else 2) for k, p in enumerate(self.parts))

    def mask(self, grid):
        return np.logical_or.reduce([p.mask(grid) for p in self.parts])

    def tiles(self, t):
        sets = [p.tiles(t) for p in self.parts]
        cat = lambda a: np.concatenate([getattr(s, a) for s in sets])
        return TileSet.build(t, cat("qt"), cat("kt"), cat("cls"))

    def classify(self, t, qt, kt):
        return np.maximum.reduce([p.classify(t, qt, kt) for p in self.parts])

    def estimate(self, t):
        return sum(p.estimate(t) for p in self.parts)

    def key_range(self, t):   # the hull of the parts' ranges (a superset, used only when smaller)
        ranges = [p.key_range(t) for p in self.parts]
        if any(r is None for r in ranges):
            return None
        first = np.minimum.reduce([r[0] for r in ranges])
        return first, np.maximum(np.maximum.reduce([r[1] for r in ranges]), first)

    def cost(self, env):
        return sum(p.cost(env) for p in self.parts)  # an upper bound: overlaps count twice

    def lower(self, cx):
        return cx.join("|", [cx.sub(p) for p in self.parts])


@dataclass(frozen=True, eq=False)
class Intersection(Pattern):
    parts: tuple[Pattern, ...]
    precedence: ClassVar[int] = 2

    def show(self):
        return " & ".join(parenthesize(p, 2 if k == 0 else 3) for k, p in enumerate(self.parts))

    def mask(self, grid):
        return np.logical_and.reduce([p.mask(grid) for p in self.parts])

    def tiles(self, t):
        """Enumerate the fewest candidates: the sparsest part's tiles, or the overlap of the parts'
        key ranges when that is smaller; the other parts classify them, a chunk at a time."""
        order = sorted(self.parts, key=lambda p: p.estimate(t))
        overlap = self.key_range(t)
        if overlap is not None and int((overlap[1] - overlap[0]).sum()) <= order[0].estimate(t):
            qt, kt = expand_ranges(*overlap)
            return TileSet.build(t, qt, kt, classify_chunked(self.parts, t, qt, kt, np.full(len(qt), FULL, np.int8)))
        base = order[0].tiles(t)
        return TileSet.build(t, base.qt, base.kt, classify_chunked(order[1:], t, base.qt, base.kt, base.cls.copy()))

    def key_range(self, t):
        ranges = [r for r in (p.key_range(t) for p in self.parts) if r is not None]
        if not ranges:
            return None
        first = np.maximum.reduce([r[0] for r in ranges])
        return first, np.maximum(np.minimum.reduce([r[1] for r in ranges]), first)

    def classify(self, t, qt, kt):
        return np.minimum.reduce([p.classify(t, qt, kt) for p in self.parts])

    def estimate(self, t):
        return min(p.estimate(t) for p in self.parts)

    def cost(self, env):
        d = sympy.Integer(1)
        for p in self.parts:
            d *= density(p.cost(env), env['n'])
        return sympy.expand(env['n']**2 * d)

    def lower(self, cx):
        return cx.join("&", [cx.sub(p) for p in self.parts])


def classify_chunked(parts, t: Tiling, qt: np.ndarray, kt: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """cls lowered to each part's class of the candidates (in place), CHUNK_TILES at a time, so the
    classifiers' temporaries stay small however many candidates there are."""
    for s in range(0, len(qt), CHUNK_TILES):
        for p in parts:
            np.minimum(cls[s:s + CHUNK_TILES], p.classify(t, qt[s:s + CHUNK_TILES], kt[s:s + CHUNK_TILES]),
                       out=cls[s:s + CHUNK_TILES])
    return cls


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class of a - b from the classes of a and b: b FULL empties, b EMPTY keeps a, else PARTIAL."""
    return np.where(b == FULL, EMPTY, np.where(b == EMPTY, a, np.minimum(a, PARTIAL))).astype(np.int8)


@dataclass(frozen=True, eq=False)
class Difference(Pattern):
    left: Pattern
    right: Pattern
    precedence: ClassVar[int] = 1

    def show(self):
        return f"{parenthesize(self.left, 1)} - {parenthesize(self.right, 2)}"

    def mask(self, grid):
        return self.left.mask(grid) & ~self.right.mask(grid)

    def tiles(self, t):
        base = self.left.tiles(t)
        return TileSet.build(t, base.qt, base.kt, subtract(base.cls, self.right.classify(t, base.qt, base.kt)))

    def key_range(self, t):
        return self.left.key_range(t)

    def classify(self, t, qt, kt):
        return subtract(self.left.classify(t, qt, kt), self.right.classify(t, qt, kt))

    def estimate(self, t):
        return self.left.estimate(t)

    def cost(self, env):
        left = self.left.cost(env)
        return sympy.expand(left * (1 - density(self.right.cost(env), env["n"])))

    def lower(self, cx):
        left = cx.sub(self.left)
        return f"({left} & ({cx.sub(self.right)} == 0))"


@dataclass(frozen=True, eq=False)
class Heads(Pattern):
    """Head h uses parts[h mod len(parts)]."""
    parts: tuple[Pattern, ...]
    keyword: ClassVar[str] = "heads"
    head_dependent: ClassVar[bool] = True

    def show(self):
        return f"heads({', '.join(p.show() for p in self.parts)})"

    def pick(self, head: int) -> Pattern:
        return self.parts[head % len(self.parts)]

    def mask(self, grid):
        return self.pick(grid.head).mask(grid)

    def tiles(self, t):
        return self.pick(t.head).tiles(t)

    def classify(self, t, qt, kt):
        return self.pick(t.head).classify(t, qt, kt)

    def estimate(self, t):
        return self.pick(t.head).estimate(t)

    def key_range(self, t):
        return self.pick(t.head).key_range(t)

    def cost(self, env):
        return sympy.expand(sum(p.cost(env) for p in self.parts) / len(self.parts))

    def lower(self, cx):
        # h is one scalar per program: every part is lowered, the select costs nothing per pair
        parts = [cx.sub(p) for p in self.parts]
        out = parts[-1]
        for k in range(len(parts) - 2, -1, -1):   # one select per statement, however many heads
            out = f"tl.where({cx.head} % {len(parts)} == {k}, {parts[k]}, {out})"
            out = cx.let(out, "heads") if k else out
        return out


@dataclass(frozen=True, eq=False)
class Blocks(Pattern):
    """Block granularity: the body is read on block indices i // size, j // size."""
    size: E.Expr
    body: Pattern
    keyword: ClassVar[str] = "blocks"
    limits: ClassVar = {"size": (1, "at least 1")}

    def show(self):
        return f"blocks({E.show(self.size)}, {self.body.show()})"

    def check(self):
        super().check()
        for node in self.body.nodes():
            if type(node).token_level:
                raise SparsecError(f"{node.keyword} is defined on tokens and cannot be used inside blocks(...)",
                                   node.span or self.span)

    def specialize(self, env):
        b = E.integer(self.size, env)
        node = replace(self, size=E.Const(b, span=self.size.span))
        node.check()  # before dividing by b
        rows = env["rows"]
        inner = dict(env, n=-(-env["n"] // b), n_k=-(-env["n_k"] // b), n_q=-(-env["n_q"] // b),
                     rows=(rows[0] // b, rows[1] // b))
        return replace(node, body=self.body.specialize(inner)).saturated()

    def mask(self, grid):
        inner, row_of, col_of = grid.coarsen(value(self.size))
        return self.body.mask(inner)[row_of][:, col_of]

    def tiles(self, t):
        return self.body.tiles(t.coarsen(value(self.size)))

    def classify(self, t, qt, kt):
        return self.body.classify(t.coarsen(value(self.size)), qt, kt)

    def estimate(self, t):
        return self.body.estimate(t.coarsen(value(self.size)))

    def key_range(self, t):   # the coarsened tiling has the same tiles: the same tile numbers
        return self.body.key_range(t.coarsen(value(self.size)))

    def cost(self, env):
        b = self.sym(self.size, env)
        inner = dict(env, n=env["n"] / b, n_q=env["n"] / b, n_k=env["n"] / b)
        return sympy.expand(self.body.cost(inner) * b**2)

    def lower(self, cx):
        return cx.coarsen(cx.num(self.size)).sub(self.body)
