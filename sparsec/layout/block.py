"""Block layouts, one type with a host form (numpy CSR lists, `BlockLayout`) and a device form (int32 CSR
tensors on the kernel's device, `DeviceLayout`): per query tile the FULL and PARTIAL key tiles, and the
transposed lists; plus the torch tile arithmetic the device builders share."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..ir.tiles import FULL, PARTIAL
from .schedule import heaviest_first, launch_order


@dataclass(frozen=True)
class TileLists:
    """Compressed rows: row r = (batch, head, tile) lists indices[ptr[r]:ptr[r + 1]], ascending."""
    ptr: np.ndarray       # (rows + 1,) int64
    indices: np.ndarray   # (nnz,) int32
    shape: tuple[int, int, int]  # (batch, heads, tiles) of the rows

    def counts(self) -> np.ndarray:
        return np.diff(self.ptr).reshape(self.shape).astype(np.int32)

    def row(self, b: int, h: int, t: int) -> np.ndarray:
        r = (b * self.shape[1] + h) * self.shape[2] + t
        return self.indices[self.ptr[r]: self.ptr[r + 1]]

    def transposed(self, tiles: int) -> "TileLists":
        """The same tiles listed by index: per (batch, head, index) the rows' tiles, ascending.
        A stable sort by the new row keeps each row's tiles in order (they were listed by row)."""
        b, h, t = self.shape
        owner = np.repeat(np.arange(b * h * t, dtype=np.int64), np.diff(self.ptr))
        row = owner // t * tiles + self.indices
        order = np.argsort(row, kind="stable")
        ptr = np.zeros(b * h * tiles + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=b * h * tiles), out=ptr[1:])
        return TileLists(ptr, (owner % t)[order].astype(np.int32), (b, h, tiles))


