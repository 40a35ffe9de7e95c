"""The analytic host build of a block layout: every rule classifies tiles from intervals, a band at a time."""
from __future__ import annotations

import numpy as np

from ..ir.pattern import Pattern
from ..ir.tiles import EMPTY, FULL, PARTIAL, CallInputs, Tiling
from .block import BlockLayout, TileLists


CHUNK_CANDIDATES = 1 << 20   # query tiles are built in bands of about this many candidate tiles


def build_layout(body: Pattern, n_q: int, n_k: int, block_m: int, block_n: int, q_offset: int,
                 heads: int = 1, segment_ids: np.ndarray | None = None, space=None) -> BlockLayout:
    """Analytic layout of a specialized pattern body, one TileSet per (batch, head) that differs.
    space: a TableSpace whose call inputs (content selections, segment ids) vary per batch row.
    Query tiles are classified a band at a time (every rule reads only its tiling's arrays), and
    each band kept as int32 lists: memory is the layout's plus one band's, however dense it is."""
    n_heads = heads if body.varies_with_head() else 1
    batches = [None] if segment_ids is None else list(segment_ids)
    if space is not None:
        batches = [[space.per_head(b, h) for h in range(n_heads)] for b in range(space.batch)]
    tq, tk = -(-n_q // block_m), -(-n_k // block_n)
    counts: dict[int, list] = {FULL: [], PARTIAL: []}    # per band, tiles per query tile
    indices: dict[int, list] = {FULL: [], PARTIAL: []}   # per band, their key tiles in row order
    for seg in batches:
        for h in range(n_heads):
            inputs = seg[h] if space is not None else CallInputs(segment_ids=seg)
            t = Tiling.regular(n_q, n_k, block_m, block_n, q_offset, head=h, inputs=inputs)
            bands = -(-min(body.estimate(t), tq * tk) // CHUNK_CANDIDATES)   # one, unless it is dense
            band = max(1, -(-tq // max(1, bands)))
            for first in range(0, tq, band):
                tiles = body.tiles(t.rows(first, first + band))
                for cls in (FULL, PARTIAL):
                    pick = tiles.cls == cls
                    counts[cls].append(np.bincount(tiles.qt[pick], minlength=min(band, tq - first)))
                    indices[cls].append(tiles.kt[pick].astype(np.int32))

    def lists(cls: int) -> TileLists:
        ptr = np.zeros(len(batches) * n_heads * tq + 1, np.int64)
        np.cumsum(np.concatenate(counts[cls]), out=ptr[1:])
        return TileLists(ptr, np.concatenate(indices[cls]), (len(batches), n_heads, tq))

    return BlockLayout(n_q, n_k, block_m, block_n, q_offset, lists(FULL), lists(PARTIAL), tk)


def tile_classes(mask: np.ndarray, block_m: int, block_n: int) -> np.ndarray:
    """The true class of every tile of a dense (..., n_q, n_k) mask: what a layout must cover."""
    *lead, n_q, n_k = mask.shape
    tq, tk = -(-n_q // block_m), -(-n_k // block_n)
    pad = np.zeros((*lead, tq * block_m, tk * block_n), np.int8)
    pad[..., :n_q, :n_k] = mask
    inside = np.zeros_like(pad)
    inside[..., :n_q, :n_k] = 1
    tiles = pad.reshape(*lead, tq, block_m, tk, block_n).sum(axis=(-3, -1))
    area = inside.reshape(*lead, tq, block_m, tk, block_n).sum(axis=(-3, -1))
    return np.where(tiles == area, FULL, np.where(tiles > 0, PARTIAL, EMPTY)).astype(np.int8)
