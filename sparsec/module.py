"""`SparseSelfAttention`: projections, a compiled pattern and an output projection, as an nn.Module."""
from __future__ import annotations

import os

import torch
from torch import nn

from .compiled import CompiledPattern, compile


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention under a sparse pattern, for (B, n, embed_dim) inputs (batch first).

    pattern: a compiled CompiledPattern, a .sa path or program text (with `pattern_name` and the program's
    params as keyword arguments). num_kv_heads < num_heads gives grouped-query attention (1: MQA).
    The call takes the call inputs (segment_ids=, q_offset=, centroids=, rotations=),
    and for decoding a KV cache: past_kv=(k, v) of shape (B, num_kv_heads, n_past, head_dim) is
    prepended to this step's keys and values; use_cache=True also returns the extended cache."""

    def __init__(self, pattern: CompiledPattern | str | os.PathLike, embed_dim: int, num_heads: int,
                 num_kv_heads: int | None = None, bias: bool = True, pattern_name: str | None = None,
                 device=None, dtype=None, **params):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if isinstance(pattern, CompiledPattern):
            if pattern_name is not None or params:
                raise ValueError("pattern is already compiled: pattern_name= and params apply to a path or source")
            self.kernel = pattern
        else:
            self.kernel = compile(pattern, pattern_name, **params)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        kv_dim = self.head_dim * num_kv_heads
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (f"pattern={self.kernel.ir.body.show()!r}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}")

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, n, _ = x.shape
        return x.view(B, n, heads, self.head_dim).transpose(1, 2)   # (B, heads, n, head_dim), a view

    def forward(self, x: torch.Tensor, segment_ids=None, q_offset: int | None = None,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None, use_cache: bool = False, **runtime):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be a tensor of shape (B, n, embed_dim={self.embed_dim}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if past_kv is not None:
            past_k, past_v = past_kv
            expected = (x.shape[0], self.num_kv_heads, past_k.shape[2], self.head_dim)
            if tuple(past_k.shape) != expected or past_v.shape != past_k.shape:
                raise ValueError(f"past_kv must be two tensors of shape (B, num_kv_heads, n_past, head_dim) = "
                                 f"{expected}, got {tuple(past_k.shape)} and {tuple(past_v.shape)}")
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        if segment_ids is not None:
            runtime["segment_ids"] = segment_ids
        o = self.kernel(q, k, v, q_offset=q_offset, **runtime)
        y = self.out_proj(o.transpose(1, 2).reshape(x.shape))
        return (y, (k, v)) if use_cache else y
