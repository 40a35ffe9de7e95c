"""Layouts of patterns with topk parts, built per call on the tensors' device from the selection.

topk's chosen (I, J) block pairs change with every call; the rest of the pattern does not. The
static parts get their layouts once per shape (host, analytic) and are kept on the device as
class grids; a call expands the selection into tiles and combines them with those by the layout
algebra of ir/pattern.py (union: max, intersection: min, difference: "right FULL empties, right
EMPTY keeps, else PARTIAL") on sorted int64 tile keys. Nothing is n x n and nothing is copied to
the host but the sizes torch needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.content import Cluster, Lsh, TopK
from ..ir.document import Document
from ..ir.pattern import Pattern, value
from ..ir.combinators import Blocks, Difference, Heads, Intersection, Union
from ..ir.positional import Chunk, OffsetPattern
from ..ir.rows import RowsOrColumns
from ..ir.random import Random
from ..ir.where import Where
from ..ir.tiles import EMPTY, FULL, PARTIAL
from .block import DeviceLayout, expand_ranges
from .build import build_layout


def supported(body: Pattern) -> bool:
    """True when body has a topk and every part reading a call input is a topk, or a union,
    intersection or difference of such parts and static ones (the keys of SELECTION_TILES)."""
    def ok(p: Pattern) -> bool:
        if not p.inputs_read() or type(p) is TopK:
            return True
        return type(p) in SELECTION_TILES and all(map(ok, p.children()))
    return any(type(n) is TopK for n in body.nodes()) and ok(body)


@dataclass(frozen=True)
class Tiles:
    """Tiles over (B, H): key = ((b * H + h) * tq + t) * tk + kt, sorted and unique, with classes."""
    key: torch.Tensor
    cls: torch.Tensor


@dataclass
class SelectionLayouts:
    """One shape's static parts (class grids (heads, tq, tk) on the device), and the build."""
    body: Pattern
    n_q: int
    n_k: int
    q_offset: int
    block_m: int
    block_n: int
    heads: int
    grids: dict

    @staticmethod
    def of(body: Pattern, n_q: int, n_k: int, q_offset: int, block_m: int, block_n: int, heads: int,
           device: torch.device) -> "SelectionLayouts":
        grids = {}

        def collect(p: Pattern) -> None:   # the largest parts that read no call input
            if not p.inputs_read():
                if p not in grids:
                    lay = build_layout(p, n_q, n_k, block_m, block_n, q_offset, heads)
                    grids[p] = torch.as_tensor(lay.classes()[0], device=device)   # static: batch dim 1
            else:
                for c in p.children():
                    collect(c)
        collect(body)
        return SelectionLayouts(body, n_q, n_k, q_offset, block_m, block_n, heads, grids)

    @property
    def tile_counts(self) -> tuple[int, int]:
        """(query tiles, key tiles)."""
        return -(-self.n_q // self.block_m), -(-self.n_k // self.block_n)

    def build(self, content: dict, batch: int) -> DeviceLayout:
        tq, tk = self.tile_counts
        tiles = self._tiles(self.body, content, batch)
        bh, t, kt = tiles.key // (tq * tk), tiles.key // tk % tq, tiles.key % tk
        return DeviceLayout.from_tiles((batch, self.heads, tq, tk), self.block_m, self.block_n, bh, t, kt,
                                       tiles.cls, tk)

    # ---- the algebra ----
    def _tiles(self, p: Pattern, content: dict, batch: int) -> Tiles:
        if p in self.grids:
            return self._enumerate(self.grids[p], batch)
        return SELECTION_TILES[type(p)](self, p, content, batch)   # supported() admits no other node

    def _union(self, p: Union, content: dict, batch: int) -> Tiles:
        parts = [self._tiles(c, content, batch) for c in p.parts]
        return _merge(torch.cat([x.key for x in parts]), torch.cat([x.cls for x in parts]))

    def _intersection(self, p: Intersection, content: dict, batch: int) -> Tiles:
        """Enumerate a part that reads the selection, classify its tiles by the rest."""
        first = next(c for c in p.parts if c not in self.grids)
        base = self._tiles(first, content, batch)
        cls = base.cls
        for c in p.parts:
            if c is not first:
                cls = torch.minimum(cls, self._classify(c, base.key, content, batch))
        return _keep(base.key, cls)

    def _difference(self, p: Difference, content: dict, batch: int) -> Tiles:
        base = self._tiles(p.left, content, batch)
        right = self._classify(p.right, base.key, content, batch)
        cls = torch.where(right == FULL, EMPTY, torch.where(right == EMPTY, base.cls, torch.clamp(base.cls, max=PARTIAL)))
        return _keep(base.key, cls.to(torch.int8))

    def _classify(self, p: Pattern, key: torch.Tensor, content: dict, batch: int) -> torch.Tensor:
        """The class p gives each tile key: a static part's grid, else a lookup in p's own tiles."""
        tq, tk = self.tile_counts
        if p in self.grids:
            grid = self.grids[p]
            h = key // (tq * tk) % self.heads % grid.shape[0]
            return grid[h, key // tk % tq, key % tk]
        own = self._tiles(p, content, batch)
        if not len(own.key):
            return torch.zeros_like(key, dtype=torch.int8)
        at = torch.searchsorted(own.key, key).clamp(max=len(own.key) - 1)
        return torch.where(own.key[at] == key, own.cls[at], EMPTY).to(torch.int8)

    def _enumerate(self, grid: torch.Tensor, batch: int) -> Tiles:
        """A static part's tiles in every (b, h): its grid has 1 head (shared) or `heads`."""
        lh, tq, tk = grid.shape
        h, t, kt = torch.nonzero(grid, as_tuple=True)     # ascending (h, t, kt)
        cls = grid[h, t, kt].to(torch.int8)
        rows = torch.arange(batch * self.heads, device=grid.device)
        if lh > 1:   # each (b, h) takes its own head's tiles
            rows = rows.view(batch, self.heads)[:, h].reshape(-1)
            t, kt, cls = t.repeat(batch), kt.repeat(batch), cls.repeat(batch)
            return Tiles((rows * tq + t) * tk + kt, cls)
        key = (rows[:, None] * tq + t[None, :]) * tk + kt[None, :]
        return Tiles(key.reshape(-1), cls.repeat(batch * self.heads))

    def _topk(self, p: TopK, content: dict, batch: int) -> Tiles:
        """The tiles of the chosen (I, J) block pairs: FULL when inside one pair (TopK.tiles)."""
        chosen = content[p][0]
        size, bm, bn = value(p.block), self.block_m, self.block_n
        tq, tk = self.tile_counts
        b, h, i, j = torch.nonzero(chosen).unbind(1)
        rows_lo = (i + self.q_offset // size) * size - self.q_offset          # block I in call rows
        rows_hi = torch.clamp(rows_lo + size - 1, max=self.n_q - 1)
        rows_lo = torch.clamp(rows_lo, min=0)
        qf, ql = torch.div(rows_lo, bm, rounding_mode="floor"), torch.div(rows_hi, bm, rounding_mode="floor") + 1
        cols_lo, cols_hi = j * size, torch.clamp(j * size + size - 1, max=self.n_k - 1)
        kf, kl = cols_lo // bn, cols_hi // bn + 1
        width = kl - kf
        owner, at = expand_ranges(torch.zeros_like(width), (ql - qf) * width)   # each pair's tiles, row-major
        qt, kt = qf[owner] + at // width[owner], kf[owner] + at % width[owner]
        inside = (qt * bm >= rows_lo[owner]) & (torch.clamp(qt * bm + bm - 1, max=self.n_q - 1) <= rows_hi[owner]) \
            & (kt * bn >= cols_lo[owner]) & (torch.clamp(kt * bn + bn - 1, max=self.n_k - 1) <= cols_hi[owner])
        key = ((b[owner] * self.heads + h[owner]) * tq + qt) * tk + kt
        return _merge(key, torch.where(inside, FULL, PARTIAL).to(torch.int8))


def _merge(key: torch.Tensor, cls: torch.Tensor) -> Tiles:
    """Sorted unique keys, each with the largest class it was listed with (a union)."""
    uniq, inverse = torch.unique(key, return_inverse=True)
    best = torch.zeros(len(uniq), dtype=torch.int8, device=key.device).scatter_reduce(
        0, inverse, cls.to(torch.int8), reduce="amax")
    return _keep(uniq, best)


def _keep(key: torch.Tensor, cls: torch.Tensor) -> Tiles:
    pick = cls > EMPTY
    return Tiles(key[pick], cls[pick].to(torch.int8))


# The device build's rule per node type that reads the selection; a part that reads no runtime
# input is a static class grid instead (any node type).
SELECTION_TILES = {
    TopK: SelectionLayouts._topk,
    Union: SelectionLayouts._union,
    Intersection: SelectionLayouts._intersection,
    Difference: SelectionLayouts._difference,
}
# Node types with no rule here: as a part that reads no call input they are a static grid;
# reading one (a document, lsh or cluster, or a topk under heads or blocks) sends the body to the host build.
NO_SELECTION_TILES = (OffsetPattern, RowsOrColumns, Chunk, Random, Where,
                      Lsh, Cluster, Document, Heads, Blocks)
