"""Block layouts: per query tile the FULL and PARTIAL key tiles in CSR form, and the transposed lists."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ir.pattern import Pattern
from .ir.tiles import EMPTY, FULL, PARTIAL, Runtime, TileSet, Tiling


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

    @staticmethod
    def from_pairs(rows: list[tuple[np.ndarray, np.ndarray]], shape) -> "TileLists":
        """rows: per (batch, head), the (tile, index) pairs sorted by tile then index."""
        counts = [np.bincount(t, minlength=shape[2]) for t, _ in rows]
        ptr = np.zeros(shape[0] * shape[1] * shape[2] + 1, np.int64)
        np.cumsum(np.concatenate(counts) if counts else [], out=ptr[1:])
        indices = np.concatenate([i for _, i in rows]).astype(np.int32) if rows else np.zeros(0, np.int32)
        return TileLists(ptr, indices, shape)


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
    full_t: TileLists     # per key tile, query tiles (the backward's dK/dV walk)
    partial_t: TileLists

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(batch, heads, query tiles, key tiles)."""
        b, h, tq = self.full.shape
        return b, h, tq, self.full_t.shape[2]

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
        return sum(x.ptr.nbytes + x.indices.nbytes for x in (self.full, self.partial, self.full_t, self.partial_t))

    def __repr__(self) -> str:
        b, h, tq, tk = self.shape
        return (f"BlockLayout(n_q={self.n_q}, n_k={self.n_k}, tile={self.block_m}x{self.block_n}, "
                f"batch={b}, heads={h}, tiles={tq}x{tk}, full={len(self.full.indices)}, "
                f"partial={len(self.partial.indices)})")


def build_layout(body: Pattern, n_q: int, n_k: int, block_m: int, block_n: int, q_offset: int,
                 heads: int = 1, segment_ids: np.ndarray | None = None, space=None) -> BlockLayout:
    """Analytic layout of a specialized pattern body, one TileSet per (batch, head) that differs.
    space: a TableSpace whose runtime inputs (content selections, segment ids) vary per batch row."""
    n_heads = heads if body.varies_with_head() else 1
    batches = [None] if segment_ids is None else list(segment_ids)
    if space is not None:
        batches = [[space.per_head(b, h) for h in range(n_heads)] for b in range(space.batch)]
    sets: list[TileSet] = []
    for seg in batches:
        for h in range(n_heads):
            runtime = seg[h] if space is not None else Runtime(segment_ids=seg)
            t = Tiling.regular(n_q, n_k, block_m, block_n, q_offset, head=h, runtime=runtime)
            sets.append(body.tiles(t))
    tq, tk = -(-n_q // block_m), -(-n_k // block_n)
    rows_shape, cols_shape = (len(batches), n_heads, tq), (len(batches), n_heads, tk)

    def lists(cls: int, transposed: bool) -> TileLists:
        pairs = []
        for s in sets:
            pick = s.cls == cls
            q, k = s.qt[pick], s.kt[pick]
            if transposed:
                order = np.lexsort((q, k))
                q, k = k[order], q[order]
            pairs.append((q, k))
        return TileLists.from_pairs(pairs, cols_shape if transposed else rows_shape)

    return BlockLayout(n_q, n_k, block_m, block_n, q_offset,
                       lists(FULL, False), lists(PARTIAL, False), lists(FULL, True), lists(PARTIAL, True))


def tile_classes(mask: np.ndarray, block_m: int, block_n: int) -> np.ndarray:
    """The true class of every tile of a dense (..., n_q, n_k) mask: what a layout must cover."""
    *lead, n_q, n_k = mask.shape
    tq, tk = -(-n_q // block_m), -(-n_k // block_n)
    pad = np.zeros((*lead, tq * block_m, tk * block_n), np.int8)
    pad[..., :n_q, :n_k] = mask
    inside = np.zeros_like(pad)
    inside[..., :n_q, :n_k] = 1
    tiles = pad.reshape(*lead, tq, block_m, tk, block_n).sum(axis=(-3, -1))
    area = inside.reshape(*lead, tq, block_m, tk, block_n).sum(axis=(-3, -1))
    return np.where(tiles == area, FULL, np.where(tiles > 0, PARTIAL, EMPTY)).astype(np.int8)
