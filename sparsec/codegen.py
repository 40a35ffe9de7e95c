"""Code generation: the optimized IR and a tile config -> the source of a Triton forward kernel."""
from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass, field, replace

from .ir import expr as E
from .ir.pattern import Pattern
from .ir.program import Definition

VERSION = 1  # bump when the generated code changes shape: part of the content hash


@dataclass(frozen=True)
class TileConfig:
    """The kernel's tile sizes and launch options (issue 5 tunes them). The defaults are what a
    GPU call with D <= 128 uses, so `kern.source` shows the kernel that runs there."""
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def show(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} num_warps={self.num_warps} "
                f"num_stages={self.num_stages}")


@dataclass(frozen=True)
class TableParam:
    """A kernel parameter filled per call from the `tables` view of node number `node` (pre-order)."""
    name: str
    node: int
    key: str
    pointer: bool


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
    n_q, n_k             lengths in these coordinates       head, batch, heads   program scalars
    """
    out: Emitter
    rows: str = "pos"
    cols: str = "cols"
    n_q: str = "N_Q"
    n_k: str = "N_K"
    head: str = "h"
    batch: str = "b"
    heads: str = "H"
    node: int = -1                 # pre-order number of the node being lowered

    def sub(self, p: Pattern) -> str:
        """Lower a child (children must be lowered once each, in `children()` order)."""
        here = self.out.visited
        self.out.visited += 1
        expr = p.lower(replace(self, node=here))
        assert self.out.visited == here + sum(1 for _ in p.walk()), f"{type(p).__name__} skipped a child"
        return expr

    def num(self, e: E.Expr, names: dict[str, str] | None = None) -> str:
        return E.to_triton(e, {"n": self.n_k, "n_k": self.n_k, "n_q": self.n_q, **(names or {})})

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

    def table(self, p: Pattern, key: str, pointer: bool = True) -> str:
        name = f"{p.keyword}{self.node}_{key}"
        if not any(t.name == name for t in self.out.tables):
            self.out.tables.append(TableParam(name, self.node, key, pointer))
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
    out = Emitter(names={"pos", "cols", "d"})
    expr = Lowering(out).sub(body)
    return expr, out


def emit_forward(d: Definition, config: TileConfig) -> Generated:
    """The Triton source of the forward kernel for the optimized definition `d`."""
    pred, out = lower(d.body)
    params = "".join(f"    {t.name},\n" for t in out.tables)
    hoisted = textwrap.indent("\n".join(out.hoisted), " " * 4) if out.hoisted else "    # (none)"
    body = textwrap.indent("\n".join(out.body), " " * 8)
    glossary = "".join(f"#   {t.name:<24} {'pointer' if t.pointer else 'int    '}  from node {t.node}: "
                       f"{t.key}\n" for t in out.tables) or "#   (none)\n"
    kernel = FORWARD.format(params=params, hoisted=hoisted, body=body + ("\n" if out.body else ""),
                            pred=pred)
    text = f"{d.name}\n{d.body.show()}\n{config.show()}\n{VERSION}\n{HELPERS}{kernel}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    header = HEADER.format(name=d.name, ir=d.body.show(), config=config.show(), digest=digest,
                           tables=glossary, block_m=config.block_m, block_n=config.block_n,
                           num_warps=config.num_warps, num_stages=config.num_stages)
    return Generated(header + HELPERS + kernel, digest, tuple(out.tables))


HEADER = '''\
# Generated by sparsec: the forward attention kernel of one pattern. Do not edit.
#
# pattern:      {name}
# canonical IR: {ir}
# tile config:  {config}
# content hash: {digest}
#
# Glossary
#   pos      (BLOCK_M,) query positions p = i + Q_OFFSET of this program's query tile
#   cols     (BLOCK_N,) key indices j of the key tile being visited
#   d        p - j over the tile; block_rows / block_cols: coordinates inside blocks(B, ...)
#   FULL     key tiles where every pair is allowed: no predicate is evaluated
#   PARTIAL  key tiles where some pairs are allowed: the predicate below decides each pair
#   h, b     the query head and batch row of this program; H query heads, G per K/V head
# Table parameters (filled per call by the runtime from the IR's `tables` view)
{tables}import triton
import triton.language as tl

CONFIG = dict(BLOCK_M={block_m}, BLOCK_N={block_n}, num_warps={num_warps}, num_stages={num_stages})
'''

HELPERS = '''

# Triton's // and % truncate toward zero (and Python's, under the interpreter, may not):
# these give the floor semantics of the .sa language on either.
@triton.jit
def _mod(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _floordiv(a, b):
    return (a - _mod(a, b)) // b  # exact division: truncation no longer matters


@triton.jit
def _real(x):
    return x.to(tl.float64)


@triton.jit
def _isqrt(x):
    r = tl.sqrt(_real(x)).to(tl.int64)
    r = tl.where(r * r > x, r - 1, r)  # the float root may land one off the exact one
    return tl.where((r + 1) * (r + 1) <= x, r + 1, r)


@triton.jit
def _ilog2(x):
    r = tl.floor(tl.log2(_real(x))).to(tl.int64)
    r = tl.where((r > 0) & ((1 << r) > x), r - 1, r)
    return tl.where((1 << (r + 1)) <= x, r + 1, r)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:  # Triton 3.9's interpreter misreads bfloat16 operands of tl.dot: widen them first
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_kv(k_base, v_base, cols, offs_d, in_d, N_K, stride_kn, stride_kd, stride_vn, stride_vd):
    """K^T (HEAD_DIM_PAD, BLOCK_N) and V (BLOCK_N, HEAD_DIM_PAD) of one key tile, zero past n_k."""
    in_n = cols < N_K
    k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=in_n[None, :] & in_d[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=in_n[:, None] & in_d[None, :], other=0.0)
    return k, v, in_n


@triton.jit
def _attend(acc, m_i, l_i, q, K_tile, V_tile, keep, QK_SCALE,
            DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """One key tile of the online softmax (base 2). keep: the pairs allowed, or None for all.

    m_i is the running row max of the scaled scores, l_i the running sum of 2^(s - m_i), acc the
    running sum of 2^(s - m_i) v. A row whose pairs are all masked so far keeps m_i = -inf; using
    0 in its place keeps every exponent finite (2^-inf = 0) so such rows stay exactly zero."""
    s = _dot(q, K_tile, DOT_PRECISION, DOT_IN_FP32) * QK_SCALE
    if keep is not None:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(V_tile.dtype), V_tile, DOT_PRECISION, DOT_IN_FP32)
    return acc, m_new, l_i

'''

FORWARD = '''
@triton.jit(do_not_specialize=["N_Q", "N_K", "Q_OFFSET"])
def sparse_attention_forward(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    N_Q, N_K, Q_OFFSET, H, G, QK_SCALE,
    FULL_PTR, FULL_IDX, PARTIAL_PTR, PARTIAL_IDX, LAYOUT_B, LAYOUT_H, QUERY_TILES,
{params}    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PAD, "the head dim is padded up to a power of two")
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G  # grouped-query attention: G query heads share one K/V head

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    pos = offs_m + Q_OFFSET
    in_d = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < N_Q) & in_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # this program's row of the layout (its leading dims broadcast when they have size 1)
    row = ((b % LAYOUT_B) * LAYOUT_H + h % LAYOUT_H) * QUERY_TILES + tile

    # FULL key tiles: every pair allowed; only the last key tile can cross n_k
    start = tl.load(FULL_PTR + row)
    end = tl.load(FULL_PTR + row + 1)
    for at in range(start, end):
        cols = tl.load(FULL_IDX + at) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, in_n = _load_kv(k_base, v_base, cols, offs_d, in_d, N_K, stride_kn, stride_kd, stride_vn, stride_vd)
        if EVEN_N:
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, None, QK_SCALE, DOT_PRECISION, DOT_IN_FP32)
        else:
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, in_n[None, :], QK_SCALE, DOT_PRECISION, DOT_IN_FP32)

    # the pattern's predicate, the parts that depend on the query rows only
{hoisted}

    # PARTIAL key tiles: the predicate decides each pair
    start = tl.load(PARTIAL_PTR + row)
    end = tl.load(PARTIAL_PTR + row + 1)
    for at in range(start, end):
        cols = tl.load(PARTIAL_IDX + at) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, in_n = _load_kv(k_base, v_base, cols, offs_d, in_d, N_K, stride_kn, stride_kd, stride_vn, stride_vd)
{body}        keep = {pred} & in_n[None, :]
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, keep, QK_SCALE, DOT_PRECISION, DOT_IN_FP32)

    # rows with no allowed key: O = 0 and LSE = -inf (l_i = 0 there), never NaN
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453  # base 2 -> natural log
    lse = tl.where(l_i == 0.0, float("-inf"), lse)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < N_Q) & in_d[None, :])
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)
'''
