"""Layouts of patterns that read declared inputs, built per call on the inputs' device.

Inputs change with every call, so their layout cannot be cached, and building it on the host
would copy them off the GPU each call. Here the parts that read no input have their layouts built
once per shape (the host's analytic build) and kept on the device as tiles; a call then works on
the device alone, in torch, with a rule per node type (RULES):

* a token-level `where(C)` classifies tiles by interval arithmetic (ir/intervals.py's rules, on
  torch arrays): each read ranges over its per-tile extremes (its values at every row or key,
  O(n), then a min and max per tile), over its values on the tile's pairs for tiles of at most
  intervals.SMALL_TILE pairs, else over the whole input and 0. A condition of the rows alone or
  the keys alone is classified per query or key tile and listed across, `or` and `and` of parts
  as union and intersection (as conditions.plan does on the host);
* `blocks(B, where(C))` lists block pairs straight from the input: `j == f(i)` (and `or`s of such)
  from f at every block row, anything else from C on every block pair, the block-level input's
  own size; tiles are FULL when they hold only listed block pairs;
* `+` merges tiles by the larger class, `&` keeps the tiles its generating parts share, by the
  smaller class, and classifies them by its token-level where(...)s.

Cost: O(n + tiles + block pairs) per call, never n_q x n_k. Other shapes (a difference, heads(...),
an input read under a document) keep the host build (choose.py's "declared inputs")."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ..ir import expr as E
from ..ir import intervals
from ..ir.combinators import Blocks, Intersection, Union
from ..ir.pattern import CHUNK_PAIRS, Pattern, value
from ..ir.tiles import EMPTY, FIXED_INPUTS, FULL, PARTIAL
from ..ir.where import Where
from .block import DeviceLayout, expand_ranges, tile_extremes
from .build import build_layout
from .expressions import to_torch


def _declared(node: Pattern) -> frozenset[str]:
    return frozenset(name for name in node.inputs_read() if name not in FIXED_INPUTS)


def _token_where(node: Pattern) -> bool:
    """A where(...) at token level that reads declared inputs: classified on given tiles."""
    return type(node) is Where and bool(_declared(node))


def supported(body: Pattern) -> bool:
    """Whether every part of the body that reads inputs has a device rule (else: the host build)."""
    if not _declared(body) or not body.inputs_read() <= _declared(body):
        return not body.inputs_read()   # no input: static; segment ids or content: other builders
    if type(body) in (Union, Intersection):
        return all(supported(p) for p in body.parts)
    if type(body) is Blocks:
        parts = body.body.parts if type(body.body) is Union else (body.body,)
        return all(not _declared(p) or type(p) is Where for p in parts)
    return type(body) is Where


@dataclass(frozen=True)
class Space:
    """One call's tiling on the device: (batch, heads, query tiles, key tiles), the tiles' token
    ranges, and the declared inputs (torch tensors) by name."""
    n_q: int
    n_k: int
    q_offset: int
    block_m: int
    block_n: int
    batch: int
    heads: int
    device: torch.device
    inputs: dict

    @property
    def tiles(self) -> tuple[int, int]:
        return -(-self.n_q // self.block_m), -(-self.n_k // self.block_n)

    def decode(self, key: torch.Tensor):
        """(b, h, t, kt) of tile keys ((b * heads + h) * tq + t) * tk + kt."""
        tq, tk = self.tiles
        bh = key // (tq * tk)
        return bh // self.heads, bh % self.heads, key // tk % tq, key % tk

    def rows(self, t):
        lo = t * self.block_m
        return lo + self.q_offset, torch.clamp(lo + self.block_m, max=self.n_q) - 1 + self.q_offset

    def keys(self, kt):
        lo = kt * self.block_n
        return lo, torch.clamp(lo + self.block_n, max=self.n_k) - 1

    def names(self, **coordinates) -> dict:
        return {"n": self.n_k, "n_q": self.n_q, "n_k": self.n_k, **self.inputs, **coordinates}


@dataclass(frozen=True)
class Tiles:
    """Visited tiles of one call: keys ascending and distinct, with their class (FULL/PARTIAL)."""
    key: torch.Tensor
    cls: torch.Tensor

    @staticmethod
    def merged(key: torch.Tensor, cls: torch.Tensor) -> "Tiles":
        """Distinct keys, a key listed twice taking its larger class; EMPTY dropped."""
        keep = cls > EMPTY
        key, cls = key[keep], cls[keep]
        uniq, at = torch.unique(key, return_inverse=True)
        best = torch.zeros(len(uniq), dtype=cls.dtype, device=key.device).scatter_reduce(0, at, cls, "amax")
        return Tiles(uniq, best)

    def keep(self, cls: torch.Tensor) -> "Tiles":
        pick = cls > EMPTY
        return Tiles(self.key[pick], cls[pick])


def _all_tiles(sp: Space) -> Tiles:
    tq, tk = sp.tiles
    key = torch.arange(sp.batch * sp.heads * tq * tk, device=sp.device)
    return Tiles(key, torch.full_like(key, FULL, dtype=torch.int8))


# ---- parts that read no input: the host's analytic build, once per shape ----

def _static(node: Pattern, sp: Space, cached) -> Tiles:
    """The node's tiles at this shape, built on the host once and kept on the device as keys of
    its own heads (1 when it does not vary with the head), repeated over the call's rows."""
    tq, tk = sp.tiles

    def make():
        lay = build_layout(node, sp.n_q, sp.n_k, sp.block_m, sp.block_n, sp.q_offset, sp.heads)
        keys, classes = [], []
        for lists, cls in ((lay.full, FULL), (lay.partial, PARTIAL)):
            ptr, kt = (torch.as_tensor(x, device=sp.device) for x in (lists.ptr, lists.indices[: lists.ptr[-1]]))
            row = torch.repeat_interleave(torch.arange(len(ptr) - 1, device=sp.device), ptr.diff())
            keys.append(row * tk + kt.long())   # row = h * tq + t: the key within batch row 0
            classes.append(torch.full_like(kt, cls, dtype=torch.int8))
        order = torch.argsort(torch.cat(keys))
        return lay.shape[1], torch.cat(keys)[order], torch.cat(classes)[order]
    lh, key, cls = cached(("input static", node.show(), sp.n_q, sp.n_k, sp.q_offset, sp.block_m, sp.block_n,
                           sp.heads, sp.device), make)
    copies = sp.batch * sp.heads // lh   # the rows (b, h) it stands for, each tq * tk keys apart
    offsets = torch.arange(copies, device=sp.device) * (lh * tq * tk)
    return Tiles((key[None, :] + offsets[:, None]).reshape(-1), cls.repeat(copies))


