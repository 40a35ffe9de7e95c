"""Code generation: the optimized IR and a tile config -> the source of its Triton kernels."""
from __future__ import annotations

import hashlib
import numbers
import textwrap
from dataclasses import dataclass, field, replace

from .ir import expr as E
from .ir.limits import saturate
from .ir.pattern import Pattern
from .ir.program import Definition
from .templates import BACKWARD, FORWARD, HELPERS

VERSION = 5  # bump when the generated code changes shape: part of the content hash
SHALLOW = 16  # parentheses a generated expression may nest before it is bound to a name
FAN_IN = 8    # operands of |, &, and, or, min, max in one generated statement


@dataclass(frozen=True)
class TileConfig:
    """The kernel's tile sizes and launch options (issue 5 tunes them). The defaults are what a
    GPU call with D <= 128 uses, so `kern.source` shows the kernel that runs there. Every field
    is checked when the config is made (powers of two 16..256 for the tiles, a power of two
    1..16 warps, 1..8 stages): a config read from the tuning cache or given by a user can only
    ever be one of those, and it is written into generated source."""
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps", "num_stages"):
            x = getattr(self, name)
            if isinstance(x, numbers.Integral) and not isinstance(x, bool):
                object.__setattr__(self, name, int(x))   # numpy ints print as np.int64(...)

        def pow2(x, lo, hi):
            return type(x) is int and lo <= x <= hi and x & (x - 1) == 0
        if not (pow2(self.block_m, 16, 256) and pow2(self.block_n, 16, 256) and pow2(self.num_warps, 1, 16)
                and type(self.num_stages) is int and 1 <= self.num_stages <= 8):
            raise ValueError(f"a tile config has block_m and block_n powers of two in 16..256, num_warps a power "
                             f"of two in 1..16 and num_stages in 1..8, got {self!r}")

    def show(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} num_warps={self.num_warps} "
                f"num_stages={self.num_stages}")


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
    n_q: str = "N_Q"
    n_k: str = "N_K"
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

    def wide(self, e: E.Expr, names: dict[str, str]) -> str:
        """A where(...) expression over i, j, h (given) and n, all int64 in the kernel: bounds()
        has checked every sub-expression fits 64 bits for the call."""
        lengths = {"n": self.n_k, "n_k": self.n_k, "n_q": self.n_q}
        wide = {k: self.let(f"({v}).to(tl.int64)", f"{k}64_", hoist=True) for k, v in lengths.items()
                if k in E.names(e)}
        return E.to_triton(e, {**wide, **names}, self.shallow, FAN_IN)

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


@dataclass(frozen=True)
class Generated:
    """A generated kernel module: its source and the table parameters the runtime must fill."""
    source: str
    digest: str
    tables: tuple[TableParam, ...]


def lower(body: Pattern) -> tuple[str, Emitter]:
    """The predicate of `body` over one tile, with the statements it needs."""
    out = Emitter(names={"pos", "cols", "keys", "d"})
    expr = Lowering(out).sub(body)
    return expr, out


def emit_kernels(d: Definition, config: TileConfig) -> Generated:
    """The Triton module for the optimized definition `d`: the forward kernel and the three
    backward kernels (delta, dQ, dK/dV), all sharing one predicate and one set of tables."""
    pred, out = lower(d.body)
    params = "".join(f"    {t.name},\n" for t in out.tables)
    hoisted = textwrap.indent("\n".join(out.hoisted), " " * 4) if out.hoisted else "    # (none)"
    body = "".join(line + "\n" for line in out.body)
    rowwise = "".join(line + "\n" for line in out.hoisted + out.body)  # dK/dV: rows change per step
    # scalar tables change with the call: no recompiles for values that happen to be 1 or multiples of 16
    scalars = "".join(f', "{t.name}"' for t in out.tables if not t.pointer)
    fill = dict(params=params, hoisted=hoisted, body=textwrap.indent(body, " " * 8), pred=pred, scalars=scalars)
    kernels = FORWARD.format(**fill) + BACKWARD.format(**fill, rowwise=textwrap.indent(rowwise, " " * 12))
    glossary = "".join(f"#   {t.name:<24} {'pointer' if t.pointer else 'int    '}  from {t.describe()}\n"
                       for t in out.tables) or "#   (none)\n"
    text = f"{d.name}\n{d.body.show()}\n{config.show()}\n{VERSION}\n{HELPERS}{kernels}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    header = HEADER.format(name=d.name, ir=d.body.show(), config=config.show(), digest=digest,
                           tables=glossary, block_m=config.block_m, block_n=config.block_n,
                           num_warps=config.num_warps, num_stages=config.num_stages)
    return Generated(header + HELPERS + kernels, digest, tuple(out.tables))


HEADER = '''\
# Generated by sparsec: the attention kernels of one pattern, forward and backward. Do not edit.
#
# pattern:      {name}
# canonical IR: {ir}
# tile config:  {config}
# content hash: {digest}
#
# Glossary
#   pos      (BLOCK_M,) query positions p = i + Q_OFFSET of this program's query tile
#   cols     (BLOCK_N,) key rows of the key tile being visited, in the kernel's order
#   keys     (BLOCK_N,) their key positions j: cols itself, or the K_ORDER entries when PERMUTED
#            (a share of a content-based pattern, run with q and k sorted by bucket)
#   d        p - j over the tile; block_rows / block_cols: coordinates inside blocks(B, ...)
#   FULL     key tiles where every pair is allowed: no predicate is evaluated
#   PARTIAL  key tiles where some pairs are allowed: the predicate below decides each pair
#   h, b     the query head and batch row of this program; H query heads, G per K/V head
# Table parameters (filled per call by the runtime from the IR's `tables` view)
{tables}import triton
import triton.language as tl

CONFIG = dict(BLOCK_M={block_m}, BLOCK_N={block_n}, num_warps={num_warps}, num_stages={num_stages})
'''
