"""A call's arguments checked into a Call (shapes, dtype, device, inputs) and its backend chosen."""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..codegen import TileConfig
from ..ir.limits import check_lengths
from ..ir.tiles import FIXED_INPUTS


BACKENDS = ("triton", "interpret", "cpu", "flex")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INPUTS = ("segment_ids", "centroids", "rotations")   # the tensors a call takes by keyword


@dataclass(frozen=True)
class DtypeKind:
    """A torch dtype as check_arrays reads a numpy one: its kind letter, printed by its name."""
    kind: str
    name: str

    def __str__(self) -> str:
        return self.name


class TensorFacts:
    """What ir/inputs.check_arrays reads of a declared input, without copying it off its device:
    its shape, its dtype's kind, and for an int tensor its least and greatest value (one small
    transfer, made when first asked for)."""

    def __init__(self, x: torch.Tensor):
        self.tensor, self.shape, self.ndim, self.size = x, tuple(x.shape), x.dim(), x.numel()
        kind = "b" if x.dtype == torch.bool else "f" if x.is_floating_point() else "c" if x.is_complex() else "i"
        self.dtype = DtypeKind(kind, str(x.dtype).removeprefix("torch."))   # the kind is what is checked

    def min(self):
        return self.extremes[0]

    def max(self):
        return self.extremes[1]

    @cached_property
    def extremes(self) -> tuple:
        return tuple(torch.stack(torch.aminmax(self.tensor)).tolist())


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
        call."""
        return (self.batch, self.heads, self.kv_heads, self.n_q, self.n_k, self.dim, self.q_offset, self.device)


def check_tensors(q, k, v) -> None:
    """What a call checks before its op (runtime/ops.py): types, ranks, dtypes and devices, which
    torch.compile reads off the tensors' metadata without a guard on any length."""
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


def wants_grad(q, k, v) -> bool:
    """Whether a backward will follow this call (the autotuner keys training tiles apart)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def op_options(scale, q_offset, backend) -> tuple:
    """scale, q_offset and backend checked for type (their values are checked in the op, on real
    lengths) and made what the op's schema takes: a float, an int, a str, or None each."""
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite float, got {scale!r}")
        scale = float(scale)
    if isinstance(q_offset, np.integer):
        q_offset = int(q_offset)
    if q_offset is not None and (isinstance(q_offset, bool) or not isinstance(q_offset, (int, torch.SymInt))):
        raise TypeError(f"q_offset must be an int, got {type(q_offset).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return scale, q_offset, backend


def check_call(name: str, needs: frozenset[str], q, k, v, scale, q_offset, inputs: dict) -> Call:
    check_tensors(q, k, v)
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
    scale, q_offset, _ = op_options(scale, q_offset, None)   # their types, as before the op
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_offset = n_k - n_q if q_offset is None else int(q_offset)
    why = check_lengths(n_q, n_k, q_offset)
    if why:
        raise ValueError(why)
    check_input_names(inputs, INPUTS + tuple(n for n in needs if n not in FIXED_INPUTS))
    call = Call(B, H, Hkv, n_q, n_k, D, q_offset, scale, q.device)
    check_inputs(name, needs, call, inputs)
    return call


def check_input_names(inputs: dict, names: tuple[str, ...] = INPUTS) -> None:
    """names: what this pattern's calls take, INPUTS and its declared inputs."""
    for arg in inputs:
        if arg not in names:
            raise TypeError(f"unexpected keyword argument {arg}=; a call takes scale=, q_offset=, return_lse=, "
                            f"backend= and the inputs {', '.join(names)}")


def check_inputs(name: str, needs: frozenset[str], c: Call, inputs: dict) -> None:
    """The keyword inputs the pattern reads are given, with the shapes it needs; no others."""
    seg = inputs.get("segment_ids")
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
        x = inputs.get(arg)
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
    if backend in ("triton", "interpret") and importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"backend={backend!r} runs the generated Triton kernels, and triton is not installed "
                           f"(pip install triton, Linux only); backend='cpu' needs no triton")
    return backend


def default_config(backend: str, call: Call) -> TileConfig:
    """Tiles when none is given or tuned: 64x64 on a GPU (32 for the largest head dims, to stay
    in shared memory). In the interpreter each program is numpy work, so tiles are 16x16 for the
    tests' short sequences and 64x64 beyond (fewer, larger numpy operations). The CPU path's
    64x64 measured fastest of 32..128 (benchmarks/cpu_forward.py); FlexAttention gets its own
    default, 128x128."""
    if backend == "cpu":
        return TileConfig(64, 64, 1, 1)
    if backend == "flex":   # Flex's own default block size
        return TileConfig(128, 128, 1, 1)
    if backend == "interpret":
        side = 16 if max(call.n_q, call.n_k) <= 256 else 64
        return TileConfig(side, side, 1, 1)
    small = call.dim > 128
    return TileConfig(64, 32 if small else 64, 4, 2 if small else 3)
