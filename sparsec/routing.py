"""Content-based parts at call time, on the tensors' device: bucket ids, clusters and top-k
selections in torch; the sorted order of a share and the layout of its bucket ranges; the merge
of shares by log-sum-exp. Nothing here is n x n: ids are O(n D) (computed a block of rows at a
time), layouts O(tiles visited); top-k scores are (query blocks x key blocks), ranked in slices."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .ir.content import Cluster, ContentPattern, Lsh, LshRound, TopK, rotations, spherical_start
from .ir.pattern import Pattern, value
from .ir.tiles import FULL, PARTIAL
from .runtime import Call, DeviceLayout, tile_extremes


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)


@functools.lru_cache(maxsize=64)
def _seeded(draw, *args) -> torch.Tensor:
    """A seeded draw of the reference (numpy, on the host: the same numbers on every device), kept."""
    return torch.from_numpy(draw(*args))


ROWS_AT_ONCE = 1 << 14       # rows of q or k made float64 and scored at once
SCORES_AT_ONCE = 1 << 22     # top-k scores (query blocks x key blocks) ranked at once


def _float64_rows(x: torch.Tensor, group: int = 1):
    """(start, end, rows): x's rows a block at a time, in float64, each K/V head repeated for the
    `group` query heads it serves; memory is one block's, whatever n."""
    for s in range(0, x.shape[2], ROWS_AT_ONCE):
        part = x[:, :, s:s + ROWS_AT_ONCE].double()
        yield s, s + part.shape[2], part.repeat_interleave(group, dim=1) if group > 1 else part


def _lsh(node: Lsh, q, k, group: int, given) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket ids (B, H, rounds, n): argmax over [x R_r, -x R_r] per round (ties: the smaller id)."""
    if given is None:
        given = _seeded(rotations, value(node.seed), value(node.rounds), q.shape[-1], value(node.buckets))
    rot = given.to(device=q.device, dtype=torch.float64)

    def ids(x, g):
        out = torch.empty((x.shape[0], x.shape[1] * g, len(rot), x.shape[2]), dtype=torch.int32, device=x.device)
        for s, e, rows in _float64_rows(x, g):
            for r, turn in enumerate(rot):   # argmax of [xR, -xR] without building it: the first max, or min
                xr = rows @ turn
                high, low = xr.argmax(-1, keepdim=True), xr.argmin(-1, keepdim=True)
                first = xr.gather(-1, high) >= -xr.gather(-1, low)    # a tie goes to the first half
                out[:, :, r, s:e] = torch.where(first, high, low + xr.shape[-1])[..., 0]
        return out
    return ids(q, 1), ids(k, group)


def _cluster(node: Cluster, q, k, group: int, given) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ids (B, H, 1, n): the nearest centroid by cosine; centroids given (H, C, D), or
    `iters` rounds of spherical k-means on each (b, h)'s keys from the seeded start (the keys
    scored a block at a time: memory O(block x clusters))."""
    B, H = q.shape[:2]
    if given is not None:
        mu = given.to(device=q.device, dtype=torch.float64)[None].expand(B, -1, -1, -1)
    else:
        start = _seeded(spherical_start, value(node.seed), value(node.k), q.shape[-1]).to(q.device)
        mu = start.expand(B, H, -1, -1)
        for _ in range(value(node.iters)):
            sums = torch.zeros_like(mu)
            for _, _, rows in _float64_rows(k, group):
                kn = _unit(rows)
                assign = (kn @ mu.transpose(-1, -2)).argmax(-1)
                sums.scatter_add_(2, assign[..., None].expand_as(kn), kn)
            norm = sums.norm(dim=-1, keepdim=True)
            mu = torch.where(norm > 0, sums / torch.where(norm > 0, norm, 1.0), mu)  # empty: stays

    def ids(x, g):
        out = torch.empty((B, H, 1, x.shape[2]), dtype=torch.int32, device=x.device)
        for s, e, rows in _float64_rows(x, g):
            out[:, :, 0, s:e] = (_unit(rows) @ mu.transpose(-1, -2)).argmax(-1)
        return out
    return ids(q, 1), ids(k, group)


