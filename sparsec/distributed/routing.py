"""Context parallelism's routing (numpy): which positions each rank holds, which K/V tiles it fetches, which query tiles it sends out."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SCHEMES = ("auto", "contiguous", "zigzag")
# The cost model that picks a scheme (docs/design.md, "Context parallelism"): a rank's time is
# its tiles' matmuls at FLOPS plus the bytes it receives at BANDWIDTH; the plan minimizes the
# slowest rank's. Defaults: an H100/H200-class GPU's dense bf16 rate and one NVLink direction.
FLOPS = 400e12
BANDWIDTH = 200e9


@dataclass(frozen=True)
class CallShape:
    """What the plan is made for, and every call under it must have: q (batch, heads, rows, dim),
    k and v (batch, kv_heads, rows, dim), of one dtype (itemsize bytes per element)."""
    batch: int
    heads: int
    kv_heads: int
    dim: int
    itemsize: int

    def kv_row(self) -> int:
        """Bytes of one position's K and V."""
        return 2 * self.batch * self.kv_heads * self.dim * self.itemsize

    def q_row(self) -> int:
        return self.batch * self.heads * self.dim * self.itemsize

    def partial_row(self) -> int:
        """One position's partial result: O in the call's dtype and LSE in fp32."""
        return self.batch * self.heads * (self.dim * self.itemsize + 4)


def tile_rows(tiles: np.ndarray, tile: int, n: int) -> np.ndarray:
    """The positions of whole tiles (ascending tile numbers -> ascending positions)."""
    rows = (np.asarray(tiles, np.int64)[:, None] * tile + np.arange(tile)).ravel()
    return rows[rows < n]


def shard_tiles(scheme: str, work: np.ndarray, world: int) -> list[np.ndarray]:
    """Each rank's query tiles under a scheme. contiguous: one run per rank, its boundaries where
    the running work (visited tiles per query tile) crosses k/P of the total, so ranks do equal
    work rather than hold equal rows (documents, global rows); zigzag: 2P equal runs, rank r
    holding runs r and 2P-1-r, which balances causal patterns."""
    tiles = len(work)
    if scheme == "zigzag":
        bounds = np.linspace(0, tiles, 2 * world + 1).round().astype(np.int64)
        return [np.concatenate([np.arange(bounds[r], bounds[r + 1]),
                                np.arange(bounds[2 * world - 1 - r], bounds[2 * world - r])]) for r in range(world)]
    total = np.cumsum(work, dtype=np.float64)
    bounds = [0]
    for r in range(1, world):   # at least one tile per rank, on both sides of each boundary
        at = int(np.searchsorted(total, total[-1] * r / world, side="left")) + 1
        bounds.append(min(max(at, bounds[-1] + 1), tiles - (world - r)))
    bounds.append(tiles)
    return [np.arange(bounds[r], bounds[r + 1]) for r in range(world)]


@dataclass(frozen=True)
class Route:
    """The exchanges of one scheme: per rank r, `fetch[r][s]` the key tiles it receives from rank
    s and `sent[r][s]` its query tiles whose partial results rank s computes (tile numbers,
    ascending); `sends[r]` marks r's query tiles that are sent out (their keys are everywhere)."""
    tiles: list[np.ndarray]          # per rank, its query (and key) tiles, ascending
    fetch: list[list[np.ndarray]]
    sent: list[list[np.ndarray]]
    work: np.ndarray                 # per rank, the tile pairs it computes (over heads), sent tiles' where computed


