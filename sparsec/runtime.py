"""Calling a compiled pattern: argument checks, backend choice, loading generated modules, layouts and launch."""
from __future__ import annotations

import linecache
import math
import os
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .codegen import Generated, TileConfig
from .ir import expr as E
from .ir.limits import check_lengths, saturate
from .ir.pattern import Blocks, Pattern, value
from .ir.tiles import FULL, PARTIAL, TableSpace
from .layout import BlockLayout, TileLists
from .schedule import heaviest_first, launch_order

BACKENDS = ("triton", "interpret", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RUNTIME_INPUTS = ("segment_ids", "centroids", "rotations")


@contextmanager
def _interpreting(on: bool):
    """triton.jit reads TRITON_INTERPRET when it decorates and when it launches."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_MODULES: dict[tuple[str, bool], object] = {}


class _GeneratedSource:
    """The loader of a generated module: it hands out the text generated in this process, so
    that Triton (which reads a kernel's source through inspect and linecache) and tracebacks see
    exactly what runs, and nothing on disk is ever consulted."""

    def __init__(self, text: str):
        self.text = text

    def get_source(self, name: str) -> str:
        return self.text


def load_kernel(gen: Generated, name: str, interpret: bool):
    """The generated module, executed from gen.source itself (the text codegen returned, never a
    file read back, no bytecode), once per digest and mode. Its functions report the filename
    <sparsec:NAME_DIGEST>, registered in linecache for inspect and tracebacks."""
    key = (gen.digest, interpret)
    if key not in _MODULES:
        module_name = f"sparsec_generated_{gen.digest}_{'interpret' if interpret else 'jit'}"
        filename = f"<sparsec:{name[:40]}_{gen.digest}>"
        module = types.ModuleType(module_name)
        module.__file__, module.__loader__ = filename, _GeneratedSource(gen.source)
        linecache.cache[filename] = (len(gen.source), None, gen.source.splitlines(True), filename)
        code = compile(gen.source, filename, "exec", dont_inherit=True)
        with _interpreting(interpret):
            sys.modules[module_name] = module
            exec(code, module.__dict__)
            if interpret:   # the interpreter reads each function's source on first use: do it now
                from triton.runtime.interpreter import InterpretedFunction
                for fn in list(vars(module).values()):
                    if isinstance(fn, InterpretedFunction):
                        fn.rewrite()
        _MODULES[key] = module
    return _MODULES[key]


# ---- argument checks -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One call's shapes and options, after checking."""
    batch: int
    heads: int
    kv_heads: int
    n_q: int
    n_k: int
    dim: int
    q_offset: int
    scale: float
    device: torch.device

    def shape_key(self) -> tuple:
        """Everything a per-shape cache (plans, tables) may depend on: the call less its scale,
        which the runners take per call. Leaving out kv_heads once made an MHA plan serve a GQA
        call (issue 20)."""
        return (self.batch, self.heads, self.kv_heads, self.n_q, self.n_k, self.dim, self.q_offset, self.device)


def check_call(name: str, needs: frozenset[str], q, k, v, scale, q_offset, runtime: dict) -> Call:
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor of shape (B, H, n, D), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{arg} must have 4 dimensions (B, H, n, D), got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{arg} must be float32, float16 or bfloat16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, n_q, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, Hkv, n_k, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, n_k = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's and v's heads ({Hkv})")
    if not 16 <= D <= 256:
        raise ValueError(f"head dim D must be between 16 and 256, got {D}")
    if n_q == 0 or n_k == 0 or B == 0 or H == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must not be empty")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    if q_offset is None:
        q_offset = n_k - n_q
    if isinstance(q_offset, bool) or not isinstance(q_offset, (int, np.integer)):
        raise TypeError(f"q_offset must be an int, got {type(q_offset).__name__}")
    why = check_lengths(n_q, n_k, int(q_offset))
    if why:
        raise ValueError(why)
    for arg in runtime:
        if arg not in RUNTIME_INPUTS:
            raise TypeError(f"unexpected keyword argument {arg}=; a call takes scale=, q_offset=, return_lse=, "
                            f"backend= and the runtime inputs {', '.join(RUNTIME_INPUTS)}")
    call = Call(B, H, Hkv, n_q, n_k, D, int(q_offset), float(scale), q.device)
    check_runtime(name, needs, call, runtime)
    return call


def check_runtime(name: str, needs: frozenset[str], c: Call, runtime: dict) -> None:
    seg = runtime.get("segment_ids")
    if "segment_ids" in needs:
        if seg is None:
            raise ValueError(f"pattern {name} uses document: pass segment_ids= of shape (B={c.batch}, n_k={c.n_k})")
        if not isinstance(seg, torch.Tensor) or seg.dtype.is_floating_point or seg.dtype == torch.bool \
                or tuple(seg.shape) != (c.batch, c.n_k):
            raise ValueError(f"segment_ids must be an integer tensor of shape (B={c.batch}, n_k={c.n_k}), got "
                             f"{getattr(seg, 'dtype', type(seg).__name__)} {tuple(getattr(seg, 'shape', ()))}")
        if seg.device != c.device:
            raise ValueError(f"segment_ids must be on q's device {c.device}, got {seg.device}")
        if c.q_offset < 0 or c.q_offset + c.n_q > c.n_k:
            raise ValueError(f"document: query positions {c.q_offset}..{c.q_offset + c.n_q - 1} must lie within "
                             f"segment_ids' n_k={c.n_k} (check q_offset)")
    elif seg is not None:
        raise ValueError(f"segment_ids= given, but pattern {name} has no document part")
    for arg, shape in (("centroids", f"(H={c.heads}, clusters, D={c.dim})"),
                       ("rotations", f"(rounds, D={c.dim}, buckets/2)")):
        x = runtime.get(arg)
        if x is None:
            continue
        if "q" not in needs:
            raise ValueError(f"{arg}= given, but pattern {name} has no content-based part")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-2 if arg == "rotations" else -1] != c.dim \
                or (arg == "centroids" and x.shape[0] != c.heads):
            raise ValueError(f"{arg} must be a tensor of shape {shape}, got {tuple(getattr(x, 'shape', ()))}")


def choose_backend(backend: str | None, device: torch.device) -> str:
    backend = backend or os.environ.get("SPARSEC_BACKEND") or ("triton" if device.type == "cuda" else "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton" and device.type != "cuda":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device}; on CPU use 'cpu' or 'interpret'")
    if backend in ("cpu", "interpret") and device.type != "cpu":
        raise ValueError(f"backend={backend!r} needs CPU tensors, got {device}")
    return backend


def default_config(backend: str, call: Call) -> TileConfig:
    """Tiles before the autotuner exists: 64x64 on a GPU (32 for the largest head dims, to stay
    in shared memory). In the interpreter each program is numpy work, so tiles are 16x16 for the
    tests' short sequences and 64x64 beyond (fewer, larger numpy operations). The CPU path's
    64x64 measured fastest of 32..128 (benchmarks/cpu_forward.py)."""
    if backend == "cpu":
        return TileConfig(64, 64, 1, 1)
    if backend == "interpret":
        side = 16 if max(call.n_q, call.n_k) <= 256 else 64
        return TileConfig(side, side, 1, 1)
    small = call.dim > 128
    return TileConfig(64, 32 if small else 64, 4, 2 if small else 3)


# ---- tables and layouts ------------------------------------------------------------------------------

def walk_scaled(p: Pattern, scale: int = 1):
    """(node, block scale) in pre-order, the numbering the lowering gives table parameters."""
    yield p, scale
    inner = scale * value(p.size) if isinstance(p, Blocks) else scale
    for c in p.children():
        yield from walk_scaled(c, inner)


def table_values(gen: Generated, body: Pattern, call: Call, inputs: dict) -> list:
    """The values of the kernel's table parameters, in its signature's order, on the device; an
    argument expression of n is evaluated here, exactly, in its node's coordinates (lengths
    divided by the enclosing blocks' sizes), and saturated (limits.py)."""
    wanted = {t.node for t in gen.tables}
    found: dict[int, dict] = {}
    scales: dict[int, int] = {}
    for index, (node, scale) in enumerate(walk_scaled(body)):
        if index in wanted:
            scales[index] = scale
            if any(t.node == index and t.expr is None for t in gen.tables):
                found[index] = node.tables(TableSpace(call.n_q, call.n_k, call.q_offset, call.heads, call.batch,
                                                      scale, inputs))
    out = []
    for t in gen.tables:
        if t.expr is not None:
            scale = scales[t.node]
            n_q, n_k = -(-call.n_q // scale), -(-call.n_k // scale)
            out.append(saturate(E.integer(t.expr, {"n": n_k, "n_k": n_k, "n_q": n_q})))
            continue
        x = found[t.node][t.key]
        if t.pointer:
            dtype = getattr(torch, t.dtype)
            x = torch.as_tensor(x).to(device=call.device, dtype=dtype).contiguous()
            out.append(x if x.numel() else torch.full((1,), -1, dtype=dtype, device=call.device))
        else:
            out.append(int(x))
    return out


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


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(call: Call, lay: DeviceLayout, interpret: bool) -> int:
    """Programs per query tile in the forward: 1, unless (decoding) the (query tile, batch x head)
    grid is too small to fill the device, then enough to give each SM about two programs, at most
    16 and never more than the longest row has key tiles. The interpreter pretends to have 4 SMs
    so that the tests' small shapes take the split path too."""
    programs = lay.shape[2] * call.batch * call.heads
    target = 2 * (4 if interpret else _sm_count(call.device))
    if programs >= target:
        return 1
    return max(1, min(16, -(-target // programs), lay.longest_row))


@dataclass(frozen=True)
class GeneratedAttention:
    """The generated module bound to one call: its layout on the device and its table values.
    order: for a share run in a content-sorted order, the original positions of its query rows
    (B, H, n_q) and key rows (B, H, n_k), int32; None for the positional order."""
    module: object
    lay: DeviceLayout
    tables: list
    call: Call
    interpret: bool
    order: tuple[torch.Tensor, torch.Tensor] | None = None

    def _orders(self, q) -> tuple:
        if self.order is None:  # never read (PERMUTED is False): any pointer will do
            return q, q
        return self.order

    def _common(self, q):
        c = self.call
        precision = "ieee" if self.interpret or (
            q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32) else "tf32"
        return dict(HEAD_DIM=c.dim, HEAD_DIM_PAD=max(16, 1 << (c.dim - 1).bit_length()),
                    BLOCK_M=self.lay.block_m, BLOCK_N=self.lay.block_n, DOT_PRECISION=precision,
                    DOT_IN_FP32=self.interpret and q.dtype == torch.bfloat16, PERMUTED=self.order is not None,
                    num_warps=self.module.CONFIG["num_warps"], num_stages=self.module.CONFIG["num_stages"])

    def _empty(self, shape, dtype, device):
        # the interpreter (the tests' backend) starts from NaN, so an entry no program writes shows
        if self.interpret:
            return torch.full(shape, float("nan"), dtype=dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    def forward(self, q, k, v):
        """O and LSE: one program per (batch x head, query tile, split), launched heaviest first
        (schedule.py); splits merged by LSE."""
        c, lay = self.call, self.lay
        lb, lh, tq, _ = lay.shape
        splits = decode_splits(c, lay, self.interpret)
        if splits == 1:
            o, lse = self._empty(q.shape, q.dtype, q.device), self._empty((c.batch, c.heads, c.n_q), torch.float32, q.device)
            o_part, lse_part = o, lse
        else:
            o_part = self._empty((splits, *q.shape), torch.float32, q.device)
            lse_part = self._empty((splits, c.batch, c.heads, c.n_q), torch.float32, q.device)
        with _interpreting(self.interpret):
            self.module.sparse_attention_forward[(tq * splits * c.batch * c.heads,)](
                q, k, v, o_part, lse_part, *q.stride(), *k.stride(), *v.stride(), *o_part.stride()[-4:],
                o_part.stride(0) if splits > 1 else 0, lse_part.stride(0) if splits > 1 else 0,
                c.n_q, c.n_k, c.q_offset, c.heads, c.heads // c.kv_heads, c.scale * math.log2(math.e), splits,
                *lay.full, *lay.partial, lb, lh, tq, lay.schedule(c.batch, c.heads), *self._orders(q), *self.tables,
                EVEN_N=c.n_k % lay.block_n == 0, **self._common(q))
        if splits == 1:
            return o, lse
        # merge the splits: LSE = logsumexp over splits, O = sum of exp(LSE_s - LSE) O_s
        lse = torch.logsumexp(lse_part, 0)
        weight = torch.exp(lse_part - lse).nan_to_num_(0.0)   # rows with no key: -inf - -inf
        o = (weight.unsqueeze(-1) * o_part).sum(0).to(q.dtype)
        return o, lse

    def backward(self, q, k, v, o, lse, do, dlse):
        """dQ, dK, dV: delta per query row, then dQ per query tile and dK/dV per key tile."""
        c, lay = self.call, self.lay
        lb, lh, tq, tk = lay.shape
        common = self._common(q)
        do = do.contiguous() if do.stride(-1) != 1 else do
        delta = self._empty((c.batch, c.heads, c.n_q), torch.float32, q.device)
        dq = self._empty(q.shape, q.dtype, q.device)
        dk, dv = self._empty(k.shape, k.dtype, k.device), self._empty(v.shape, v.dtype, v.device)
        scalars = (c.n_q, c.n_k, c.q_offset, c.heads, c.heads // c.kv_heads, c.scale, c.scale * math.log2(math.e))
        with _interpreting(self.interpret):
            self.module.sparse_attention_backward_delta[(tq, c.batch * c.heads)](
                o, do, dlse if dlse is not None else delta, delta, *o.stride(), *do.stride(), c.n_q, c.heads,
                HEAD_DIM=common["HEAD_DIM"], HEAD_DIM_PAD=common["HEAD_DIM_PAD"], BLOCK_M=lay.block_m,
                HAS_DLSE=dlse is not None)
            self.module.sparse_attention_backward_dq[(tq * c.batch * c.heads,)](
                q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                *scalars, *lay.full, *lay.partial, lb, lh, tq, lay.schedule(c.batch, c.heads), *self._orders(q),
                *self.tables,
                EVEN_N=c.n_k % lay.block_n == 0, **common)
            self.module.sparse_attention_backward_dkdv[(tk * c.batch * c.kv_heads,)](
                q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                *dk.stride(), *dv.stride(), *scalars, *lay.full_t, *lay.partial_t, lb, lh, tk,
                lay.schedule(c.batch, c.heads, c.heads // c.kv_heads), *self._orders(q),
                *self.tables, **common)
        return dq, dk, dv
