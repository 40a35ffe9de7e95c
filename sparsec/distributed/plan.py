"""`sparsec.distributed.plan` and the Plan it returns: one sequence sharded over a process group, and the calls under it."""
from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import numpy as np
import torch
import torch.distributed as dist

from .. import pipeline
from ..compiled import _int_arg as _int
from ..runtime.call import Call, check_tensors, choose_backend, default_config
from . import routing as R
from . import ops
from .attention import Exchanges, Side
from .exchange import Moves, Tally


class Plan:
    """Which positions of n each rank of `group` holds and what each call moves (spec section 9).
    Made on every rank from the same arguments, so every rank knows every rank's exchanges with
    no metadata moved: the pattern's layout is analytic (segment_ids, for documents, are given
    whole to every rank)."""

    def __init__(self, kern, n: int, group=None, heads: int = 1, kv_heads: int | None = None, batch: int = 1,
                 dim: int = 128, dtype=torch.bfloat16, block: int = 128, scheme: str = "auto",
                 segment_ids=None, rank: int | None = None, world: int | None = None,
                 flops: float = R.FLOPS, bandwidth: float = R.BANDWIDTH):
        self.kern, self.group = kern, group
        self.n, self.block = _int("n", n, 1), _int("block", block, 16)
        heads = _int("heads", heads, 1)
        kv_heads = heads if kv_heads is None else _int("kv_heads", kv_heads, 1)
        if heads % kv_heads:
            raise ValueError(f"heads % kv_heads must be 0, got heads={heads}, kv_heads={kv_heads}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.shape = R.CallShape(_int("batch", batch, 1), heads, kv_heads, _int("dim", dim, 1),
                                 torch.empty((), dtype=dtype).element_size())
        if scheme not in R.SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(R.SCHEMES)}, got {scheme!r}")
        self.rank = dist.get_rank(group) if rank is None else _int("rank", rank, 0)
        self.world = dist.get_world_size(group) if world is None else _int("world", world, 1)
        if self.rank >= self.world:
            raise ValueError(f"rank must be below world={self.world}, got {self.rank}")
        self.segment_ids = None if segment_ids is None else torch.as_tensor(segment_ids).to(torch.int64)
        self._refuse(kern)
        self.tally, self._runners, self._layouts = Tally(), {}, {}
        self.key = ops.register(self)   # what the custom ops (ops.py) know this plan by
        # "gather": content patterns (their tiles depend on every rank's q and k) fetch all K/V
        self.mode = "gather" if {"q", "k"} & kern.needs or len(kern.shares) > 1 else "sparse"
        tiles = -(-self.n // self.block)
        if self.mode == "gather":   # every rank fetches every other rank's tiles, sends nothing
            R.check_world(tiles, self.world, "contiguous", self.block, self.n)
            self._settle(R.gathered(R.shard_tiles("contiguous", np.ones(tiles), self.world), tiles))
            self.scheme, self.costs = "contiguous", {}
            return
        pairs, work = R.tile_pairs(self._layout(self.block, self.block))
        schemes = ["contiguous", "zigzag"] if scheme == "auto" else [scheme]
        schemes = [s for s in schemes if tiles >= (2 if s == "zigzag" else 1) * self.world] or schemes
        for s in schemes:
            R.check_world(tiles, self.world, s, self.block, self.n)
        routes = {s: self._balanced(s, pairs, work) for s in schemes}
        self.costs = {s: R.cost(rt, self.block, self.n, self.shape, flops, bandwidth) for s, rt in routes.items()}
        self.scheme = min(schemes, key=lambda s: (self.costs[s], schemes.index(s)))
        self._settle(routes[self.scheme])

    def _balanced(self, scheme: str, pairs, work) -> R.Route:
        """The route of a scheme, sharded twice: a sent tile's work is done where its keys are, so
        the second sharding counts a sent tile's work as 1/P at its owner."""
        first = R.route(pairs, work, R.shard_tiles(scheme, work, self.world), self.block, self.n, self.shape,
                        send=self.mode == "sparse")
        sent = np.concatenate([t for row in first.sent for t in row]).astype(np.int64)
        if not len(sent):
            return first
        spread = work.copy()
        spread[sent] /= self.world
        second = R.route(pairs, work, R.shard_tiles(scheme, spread, self.world), self.block, self.n, self.shape,
                         send=self.mode == "sparse")
        return min((first, second), key=lambda rt: max(rt.work))

    def _refuse(self, kern) -> None:
        if kern.ir.score is not None:
            raise ValueError(f"pattern {kern.name}: context parallelism does not run score modifications "
                             f"(with ...) yet")
        declared = [d.name for d in kern.ir.inputs]
        if declared:
            raise ValueError(f"pattern {kern.name}: context parallelism does not take declared inputs "
                             f"({', '.join(declared)}) yet")
        if "segment_ids" in kern.needs and self.segment_ids is None:
            raise ValueError(f"pattern {kern.name} uses document: pass segment_ids= of the whole sequence, "
                             f"shape (batch, n), the same on every rank")
        if self.segment_ids is not None and tuple(self.segment_ids.shape) != (self.shape.batch, self.n):
            raise ValueError(f"segment_ids must have shape (batch={self.shape.batch}, n={self.n}), got "
                             f"{tuple(self.segment_ids.shape)}")

    def __repr__(self) -> str:
        return (f"<sparsec context-parallel plan: {self.kern.name}, n={self.n} over {self.world} ranks, "
                f"{self.scheme}, {self.mode}, tiles of {self.block}>")

    # ---- positions ----
    def rows(self, rank: int | None = None) -> torch.Tensor:
        """The positions rank holds (this rank's by default), ascending."""
        return R.as_positions(self.route.tiles[self.rank if rank is None else rank], self.block, self.n)

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's rows of a whole-sequence tensor (q, k, v: dim 2)."""
        if x.shape[dim] != self.n:
            raise ValueError(f"shard: dim {dim} must have the plan's n={self.n} positions, got shape {tuple(x.shape)}")
        return x.index_select(dim, self.rows().to(x.device))

    def unshard(self, x_r: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Every rank's rows gathered, in position order (a collective: every rank calls it)."""
        rows = self.rows()
        if x_r.shape[dim] != len(rows):
            raise ValueError(f"unshard: dim {dim} must have this rank's {len(rows)} rows, got shape {tuple(x_r.shape)}")
        most = max(len(self.rows(r)) for r in range(self.world))
        x = x_r.movedim(dim, 0)
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: len(rows)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        out = x.new_empty((self.n, *x.shape[1:]))
        for r, part in enumerate(parts):
            at = self.rows(r)
            out[at.to(out.device)] = part[: len(at)]
        return out.movedim(0, dim)

    # ---- what moves ----
    def bytes(self) -> list[dict[str, int]]:
        """Per rank, the bytes it receives in one forward: K/V rows fetched ("kv"), other ranks'
        query rows ("queries"), partial results of its sent rows ("partials"), "total", and what
        ring attention or an all-gather would receive ("ring": (P-1)/P of all K/V)."""
        return [{**R.received_bytes(self.route, r, self.block, self.n, self.shape),
                 "ring": (self.n - len(self.rows(r))) * self.shape.kv_row()} for r in range(self.world)]

    def work(self) -> list[float]:
        """Per rank, the (query tile, key tile) pairs it computes, over the layout's heads."""
        return [float(w) for w in self.route.work]

    # ---- layouts and exchanges ----
    def _layout(self, block_m: int, block_n: int):
        """The whole sequence's layout at these tiles (made once per size)."""
        if (block_m, block_n) not in self._layouts:
            seg = None if self.segment_ids is None else self.segment_ids.numpy()
            self._layouts[block_m, block_n] = self.kern.layout(self.n, self.n, block_m, block_n, heads=self.shape.heads,
                                                               q_offset=0, segment_ids=seg)
        return self._layouts[block_m, block_n]

    @cached_property
    def _arrivals(self) -> tuple[np.ndarray, np.ndarray]:
        """The positions of the K/V rows this rank fetches and of the query rows it receives,
        in arrival order (grouped by sending rank, each rank's ascending)."""
        rt, r, world = self.route, self.rank, self.world
        rows = lambda tiles: R.tile_rows(tiles, self.block, self.n)
        return (np.concatenate([rows(rt.fetch[r][s]) for s in range(world)]),
                np.concatenate([rows(rt.sent[s][r]) for s in range(world)]))

    @cached_property
    def exchanges(self) -> Exchanges:
        rt, r, world = self.route, self.rank, self.world
        rows = self.rows()
        local = lambda tiles: torch.as_tensor(np.searchsorted(rows.numpy(), R.tile_rows(tiles, self.block, self.n)))
        count = lambda tiles: len(R.tile_rows(tiles, self.block, self.n))
        fetch = Moves([local(rt.fetch[d][r]) for d in range(world)], [count(rt.fetch[r][s]) for s in range(world)])
        queries = Moves([local(rt.sent[r][d]) for d in range(world)], [count(rt.sent[s][r]) for s in range(world)])
        fetched, received = self._arrivals
        return Exchanges(fetch, torch.as_tensor(np.argsort(fetched, kind="stable")), bool((rows == self.n - 1).any()),
                         queries, torch.as_tensor(np.argsort(received, kind="stable")))

    def key_rows(self) -> torch.Tensor:
        """The positions of this rank's key buffer's rows: its own and the fetched ones (by position)."""
        rows, fetched = self.rows(), torch.as_tensor(np.sort(self._arrivals[0]))
        return torch.cat([fetched, rows] if self.exchanges.fetched_first else [rows, fetched])

    def _sides(self) -> tuple[Side, Side, Side]:
        """near: local rows over local keys; far: local rows over fetched keys (not the sent
        tiles': their remote keys are computed where those keys are); remote: received rows
        over local keys."""
        rt, r = self.route, self.rank
        rows, fetched = self.rows(), torch.as_tensor(np.sort(self._arrivals[0]))
        received = torch.as_tensor(np.sort(self._arrivals[1]))
        sends = np.zeros(-(-self.n // self.block), bool)
        for s in range(self.world):
            sends[rt.sent[r][s]] = True
        q_np = rows.numpy()

        def keep(bm: int, bn: int):
            q_sent = sends[q_np[::bm] // self.block]
            return lambda qt, kt: ~q_sent[qt]
        return Side(rows, rows), Side(rows, fetched, keep), Side(received, rows)

    def _bound(self, q, k, v, scale, backend):
        """The three sides' runners (near, far, remote) for this call's backend, scale and tensors (made once)."""
        B, H, n_r, D = q.shape
        call = Call(B, H, k.shape[1], n_r, n_r, D, 0, scale, q.device)
        whole = replace(call, n_q=self.n, n_k=self.n)   # what the pattern is specialized for
        backend = choose_backend(backend, q.device)
        if backend == "flex":
            raise ValueError("context parallelism runs backend='triton', 'interpret' or 'cpu', not 'flex'")
        key = (backend, scale, q.device, q.dtype)
        if key not in self._runners:
            config = self.kern.config or default_config(backend, whole)
            if self.block % config.block_m or self.block % config.block_n:
                raise ValueError(f"the kernels' tiles {config.block_m}x{config.block_n} must divide the plan's "
                                 f"block={self.block}")
            body = pipeline.specialize(self.kern.shares[0].body, whole)
            inputs = {} if self.segment_ids is None else {"segment_ids": self.segment_ids.to(q.device)}
            self._runners[key] = tuple(side.runner(self.kern, body, self._layout, self.n, call, backend, config,
                                                   inputs) for side in self._sides())
        return self._runners[key]

    # ---- the call ----
    def attend(self, kern, q, k, v, scale=None, return_lse: bool = False, backend=None, **inputs):
        """kern(q_r, k_r, v_r, plan=plan): this rank's rows of attention over the whole sequence."""
        if kern is not self.kern:
            raise ValueError(f"plan= was made for pattern {self.kern.name}, not {kern.name}")
        check_tensors(q, k, v)
        want = (self.shape.batch, self.shape.heads, self._row_count)
        if tuple(q.shape[:3]) != want or tuple(k.shape[:3]) != (want[0], self.shape.kv_heads, want[2]) \
                or k.shape != v.shape or q.shape[3] != k.shape[3]:
            raise ValueError(f"under this plan q must be (B={want[0]}, H={want[1]}, rows={want[2]}, D) and k, v "
                             f"(B, Hkv={self.shape.kv_heads}, rows, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        if "segment_ids" in inputs:
            raise ValueError("under plan=, segment_ids go to sd.plan (the whole sequence's, on every rank), "
                             "not to the call")
        extra = sorted(set(inputs) - {"centroids", "rotations"})
        if extra:
            raise TypeError(f"unexpected keyword arguments under plan=: {', '.join(extra)}")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if self.mode == "gather":
            o, lse = self._gathered(q, k, v, scale, backend, inputs)
        else:   # one custom op (ops.py): torch.compile sees one node, collectives inside
            o, lse, *_ = ops.context_parallel(q, k, v, self.key, scale, backend)
        return (o, lse) if return_lse else o

    def _gathered(self, q, k, v, scale, backend, inputs):
        """Content patterns: every rank's K/V fetched whole, then the ordinary call on this rank's
        query rows (a contiguous run: q_offset = its first position)."""
        k_all, v_all = ops.context_parallel_gather(k, v, self.key)
        given = dict(inputs)
        if self.segment_ids is not None:
            given["segment_ids"] = self.segment_ids.to(q.device)
        return self.kern(q, k_all, v_all, scale=scale, q_offset=self._first_row, return_lse=True, backend=backend,
                         **given)

    def _settle(self, route: R.Route) -> None:
        """The route, and the plain numbers a call reads (an int attribute is all torch.compile
        traces of the plan: no numpy under dynamo)."""
        self.route = route
        rows = self.rows()
        self._row_count, self._first_row = len(rows), int(rows[0])

    @cached_property
    def key_order(self) -> torch.Tensor:
        """The key buffer's rows sorted by position (gather mode: the whole sequence in order)."""
        return torch.argsort(self.key_rows())

    def received_rows(self) -> tuple[int, int]:
        """The K/V rows this rank fetches and the query rows it receives."""
        return len(self._arrivals[0]), len(self._arrivals[1])


def plan(kern, n: int, group=None, **options) -> Plan:
    """The context-parallel plan of pattern `kern` over n positions and the process group (default:
    the world): see Plan. Every rank calls it with the same arguments."""
    return Plan(kern, n, group, **options)