# ---- token-level where(...): intervals over the tiles ----

def _ints(x):
    return x.long() if torch.is_tensor(x) and x.dtype == torch.bool else x


def _arrays(device) -> intervals.Arrays:
    def asarray(x):
        if torch.is_tensor(x):
            return x
        return torch.as_tensor(x, dtype=torch.float64 if isinstance(x, float) else None, device=device)
    return intervals.Arrays(asarray, torch.where, torch.minimum, torch.maximum, torch.abs,
                            lambda x: asarray(x).long(),
                            lambda x: (x.is_floating_point() if torch.is_tensor(x) else isinstance(x, float)))


def _read_range(e: E.Read, sp: Space, b, h, t, kt):
    """Per tile, the least and greatest value the read can take there (intervals._read's rules)."""
    used = E.names(e)
    if "i" in used and "j" in used:
        area = sp.block_m * sp.block_n
        if area <= intervals.SMALL_TILE:
            return _read_on_pairs(e, sp, b, h, t, kt)
        x = _ints(sp.inputs[e.decl.name])
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        lo, hi = (x.min(), x.max()) if x.numel() else (zero, zero)
        return torch.minimum(lo, zero), torch.maximum(hi, zero)
    bs = torch.arange(sp.batch, device=sp.device)[:, None, None]
    hs = torch.arange(sp.heads, device=sp.device)[None, :, None]
    if "i" not in used and "j" not in used:
        v = _ints(to_torch(e, sp.names(b=b, h=h)))
        return v, v
    var, at, size, pick = (("i", torch.arange(sp.n_q, device=sp.device) + sp.q_offset, sp.block_m, t) if "i" in used
                           else ("j", torch.arange(sp.n_k, device=sp.device), sp.block_n, kt))
    values = _ints(to_torch(e, sp.names(b=bs, h=hs, **{var: at[None, None, :]})))   # (B or 1, H or 1, len(at))
    lo, hi = tile_extremes(values, size)   # over the batch rows and heads the read depends on, 1 for the others
    b, h = (b if lo.shape[0] > 1 else 0), (h if lo.shape[1] > 1 else 0)
    return lo[b, h, pick], hi[b, h, pick]


