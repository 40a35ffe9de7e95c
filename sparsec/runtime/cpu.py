"""The fast CPU path: the same block layout, executed as batched matmuls over gathered key tiles."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ir.pattern import Pattern
from ..ir.tiles import Grid, TableSpace
from ..layout import BlockLayout

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
    """Tile groups per batch row (key None: the same for every batch row). positions: for a share
    in a sorted order, (q rows, k rows) int tensors (B, H, n), the original row of each sorted
    one (a score expression reads positions); None in the positional order."""
    layout: BlockLayout
    groups: dict[int | None, list[TileGroup]]
    positions: tuple[torch.Tensor, torch.Tensor] | None = None


def row_mask(body: Pattern, layout: BlockLayout, space: TableSpace, head: int, inputs, t: int,
              key_tiles: np.ndarray, order) -> np.ndarray:
    """The reference mask over query tile t x the visited key tiles (padding rows/keys False).
    order: (q rows, k rows) of a sorted share, the original row of each sorted one. The layout's
    lengths bound the rows; the space's are the pattern's (more, for a compact buffer's rows)."""
    bm, bn = layout.block_m, layout.block_n
    rows = np.arange(t * bm, min((t + 1) * bm, layout.n_q), dtype=np.int64)
    keys = (key_tiles[:, None] * bn + np.arange(bn)).ravel()
    valid = np.flatnonzero(keys < layout.n_k)
    keep = np.zeros((bm, len(keys)), bool)
    if order is None:
        keep[: len(rows), valid] = body.mask(Grid(rows + space.q_offset, keys[valid], space.n_q, space.n_k, head,
                                                  inputs))
        return keep
    # the reference evaluated on the original positions of the sorted rows
    grid = Grid(order[0][rows] + space.q_offset, order[1][keys[valid]], space.n_q, space.n_k, head, inputs)
    keep[: len(rows), valid] = body.mask(grid)
    return keep


def plan(body: Pattern, layout: BlockLayout, space: TableSpace, kv_heads: int, per_batch: bool,
         order=None) -> Plan:
    """Group the query tiles of every head by visit count; evaluate the pattern's reference mask
    on the visited pairs of PARTIAL rows only (FULL tiles are all True), never n x n. order:
    for a share in a sorted order, (q rows, k rows) numpy (B, H, n), the original row of each."""
    lb, lh, tq, tk = layout.shape
    H, group = space.heads, space.heads // kv_heads
    groups: dict[int | None, list[TileGroup]] = {}
    for b in (range(space.batch) if per_batch else [None]):
        by_count: dict[int, list] = {}       # visits -> [(row, key tiles, layout row key)]
        masks: dict[tuple[int, int], np.ndarray | None] = {}
        for h in range(H):
            lay_h = h if lh > 1 else 0
            inputs = space.per_head(b or 0, h)
            rows_of = None if order is None else (order[0][b or 0, h], order[1][b or 0, h])
            for t in range(tq):
                full = layout.full.row(b if lb > 1 else 0, lay_h, t)
                part = layout.partial.row(b if lb > 1 else 0, lay_h, t)
                visits = np.union1d(full, part)
                if not len(visits):
                    continue
                if (lay_h, t) not in masks:
                    past_n_k = (visits[-1] + 1) * layout.block_n > layout.n_k
                    masks[(lay_h, t)] = row_mask(body, layout, space, h, inputs, t, visits, rows_of) \
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
    return Plan(layout, groups, None if order is None else tuple(torch.as_tensor(x).long() for x in order))


def _tiles(x: torch.Tensor, tiles: int, size: int) -> torch.Tensor:
    """x (B, H, m, D) as float32 (B, H * tiles, size, D), zero-padded to tiles * size rows."""
    B, H, m, D = x.shape
    if m == tiles * size and x.dtype == torch.float32:
        return x.reshape(B, H * tiles, size, D)
    out = torch.zeros((B, H, tiles * size, D), dtype=torch.float32)
    out[:, :, :m] = x
    return out.view(B, H * tiles, size, D)


def _steps(p: Plan, batch: int):
    """(batch slice, its size, query tile rows, their key tiles, their keep masks or None), in
    steps whose score matrix fits SCORE_BUDGET. keep is a fresh copy: callers may write to it."""
    bm, bn = p.layout.block_m, p.layout.block_n
    for b, groups in p.groups.items():
        bs = slice(None) if b is None else slice(b, b + 1)
        nb = batch if b is None else 1
        for grp in groups:
            visits = grp.key_tiles.shape[1]
            step = max(1, SCORE_BUDGET // (nb * bm * visits * bn))
            for s in range(0, len(grp.rows), step):
                keep = None if grp.keep is None else grp.keep[grp.keep_of[s: s + step]]
                yield bs, nb, grp.rows[s: s + step], grp.key_tiles[s: s + step], keep


def _coordinates(p: Plan, bs: slice, batch: int, rows, key_tiles, q_offset: int):
    """(i, j, h, b) of a step's score entries (nb, r, BLOCK_M, visits * BLOCK_N), broadcastable:
    query positions, key positions, query heads, batch rows (a score expression reads them)."""
    _, _, tq, tk = p.layout.shape
    bm, bn = p.layout.block_m, p.layout.block_n
    r = len(rows)
    i = (rows % tq)[:, None] * bm + torch.arange(bm)             # (r, BLOCK_M) rows of the share's order
    j = (key_tiles % tk)[:, :, None] * bn + torch.arange(bn)     # (r, visits, BLOCK_N)
    h = rows // tq
    b = torch.arange(batch) if bs.start is None else torch.tensor([bs.start])
    if p.positions is not None:   # a sorted share: each sorted row's original row (padding rows clamped)
        q_pos, k_pos = p.positions
        i = q_pos[b[:, None, None], h[None, :, None], i.clamp(max=q_pos.shape[2] - 1)]
        j = k_pos[b[:, None, None, None], (key_tiles // tk)[None, :, :, None], j.clamp(max=k_pos.shape[2] - 1)]
    return ((i + q_offset).view(-1, r, bm, 1), j.reshape(-1, r, 1, key_tiles.shape[1] * bn), h.view(1, r, 1, 1),
            b.view(-1, 1, 1, 1))


UNDERFLOW = -87.0   # exp(x) below fp32's smallest normal number (2^-126 = e^-87.3) for x < this


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """exp in place, with exponents below UNDERFLOW sent to -inf (exactly 0). Their results would
    be subnormal or underflow, which x86 computes 30-70x slower (ALiBi's distant pairs, peaked
    softmax rows); they are under 2^-126 of the row's largest term, below fp32's resolution of
    the row's sum, so O and LSE do not change beyond rounding."""
    return x.masked_fill_(x < UNDERFLOW, float("-inf")).exp_()


def forward(p: Plan, q, k, v, scale: float, score=None, q_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """O and LSE: per tile group, scores of the gathered key tiles, a masked softmax, and P @ V.
    Rows with no allowed key get O = 0 and LSE = -inf. score: a TorchScore (runtime/scores.py)
    that replaces each pair's score before the mask applies."""
    B, H, n_q, D = q.shape
    _, _, tq, tk = p.layout.shape
    bm, bn = p.layout.block_m, p.layout.block_n
    qt = _tiles(q.float() * scale, tq, bm)  # scale folded into q (.float() copies only fp16/bf16)
    kt, vt = _tiles(k, tk, bn), _tiles(v, tk, bn)
    o = torch.zeros((B, H * tq, bm, D), dtype=torch.float32)
    lse = torch.full((B, H * tq, bm), float("-inf"), dtype=torch.float32)
    for bs, nb, rows, key_tiles, keep in _steps(p, B):
        r, visits = key_tiles.shape
        kg = kt[bs, key_tiles].view(nb, r, visits * bn, D)
        scores = torch.matmul(qt[bs, rows], kg.transpose(-1, -2))
        if score is not None:
            scores = score.apply(scores, *_coordinates(p, bs, B, rows, key_tiles, q_offset))
        if keep is not None:
            scores.masked_fill_(keep.logical_not_(), float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m.masked_fill_(torch.isneginf(m), 0.0)   # rows with nothing allowed: exp(-inf) = 0
        _exp_(scores.sub_(m))
        total = scores.sum(-1, keepdim=True)
        out = torch.matmul(scores, vt[bs, key_tiles].view(nb, r, visits * bn, D))
        o[bs, rows] = out.div_(total.clamp_min(torch.finfo(torch.float32).tiny))
        lse[bs, rows] = m.add_(total.log()).squeeze(-1)
    o = o.view(B, H, tq * bm, D)[:, :, :n_q]
    return o.to(q.dtype).contiguous(), lse.view(B, H, tq * bm)[:, :, :n_q].contiguous()


def backward(p: Plan, q, k, v, o, lse, do, dlse, scale: float, score=None, q_offset: int = 0):
    """dQ, dK, dV by the FlashAttention-2 equations per tile group: P recomputed from the saved
    LSE, dS = P * (dO V^T - delta) with delta = rowsum(dO * O) - dLSE; dK and dV of the gathered
    key tiles are summed back into place with index_add_ (deterministic on the CPU). With a
    score expression, dS is carried back through it per pair (and into its float inputs)."""
    B, H, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    _, _, tq, tk = p.layout.shape
    bm, bn = p.layout.block_m, p.layout.block_n
    qt = _tiles(q.float() * scale, tq, bm)
    kt, vt, dot = _tiles(k, tk, bn), _tiles(v, tk, bn), _tiles(do, tq, bm)
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    # rows with no allowed key (LSE = -inf) and padding rows: +inf makes their P exactly 0
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    pad = tq * bm - n_q
    lse_t = torch.nn.functional.pad(lse, (0, pad), value=float("inf")).view(B, H * tq, bm, 1)
    delta_t = torch.nn.functional.pad(delta, (0, pad)).view(B, H * tq, bm, 1)
    dq = torch.zeros((B, H * tq, bm, D), dtype=torch.float32)
    dk = torch.zeros((B, Hkv * tk, bn, D), dtype=torch.float32)
    dv = torch.zeros((B, Hkv * tk, bn, D), dtype=torch.float32)
    for bs, nb, rows, key_tiles, keep in _steps(p, B):
        r, visits = key_tiles.shape
        kg = kt[bs, key_tiles].view(nb, r, visits * bn, D)
        vg = vt[bs, key_tiles].view(nb, r, visits * bn, D)
        raw = torch.matmul(qt[bs, rows], kg.transpose(-1, -2))
        coords = None if score is None else _coordinates(p, bs, B, rows, key_tiles, q_offset)
        scores = raw if score is None else score.apply(raw, *coords)
        if keep is not None:
            scores.masked_fill_(keep.logical_not_(), float("-inf"))
        prob = _exp_(scores.sub_(lse_t[bs, rows]))
        d_o = dot[bs, rows]
        ds = torch.matmul(d_o, vg.transpose(-1, -2)).sub_(delta_t[bs, rows]).mul_(prob)
        if score is not None:
            ds = score.backward(raw, *coords, ds)
        dq[bs, rows] = torch.matmul(ds, kg).mul_(scale)
        flat = key_tiles.reshape(-1)
        dk[bs].index_add_(1, flat, torch.matmul(ds.transpose(-1, -2), qt[bs, rows]).view(nb, r * visits, bn, D))
        dv[bs].index_add_(1, flat, torch.matmul(prob.transpose(-1, -2), d_o).view(nb, r * visits, bn, D))
    dq = dq.view(B, H, tq * bm, D)[:, :, :n_q]
    dk = dk.view(B, Hkv, tk * bn, D)[:, :, :n_k]
    dv = dv.view(B, Hkv, tk * bn, D)[:, :, :n_k]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@dataclass(frozen=True)
class CpuAttention:
    """A plan bound to one call's scale (and score expression): the CPU path's forward and backward."""
    plan: Plan
    scale: float
    score: object = None      # a TorchScore, or None
    q_offset: int = 0

    def forward(self, q, k, v):
        return forward(self.plan, q, k, v, self.scale, self.score, self.q_offset)

    def backward(self, q, k, v, o, lse, do, dlse):
        return backward(self.plan, q, k, v, o, lse, do, dlse, self.scale, self.score, self.q_offset)
