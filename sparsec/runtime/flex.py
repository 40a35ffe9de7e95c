"""FlexAttention's BlockMask of a pattern, built from sparsec's layout: FULL and PARTIAL tiles as listed, PARTIAL tiles' bits from the IR's reference rule."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ir.tiles import Grid, TableSpace
from ..layout import BlockLayout

FULL_TILE, EMPTY_TILE = -2, -1


@dataclass(frozen=True)
class TileMasks:
    """A pattern at one tile size, as FlexAttention needs it: the block layout, and for PARTIAL
    tiles their exact masks: tile_id per (b, h, query tile, key tile) is the PARTIAL tile's index
    into bits (tiles, block, block), or FULL_TILE, or EMPTY_TILE. Memory grows with the PARTIAL
    tiles, never with n_q x n_k."""
    layout: BlockLayout
    tile_id: np.ndarray
    bits: np.ndarray

    def pairs(self, batch: int, heads: int) -> int:
        """Allowed (query, key) pairs over all batch rows and heads."""
        lay, (lb, lh, _, _) = self.layout, self.layout.shape
        full = 0
        for b in range(lb):
            for h in range(lh):
                for t in range(lay.shape[2]):
                    rows = min(lay.block_m, lay.n_q - t * lay.block_m)
                    cols = lay.full.row(b, h, t)
                    full += rows * int(np.minimum(lay.block_n, lay.n_k - cols * lay.block_n).sum())
        partial = int(self.bits.sum())
        return (full + partial) * (batch // lb) * (heads // lh)


def tile_masks(body, lay: BlockLayout, q_offset: int, segment_ids=None) -> TileMasks:
    """The PARTIAL tiles' masks of layout `lay`, from the specialized body's reference rule
    evaluated on those tiles only (memory: block^2 bits per PARTIAL tile)."""
    n_q, n_k, block = lay.n_q, lay.n_k, lay.block_m
    lb, lh, tq, tk = lay.shape
    space = TableSpace(n_q, n_k, q_offset, lh, lb, inputs=dict(segment_ids=segment_ids))
    tile_id = np.full((lb, lh, tq, tk), EMPTY_TILE, np.int32)
    bits, count = [], 0
    for b in range(lb):
        for h in range(lh):
            for t in range(tq):
                tile_id[b, h, t, lay.full.row(b, h, t)] = FULL_TILE
                cols = lay.partial.row(b, h, t)
                if not len(cols):
                    continue
                rows = np.arange(t * block, min(n_q, (t + 1) * block), dtype=np.int64)
                keys = (cols[:, None].astype(np.int64) * block + np.arange(block)).ravel()
                inside = keys < n_k
                m = np.zeros((len(rows), len(keys)), bool)
                m[:, inside] = body.mask(Grid(rows + q_offset, keys[inside], n_q, n_k, h, space.per_head(b, h)))
                tiles = np.zeros((len(cols), block, block), bool)
                tiles[:, :len(rows)] = m.reshape(len(rows), len(cols), block).transpose(1, 0, 2)
                bits.append(tiles)
                tile_id[b, h, t, cols] = np.arange(count, count + len(cols))
                count += len(cols)
    return TileMasks(lay, tile_id, np.concatenate(bits) if bits else np.zeros((1, block, block), bool))


def block_mask(masks: TileMasks, batch: int, heads: int, device):
    """A FlexAttention BlockMask with the same FULL / PARTIAL tiles. Its mask_mod is the pattern
    everywhere (Flex only calls it on PARTIAL tiles): a lookup of the tile, then of its bits."""
    from torch.nn.attention.flex_attention import BlockMask
    lay = masks.layout
    lb, lh, tq, tk = lay.shape
    block = lay.block_m

    def lists(tl):
        counts = torch.as_tensor(tl.counts(), dtype=torch.int32)
        indices = torch.zeros((lb, lh, tq, tk), dtype=torch.int32)
        for r in range(lb * lh * tq):
            row = tl.indices[tl.ptr[r]: tl.ptr[r + 1]]
            indices.view(-1, tk)[r, :len(row)] = torch.as_tensor(row, dtype=torch.int32)
        expand = lambda x: x.expand(batch, heads, *x.shape[2:]).contiguous().to(device)
        return expand(counts), expand(indices)

    tile_id = torch.as_tensor(masks.tile_id, device=device)
    bits = torch.as_tensor(masks.bits, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        t = tile_id[b % lb, h % lh, q_idx // block, kv_idx // block]
        return (t == FULL_TILE) | ((t >= 0) & bits[t.clamp(min=0), q_idx % block, kv_idx % block])

    partial, full = lists(lay.partial), lists(lay.full)
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(lay.n_q, lay.n_k))
