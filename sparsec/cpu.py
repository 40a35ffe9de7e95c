"""The fast CPU path: the same block layout, executed as batched matmuls over gathered key tiles."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ir.pattern import Pattern
from .ir.tiles import Grid, TableSpace
from .layout import BlockLayout

SCORE_BUDGET = 1 << 19   # score entries (fp32) per step: 2 MB, so a step's working set stays in cache


@dataclass(frozen=True)
class TileGroup:
    """Query tiles, over every head, that visit the same number of key tiles: one batched matmul.

    rows (R,) index the query tiles of all heads, (h * TQ + t); key_tiles (R, visits) index the
    key tiles of all K/V heads, (h // G * TK + kt). keep (M, BLOCK_M, visits * BLOCK_N) holds the
    masks of distinct layout rows (heads share them when the layout does), keep_of (R,) picks one;
    keep is None when every pair of the group is allowed."""
    rows: torch.Tensor
    key_tiles: torch.Tensor
    keep: torch.Tensor | None
    keep_of: torch.Tensor | None


@dataclass(frozen=True)
class Plan:
    """Tile groups per batch row (key None: the same for every batch row)."""
    layout: BlockLayout
    groups: dict[int | None, list[TileGroup]]


def _row_mask(body: Pattern, layout: BlockLayout, space: TableSpace, head: int, runtime, t: int,
              key_tiles: np.ndarray) -> np.ndarray:
    """The reference mask over query tile t x the visited key tiles (padding rows/keys False)."""
    bm, bn = layout.block_m, layout.block_n
    pos = np.arange(t * bm, min((t + 1) * bm, space.n_q), dtype=np.int64) + space.q_offset
    keys = (key_tiles[:, None] * bn + np.arange(bn)).ravel()
    valid = keys < space.n_k
    keep = np.zeros((bm, len(keys)), bool)
    keep[: len(pos), np.flatnonzero(valid)] = body.mask(Grid(pos, keys[valid], space.n_q, space.n_k, head, runtime))
    return keep


def plan(body: Pattern, layout: BlockLayout, space: TableSpace, kv_heads: int, per_batch: bool) -> Plan:
    """Group the query tiles of every head by visit count; evaluate the pattern's reference mask
    on the visited pairs of PARTIAL rows only (FULL tiles are all True), never n x n."""
    lb, lh, tq, tk = layout.shape
    H, group = space.heads, space.heads // kv_heads
    groups: dict[int | None, list[TileGroup]] = {}
    for b in (range(space.batch) if per_batch else [None]):
        by_count: dict[int, list] = {}       # visits -> [(row, key tiles, layout row key)]
        masks: dict[tuple[int, int], np.ndarray | None] = {}
        for h in range(H):
            lay_h = h if lh > 1 else 0
            runtime = space.per_head(b or 0, h)
            for t in range(tq):
                full = layout.full.row(b if lb > 1 else 0, lay_h, t)
                part = layout.partial.row(b if lb > 1 else 0, lay_h, t)
                visits = np.union1d(full, part)
                if not len(visits):
                    continue
                if (lay_h, t) not in masks:
                    past_n_k = (visits[-1] + 1) * layout.block_n > space.n_k
                    masks[(lay_h, t)] = _row_mask(body, layout, space, h, runtime, t, visits) \
                        if len(part) or past_n_k else None
                by_count.setdefault(len(visits), []).append((h * tq + t, (h // group) * tk + visits, (lay_h, t)))
        out = []
        for entries in by_count.values():
            rows = torch.as_tensor([e[0] for e in entries])
            key_tiles = torch.as_tensor(np.stack([e[1] for e in entries]))
            keys = [e[2] for e in entries]
            if all(masks[key] is None for key in keys):
                out.append(TileGroup(rows, key_tiles, None, None))
                continue
            distinct = list(dict.fromkeys(keys))
            width = key_tiles.shape[1] * layout.block_n
            stack = [masks[key] if masks[key] is not None else np.ones((layout.block_m, width), bool)
                     for key in distinct]
            index = {key: i for i, key in enumerate(distinct)}
            out.append(TileGroup(rows, key_tiles, torch.as_tensor(np.stack(stack)),
                                 torch.as_tensor([index[key] for key in keys])))
        groups[b] = out
    return Plan(layout, groups)


def _tiles(x: torch.Tensor, tiles: int, size: int) -> torch.Tensor:
    """x (B, H, m, D) as float32 (B, H * tiles, size, D), zero-padded to tiles * size rows."""
    B, H, m, D = x.shape
    if m == tiles * size and x.dtype == torch.float32:
        return x.reshape(B, H * tiles, size, D)
    out = torch.zeros((B, H, tiles * size, D), dtype=torch.float32)
    out[:, :, :m] = x
    return out.view(B, H * tiles, size, D)


def forward(p: Plan, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O and LSE: per tile group, scores of the gathered key tiles, a masked softmax, and P @ V.
    Rows with no allowed key get O = 0 and LSE = -inf."""
    B, H, n_q, D = q.shape
    _, _, tq, tk = p.layout.shape
    bm, bn = p.layout.block_m, p.layout.block_n
    qt = _tiles(q * scale if q.dtype == torch.float32 else q.float() * scale, tq, bm)  # scale folded into q
    kt, vt = _tiles(k, tk, bn), _tiles(v, tk, bn)
    o = torch.zeros((B, H * tq, bm, D), dtype=torch.float32)
    lse = torch.full((B, H * tq, bm), float("-inf"), dtype=torch.float32)
    for b, groups in p.groups.items():
        bs = slice(None) if b is None else slice(b, b + 1)
        nb = B if b is None else 1
        for grp in groups:
            visits = grp.key_tiles.shape[1]
            step = max(1, SCORE_BUDGET // (nb * bm * visits * bn))
            for s in range(0, len(grp.rows), step):
                rows, key_tiles = grp.rows[s: s + step], grp.key_tiles[s: s + step]
                r = len(rows)
                kg = kt[bs, key_tiles].view(nb, r, visits * bn, D)
                scores = torch.matmul(qt[bs, rows], kg.transpose(-1, -2))
                if grp.keep is not None:
                    scores.masked_fill_(grp.keep[grp.keep_of[s: s + step]].logical_not_(), float("-inf"))
                m = scores.amax(-1, keepdim=True)
                m.masked_fill_(torch.isneginf(m), 0.0)   # rows with nothing allowed: exp(-inf) = 0
                scores.sub_(m).exp_()
                total = scores.sum(-1, keepdim=True)
                out = torch.matmul(scores, vt[bs, key_tiles].view(nb, r, visits * bn, D))
                o[bs, rows] = out.div_(total.clamp_min(torch.finfo(torch.float32).tiny))
                lse[bs, rows] = m.add_(total.log()).squeeze(-1)
    o = o.view(B, H, tq * bm, D)[:, :, :n_q]
    return o.to(q.dtype).contiguous(), lse.view(B, H, tq * bm)[:, :, :n_q].contiguous()