def _topk(node: TopK, q, k, group: int, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen (B, H, I, J) bool and its table (B, H, I, t) of key blocks, padded with -1: each
    query block I of the call keeps the `k` key blocks J with the largest mean(q_I) . mean(k_J)
    (ties: the smaller J), among J < I with causal=true. Ranked SCORES_AT_ONCE scores at a time."""
    size, top = value(node.block), value(node.k)
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    first = q_offset // size
    row_of = torch.div(torch.arange(n_q, device=q.device) + q_offset, size, rounding_mode="floor") - first
    rows = (q_offset + n_q - 1) // size - first + 1
    q_sum = torch.zeros((B, H, rows, D), dtype=torch.float64, device=q.device)
    for s, e, part in _float64_rows(q):
        q_sum.index_add_(2, row_of[s:e], part)
    blocks = -(-n_k // size)
    block_of = torch.div(torch.arange(n_k, device=k.device), size, rounding_mode="floor")   # no padding to a
    k_sum = torch.zeros((B, H, blocks, D), dtype=torch.float64, device=k.device)           # whole block
    for s, e, part in _float64_rows(k, group):
        k_sum.index_add_(2, block_of[s:e], part)
    k_count = torch.bincount(block_of, minlength=blocks).double()
    width = min(top, blocks)
    chosen = torch.zeros((B, H, rows, blocks), dtype=torch.bool, device=q.device)
    table = torch.empty((B, H, rows, width), dtype=torch.int32, device=q.device)
    cols = torch.arange(blocks, device=q.device)
    step = max(1, SCORES_AT_ONCE // max(1, B * H * blocks))
    for r in range(0, rows, step):
        at = torch.arange(r, min(rows, r + step), device=q.device)
        score = (q_sum[:, :, at] @ k_sum.transpose(-1, -2)) / k_count   # ranks J as mean . mean does
        candidate = (cols[None, :] < (at + first)[:, None]) if value(node.causal) \
            else torch.ones((len(at), blocks), dtype=torch.bool, device=q.device)
        score = torch.where(candidate, score, float("-inf"))
        order = torch.sort(-score, dim=-1, stable=True).indices[..., :width]
        picked = candidate.expand(B, H, -1, -1).gather(-1, order)
        chosen[:, :, at] = torch.zeros(score.shape, dtype=torch.bool, device=q.device).scatter_(-1, order, picked)
        table[:, :, at] = torch.where(picked, order, -1).int()
    return chosen, table


def content_values(nodes, q, k, call: Call, inputs: dict) -> dict[Pattern, tuple[torch.Tensor, ...]]:
    """Each content node's ids or selection for this call, on q's device, computed in float64
    from q and k (k of each query head's group), leading dims (B, H), a block of rows at a time."""
    group = call.heads // call.kv_heads
    q, k = q.detach(), k.detach()
    out: dict[Pattern, tuple[torch.Tensor, ...]] = {}
    for node in nodes:
        if node in out or not isinstance(node, ContentPattern):
            continue
        if isinstance(node, LshRound):
            whole = Lsh(node.buckets, node.rounds, node.seed)
            if whole not in out:
                out[whole] = _lsh(whole, q, k, group, inputs.get("rotations"))
            out[node] = tuple(x[:, :, node.round: node.round + 1].contiguous() for x in out[whole])
        elif isinstance(node, Lsh):
            out[node] = _lsh(node, q, k, group, inputs.get("rotations"))
        elif isinstance(node, Cluster):
            out[node] = _cluster(node, q, k, group, inputs.get("centroids"))
        elif isinstance(node, TopK):
            out[node] = _topk(node, q, k, group, call.q_offset)
    return out


@dataclass(frozen=True)
class SortedOrder:
    """q's and k's rows of every (b, h) sorted by one bucketing (stable: by position within a
    bucket). q_pos, k_pos (B, H, n) int32 are the original row of each sorted row."""
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_ids: torch.Tensor     # (B, H, n_q) sorted bucket ids
    k_ids: torch.Tensor

    @staticmethod
    def of(ids: tuple[torch.Tensor, torch.Tensor]) -> "SortedOrder":
        (q_ids, q_pos), (k_ids, k_pos) = (torch.sort(x[:, :, 0], dim=-1, stable=True) for x in ids)
        return SortedOrder(q_pos.int().contiguous(), k_pos.int().contiguous(), q_ids, k_ids)

    def gather(self, q, k, v, call: Call):
        """q, k, v in this order; k and v get one copy per query head (each head sorts its own).
        Differentiable: torch sends the gradients back to the original rows and K/V heads."""
        group = call.heads // call.kv_heads
        k, v = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (k, v))
        q_rows, k_rows = _flat(self.q_pos), _flat(self.k_pos)
        return tuple(x.reshape(-1, x.shape[-1]).index_select(0, rows).view(x.shape)
                for x, rows in ((q, q_rows), (k, k_rows), (v, k_rows)))

    def scatter(self, o, lse):
        """O and LSE back in the original row order."""
        rows = _flat(self.q_pos)
        o = torch.zeros_like(o).view(-1, o.shape[-1]).index_copy(0, rows, o.reshape(-1, o.shape[-1]))
        return o.view(self.q_pos.shape + o.shape[-1:]), torch.zeros_like(lse).view(-1).index_copy(
            0, rows, lse.reshape(-1)).view(lse.shape)

    def layout(self, block_m: int, block_n: int, full: bool, offsets=None, q_offset: int = 0,
               heads: list[bool] | None = None) -> DeviceLayout:
        """A query tile visits the key tiles whose bucket range meets its own; with `full`, a tile
        whose q and k rows all hold one and the same bucket is FULL, every other one PARTIAL.
        offsets: [lo, hi] that p - j must lie in (shares.offset_bounds), or None; a tile whose
        positions (p = row + q_offset, j) cannot meet it is skipped. heads: the heads the share
        can allow pairs in (shares.active_heads), or None for all; the others get no tiles."""
        B, H, n_q = self.q_ids.shape
        n_k = self.k_ids.shape[2]
        tq, tk = -(-n_q // block_m), -(-n_k // block_n)
        q_lo, q_hi = _ends(self.q_ids, block_m)
        k_lo, k_hi = _ends(self.k_ids, block_n)
        rows = self.k_ids.reshape(B * H, n_k).contiguous()
        first = torch.searchsorted(rows, q_lo.reshape(B * H, tq).contiguous(), side="left")
        last = torch.searchsorted(rows, q_hi.reshape(B * H, tq).contiguous(), side="right")
        count = torch.where(last > first, (last - 1) // block_n - first // block_n + 1, 0).reshape(-1)
        owner = torch.repeat_interleave(torch.arange(B * H * tq, device=rows.device), count)
        start = torch.cumsum(count, 0) - count
        kt = torch.arange(len(owner), device=rows.device) - start[owner] + (first // block_n).reshape(-1)[owner]
        bh, t = owner // tq, owner % tq
        cls = torch.full_like(kt, PARTIAL, dtype=torch.int8)
        if full:
            lo, hi = q_lo.reshape(-1)[owner], q_hi.reshape(-1)[owner]
            klo, khi = k_lo.reshape(B * H, tk)[bh, kt], k_hi.reshape(B * H, tk)[bh, kt]
            cls = torch.where((lo == hi) & (klo == khi) & (klo == lo), FULL, PARTIAL).to(torch.int8)
        if offsets is not None:   # the tile's offsets p - j span [min p - max j, max p - min j]
            p_min, p_max = (x.reshape(B * H, tq).long() + q_offset
                            for x in tile_extremes(self.q_pos, block_m))
            j_min, j_max = (x.reshape(B * H, tk).long() for x in tile_extremes(self.k_pos, block_n))
            meet = (p_max[bh, t] - j_min[bh, kt] >= offsets[0]) & (p_min[bh, t] - j_max[bh, kt] <= offsets[1])
            bh, t, kt, cls = bh[meet], t[meet], kt[meet], cls[meet]
        if heads is not None and not all(heads):
            keep = torch.as_tensor(heads, device=bh.device)[bh % H]
            bh, t, kt, cls = bh[keep], t[keep], kt[keep], cls[keep]
        return DeviceLayout.from_tiles((B, H, tq, tk), block_m, block_n, bh, t, kt, cls, tk)


def _flat(pos: torch.Tensor) -> torch.Tensor:
    """Rows (B, H, n) of each (b, h) as rows of the (B * H * n)-row flattening: one index_select
    moves whole rows (a gather with an expanded index would read one index per element)."""
    B, H, n = pos.shape
    base = torch.arange(B * H, device=pos.device, dtype=torch.long).view(B, H, 1) * n
    return (pos.long() + base).reshape(-1)


def _ends(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last id of every tile of `size` sorted rows: its bucket range (B, H, tiles)."""
    n = ids.shape[-1]
    starts = torch.arange(0, n, size, device=ids.device)
    return ids[..., starts], ids[..., torch.clamp(starts + size, max=n) - 1]


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a union of disjoint shares from each share's (O, LSE):
    LSE = log sum_s exp(LSE_s), O = sum_s exp(LSE_s - LSE) O_s. Differentiable; rows no share
    reaches keep O = 0 and LSE = -inf, with zero gradients rather than NaN."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])
    none = torch.isneginf(lses).all(0)
    lse = torch.where(none, float("-inf"), torch.logsumexp(torch.where(none, 0.0, lses), 0))
    weights = torch.exp(lses - torch.where(none, 0.0, lse))
    o = sum(w[..., None] * o_s.float() for w, (o_s, _) in zip(weights, parts))
    return o.to(dtype), lse
