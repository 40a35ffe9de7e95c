"""A pattern as FlexAttention's mask_mod: each IR node's predicate lowered to torch ops (a table keyed by node type)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ir.combinators import Blocks, Difference, Heads, Intersection, Union
from ..ir.content import Cluster, Lsh, TopK
from ..ir.document import Document
from ..ir.pattern import value
from ..ir.positional import Band, Causal, Chunk, Dilated, Empty, Full, LogSparse, Stride
from ..ir.random import Random, random_keys
from ..ir.rows import Global, GlobalSet, Last, Sink
from ..ir.where import Where
from ..layout.expressions import to_torch


@dataclass(frozen=True)
class Index:
    """What a node's torch rule sees: Flex's batch and head, the query position p (q_idx +
    q_offset) and key j, in the node's coordinates (block indices inside blocks(...)), with the
    lengths in those coordinates and the call's input tensors."""
    b: torch.Tensor
    h: torch.Tensor
    p: torch.Tensor
    j: torch.Tensor
    n_q: int
    n_k: int
    inputs: dict
    rows: tuple[int, int]   # [first, end) of the positions p can take here
    tables: dict            # random_tables


def _heads(node, x: Index):
    out = lower_torch(node.parts[0], x)
    for k, part in enumerate(node.parts[1:], 1):
        out = torch.where(x.h % len(node.parts) == k, lower_torch(part, x), out)
    return out


