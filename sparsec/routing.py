"""Content-based parts at call time, on the tensors' device: bucket ids, clusters and top-k
selections in torch; the sorted order of a share and the layout of its bucket ranges; the merge
of shares by log-sum-exp. Nothing here is n x n: ids are O(n D), layouts O(tiles visited)."""
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


def _lsh(node: Lsh, q, k, given) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket ids (B, H, rounds, n): argmax over [x R_r, -x R_r] per round (ties: the smaller id)."""
    if given is None:
        given = _seeded(rotations, value(node.seed), value(node.rounds), q.shape[-1], value(node.buckets))
    rot = given.to(device=q.device, dtype=torch.float64)

    def ids(x):
        out = []
        for r in rot:   # argmax of [xR, -xR] without building it: the first max, or the first min
            xr = x @ r
            high, low = xr.argmax(-1, keepdim=True), xr.argmin(-1, keepdim=True)
            first = xr.gather(-1, high) >= -xr.gather(-1, low)    # a tie goes to the first half
            out.append(torch.where(first, high, low + xr.shape[-1])[..., 0])
        return torch.stack(out, 2).int()
    return ids(q), ids(k)


def _cluster(node: Cluster, q, k, given) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ids (B, H, 1, n): the nearest centroid by cosine; centroids given (H, C, D), or
    `iters` rounds of spherical k-means on each (b, h)'s keys from the seeded start."""
    kn = _unit(k)
    if given is not None:
        mu = given.to(device=q.device, dtype=torch.float64)[None].expand(q.shape[0], -1, -1, -1)
    else:
        start = _seeded(spherical_start, value(node.seed), value(node.k), q.shape[-1]).to(q.device)
        mu = start.expand(q.shape[0], q.shape[1], -1, -1)
        for _ in range(value(node.iters)):
            assign = (kn @ mu.transpose(-1, -2)).argmax(-1)
            sums = torch.zeros_like(mu).scatter_add_(2, assign[..., None].expand_as(kn), kn)
            norm = sums.norm(dim=-1, keepdim=True)
            mu = torch.where(norm > 0, sums / torch.where(norm > 0, norm, 1.0), mu)  # empty: stays
    ids = lambda unit_x: (unit_x @ mu.transpose(-1, -2)).argmax(-1)[:, :, None].int()
    return ids(_unit(q)), ids(kn)


def _topk(node: TopK, q, k, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen (B, H, I, J) bool and its table (B, H, I, t) of key blocks, padded with -1: each
    query block I of the call keeps the `k` key blocks J with the largest mean(q_I) . mean(k_J)
    (ties: the smaller J), among J < I with causal=true."""
    size, top = value(node.block), value(node.k)
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    first = q_offset // size
    row_of = torch.div(torch.arange(n_q, device=q.device) + q_offset, size, rounding_mode="floor") - first
    rows = (q_offset + n_q - 1) // size - first + 1
    q_sum = torch.zeros((B, H, rows, D), dtype=q.dtype, device=q.device).index_add_(2, row_of, q)
    blocks = -(-n_k // size)
    block_of = torch.div(torch.arange(n_k, device=k.device), size, rounding_mode="floor")   # no padding to a
    k_sum = torch.zeros((B, H, blocks, D), dtype=k.dtype, device=k.device).index_add_(2, block_of, k)   # block
    k_count = torch.bincount(block_of, minlength=blocks).to(k.dtype)
    score = (q_sum @ k_sum.transpose(-1, -2)) / k_count   # ranks J as mean . mean does (see TopK.selection)
    cols = torch.arange(blocks, device=q.device)
    candidate = (cols[None, :] < (torch.arange(rows, device=q.device) + first)[:, None]) if value(node.causal) \
        else torch.ones((rows, blocks), dtype=torch.bool, device=q.device)
    score = torch.where(candidate, score, float("-inf"))
    order = torch.sort(-score, dim=-1, stable=True).indices[..., :min(top, blocks)]
    picked = candidate.expand(B, H, -1, -1).gather(-1, order)
    chosen = torch.zeros(score.shape, dtype=torch.bool, device=q.device).scatter_(-1, order, picked)
    return chosen, torch.where(picked, order, -1).int().contiguous()


def content_values(nodes, q, k, call: Call, inputs: dict) -> dict[Pattern, tuple[torch.Tensor, ...]]:
    """Each content node's ids or selection for this call, on q's device, computed in float64
    from q and k (k of each query head's group), leading dims (B, H)."""
    group = call.heads // call.kv_heads
    q64, k64 = q.detach().double(), k.detach().double()
    k64 = k64.repeat_interleave(group, dim=1) if group > 1 else k64
    out: dict[Pattern, tuple[torch.Tensor, ...]] = {}
    for node in nodes:
        if node in out or not isinstance(node, ContentPattern):
            continue
        if isinstance(node, LshRound):
            whole = Lsh(node.buckets, node.rounds, node.seed)
            if whole not in out:
                out[whole] = _lsh(whole, q64, k64, inputs.get("rotations"))
            out[node] = tuple(x[:, :, node.round: node.round + 1].contiguous() for x in out[whole])
        elif isinstance(node, Lsh):
            out[node] = _lsh(node, q64, k64, inputs.get("rotations"))
        elif isinstance(node, Cluster):
            out[node] = _cluster(node, q64, k64, inputs.get("centroids"))
        elif isinstance(node, TopK):
            out[node] = _topk(node, q64, k64, call.q_offset)
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