def route(pairs: tuple[np.ndarray, np.ndarray], work: np.ndarray, tiles: list[np.ndarray], tile: int, n: int,
          shape: CallShape, send: bool = True) -> Route:
    """Which key tiles each rank fetches and which query tiles it sends out, from the sequence's
    (query tile, key tile) pairs (any head). A query tile is sent out, greedily from the one with
    the most remote key tiles down, when sending it (its rows out and their partial results back,
    forward and backward) moves fewer bytes than fetching the remote key tiles no other of the
    rank's tiles needs (K and V in, dK and dV back): so global rows are sent, band rows fetch.
    send=False fetches every key tile (content patterns, whose kernels need the whole K/V)."""
    world = len(tiles)
    owner = np.empty(-(-n // tile), np.int64)
    for r, t in enumerate(tiles):
        owner[t] = r
    qt, kt = pairs
    per_tile = np.maximum(np.bincount(qt, minlength=len(owner)), 1)   # distinct key tiles per query tile
    rows_of = lambda t: np.minimum(tile, n - t * tile)          # rows in tile t (the last is short)
    send_cost = shape.batch * shape.heads * (5 * shape.dim * shape.itemsize + 12)   # per row and rank
    fetch_saving = 2 * shape.kv_row()                                              # per key row
    fetch = [[np.zeros(0, np.int64) for _ in range(world)] for _ in range(world)]
    sent = [[np.zeros(0, np.int64) for _ in range(world)] for _ in range(world)]
    done = np.zeros(world)
    for r in range(world):
        mine = owner[qt] == r
        remote = mine & (owner[kt] != r)
        q_r, k_r = qt[remote], kt[remote]
        need = np.bincount(k_r, minlength=len(owner))             # r's query tiles needing each key tile
        by_tile = np.split(k_r[np.argsort(q_r, kind="stable")], np.cumsum(np.bincount(q_r, minlength=len(owner))))
        sends = []
        for t in sorted(set(q_r.tolist()), key=lambda t: (-len(by_tile[t]), t)):
            keys = by_tile[t]
            ranks = np.unique(owner[keys])
            exclusive = keys[need[keys] == 1]
            if send and rows_of(t) * len(ranks) * send_cost < rows_of(exclusive).sum() * fetch_saving:
                sends.append(t)
                need[keys] -= 1
        for s in range(world):
            if s != r:
                fetch[r][s] = np.flatnonzero((need > 0) & (owner == s))
                sent[r][s] = np.array(sorted(t for t in sends if np.any(owner[by_tile[t]] == s)), np.int64)
        is_sent = np.zeros(len(owner), bool)
        is_sent[sends] = True
        kept = mine & ~is_sent[qt]
        done[r] += (work[qt[kept]] / per_tile[qt[kept]]).sum()
        for s in range(world):   # a sent tile's pairs are computed where their keys are
            gone = mine & is_sent[qt] & (owner[kt] == s)
            done[s] += (work[qt[gone]] / per_tile[qt[gone]]).sum()
    return Route(tiles, fetch, sent, done)


def gathered(tiles: list[np.ndarray], count: int) -> Route:
    """The route of an all-gather: each rank fetches every other rank's tiles (content patterns,
    whose tiles depend on every rank's q and k), in O(tiles), not O(tiles^2)."""
    world = len(tiles)
    fetch = [[tiles[s] if s != r else np.zeros(0, np.int64) for s in range(world)] for r in range(world)]
    sent = [[np.zeros(0, np.int64) for _ in range(world)] for _ in range(world)]
    return Route(tiles, fetch, sent, np.array([len(t) * count for t in tiles], np.float64))


def received_bytes(rt: Route, r: int, tile: int, n: int, shape: CallShape) -> dict[str, int]:
    """Bytes rank r receives in one forward under the route: K/V rows fetched, other ranks'
    query rows it computes partial results for, and its own sent rows' partial results."""
    world = len(rt.tiles)
    rows = lambda tiles: len(tile_rows(tiles, tile, n))
    kv = sum(rows(rt.fetch[r][s]) for s in range(world)) * shape.kv_row()
    queries = sum(rows(rt.sent[s][r]) for s in range(world)) * shape.q_row()
    partials = sum(rows(rt.sent[r][s]) for s in range(world)) * shape.partial_row()
    return {"kv": kv, "queries": queries, "partials": partials, "total": kv + queries + partials}


def cost(rt: Route, tile: int, n: int, shape: CallShape, flops: float, bandwidth: float) -> float:
    """The slowest rank's seconds by the cost model: its tiles' two matmuls (QK^T and PV) plus
    the bytes it receives."""
    per_tile = 4.0 * tile * tile * shape.dim * shape.batch
    return max(rt.work[r] * per_tile / flops + received_bytes(rt, r, tile, n, shape)["total"] / bandwidth
               for r in range(len(rt.tiles)))


def tile_pairs(lay) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """From a sequence's layout (tile x tile): its distinct (query tile, key tile) pairs over
    batch rows and heads, and the work per query tile (pairs times the batch rows and heads
    each layout row stands for)."""
    lb, lh, tq, tk = lay.shape
    qs, ks = [], []
    for lists in (lay.full, lay.partial):
        owner = np.repeat(np.arange(lb * lh * tq), np.diff(lists.ptr))
        qs.append(owner % tq)
        ks.append(lists.indices[: len(owner)].astype(np.int64))
    q, k = np.concatenate(qs), np.concatenate(ks)
    work = np.bincount(q, minlength=tq).astype(np.float64)
    key = np.unique(q * tk + k)
    return (key // tk, key % tk), work


def check_world(tiles: int, world: int, scheme: str, tile: int, n: int) -> None:
    need = 2 * world if scheme == "zigzag" else world
    if tiles < need:
        raise ValueError(f"n={n} is {tiles} tiles of {tile} positions: too few for {world} ranks under "
                         f"scheme={scheme!r} (it needs {need}); pass a smaller block=")


def as_positions(tiles: np.ndarray, tile: int, n: int) -> torch.Tensor:
    return torch.as_tensor(tile_rows(tiles, tile, n))
