"""The fast CPU path: the same block layout, executed as batched matmuls over gathered key tiles."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ir.pattern import Pattern
from .ir.tiles import Grid, TableSpace
from .layout import BlockLayout

SCORE_BUDGET = 1 << 24   # score entries (fp32) materialized at once, to bound memory


@dataclass(frozen=True)
class TileGroup:
    """Query tiles of one layout slice that visit the same number of key tiles: they run as one
    batched matmul. keep (tiles, BLOCK_M, visits * BLOCK_N) is None when every pair is allowed."""
    tiles: torch.Tensor        # (T,) query tile indices
    key_tiles: torch.Tensor    # (T, visits) key tile indices, ascending per row
    keep: torch.Tensor | None


@dataclass(frozen=True)
class Plan:
    """Per (layout batch, layout head) slice, the tile groups; `slices` keys are (b, h) or None
    for a dimension the layout broadcasts."""
    layout: BlockLayout
    slices: dict[tuple[int | None, int | None], list[TileGroup]]


def plan(body: Pattern, layout: BlockLayout, space: TableSpace, per_batch: bool) -> Plan:
    """Group the layout's query tiles by visit count and evaluate the pattern's reference mask on
    the visited pairs only (FULL tiles are all True; PARTIAL tiles are decided pair by pair)."""
    lb, lh, tq, tk = layout.shape
    bm, bn = layout.block_m, layout.block_n
    batches = range(space.batch) if per_batch else [None]
    heads = range(lh) if lh > 1 else [None]
    slices = {}
    for b in batches:
        for h in heads:
            lay_b, lay_h = (b if lb > 1 else 0), (h if h is not None else 0)
            runtime = space.per_head(b or 0, h or 0)
            visits, partial = [], []
            for t in range(tq):
                full, part = layout.full.row(lay_b, lay_h, t), layout.partial.row(lay_b, lay_h, t)
                visits.append(np.union1d(full, part))
                partial.append(len(part) > 0)
            groups = []
            counts = np.array([len(x) for x in visits])
            for c in np.unique(counts[counts > 0]):
                tiles = np.flatnonzero(counts == c)
                key_tiles = np.stack([visits[t] for t in tiles])
                keep = None
                if any(partial[t] for t in tiles) or (key_tiles.max() + 1) * bn > space.n_k:
                    keep = np.zeros((len(tiles), bm, c * bn), bool)
                    for r, t in enumerate(tiles):
                        pos = np.arange(t * bm, min((t + 1) * bm, space.n_q), dtype=np.int64) + space.q_offset
                        keys = (key_tiles[r][:, None] * bn + np.arange(bn)).ravel()
                        valid = keys < space.n_k
                        grid = Grid(pos, keys[valid], space.n_q, space.n_k, h or 0, runtime)
                        keep[r][: len(pos), np.flatnonzero(valid)] = body.mask(grid)
                groups.append(TileGroup(torch.as_tensor(tiles), torch.as_tensor(key_tiles),
                                        None if keep is None else torch.as_tensor(keep)))
            slices[(b, h)] = groups
    return Plan(layout, slices)


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (B, H, m, D) as float32 with zero rows up to n."""
    out = torch.zeros((*x.shape[:2], n, x.shape[3]), dtype=torch.float32)
    out[:, :, : x.shape[2]] = x
    return out


def forward(p: Plan, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O and LSE: per tile group, scores of the gathered tiles, a masked softmax, and P @ V.
    Rows with no allowed key get O = 0 and LSE = -inf."""
    B, H, n_q, D = q.shape
    Hkv = k.shape[1]
    layout = p.layout
    _, _, tq, tk = layout.shape
    bm, bn = layout.block_m, layout.block_n
    qp = _pad(q, tq * bm).view(B, H, tq, bm, D)
    kp = _pad(k, tk * bn).view(B, Hkv, tk, bn, D)
    vp = _pad(v, tk * bn).view(B, Hkv, tk, bn, D)
    o = torch.zeros((B, H, tq, bm, D), dtype=torch.float32)
    lse = torch.full((B, H, tq, bm), float("-inf"), dtype=torch.float32)
    group = H // Hkv
    for (b, h), groups in p.slices.items():
        bs = slice(None) if b is None else slice(b, b + 1)
        if h is None:   # every head: view q as (B, Hkv, G, ...) against k (B, Hkv, 1, ...)
            qs, ks, vs, g = qp[bs], kp[bs], vp[bs], group
        else:
            qs, ks, vs, g = qp[bs, h: h + 1], kp[bs, h // group: h // group + 1], vp[bs, h // group: h // group + 1], 1
        nb, nh = qs.shape[0], ks.shape[1]
        for grp in groups:
            visits = grp.key_tiles.shape[1]
            step = max(1, SCORE_BUDGET // (nb * nh * g * bm * visits * bn))
            for s in range(0, len(grp.tiles), step):
                tiles, key_tiles = grp.tiles[s: s + step], grp.key_tiles[s: s + step]
                qg = qs[:, :, tiles].view(nb, nh, g, len(tiles), bm, D)
                kg = ks[:, :, key_tiles].reshape(nb, nh, 1, len(tiles), visits * bn, D)
                vg = vs[:, :, key_tiles].reshape(nb, nh, 1, len(tiles), visits * bn, D)
                scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale)
                if grp.keep is not None:
                    scores.masked_fill_(~grp.keep[s: s + step], float("-inf"))
                m = scores.amax(-1, keepdim=True)
                m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # empty rows: exp(-inf) = 0
                scores.sub_(m).exp_()
                total = scores.sum(-1, keepdim=True)
                out = torch.matmul(scores, vg).div_(torch.where(total == 0, torch.ones_like(total), total))
                hs = slice(None) if h is None else slice(h, h + 1)
                o[bs, hs, tiles] = out.view(nb, nh * g, len(tiles), bm, D)
                lse[bs, hs, tiles] = (m + total.log()).view(nb, nh * g, len(tiles), bm)
    o = o.view(B, H, tq * bm, D)[:, :, :n_q]
    return o.to(q.dtype), lse.view(B, H, tq * bm)[:, :, :n_q].contiguous()
