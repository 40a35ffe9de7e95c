"""The pattern IR: the base node with its views, and the nodes that combine other patterns."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import numpy as np
import sympy

from ..errors import Span, SparsecError
from . import expr as E
from .limits import saturate
from .tiles import EMPTY, FULL, PARTIAL, Grid, TileSet, Tiling, all_tiles, expand_ranges

CHUNK_PAIRS = 1 << 22  # token pairs evaluated at once by dense fallbacks, to bound their memory
CHUNK_TILES = 1 << 20  # candidate tiles classified at once by an intersection or difference


def value(e: E.Expr):
    """The value of an argument of a specialized node (every argument is then a constant)."""
    assert isinstance(e, E.Const), f"unspecialized argument {e!r}"
    return e.value


@dataclass(frozen=True, eq=False)
class Pattern:
    """A node of the pattern IR. Each subclass keeps all of its rules together:

    show      source text that parses back to an equal node (spans do not count in equality)
    check     argument values allowed (run on every argument that is already a constant)
    mask      the dense reference: a bool array over a Grid of token pairs, the oracle of every test
    tiles     the non-EMPTY tiles of a Tiling with their class, built analytically where possible
    classify  the class of given tiles (what an intersection or difference asks of its other parts)
    estimate  how many tiles `tiles` would list, so an intersection enumerates its sparsest part
    cost      allowed pairs at n_q = n_k = n as a sympy expression (section "cost" of docs/ir.md)
    lower     the predicate as Triton source over one tile, through a Lowering (codegen.py): its
              `rows`/`cols` coordinates, `num(expr)`, `let`/`loop` statements, `table` parameters
    tables    the values of the kernel parameters `lower` declared, for one call (TableSpace)
    """
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)

    keyword: ClassVar[str] = ""                       # the primitive's name in the language
    limits: ClassVar[dict[str, tuple[int, str]]] = {}  # argument -> (lowest allowed value, wording)
    ceilings: ClassVar[dict[str, int]] = {}            # argument -> highest allowed value (work grows with it)
    exact: ClassVar[frozenset[str]] = frozenset({"seed"})  # arguments never saturated (limits.py)
    head_dependent: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()      # call inputs it reads (segment_ids, q, k)
    token_level: ClassVar[bool] = False                # defined on tokens only: not inside blocks()

    # ---- identity: by value, spans aside; the hash is cached, so that comparing two different
    # patterns costs one hash comparison however large (and however shared) they are
    def _key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if f.compare)

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((type(self), self._key()))
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return hash(self) == hash(other) and self._key() == other._key()

    # ---- structure (generic over the dataclass fields) ----
    def children(self) -> tuple["Pattern", ...]:
        out: list[Pattern] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Pattern):
                out.append(v)
            elif isinstance(v, tuple) and v and isinstance(v[0], Pattern):
                out.extend(v)
        return tuple(out)

    def map_children(self, fn: Callable[["Pattern"], "Pattern"]) -> "Pattern":
        """The node with fn applied to each child; the node itself when no child changes, so that
        passes keep shared sub-patterns shared and an unchanged tree compares by identity."""
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Pattern):
                new = fn(v)
                if new is not v:
                    changes[f.name] = new
            elif isinstance(v, tuple) and v and isinstance(v[0], Pattern):
                new = tuple(fn(c) for c in v)
                if any(a is not b for a, b in zip(new, v)):
                    changes[f.name] = new
        return replace(self, **changes) if changes else self

    def arguments(self) -> dict[str, E.Expr]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, E.Expr):
                out[f.name] = v
            elif isinstance(v, tuple) and v and isinstance(v[0], E.Expr):
                out.update({f"{f.name}[{k}]": x for k, x in enumerate(v)})
        return out

    def map_arguments(self, fn: Callable[[E.Expr], E.Expr]) -> "Pattern":
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, E.Expr):
                changes[f.name] = fn(v)
            elif isinstance(v, tuple) and v and isinstance(v[0], E.Expr):
                changes[f.name] = tuple(fn(x) for x in v)
        return replace(self, **changes) if changes else self

    def walk(self):
        """Every node in pre-order, a shared sub-pattern once per use (what lowering numbers)."""
        yield self
        for c in self.children():
            yield from c.walk()

    def nodes(self):
        """Every distinct node in pre-order, a shared sub-pattern once: named patterns used many
        times make a DAG whose walk can be exponentially longer than the program."""
        seen, todo = set(), [self]
        while todo:
            node = todo.pop()
            if id(node) not in seen:
                seen.add(id(node))
                yield node
                todo.extend(reversed(node.children()))

    def tree_size(self, memo: dict | None = None) -> int:
        """Nodes once written out as a tree (len(list(walk()))), counted on the DAG."""
        memo = {} if memo is None else memo
        if id(self) not in memo:
            memo[id(self)] = (1 + sum(c.tree_size(memo) for c in self.children()), self)
        return memo[id(self)][0]

    def uses_head(self) -> bool:
        return type(self).head_dependent

    def varies_with_head(self) -> bool:
        return any(n.uses_head() for n in self.nodes())

    def inputs_read(self) -> frozenset[str]:
        return frozenset().union(*(type(n).needs for n in self.nodes()))

    # ---- views with defaults ----
    def show(self) -> str:
        args = ", ".join(E.show(a) for a in self.arguments().values())
        return f"{self.keyword}({args})" if args else self.keyword

    def check(self) -> None:
        for name, (lowest, wording) in self.limits.items():
            e = getattr(self, name)
            if isinstance(e, E.Const) and not isinstance(e.value, bool) and e.value < lowest:
                raise SparsecError(f"{self.keyword}: {name} must be {wording}, got {e.value}", e.span or self.span)
        for name, highest in self.ceilings.items():
            e = getattr(self, name)
            if isinstance(e, E.Const) and not isinstance(e.value, bool) and e.value > highest:
                raise SparsecError(f"{self.keyword}: {name} must be at most {highest}, got {e.value}", e.span or self.span)

    def specialize(self, env: dict[str, Any]) -> "Pattern":
        """Every argument evaluated for concrete lengths (reals rounded down) and checked, then
        saturated (limits.saturate: the same mask, and every argument fits the kernels' int32).
        env: n, n_q, n_k, `rows` (the range of row coordinates: positions, or block indices
        inside blocks) and `heads`."""
        memo: dict = {}   # arguments share sub-expressions (band(w) is band(w, w))
        node = self.map_arguments(lambda e: E.Const(
            bool(E.evaluate(e, env, memo=memo)) if E.kind(e) == "bool" else E.integer(e, env, memo), span=e.span))
        node = node.map_children(lambda c: c.specialize(env))
        node.check()
        return node.saturated()

    def saturated(self) -> "Pattern":
        """The node with its integer arguments (but `exact` ones) clamped to +-SATURATED."""
        sat = lambda e: E.Const(saturate(e.value), span=e.span) \
            if isinstance(e, E.Const) and type(e.value) is int else e
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.exact:
                continue
            if isinstance(v, E.Expr):
                changes[f.name] = sat(v)
            elif isinstance(v, tuple) and v and isinstance(v[0], E.Expr):
                changes[f.name] = tuple(map(sat, v))
        return replace(self, **changes) if changes else self

    def mask(self, grid: Grid) -> np.ndarray:
        raise NotImplementedError

    def tiles(self, t: Tiling) -> TileSet:
        """Every tile with its class. A node defines tiles or classify (or both): the default of
        each is made from the other, never from itself."""
        if type(self).classify is Pattern.classify:
            raise NotImplementedError(f"{type(self).__name__} defines neither tiles nor classify")
        qt, kt = all_tiles(t)
        return TileSet.build(t, qt, kt, self.classify(t, qt, kt))

    def classify(self, t: Tiling, qt: np.ndarray, kt: np.ndarray) -> np.ndarray:
        if type(self).tiles is Pattern.tiles:
            raise NotImplementedError(f"{type(self).__name__} defines neither tiles nor classify")
        return self.tiles(t).lookup(t, qt, kt)

    def estimate(self, t: Tiling) -> int:
        return t.shape[0] * t.shape[1]

    def key_range(self, t: Tiling) -> tuple[np.ndarray, np.ndarray] | None:
        """[first, last) key tiles per query tile holding every tile this pattern can list, when
        it is one range per query tile (bands, causal, chunks, sorted key matches), else None:
        an intersection enumerates only where its parts' ranges overlap."""
        return None

    def cost(self, env: dict[str, Any]) -> sympy.Expr:
        """env maps n, n_q and n_k to the sympy length (all equal: the cost is for square masks)."""
        raise NotImplementedError

    def sym(self, e: E.Expr, env: dict[str, Any]):
        return E.to_sympy(e, env)

    def lower(self, cx) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no kernel lowering")

    def tables(self, space) -> dict[str, Any]:
        """Values of the table parameters `lower` declared (on a specialized node); most have none."""
        return {}


def parenthesize(p: Pattern, need: int) -> str:
    return f"({p.show()})" if level(p) < need else p.show()


def level(p: Pattern) -> int:
    return 1 if isinstance(p, (Union, Difference)) else 2 if isinstance(p, Intersection) else 3


def density(c, n):
    return c / n**2


# ---- combinators ---------------------------------------------------------------------------------
# cost: a union counts its parts' pairs (an upper bound); intersection and difference treat their
# parts as independent, so densities multiply (an estimate; see docs/ir.md).

@dataclass(frozen=True, eq=False)
class Union(Pattern):
    parts: tuple[Pattern, ...]

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
