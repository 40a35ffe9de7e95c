"""The oracle: the dense mask of a specialized pattern (the IR's reference rules) and float64 masked attention."""
from __future__ import annotations

import numpy as np
import torch

from .ir.pattern import Pattern
from .ir.tiles import Grid, TableSpace


def dense_mask(body: Pattern, n_q: int, n_k: int, q_offset: int, heads: int, batch: int, inputs: dict,
               rows=None) -> torch.Tensor:
    """bool (batch, heads, n_q, n_k): every pair the specialized body allows, by its `mask` rules
    (numpy inputs: segment_ids, q, k, centroids, rotations and declared inputs by name). n_q x n_k: for tests and small n;
    rows (query indices) restricts it to those rows, (batch, heads, len(rows), n_k)."""
    per_head = heads if body.varies_with_head() else 1
    rows = np.arange(n_q, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.zeros((batch, heads, len(rows), n_k), bool)
    pos, keys = rows + q_offset, np.arange(n_k, dtype=np.int64)
    space = TableSpace(n_q, n_k, q_offset, heads, batch, inputs=inputs)
    for b in range(batch):
        for h in range(per_head):
            out[b, h] = body.mask(Grid(pos, keys, n_q, n_k, h, space.per_head(b, h)))
        if per_head == 1:
            out[b, 1:] = out[b, 0]
    return torch.from_numpy(out)


def attention(q, k, v, mask: torch.Tensor, scale: float, score=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE) in float64 by dense masked softmax: q (B, H, n_q, D), k and v (B, Hkv, n_k, D) with
    H a multiple of Hkv, mask bool broadcastable to (B, H, n_q, n_k). score: S -> S' (a pattern's
    with expression, kern.score_function) applied before the mask; a pair whose S' is -inf counts
    for nothing. A row with no allowed key gives O = 0 and LSE = -inf. Differentiable (float64
    autograd), for gradient references."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) if group > 1 else x.double() for x in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    s = (s if score is None else score(s)).masked_fill(~mask, -torch.inf)
    some = torch.isfinite(s).any(-1, keepdim=True)
    s = torch.where(some, s, 0.0)       # rows with no key: finite, so no NaN reaches their gradients
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(some & torch.isfinite(s), torch.exp(s - lse), 0.0)
    return p @ v, torch.where(some, lse, -torch.inf)[..., 0]
