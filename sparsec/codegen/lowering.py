"""Lowering: a pattern -> the Triton expression of its tile predicate, with the statements and tables it needs."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..ir import expr as E
from ..ir.limits import saturate
from ..ir.pattern import Pattern

SHALLOW = 16  # parentheses a generated expression may nest before it is bound to a name
FAN_IN = 8    # operands of |, &, and, or, min, max in one generated statement


@dataclass(frozen=True)
class TableParam:
    """A kernel parameter filled per call from the `tables` view of node number `node` (pre-order),
    or, with `expr`, the value of that argument expression of n (computed on the host per call,
    exactly, then saturated: limits.py), so the kernel never does arithmetic on lengths."""
    name: str
    node: int
    key: str
    pointer: bool
    expr: E.Expr | None = None
    dtype: str = "int32"      # of a pointer table's elements

    def describe(self) -> str:
        if self.node < 0:   # codegen/score.py's: the with expression's inputs
            return f"the with expression: {self.key}"
        return f"node {self.node}: {self.key if self.expr is None else E.show(self.expr)}"


@dataclass
class Emitter:
    """Shared state of one lowering: statement lists, names in use, declared table parameters."""
    hoisted: list[str] = field(default_factory=list)   # before the tile loops: rows only
    body: list[str] = field(default_factory=list)      # inside the PARTIAL loop
    names: set[str] = field(default_factory=set)
    tables: list[TableParam] = field(default_factory=list)
    visited: int = 0                                   # nodes lowered so far (pre-order number)
    offsets: dict[tuple[str, str], str] = field(default_factory=dict)  # d = p - j per coordinate space

    def fresh(self, hint: str) -> str:
        k = 0
        while f"{hint}{k}" in self.names:
            k += 1
        self.names.add(f"{hint}{k}")
        return f"{hint}{k}"


@dataclass
class Lowering:
    """What a node's `lower` rule sees: the tile's coordinates in its own space (positions, or
    block indices inside blocks(...)) as Triton names, and ways to emit statements.

    rows (BLOCK_M,) int  row coordinates of the tile        cols (BLOCK_N,) int  key coordinates
    (positions: in a share run in a content-sorted order, the permutation's entries)
    n_q, n_k             lengths in these coordinates       head, batch, heads   program scalars
    """
    out: Emitter
    rows: str = "pos"
    cols: str = "keys"
    n_q: str = "LEN_Q"
    n_k: str = "LEN_K"
    q_offset: str = "Q_OFFSET"     # positions p = i + q_offset (token-level patterns read it)
    head: str = "h"
    batch: str = "b"
    heads: str = "H"
    node: int = -1                 # pre-order number of the node being lowered

    def sub(self, p: Pattern) -> str:
        """Lower a child (children must be lowered once each, in `children()` order). A deeply
        parenthesized predicate is bound to a name: Python parses at most 200 nested parentheses."""
        here = self.out.visited
        self.out.visited += 1
        expr = p.lower(replace(self, node=here))
        assert self.out.visited == here + p.tree_size(), f"{type(p).__name__} skipped a child"
        return self.shallow(expr)

    def shallow(self, expr: str) -> str:
        """expr, or a name bound to it when it nests more than SHALLOW parentheses."""
        depth = deepest = 0
        for c in expr:
            depth += (c == "(") - (c == ")")
            deepest = max(deepest, depth)
        return self.let(expr, "part") if deepest > SHALLOW else expr

    def join(self, op: str, terms: list[str]) -> str:
        """terms combined by op (| or &), at most FAN_IN to a statement: Triton's code generator
        recurses once per operator of a chain."""
        while len(terms) > FAN_IN:
            terms = [self.let("(" + f" {op} ".join(terms[k:k + FAN_IN]) + ")", "part")
                     for k in range(0, len(terms), FAN_IN)]
        return "(" + f" {op} ".join(terms) + ")"

    def num(self, e: E.Expr) -> str:
        """An integer argument of a primitive: a literal when constant, else a kernel parameter
        the runtime computes from n per call; either way saturated, so it fits an int32."""
        if isinstance(e, E.Const):
            return repr(saturate(e.value)) if type(e.value) is int else repr(e.value)
        for t in self.out.tables:
            if t.node == self.node and t.expr == e:
                return t.name
        name = f"arg{self.node}_{sum(t.node == self.node for t in self.out.tables)}"
        self.out.tables.append(TableParam(name, self.node, "", False, e))
        return name

    def wide(self, e: E.Expr, names: dict[str, str], read=None) -> str:
        """A where(...) expression over i, j, h (given) and n, all int64 in the kernel: bounds()
        has checked every sub-expression fits 64 bits for the call. read: E.to_triton's."""
        lengths = {"n": self.n_k, "n_k": self.n_k, "n_q": self.n_q}
        wide = {k: self.let(f"({v}).to(tl.int64)", f"{k}64_", hoist=True) for k, v in lengths.items()
                if k in E.names(e)}
        return E.to_triton(e, {**wide, **names}, self.shallow, FAN_IN, read)

    def let(self, expr: str, hint: str, hoist: bool = False) -> str:
        """Bind expr to a fresh name; hoist=True when it depends on rows only (computed once)."""
        name = self.out.fresh(hint)
        (self.out.hoisted if hoist else self.out.body).append(f"{name} = {expr}")
        return name

    def loop(self, head: str, lines: list[str]) -> None:
        self.out.body.append(head)
        self.out.body.extend("    " + line for line in lines)

    def constant(self, value: bool) -> str:
        return f"tl.full([BLOCK_M, BLOCK_N], {int(value)}, tl.int1)"

    def offsets(self) -> str:
        """d = p - j over the tile, bound once per coordinate space."""
        space = (self.rows, self.cols)
        if space not in self.out.offsets:
            self.out.offsets[space] = self.let(f"{self.rows}[:, None] - {self.cols}[None, :]", "d")
        return self.out.offsets[space]

    def table(self, p: Pattern, key: str, pointer: bool = True, dtype: str = "int32") -> str:
        name = f"{p.keyword}{self.node}_{key}"
        if not any(t.name == name for t in self.out.tables):
            self.out.tables.append(TableParam(name, self.node, key, pointer, dtype=dtype))
        return name

    def coarsen(self, size: str) -> "Lowering":
        """The coordinates of blocks(size, ...): every coordinate and length divided by size."""
        rows = self.let(f"_floordiv({self.rows}, {size})", "block_rows", hoist=True)
        cols = self.let(f"_floordiv({self.cols}, {size})", "block_cols")
        return replace(self, rows=rows, cols=cols, n_q=f"(-_floordiv(-{self.n_q}, {size}))",
                       n_k=f"(-_floordiv(-{self.n_k}, {size}))")


def lower(body: Pattern) -> tuple[str, Emitter]:
    """The predicate of `body` over one tile, with the statements it needs."""
    out = Emitter(names={"pos", "cols", "keys", "d"})
    expr = Lowering(out).sub(body)
    return expr, out


