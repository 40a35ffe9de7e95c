"""Calling a compiled pattern: argument checks, backend choice, the source cache, layouts and launch."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .codegen import Generated, TileConfig
from .ir.pattern import Blocks, Pattern, value
from .ir.tiles import TableSpace
from .layout import BlockLayout

BACKENDS = ("triton", "interpret", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RUNTIME_INPUTS = ("segment_ids", "centroids", "rotations")


def cache_dir() -> Path:
    """Where generated sources live: $SPARSEC_CACHE_DIR, else the user cache dir."""
    if os.environ.get("SPARSEC_CACHE_DIR"):
        return Path(os.environ["SPARSEC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsec"


def write_source(gen: Generated, name: str) -> Path:
    """The source, written once under its content hash; atomically, so concurrent processes
    never import half a file."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{gen.digest}.py"
    if not path.exists() or path.read_text() != gen.source:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(gen.source)
        os.replace(tmp, path)
    return path


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


def load_kernel(gen: Generated, name: str, interpret: bool):
    """Import the generated module from its file (Triton reads the kernel's source from there)."""
    key = (gen.digest, interpret)
    if key not in _MODULES:
        path = write_source(gen, name)
        module_name = f"sparsec_generated_{gen.digest}_{'interpret' if interpret else 'jit'}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        with _interpreting(interpret):
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
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
    if not -(1 << 30) <= q_offset <= (1 << 30):
        raise ValueError(f"q_offset must be within +-2^30, got {q_offset}")
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
    """The values of the kernel's table parameters, in its signature's order, on the device."""
    wanted = {t.node for t in gen.tables}
    found: dict[int, dict] = {}
    for index, (node, scale) in enumerate(walk_scaled(body)):
        if index in wanted:
            found[index] = node.tables(TableSpace(call.n_q, call.n_k, call.q_offset, call.heads, call.batch,
                                                  scale, inputs))
    out = []
    for t in gen.tables:
        x = found[t.node][t.key]
        if t.pointer:
            x = torch.as_tensor(x).to(device=call.device, dtype=torch.int32).contiguous()
            out.append(x if x.numel() else torch.full((1,), -1, dtype=torch.int32, device=call.device))
        else:
            out.append(int(x))
    return out


@dataclass(frozen=True)
class DeviceLayout:
    """A BlockLayout's FULL and PARTIAL lists as int32 tensors on the kernel's device."""
    layout: BlockLayout
    full_ptr: torch.Tensor
    full_idx: torch.Tensor
    partial_ptr: torch.Tensor
    partial_idx: torch.Tensor

    @staticmethod
    def of(layout: BlockLayout, device: torch.device) -> "DeviceLayout":
        def tensor(x):
            if len(x) and int(x.max()) >= 1 << 31:
                raise ValueError("the layout has more than 2^31 tiles; use larger tiles")
            x = torch.as_tensor(np.asarray(x, np.int32), device=device)
            return x if x.numel() else torch.zeros(1, dtype=torch.int32, device=device)
        return DeviceLayout(layout, tensor(layout.full.ptr), tensor(layout.full.indices),
                            tensor(layout.partial.ptr), tensor(layout.partial.indices))


def launch(module, lay: DeviceLayout, tables: list, call: Call, q, k, v, interpret: bool):
    """Run the generated kernel: one program per (query tile, batch x head)."""
    # the interpreter (the tests' backend) starts from NaN, so a row the kernel never writes shows
    make = (lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype)) if interpret else \
        (lambda shape, dtype: torch.empty(shape, dtype=dtype, device=q.device))
    o, lse = make(q.shape, q.dtype), make((call.batch, call.heads, call.n_q), torch.float32)
    layout = lay.layout
    lb, lh, tq, _ = layout.shape
    precision = "ieee" if interpret or (q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32) \
        else "tf32"
    grid = (tq, call.batch * call.heads)
    with _interpreting(interpret):
        module.sparse_attention_forward[grid](
            q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            call.n_q, call.n_k, call.q_offset, call.heads, call.heads // call.kv_heads,
            call.scale * math.log2(math.e),
            lay.full_ptr, lay.full_idx, lay.partial_ptr, lay.partial_idx, lb, lh, tq, *tables,
            HEAD_DIM=call.dim, HEAD_DIM_PAD=max(16, 1 << (call.dim - 1).bit_length()),
            BLOCK_M=layout.block_m, BLOCK_N=layout.block_n, EVEN_N=call.n_k % layout.block_n == 0,
            DOT_PRECISION=precision, DOT_IN_FP32=interpret and q.dtype == torch.bfloat16,
            num_warps=module.CONFIG["num_warps"], num_stages=module.CONFIG["num_stages"])
    return o, lse
