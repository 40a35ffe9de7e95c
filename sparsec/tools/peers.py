"""The implementations sparsec is timed against, built for one compiled pattern and one shape: dense
SDPA, SDPA under the pattern's boolean mask, and compiled FlexAttention with a block mask of the
same pattern."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import passes
from ..compiled import CompiledPattern
from ..ir.tiles import Grid, TableSpace
from ..layout import BlockLayout


FULL_TILE, EMPTY_TILE = -2, -1


class Skipped(Exception):
    """A peer that cannot run this case (too much memory, a pattern it cannot express); the
    message says why and goes into the report."""


def dense(q, k, v, scale: float):
    """SDPA with no mask: dense flash attention, the cost sparsity is measured against."""
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)


def masked_sdpa(kern: CompiledPattern, q, k, v, scale: float, limit_bytes: int, runtime: dict):
    """SDPA with the pattern's dense boolean mask (broadcast over heads when the pattern does not
    depend on them), when the mask fits in limit_bytes."""
    if {"q", "k"} & kern.needs:
        raise Skipped("content-based pattern: the mask is per call (see benchmarks/content.py)")
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    heads = H if kern.ir.body.varies_with_head() else 1
    need = (B if "segment_ids" in kern.needs else 1) * heads * n_q * n_k
    if need > limit_bytes:
        raise Skipped(f"its n_q x n_k bool mask needs {need / 2**30:.1f} GiB (limit {limit_bytes / 2**30:.1f} GiB)")
    mask = kern.mask(n_q, n_k, heads=heads, **runtime).to(q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


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


def tile_masks(kern: CompiledPattern, n_q: int, n_k: int, heads: int, block: int, q_offset: int | None = None,
               segment_ids=None) -> TileMasks:
    """The layout at block x block tiles and the PARTIAL tiles' masks, from the IR's reference
    rule evaluated on those tiles only."""
    if {"q", "k"} & kern.needs:
        raise Skipped("content-based pattern: its tiles depend on q and k (see benchmarks/content.py)")
    heads = heads if kern.ir.body.varies_with_head() else 1
    q_offset = n_k - n_q if q_offset is None else q_offset
    seg = None if segment_ids is None else np.asarray(torch.as_tensor(segment_ids).cpu())
    lay = kern.layout(n_q, n_k, block, block, heads=heads, q_offset=q_offset, segment_ids=seg)
    body = passes.specialize(kern.ir, n_q, n_k, q_offset, heads)
    lb, lh, tq, tk = lay.shape
    space = TableSpace(n_q, n_k, q_offset, lh, lb, inputs=dict(segment_ids=seg))
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


def flex_block_mask(masks: TileMasks, batch: int, heads: int, device):
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


def flex(masks: TileMasks, q, k, v, scale: float):
    """Compiled flex_attention under the block mask (the compile happens on the first call)."""
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cpu" and q.requires_grad:
        raise Skipped("FlexAttention has no backward on CPU")
    block_mask = flex_block_mask(masks, q.shape[0], q.shape[1], q.device)
    # every new shape and block mask recompiles; past dynamo's default limit (8) flex_attention
    # would fall back to its slow eager path for the rest of a suite run, which is not Flex's speed
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, 128)
    limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 1024)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
