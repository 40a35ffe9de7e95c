"""Rows placed at positions of a longer sequence (context parallelism's compact buffers): a layout re-indexed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .block import BlockLayout, TileLists


@dataclass(frozen=True)
class Placement:
    """Query rows and key rows that are whole tiles of a longer sequence, each row at its
    position there (q_pos, k_pos: (B, H, rows) int32, the orders the kernels read). tiles(block_m,
    block_n) gives the layout over these rows: the sequence's layout with its tiles re-indexed
    (`reindex`)."""
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    tiles: Callable[[int, int], BlockLayout]


def _tile_map(rows: np.ndarray, size: int, n: int) -> np.ndarray:
    """For each tile of the sequence of n positions, the tile of `rows` that holds it, or -1.
    rows must be whole tiles of `size`, the sequence's last (shorter) tile last of all, as the
    kernels bound only the last tile's rows."""
    starts = rows[::size]
    whole = (starts[:, None] + np.arange(size)).ravel()[:len(rows)]
    ends_short = len(rows) % size == 0 or rows[-1] == n - 1
    if np.any(starts % size) or not np.array_equal(whole, rows) or not ends_short or np.any(rows[:-1] >= n - 1):
        raise ValueError(f"placed rows must be whole tiles of {size} positions, the sequence's last tile last")
    out = np.full(-(-n // size), -1, np.int64)
    out[starts // size] = np.arange(len(starts))
    return out


def reindex(lay: BlockLayout, q_rows: np.ndarray, k_rows: np.ndarray,
            keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> BlockLayout:
    """The tiles of `lay` (a whole sequence's layout) between the query rows q_rows and the key
    rows k_rows (positions, whole tiles of the layout's sizes), indexed as those rows are
    ordered. keep(query tile, key tile) (indices of the new layout, arrays) drops tiles whose
    pairs another part of the computation covers. Cost: the tiles of the placed query rows."""
    bm, bn = lay.block_m, lay.block_n
    lb, lh, tq, tk = lay.shape
    q_map = _tile_map(q_rows, bm, lay.n_q)
    k_map = _tile_map(k_rows, bn, lay.n_k)
    q_tiles = np.flatnonzero(q_map >= 0)                 # the sequence's tiles, in placed order
    q_tiles = q_tiles[np.argsort(q_map[q_tiles])]
    new_tq, new_tk = len(q_tiles), -(-len(k_rows) // bn)

    def lists(old: TileLists) -> TileLists:
        rows = (np.arange(lb * lh)[:, None] * tq + q_tiles[None, :]).ravel()   # (b, h, placed tile)
        first, count = old.ptr[rows], np.diff(old.ptr)[rows]
        owner = np.repeat(np.arange(len(rows)), count)
        at = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first, count)
        kt = k_map[old.indices[at]]
        mask = kt >= 0
        if keep is not None and mask.any():
            mask[mask] = keep(owner[mask] % new_tq, kt[mask])
        owner, kt = owner[mask], kt[mask]
        order = np.lexsort((kt, owner))
        ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(np.bincount(owner, minlength=len(rows)), out=ptr[1:])
        return TileLists(ptr, kt[order].astype(np.int32), (lb, lh, new_tq))
    return BlockLayout(len(q_rows), len(k_rows), bm, bn, 0, lists(lay.full), lists(lay.partial), new_tk)
