"""Where a pattern is read: a Grid of token pairs for the dense mask, a Tiling of tiles for layouts."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes, ordered so that union is max and intersection is min


@dataclass(frozen=True)
class CallInputs:
    """Call-time inputs of one (batch, head): segment ids and, for content-based parts, q and k."""
    segment_ids: np.ndarray | None = None    # (n_k,) ints of this batch row
    q: np.ndarray | None = None              # (n_q, D) of this (batch, head)
    k: np.ndarray | None = None              # (n_k, D)
    centroids: np.ndarray | None = None      # (clusters, D) of this head
    rotations: np.ndarray | None = None      # (rounds, D, buckets/2)
    q_offset: int = 0                        # position of q's first row
    content: dict | None = None              # content node -> its ids or selection, computed per call
    declared: dict = field(default_factory=dict)   # input statement name -> the whole array (ir/inputs.py)
    batch: int = 0                           # the batch row, where declared inputs are read
    head: int = 0                            # the query head (topk's by= input is per head)

    def coarse(self) -> "CallInputs":
        """What a blocks(...) body reads: the declared inputs (its i and j are block indices)."""
        return CallInputs(declared=self.declared, batch=self.batch, head=self.head)


@dataclass(frozen=True)
class TableSpace:
    """What a node's kernel tables are built for: one call's lengths (tokens), the block scale
    the node sits under (product of enclosing blocks sizes), and every call input, whole
    (numpy or torch): segment_ids (B, n_k), q (B, H, n_q, D), k (B, Hkv, n_k, D), centroids
    (H, clusters, D), rotations (rounds, D, buckets/2); and `content`, when the runtime has
    computed them: content node -> a tuple of arrays whose leading dims are (B, H)."""
    n_q: int
    n_k: int
    q_offset: int
    heads: int
    batch: int
    scale: int = 1
    inputs: dict = field(default_factory=dict)

    @property
    def first_row(self) -> int:
        """The first row coordinate (position, or block index inside blocks) of this call."""
        return self.q_offset // self.scale

    @property
    def last_row(self) -> int:
        return (self.q_offset + self.n_q - 1) // self.scale

    @property
    def keys(self) -> int:
        """n_k in this node's coordinates."""
        return -(-self.n_k // self.scale)

    @cached_property
    def host(self) -> dict:
        """The call inputs as numpy arrays, converted (copied off a device) once."""
        out = {name: _host(x) for name, x in self.inputs.items() if x is not None and name != "content"}
        if self.inputs.get("content"):
            out["content"] = {node: tuple(map(_host, arrays)) for node, arrays in self.inputs["content"].items()}
        return out

    def per_head(self, b: int, h: int) -> CallInputs:
        """The CallInputs (numpy) of query head h of batch row b (k of its group)."""
        x = self.host
        q, k = x.get("q"), x.get("k")
        group = self.heads // k.shape[1] if k is not None else 1
        return CallInputs(segment_ids=None if x.get("segment_ids") is None else x["segment_ids"][b],
                       q=None if q is None else q[b, h], k=None if k is None else k[b, h // group],
                       centroids=None if x.get("centroids") is None else x["centroids"][h],
                       rotations=x.get("rotations"), q_offset=self.q_offset,
                       content=None if "content" not in x else
                       {node: tuple(a[b, h] for a in arrays) for node, arrays in x["content"].items()},
                       declared={name: a for name, a in x.items() if name not in FIXED_INPUTS}, batch=b, head=h)


FIXED_INPUTS = ("segment_ids", "q", "k", "centroids", "rotations", "content")   # the rest: declared inputs


def _host(x):
    """A torch tensor as a numpy array (floats as float64: numpy has no bfloat16); else x."""
    if not hasattr(x, "detach"):
        return x
    x = x.detach().cpu()
    return (x.double() if x.is_floating_point() else x).numpy()


@dataclass(frozen=True)
class Grid:
    """Token pairs pos x keys: query positions (i + q_offset) and key indices, both 1-D int64,
    distinct, in any order (a share sorted by bucket reads its tiles' scattered positions)."""
    pos: np.ndarray
    keys: np.ndarray
    n_q: int
    n_k: int
    head: int = 0
    inputs: CallInputs = field(default_factory=CallInputs)

    def offsets(self) -> np.ndarray:
        return self.pos[:, None] - self.keys[None, :]

    def coarsen(self, b: int) -> tuple["Grid", np.ndarray, np.ndarray]:
        """The grid of blocks of size b, with the maps from tokens to its rows and columns."""
        rows, row_of = np.unique(self.pos // b, return_inverse=True)
        cols, col_of = np.unique(self.keys // b, return_inverse=True)
        inner = Grid(rows, cols, -(-self.n_q // b), -(-self.n_k // b), self.head, self.inputs.coarse())
        return inner, row_of, col_of


@dataclass(frozen=True)
class Tiling:
    """Query tiles [q_lo, q_hi] (positions) and key tiles [k_lo, k_hi], inclusive, both non-decreasing.

    Top-level tilings are regular; inside blocks(B, ...) the tiles are divided by B and may overlap."""
    q_lo: np.ndarray
    q_hi: np.ndarray
    k_lo: np.ndarray
    k_hi: np.ndarray
    n_q: int
    n_k: int
    head: int = 0
    inputs: CallInputs = field(default_factory=CallInputs)

    @staticmethod
    def regular(n_q: int, n_k: int, block_m: int, block_n: int, q_offset: int, **kw) -> "Tiling":
        q_lo = np.arange(0, n_q, block_m, dtype=np.int64)
        k_lo = np.arange(0, n_k, block_n, dtype=np.int64)
        return Tiling(q_lo + q_offset, np.minimum(q_lo + block_m, n_q) - 1 + q_offset,
                      k_lo, np.minimum(k_lo + block_n, n_k) - 1, n_q, n_k, **kw)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.q_lo), len(self.k_lo)

    def rows(self, first: int, last: int) -> "Tiling":
        """Query tiles first..last - 1 alone (numbered from 0), with every key tile."""
        return replace(self, q_lo=self.q_lo[first:last], q_hi=self.q_hi[first:last])

    def coarsen(self, b: int) -> "Tiling":
        return replace(self, q_lo=self.q_lo // b, q_hi=self.q_hi // b, k_lo=self.k_lo // b,
                       k_hi=self.k_hi // b, n_q=-(-self.n_q // b), n_k=-(-self.n_k // b), inputs=self.inputs.coarse())

    def key_tiles(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For key intervals [lo, hi] (per query tile), the range [first, last) of key tiles they meet."""
        first = np.searchsorted(self.k_hi, lo, side="left")
        last = np.searchsorted(self.k_lo, hi, side="right")
        return first, np.maximum(last, first)

    def query_tiles(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.searchsorted(self.q_hi, lo, side="left")
        last = np.searchsorted(self.q_lo, hi, side="right")
        return first, np.maximum(last, first)


@dataclass(frozen=True)
class TileSet:
    """The non-EMPTY tiles of one (batch, head): sorted unique (qt, kt) with their class."""
    qt: np.ndarray
    kt: np.ndarray
    cls: np.ndarray

    def __len__(self) -> int:
        return len(self.qt)

    @staticmethod
    def build(tiling: Tiling, qt, kt, cls) -> "TileSet":
        """Sort, drop EMPTY, and merge duplicates by max (a pair listed twice is in either)."""
        qt, kt = np.asarray(qt, np.int64), np.asarray(kt, np.int64)
        cls = np.broadcast_to(np.asarray(cls, np.int8), qt.shape)
        keep = cls > EMPTY
        if not keep.all():
            qt, kt, cls = qt[keep], kt[keep], cls[keep]
        key = qt * tiling.shape[1] + kt
        if len(key) < 2 or bool((key[1:] > key[:-1]).all()):   # enumerated in order already: no sort
            return TileSet(qt, kt, np.ascontiguousarray(cls))
        order = np.lexsort((-cls, key))
        key, cls = key[order], cls[order]
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]   # after sorting by -cls, the first of each key has the max
        key, cls = key[first], cls[first]
        return TileSet(key // tiling.shape[1], key % tiling.shape[1], cls)

    def lookup(self, tiling: Tiling, qt: np.ndarray, kt: np.ndarray) -> np.ndarray:
        """Class of each requested tile (EMPTY where not listed)."""
        keys = self.qt * tiling.shape[1] + self.kt
        want = np.asarray(qt, np.int64) * tiling.shape[1] + np.asarray(kt, np.int64)
        at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        hit = (keys[at] == want) if len(keys) else np.zeros(len(want), bool)
        return np.where(hit, self.cls[at] if len(keys) else 0, EMPTY).astype(np.int8)


def expand_ranges(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [first[r], last[r]): (r, t) for every t in each range, without a Python loop."""
    counts = np.maximum(last - first, 0).astype(np.int64)
    owner = np.repeat(np.arange(len(first), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    t = np.arange(int(counts.sum()), dtype=np.int64)
    t += (np.asarray(first, np.int64) - starts)[owner]   # one gather instead of two repeats
    return owner, t


def tiles_of_pairs(tiling: Tiling, rows: np.ndarray, cols: np.ndarray) -> TileSet:
    """Tile classes from an explicit list of distinct allowed pairs (row position, key index).

    A tile is FULL when every one of its pairs is listed, PARTIAL when some are."""
    qf, ql = tiling.query_tiles(rows, rows)
    owner, qt = expand_ranges(qf, ql)
    rows, cols = rows[owner], cols[owner]
    kf, kl = tiling.key_tiles(cols, cols)
    owner, kt = expand_ranges(kf, kl)
    qt = qt[owner]
    key = qt * tiling.shape[1] + kt
    uniq, count = np.unique(key, return_counts=True)
    qt, kt = uniq // tiling.shape[1], uniq % tiling.shape[1]
    area = (tiling.q_hi[qt] - tiling.q_lo[qt] + 1) * (tiling.k_hi[kt] - tiling.k_lo[kt] + 1)
    return TileSet.build(tiling, qt, kt, np.where(count >= area, FULL, PARTIAL))


def all_tiles(tiling: Tiling) -> tuple[np.ndarray, np.ndarray]:
    tq, tk = tiling.shape
    return np.repeat(np.arange(tq, dtype=np.int64), tk), np.tile(np.arange(tk, dtype=np.int64), tq)


def input_value(inputs: CallInputs, name: str, what: str) -> Any:
    value = getattr(inputs, name)
    if value is None:
        raise ValueError(f"{what} needs the input {name}=")
    return value