@dataclass(frozen=True)
class BlockLayout:
    """Which (query tile, key tile) pairs an attention kernel visits, in FlexAttention's terms:
    FULL tiles need no mask, PARTIAL tiles evaluate it, EMPTY tiles are skipped. Leading dims
    (batch, heads) are 1 where the pattern does not depend on them (broadcast)."""
    n_q: int
    n_k: int
    block_m: int
    block_n: int
    q_offset: int
    full: TileLists       # per query tile, key tiles
    partial: TileLists
    key_tiles: int

    @cached_property
    def full_t(self) -> TileLists:
        """Per key tile, its FULL query tiles (the backward's dK/dV walk), made when first asked for."""
        return self.full.transposed(self.key_tiles)

    @cached_property
    def partial_t(self) -> TileLists:
        return self.partial.transposed(self.key_tiles)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(batch, heads, query tiles, key tiles)."""
        b, h, tq = self.full.shape
        return b, h, tq, self.key_tiles

    def classes(self) -> np.ndarray:
        """The dense (batch, heads, query tiles, key tiles) grid of EMPTY/PARTIAL/FULL (small n)."""
        b, h, tq, tk = self.shape
        out = np.zeros((b * h * tq, tk), np.int8)
        for lists, cls in ((self.partial, PARTIAL), (self.full, FULL)):
            owner = np.repeat(np.arange(b * h * tq), np.diff(lists.ptr))
            out[owner, lists.indices] = cls
        return out.reshape(b, h, tq, tk)

    def longest_row(self) -> int:
        """The most key tiles any query tile visits."""
        return int((np.diff(self.full.ptr) + np.diff(self.partial.ptr)).max(initial=0))

    def tiles_visited(self) -> int:
        return len(self.full.indices) + len(self.partial.indices)

    def tile_density(self) -> float:
        """Visited tiles over all tiles (per batch and head)."""
        b, h, tq, tk = self.shape
        return self.tiles_visited() / max(1, b * h * tq * tk)

    def nbytes(self) -> int:
        """Bytes of the four lists (a transposed list holds the same indices, with its own pointers)."""
        b, h, _, tk = self.shape
        return sum(2 * x.indices.nbytes + x.ptr.nbytes + 8 * (b * h * tk + 1) for x in (self.full, self.partial))

    def to(self, device) -> "DeviceLayout":
        """The device form: the four lists as int32 CSR tensors on `device` (O(tiles) copied)."""
        return DeviceLayout.of(self, torch.device(device))

    def __repr__(self) -> str:
        b, h, tq, tk = self.shape
        return (f"BlockLayout(n_q={self.n_q}, n_k={self.n_k}, tile={self.block_m}x{self.block_n}, "
                f"batch={b}, heads={h}, tiles={tq}x{tk}, full={len(self.full.indices)}, "
                f"partial={len(self.partial.indices)})")


@dataclass(frozen=True)
class DeviceLayout:
    """A BlockLayout's four lists (FULL and PARTIAL, by query tile and by key tile) as int32 CSR
    tensors on the kernel's device. shape: (batch, heads, query tiles, key tiles)."""
    shape: tuple[int, int, int, int]
    block_m: int
    block_n: int
    full: tuple[torch.Tensor, torch.Tensor]        # (ptr, indices) per query tile
    partial: tuple[torch.Tensor, torch.Tensor]
    full_t: tuple[torch.Tensor, torch.Tensor]      # per key tile: the backward's dK/dV walk
    partial_t: tuple[torch.Tensor, torch.Tensor]
    longest_row: int                               # most key tiles any query tile visits
    schedules: dict = field(default_factory=dict, compare=False, repr=False)   # launch orders, by call shape

    def schedule(self, batch: int, heads: int, group: int = 0) -> torch.Tensor:
        """The launch order of this layout's programs for a call with (batch, heads) query heads
        (schedule.py): over query tiles, or with group = G > 0 over key tiles of the batch x heads/G
        K/V heads. Kept with the layout, so a layout cached by shape sorts once."""
        key = (batch, heads, group, launch_order())
        if key not in self.schedules:
            lb, lh, tq, tk = self.shape
            if group:
                self.schedules[key] = heaviest_first(self.full_t[0], self.partial_t[0], (lb, lh, tk), batch, heads, group)
            else:
                self.schedules[key] = heaviest_first(self.full[0], self.partial[0], (lb, lh, tq), batch, heads)
        return self.schedules[key]

    @staticmethod
    def of(layout: BlockLayout, device: torch.device) -> "DeviceLayout":
        def tensor(x):
            if len(x) and int(x.max()) >= 1 << 31:
                raise ValueError("the layout has more than 2^31 tiles; use larger tiles")
            x = torch.as_tensor(np.asarray(x, np.int32), device=device)
            return x if x.numel() else torch.zeros(1, dtype=torch.int32, device=device)
        lists = [(tensor(x.ptr), tensor(x.indices)) for x in
                 (layout.full, layout.partial, layout.full_t, layout.partial_t)]
        return DeviceLayout(layout.shape, layout.block_m, layout.block_n, *lists, layout.longest_row())

    @staticmethod
    def from_tiles(shape, block_m: int, block_n: int, bh, t, kt, cls, longest_row: int) -> "DeviceLayout":
        """From the visited tiles as device tensors: row bh = b * heads + h, query tile t, key
        tile kt, class FULL or PARTIAL (each tile listed once)."""
        B, H, tq, tk = shape
        lists = []
        for want in (FULL, PARTIAL):
            pick = cls == want
            lists.append(_csr(bh[pick] * tq + t[pick], kt[pick], B * H * tq))
            lists.append(_csr(bh[pick] * tk + kt[pick], t[pick], B * H * tk))
        full, full_t, partial, partial_t = lists
        return DeviceLayout(shape, block_m, block_n, full, partial, full_t, partial_t, longest_row)

    def to_host(self, n_q: int, n_k: int, q_offset: int) -> BlockLayout:
        """The same lists as a host BlockLayout (what the CPU path plans from)."""
        B, H, tq, tk = self.shape

        def lists(pair, tiles):
            ptr, indices = (x.cpu().numpy() for x in pair)
            return TileLists(ptr.astype(np.int64), indices[: ptr[-1]], (B, H, tiles))
        return BlockLayout(n_q, n_k, self.block_m, self.block_n, q_offset, lists(self.full, tq),
                           lists(self.partial, tq), tk)


def tile_extremes(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of every tile of `size` entries along the last dim, (..., tiles); the last
    tile repeats its edge entry."""
    n = x.shape[-1]
    tiles = -(-n // size)
    if tiles * size > n:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], tiles * size - n)], -1)
    x = x.view(*x.shape[:-1], tiles, size)
    return x.amin(-1), x.amax(-1)


def _csr(rows: torch.Tensor, indices: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ptr, indices) int32 on the rows' device, indices ascending within each row."""
    order = torch.argsort(rows * (1 << 31) + indices)
    ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=ptr[1:])
    indices = indices[order].int()
    return ptr.int(), indices if len(indices) else torch.zeros(1, dtype=torch.int32, device=rows.device)


def expand_ranges(first: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges [first[r], first[r] + count[r]) listed one entry each: (owner row r, value), on the
    tensors' device, ascending within each row. Every device builder enumerates tiles this way."""
    owner = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)
    start = torch.cumsum(count, 0) - count
    return owner, torch.arange(len(owner), device=count.device) - start[owner] + first[owner]
