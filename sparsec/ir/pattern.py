"""The pattern IR: the base node with its views, and the nodes that combine other patterns."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import numpy as np
import sympy

from ..errors import Span, SparsecError
from . import expr as E
from .limits import saturate
from .tiles import Grid, TileSet, Tiling, all_tiles

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
    precedence: ClassVar[int] = 3                      # how tightly its source binds: + and - 1, & 2, calls 3
    needs: ClassVar[frozenset[str]] = frozenset()      # call inputs it reads (segment_ids, q, k, declared ones)
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

    def declarations(self) -> tuple[str, ...]:
        """The declared inputs named as arguments, not read in an expression (topk's by=)."""
        return ()

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

    def _remembered(self, name: str, make):
        """A fact of the whole sub-pattern, computed once per node (a call asks for it each time)."""
        value = self.__dict__.get(name)
        if value is None:
            value = make()
            object.__setattr__(self, name, value)
        return value

    def varies_with_head(self) -> bool:
        return self._remembered("_varies_with_head", lambda: any(n.uses_head() for n in self.nodes()))

    def inputs_read(self) -> frozenset[str]:
        return self._remembered("_inputs_read", lambda: frozenset().union(*(n.needs for n in self.nodes())))

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
    """p's source, in parentheses when it binds looser than `need` (its precedence)."""
    return f"({p.show()})" if p.precedence < need else p.show()


def density(c, n):
    return c / n**2


# ---- combinators ---------------------------------------------------------------------------------
# cost: a union counts its parts' pairs (an upper bound); intersection and difference treat their
# parts as independent, so densities multiply (an estimate; see docs/ir.md).