def _blocks(node, x: Index):
    size = value(node.size)
    inner = Index(x.b, x.h, x.p // size, x.j // size, -(-x.n_q // size), -(-x.n_k // size), x.inputs,
                  (x.rows[0] // size, -(-x.rows[1] // size)), x.tables)
    return lower_torch(node.body, inner)


def _any(parts, x: Index):
    out = lower_torch(parts[0], x)
    for part in parts[1:]:
        out = out | lower_torch(part, x)
    return out


def _all(parts, x: Index):
    out = lower_torch(parts[0], x)
    for part in parts[1:]:
        out = out & lower_torch(part, x)
    return out


def _global_set(node, x: Index):
    out = x.p != x.p
    for m in node.members().tolist():   # a handful of listed positions: one comparison each
        out = out | (x.p == m) | (x.j == m)
    return out


# ---- random(r, seed): a lookup of the drawn keys, as the Triton lowering does ----
# Recomputing the counter hash inside the mask_mod is exact too, but inductor then simplifies its
# 64-bit arithmetic as index expressions: one BigBird block mask took 474 s to compile on CPU.

def _random(node, x: Index):
    """j is one of the row's min(r, n_k) drawn keys (ir/random.py's random_keys), read from the
    table built for these rows and heads; heads past the table (a mask_mod asked for fewer heads
    than Flex runs) allow nothing there rather than read out of bounds."""
    row0, keys = x.tables[(id(node), x.rows, x.n_k)]
    heads, rows, count = keys.shape
    at = x.p - row0
    ok = (at >= 0) & (at < rows) & (x.h < heads)
    h, row = x.h.clamp(0, heads - 1), at.clamp(0, rows - 1)
    out = x.j != x.j
    for t in range(count):   # one element per read: compiled Flex on CPU got keys[h, row][t] wrong (torch 2.13)
        out = out | (keys[h, row, t] == x.j)
    return ok & out


def random_tables(body, rows: tuple[int, int], n_k: int, heads: int, device) -> dict:
    """The drawn keys of every random node for positions rows = [first, end) and key count n_k,
    in each node's own coordinates (blocks(...) divide them, as _blocks does): memory heads x
    rows x r, never n_q x n_k."""
    out = {}

    def visit(node, rows, n_k):
        if type(node) is Random and (id(node), rows, n_k) not in out:
            positions = np.arange(*rows, dtype=np.int64)
            count = min(value(node.r), n_k)
            keys = np.stack([random_keys(value(node.seed), h, positions, count, n_k) for h in range(heads)])
            out[(id(node), rows, n_k)] = (rows[0], torch.as_tensor(keys.reshape(heads, len(positions), count),
                                                                    device=device))
        if type(node) is Blocks:
            size = value(node.size)
            rows, n_k = (rows[0] // size, -(-rows[1] // size)), -(-n_k // size)
        for child in node.children():
            visit(child, rows, n_k)
    visit(body, rows, n_k)
    return out


def _where(node, x: Index):
    # int64 coordinates: products such as i * j overflow Flex's int32 indices at long lengths
    names = {"i": x.p.long(), "j": x.j.long(), "h": x.h.long(), "b": x.b.long(), "n": x.n_k, "n_q": x.n_q,
             "n_k": x.n_k, **x.inputs}
    return (x.p == x.p) & to_torch(node.cond, names)   # & broadcasts a condition of h alone


# Each node's predicate in torch ops, the same rules as its Triton `lower` (beside it in ir/), on
# scalars under Flex's vmap or on broadcast index tensors. Arguments are constants here: the body
# is specialized for the call's lengths first.
MASK_MODS = {
    Full: lambda node, x: (x.p - x.j) == (x.p - x.j),
    Empty: lambda node, x: (x.p - x.j) != (x.p - x.j),
    Causal: lambda node, x: x.p >= x.j,
    Band: lambda node, x: ((x.p - x.j) >= -value(node.after)) & ((x.p - x.j) <= value(node.before)),
    Dilated: lambda node, x: ((x.p - x.j).abs() <= value(node.w) * value(node.d)) & ((x.p - x.j) % value(node.d) == 0),
    Stride: lambda node, x: (x.p - x.j) % value(node.s) == 0,
    LogSparse: lambda node, x: ((x.p - x.j) == 0) | (((x.p - x.j) > 0) & (((x.p - x.j) & (x.p - x.j - 1)) == 0)),
    Chunk: lambda node, x: x.p // value(node.c) == x.j // value(node.c),
    Global: lambda node, x: (x.p < value(node.g)) | (x.j < value(node.g)),
    Last: lambda node, x: (x.p >= x.n_k - value(node.g)) | (x.j >= x.n_k - value(node.g)),
    Sink: lambda node, x: x.j < value(node.g),
    GlobalSet: _global_set,
    Random: _random,
    Where: _where,
    Document: lambda node, x: x.inputs["segment_ids"][x.b, x.p] == x.inputs["segment_ids"][x.b, x.j],
    Union: lambda node, x: _any(node.parts, x),
    Intersection: lambda node, x: _all(node.parts, x),
    Difference: lambda node, x: lower_torch(node.left, x) & ~lower_torch(node.right, x),
    Heads: _heads,
    Blocks: _blocks,
}
# Content patterns have no mask_mod of their own: their pairs depend on q and k (backend='flex'
# evaluates their PARTIAL tiles' bits in the sorted order instead).
NO_MASK_MODS = (Lsh, Cluster, TopK)


def unlowered(body):
    """The first node of the body with no torch rule, or None."""
    return next((node for node in body.nodes() if type(node) not in MASK_MODS), None)


def _no_rule(node) -> ValueError:
    return ValueError(f"{node.show()} is content-based (its pairs depend on q and k), so it has no mask_mod; "
                      f"backend='flex' runs it from each call's layout")


def lower_torch(node, x: Index) -> torch.Tensor:
    rule = MASK_MODS.get(type(node))
    if rule is None:
        raise _no_rule(node)
    return rule(node, x)


def mask_mod(body, n_q: int, n_k: int, q_offset: int, heads: int, inputs: dict, device):
    """Flex's mask_mod(b, h, q_idx, kv_idx) of a body specialized for these lengths and heads,
    its tables (random's keys) on `device`."""
    missing = unlowered(body)
    if missing is not None:   # fail now, not inside Flex's vmap
        raise _no_rule(missing)
    rows = (q_offset, q_offset + n_q)
    tables = random_tables(body, rows, n_k, heads, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return lower_torch(body, Index(b, h, q_idx + q_offset, kv_idx, n_q, n_k, inputs, rows, tables))
    return mask_mod
