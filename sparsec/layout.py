"""Block layouts: per query tile the FULL and PARTIAL key tiles in CSR form, and the transposed lists."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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

    def __repr__(self) -> str:
        b, h, tq, tk = self.shape
        return (f"BlockLayout(n_q={self.n_q}, n_k={self.n_k}, tile={self.block_m}x{self.block_n}, "
                f"batch={b}, heads={h}, tiles={tq}x{tk}, full={len(self.full.indices)}, "
                f"partial={len(self.partial.indices)})")


CHUNK_CANDIDATES = 1 << 20   # query tiles are built in bands of about this many candidate tiles


def build_layout(body: Pattern, n_q: int, n_k: int, block_m: int, block_n: int, q_offset: int,
                 heads: int = 1, segment_ids: np.ndarray | None = None, space=None) -> BlockLayout:
    """Analytic layout of a specialized pattern body, one TileSet per (batch, head) that differs.
    space: a TableSpace whose runtime inputs (content selections, segment ids) vary per batch row.
    Query tiles are classified a band at a time (every rule reads only its tiling's arrays), and
    each band kept as int32 lists: memory is the layout's plus one band's, however dense it is."""
    n_heads = heads if body.varies_with_head() else 1
    batches = [None] if segment_ids is None else list(segment_ids)
    if space is not None:
        batches = [[space.per_head(b, h) for h in range(n_heads)] for b in range(space.batch)]
    tq, tk = -(-n_q // block_m), -(-n_k // block_n)
    counts: dict[int, list] = {FULL: [], PARTIAL: []}    # per band, tiles per query tile
    indices: dict[int, list] = {FULL: [], PARTIAL: []}   # per band, their key tiles in row order
    for seg in batches:
        for h in range(n_heads):
            runtime = seg[h] if space is not None else Runtime(segment_ids=seg)
            t = Tiling.regular(n_q, n_k, block_m, block_n, q_offset, head=h, runtime=runtime)
            bands = -(-min(body.estimate(t), tq * tk) // CHUNK_CANDIDATES)   # one, unless it is dense
            band = max(1, -(-tq // max(1, bands)))
            for first in range(0, tq, band):
                tiles = body.tiles(t.rows(first, first + band))
                for cls in (FULL, PARTIAL):
                    pick = tiles.cls == cls
                    counts[cls].append(np.bincount(tiles.qt[pick], minlength=min(band, tq - first)))
                    indices[cls].append(tiles.kt[pick].astype(np.int32))

    def lists(cls: int) -> TileLists:
        ptr = np.zeros(len(batches) * n_heads * tq + 1, np.int64)
        np.cumsum(np.concatenate(counts[cls]), out=ptr[1:])
        return TileLists(ptr, np.concatenate(indices[cls]), (len(batches), n_heads, tq))

    return BlockLayout(n_q, n_k, block_m, block_n, q_offset, lists(FULL), lists(PARTIAL), tk)


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
