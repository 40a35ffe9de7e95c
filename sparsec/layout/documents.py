"""Layouts of `document & X` built per call on the tensors' device from segment boundaries.

Packed sequences change with every batch, so their layout cannot be cached: building it on the
host would copy segment_ids off the GPU and back each call. Here the static part X (no runtime
input) has its layout built once per shape and kept on the device as candidate tiles; a call only
computes each tile's segment range (min and max id, O(n)) and intersects, all in torch on the
device: O(n + candidate tiles), never n x n. A tile is FULL when it is FULL in X and both its rows
and its keys lie in one and the same segment, EMPTY when their id ranges do not meet, else PARTIAL
(the document predicate decides each pair), exactly the host rule of ir/document.Document."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ir.content import Cluster, Lsh, TopK
from ..ir.pattern import Pattern
from ..ir.combinators import Blocks, Difference, Heads, Intersection, Union
from ..ir.positional import Chunk, OffsetPattern
from ..ir.rows import RowsOrColumns
from ..ir.random import Random
from ..ir.where import Where
from ..ir.document import Document
from ..ir.tiles import FULL, PARTIAL
from .block import BlockLayout, DeviceLayout, expand_ranges, tile_extremes


def _static_of_intersection(body: Intersection) -> tuple[Pattern | None] | None:
    rest = [p for p in body.parts if not isinstance(p, Document)]
    if len(rest) < len(body.parts) and not any(p.inputs_read() for p in rest):
        return (rest[0] if len(rest) == 1 else Intersection(tuple(rest)),)
    return None


# The static part X of a body `document & X` (or `document` alone), by node type.
STATIC_PART = {Document: lambda body: (None,), Intersection: _static_of_intersection}
NO_STATIC_PART = (OffsetPattern, RowsOrColumns, Chunk, Random, Where, Lsh, Cluster, TopK, Union, Difference, Heads,
                  Blocks)   # a document under these is built on the host


def static_part(body: Pattern) -> tuple[Pattern | None] | None:
    """(X,) when body is `document & X` with X reading no call input, (None,) when body is
    `document` alone, None otherwise (the layout is then built on the host)."""
    rule = STATIC_PART.get(type(body))
    return rule(body) if rule else None


@dataclass(frozen=True)
class DocumentLayouts:
    """Candidate tiles of the static part for one shape, on the device: head h, query tile t,
    key tile kt and class (FULL/PARTIAL). candidates None: the static part is everything."""
    n_q: int
    n_k: int
    q_offset: int
    block_m: int
    block_n: int
    heads: int                          # the static part's heads dim (1 when it is shared)
    candidates: tuple[torch.Tensor, ...] | None
    longest_row: int

    @staticmethod
    def of(static: BlockLayout | None, n_q: int, n_k: int, q_offset: int, block_m: int, block_n: int,
           device: torch.device) -> "DocumentLayouts":
        tq, tk = -(-n_q // block_m), -(-n_k // block_n)
        if static is None:
            return DocumentLayouts(n_q, n_k, q_offset, block_m, block_n, 1, None, tk)
        _, lh, _, _ = static.shape
        parts = []
        for lists, cls in ((static.full, FULL), (static.partial, PARTIAL)):
            row = np.repeat(np.arange(lh * tq), np.diff(lists.ptr))   # static layouts have batch 1
            parts.append((row // tq, row % tq, lists.indices.astype(np.int64), np.full(len(row), cls)))
        h, t, kt, cls = (torch.as_tensor(np.concatenate(x), device=device) for x in zip(*parts))
        return DocumentLayouts(n_q, n_k, q_offset, block_m, block_n, lh, (h, t, kt, cls.to(torch.int8)),
                               static.longest_row())

    def build(self, segment_ids: torch.Tensor) -> DeviceLayout:
        """The layout for these segment ids (B, n_k) on their device: one per batch row."""
        seg = segment_ids.long()
        B = seg.shape[0]
        tq, tk = -(-self.n_q // self.block_m), -(-self.n_k // self.block_n)
        q_min, q_max = tile_extremes(seg[:, self.q_offset: self.q_offset + self.n_q], self.block_m)
        k_min, k_max = tile_extremes(seg, self.block_n)
        if self.candidates is None:
            b, h, t, kt, cls = _document_tiles(seg, q_min, q_max, self.block_n, tq, tk)
        else:
            h, t, kt, cls = self.candidates
            b = torch.arange(B, device=seg.device).repeat_interleave(len(t))
            h, t, kt, cls = h.repeat(B), t.repeat(B), kt.repeat(B), cls.repeat(B)
        lo_q, hi_q, lo_k, hi_k = q_min[b, t], q_max[b, t], k_min[b, kt], k_max[b, kt]
        one = (lo_q == hi_q) & (lo_k == hi_k) & (lo_q == lo_k)
        meet = (lo_q <= hi_k) & (lo_k <= hi_q)
        cls = torch.where(one, cls, torch.where(meet, torch.clamp(cls, max=PARTIAL), 0))
        pick = cls > 0
        return DeviceLayout.from_tiles((B, self.heads, tq, tk), self.block_m, self.block_n,
                                       (b * self.heads + h)[pick], t[pick], kt[pick], cls[pick], self.longest_row)


def _document_tiles(seg, q_min, q_max, block_n, tq, tk):
    """`document` alone: (b, h, t, kt, class FULL) for the tiles a query tile may meet. Sorted ids
    (packed documents): the key range of its segment range, by binary search; otherwise every tile."""
    B, device = seg.shape[0], seg.device
    if bool((seg[:, 1:] >= seg[:, :-1]).all()):
        first = torch.searchsorted(seg, q_min, side="left") // block_n
        last = (torch.searchsorted(seg, q_max, side="right") - 1) // block_n + 1
        owner, kt = expand_ranges(first.reshape(-1), (last - first).reshape(-1))
        b, t = owner // tq, owner % tq
    else:
        b = torch.arange(B, device=device).repeat_interleave(tq * tk)
        t = torch.arange(tq, device=device).repeat_interleave(tk).repeat(B)
        kt = torch.arange(tk, device=device).repeat(B * tq)
    return b, torch.zeros_like(b), t, kt, torch.full_like(b, FULL, dtype=torch.int8)
