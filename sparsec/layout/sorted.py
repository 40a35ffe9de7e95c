"""Layouts of a share run in a content-sorted order: q and k sorted by bucket, tiles of meeting bucket ranges."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.tiles import FULL, PARTIAL
from .block import DeviceLayout, expand_ranges, tile_extremes


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

    def layout(self, block_m: int, block_n: int, full: bool, offsets=None, q_offset: int = 0,
               heads: list[bool] | None = None) -> DeviceLayout:
        """A query tile visits the key tiles whose bucket range meets its own; with `full`, a tile
        whose q and k rows all hold one and the same bucket is FULL, every other one PARTIAL.
        offsets: [lo, hi] that p - j must lie in (passes.shares.offset_bounds), or None; a tile whose
        positions (p = row + q_offset, j) cannot meet it is skipped. heads: the heads the share
        can allow pairs in (passes.shares.active_heads), or None for all; the others get no tiles."""
        B, H, n_q = self.q_ids.shape
        n_k = self.k_ids.shape[2]
        tq, tk = -(-n_q // block_m), -(-n_k // block_n)
        q_lo, q_hi = _ends(self.q_ids, block_m)
        k_lo, k_hi = _ends(self.k_ids, block_n)
        rows = self.k_ids.reshape(B * H, n_k).contiguous()
        first = torch.searchsorted(rows, q_lo.reshape(B * H, tq).contiguous(), side="left")
        last = torch.searchsorted(rows, q_hi.reshape(B * H, tq).contiguous(), side="right")
        count = torch.where(last > first, (last - 1) // block_n - first // block_n + 1, 0)
        owner, kt = expand_ranges((first // block_n).reshape(-1), count.reshape(-1))
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


def _ends(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last id of every tile of `size` sorted rows: its bucket range (B, H, tiles)."""
    n = ids.shape[-1]
    starts = torch.arange(0, n, size, device=ids.device)
    return ids[..., starts], ids[..., torch.clamp(starts + size, max=n) - 1]
