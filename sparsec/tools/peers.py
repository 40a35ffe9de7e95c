"""The implementations sparsec is timed against, built for one compiled pattern and one shape: dense
SDPA, SDPA under the pattern's boolean mask, and compiled FlexAttention with a block mask of the
same pattern."""
from __future__ import annotations

import torch.nn.functional as F

from ..compiled import CompiledPattern
from ..runtime.flex import TileMasks, bits_mask_mod, block_mask, compiled_flex


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


def tile_masks(kern: CompiledPattern, n_q: int, n_k: int, heads: int, block: int, q_offset: int | None = None,
               segment_ids=None) -> TileMasks:
    """The pattern's layout at block x block tiles with its PARTIAL tiles' masks (runtime/flex.py)."""
    if {"q", "k"} & kern.needs:
        raise Skipped("content-based pattern: its tiles depend on q and k (see benchmarks/content.py)")
    return kern.tile_masks(n_q, n_k, heads, block, q_offset, segment_ids)


def flex(masks: TileMasks, q, k, v, scale: float):
    """Compiled flex_attention under the block mask (the compile happens on the first call)."""
    if q.device.type == "cpu" and q.requires_grad:
        raise Skipped("FlexAttention has no backward on CPU")
    mask = block_mask(masks.layout, q.shape[0], q.shape[1], q.device, bits_mask_mod(masks, q.device))
    compiled, gqa = compiled_flex(), q.shape[1] != k.shape[1]
    return lambda: compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