def _read_on_pairs(e: E.Read, sp: Space, b, h, t, kt):
    """The read's least and greatest value over each small tile's pairs, CHUNK_PAIRS at a time."""
    lo = torch.empty(len(t), dtype=torch.float64, device=sp.device)
    hi = torch.empty_like(lo)
    step = max(1, CHUNK_PAIRS // (sp.block_m * sp.block_n))
    for s in range(0, len(t), step):
        sl = slice(s, s + step)
        rows = sp.rows(t[sl])[0][:, None, None] + torch.arange(sp.block_m, device=sp.device)[None, :, None]
        cols = sp.keys(kt[sl])[0][:, None, None] + torch.arange(sp.block_n, device=sp.device)[None, None, :]
        valid = (rows <= sp.rows(t[sl])[1][:, None, None]) & (cols <= sp.keys(kt[sl])[1][:, None, None])
        v = to_torch(e, sp.names(i=rows, j=cols, b=b[sl, None, None], h=h[sl, None, None]))
        v = torch.as_tensor(v, device=sp.device).double().expand(valid.shape)
        lo[sl] = torch.where(valid, v, torch.inf).amin((1, 2))
        hi[sl] = torch.where(valid, v, -torch.inf).amax((1, 2))
    return (lo, hi) if e.decl.dtype == "float" else (lo.long(), hi.long())


def classify(cond: E.Expr, sp: Space, tiles: Tiles) -> torch.Tensor:
    """The class of where(cond) on each of the tiles."""
    b, h, t, kt = sp.decode(tiles.key)
    ranges = {"i": sp.rows(t), "j": sp.keys(kt), "h": (h, h), "b": (b, b),
              **{name: (v, v) for name, v in sp.names().items() if name in ("n", "n_q", "n_k")}}
    lo, hi = intervals.condition_interval(cond, ranges, lambda e: _read_range(e, sp, b, h, t, kt),
                                          _arrays(sp.device))
    lo, hi = (torch.as_tensor(x, device=sp.device).expand(tiles.key.shape) for x in (lo, hi))
    return torch.where(lo == 1, FULL, torch.where(hi == 0, EMPTY, PARTIAL)).to(torch.int8)


def _where(node: Where, sp: Space, cached) -> Tiles:
    return _condition_tiles(node.cond, sp)


def _condition_tiles(cond: E.Expr, sp: Space) -> Tiles:
    """where(cond)'s tiles, listed as conditions.plan lists them on the host: a condition of the
    rows alone (or the keys alone) from its class per query (key) tile, times every key (query)
    tile; `or` and `and` of parts as union and intersection; anything else by classifying every
    tile. So runtime global tokens, `g[b, i] or g[b, j]`, cost the tiles they list."""
    used = E.names(cond)
    if "i" not in used or "j" not in used:
        return _line_tiles(cond, sp, on_keys="j" in used)
    if isinstance(cond, E.Apply) and cond.op in ("or", "and"):
        parts = [_condition_tiles(a, sp) for a in cond.args]
        return _merged(parts) if cond.op == "or" else functools.reduce(_meet, parts)
    every = _all_tiles(sp)
    return every.keep(classify(cond, sp, every))


def _line_tiles(cond: E.Expr, sp: Space, on_keys: bool) -> Tiles:
    """A condition of the keys alone (on_keys) or of the rows alone: classified once per (b, h,
    key tile) or (b, h, query tile), each line that allows something then listed across."""
    tq, tk = sp.tiles
    lines, across = (tk, tq) if on_keys else (tq, tk)
    bh = torch.arange(sp.batch * sp.heads, device=sp.device)[:, None]
    line = torch.arange(lines, device=sp.device)[None, :]
    key = (bh * tq * tk + (line if on_keys else line * tk)).reshape(-1)   # the line's first tile
    cls = classify(cond, sp, Tiles(key, torch.zeros_like(key, dtype=torch.int8)))
    hit = cls > EMPTY
    step = torch.arange(across, device=sp.device) * (tk if on_keys else 1)
    keys = (key[hit][:, None] + step[None, :]).reshape(-1)
    classes = cls[hit][:, None].expand(-1, across).reshape(-1)
    order = torch.argsort(keys)
    return Tiles(keys[order], classes[order])


# ---- blocks(B, where(...)): block pairs from the input ----

def _matched_keys(cond: E.Expr) -> list[E.Expr] | None:
    """[f, ...] when cond is j == f (or f == j) with f free of j, or an `or` of such."""
    if isinstance(cond, E.Apply) and cond.op == "or":
        parts = [_matched_keys(a) for a in cond.args]
        return None if any(p is None for p in parts) else [f for p in parts for f in p]
    if isinstance(cond, E.Apply) and cond.op == "==":
        a, b = cond.args
        for key, f in ((a, b), (b, a)):
            if isinstance(key, E.Var) and key.name == "j" and "j" not in E.names(f):
                return [f]
    return None


def _block_pairs(cond: E.Expr, sp: Space, size: int):
    """(b, h, block row, block key) of every allowed block pair, each once."""
    first, last = sp.q_offset // size, (sp.q_offset + sp.n_q - 1) // size
    n_k = -(-sp.n_k // size)
    names = dict(sp.names(), n=n_k, n_q=-(-sp.n_q // size), n_k=n_k)
    bs = torch.arange(sp.batch, device=sp.device)[:, None, None, None]
    hs = torch.arange(sp.heads, device=sp.device)[None, :, None, None]
    keys = _matched_keys(cond)
    if keys is not None:   # one key per block row and f: O(rows)
        rows = torch.arange(first, last + 1, device=sp.device)[None, None, :, None]
        out = []
        for f in keys:
            j = torch.as_tensor(to_torch(f, {**names, "i": rows, "b": bs, "h": hs}), device=sp.device)
            j = j.expand(sp.batch, sp.heads, last + 1 - first, 1)
            b, h, r, _ = torch.nonzero((j >= 0) & (j < n_k), as_tuple=True)
            out.append(torch.stack([b, h, r + first, j[b, h, r, 0]]))
        pairs = torch.unique(torch.cat(out, 1), dim=1)
        return tuple(pairs)
    out = []
    step = max(1, CHUNK_PAIRS // max(1, sp.batch * sp.heads * n_k))
    for lo in range(first, last + 1, step):   # every block pair: the block-level input's own size
        rows = torch.arange(lo, min(lo + step, last + 1), device=sp.device)[None, None, :, None]
        cols = torch.arange(n_k, device=sp.device)[None, None, None, :]
        ok = torch.as_tensor(to_torch(cond, {**names, "i": rows, "j": cols, "b": bs, "h": hs}), device=sp.device)
        b, h, r, c = torch.nonzero(ok.expand(sp.batch, sp.heads, rows.shape[2], n_k), as_tuple=True)
        out.append(torch.stack([b, h, r + lo, c]))
    return tuple(torch.cat(out, 1)) if out else tuple(torch.zeros(4, 0, dtype=torch.long, device=sp.device))


def _tiles_of_block_pairs(sp: Space, size: int, b, h, r, c) -> Tiles:
    """The tiles holding these distinct block pairs: FULL where every block pair a tile meets is listed."""
    tq, tk = sp.tiles
    row_lo = torch.clamp(r * size, min=sp.q_offset) - sp.q_offset
    row_hi = torch.clamp(r * size + size - 1, max=sp.q_offset + sp.n_q - 1) - sp.q_offset
    owner, t = expand_ranges(row_lo // sp.block_m, row_hi // sp.block_m - row_lo // sp.block_m + 1)
    key_lo, key_hi = c * size, torch.clamp(c * size + size - 1, max=sp.n_k - 1)
    first = key_lo[owner] // sp.block_n
    owner2, kt = expand_ranges(first, key_hi[owner] // sp.block_n - first + 1)
    owner, t = owner[owner2], t[owner2]
    key = ((b[owner] * sp.heads + h[owner]) * tq + t) * tk + kt
    uniq, count = torch.unique(key, return_counts=True)
    _, _, t, kt = sp.decode(uniq)
    (q_lo, q_hi), (k_lo, k_hi) = sp.rows(t), sp.keys(kt)
    area = (q_hi // size - q_lo // size + 1) * (k_hi // size - k_lo // size + 1)
    return Tiles(uniq, torch.where(count >= area, FULL, PARTIAL).to(torch.int8))


def _blocks(node: Blocks, sp: Space, cached) -> Tiles:
    size = value(node.size)
    parts = node.body.parts if type(node.body) is Union else (node.body,)
    found = []
    for part in parts:
        if _declared(part):
            found.append(_tiles_of_block_pairs(sp, size, *_block_pairs(part.cond, sp, size)))
        else:
            found.append(_static(replace(node, body=part), sp, cached))
    return _merged(found)


# ---- combinators ----

def _merged(found: list[Tiles]) -> Tiles:
    """Union: every listed tile, by its larger class."""
    return Tiles.merged(torch.cat([x.key for x in found]), torch.cat([x.cls for x in found]))


def _meet(a: Tiles, b: Tiles) -> Tiles:
    """Intersection: the tiles both list, by the smaller class."""
    if not len(b.key):
        return b
    at = torch.searchsorted(b.key, a.key).clamp(max=len(b.key) - 1)
    return a.keep(torch.where(b.key[at] == a.key, torch.minimum(a.cls, b.cls[at]), EMPTY))


def _union(node: Union, sp: Space, cached) -> Tiles:
    return _merged([tiles_of(p, sp, cached) for p in node.parts])


def _intersection(node: Intersection, sp: Space, cached) -> Tiles:
    """The tiles every generating part lists (by the smaller class), then each token-level
    where(...) classifying them."""
    generators = [p for p in node.parts if not _token_where(p)]
    out = _all_tiles(sp) if not generators else tiles_of(generators[0], sp, cached)
    for part in generators[1:]:
        out = _meet(out, tiles_of(part, sp, cached))
    for part in node.parts:
        if _token_where(part):
            out = out.keep(torch.minimum(out.cls, classify(part.cond, sp, out)))
    return out


RULES = {Union: _union, Intersection: _intersection, Blocks: _blocks, Where: _where}


def tiles_of(node: Pattern, sp: Space, cached) -> Tiles:
    """The node's tiles for this call: its rule when it reads inputs, else its static tiles."""
    return RULES[type(node)](node, sp, cached) if _declared(node) else _static(node, sp, cached)


def build(body: Pattern, sp: Space, cached) -> DeviceLayout:
    """The call's layout on its device, (batch, heads or 1, query tiles, key tiles)."""
    tiles = tiles_of(body, sp, cached)
    b, h, t, kt = sp.decode(tiles.key)
    tq, tk = sp.tiles
    counts = torch.bincount(tiles.key // tk, minlength=sp.batch * sp.heads * tq)
    longest = int(counts.max()) if len(counts) else 0
    return DeviceLayout.from_tiles((sp.batch, sp.heads, tq, tk), sp.block_m, sp.block_n, b * sp.heads + h, t, kt,
                                   tiles.cls, longest)
