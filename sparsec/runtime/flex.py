"""FlexAttention from sparsec: a pattern's BlockMask built from its layout, with the lowered mask_mod (mask_mods.py) or its tiles' bits, and backend='flex'."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..ir.tiles import FIXED_INPUTS, TableSpace
from ..layout import BlockLayout
from . import cpu
from .mask_mods import mask_mod, unlowered

FULL_TILE, EMPTY_TILE = -2, -1


@dataclass(frozen=True)
class TileMasks:
    """A pattern at one tile size, as FlexAttention needs it: the block layout, and for PARTIAL
    tiles their exact masks: tile_id per (b, h, query tile, key tile) is the PARTIAL tile's index
    into bits (tiles, block, block), or FULL_TILE, or EMPTY_TILE. Memory grows with the PARTIAL
    tiles, never with n_q x n_k."""
    layout: BlockLayout
    tile_id: np.ndarray
    bits: np.ndarray

    def pairs(self, batch: int, heads: int) -> int:
        """Allowed (query, key) pairs over all batch rows and heads."""
        lay, (lb, lh, _, _) = self.layout, self.layout.shape
        full = 0
        for b in range(lb):
            for h in range(lh):
                for t in range(lay.shape[2]):
                    rows = min(lay.block_m, lay.n_q - t * lay.block_m)
                    cols = lay.full.row(b, h, t)
                    full += rows * int(np.minimum(lay.block_n, lay.n_k - cols * lay.block_n).sum())
        partial = int(self.bits.sum())
        return (full + partial) * (batch // lb) * (heads // lh)


def tile_masks(body, lay: BlockLayout, space: TableSpace, order=None) -> TileMasks:
    """The PARTIAL tiles' masks of layout `lay`, from the specialized body's reference rule
    evaluated on those tiles only (memory: block^2 bits per PARTIAL tile). order: for a share in
    a sorted order, (q rows, k rows) numpy (B, H, n), the original row of each sorted row."""
    block = lay.block_m
    lb, lh, tq, tk = lay.shape
    tile_id = np.full((lb, lh, tq, tk), EMPTY_TILE, np.int32)
    bits, count = [], 0
    for b in range(lb):
        for h in range(lh):
            rows_of = None if order is None else (order[0][b, h], order[1][b, h])
            for t in range(tq):
                tile_id[b, h, t, lay.full.row(b, h, t)] = FULL_TILE
                cols = lay.partial.row(b, h, t)
                if not len(cols):
                    continue
                keep = cpu.row_mask(body, lay, space, h, space.per_head(b, h), t, cols, rows_of)
                bits.append(keep.reshape(block, len(cols), block).transpose(1, 0, 2))
                tile_id[b, h, t, cols] = np.arange(count, count + len(cols))
                count += len(cols)
    return TileMasks(lay, tile_id, np.concatenate(bits) if bits else np.zeros((1, block, block), bool))


def bits_mask_mod(masks: TileMasks, device):
    """A mask_mod for every pattern, the pattern everywhere Flex calls it (PARTIAL tiles only): a
    lookup of the tile, then of its bits."""
    lb, lh, _, _ = masks.layout.shape
    block = masks.layout.block_m
    tile_id = torch.as_tensor(masks.tile_id, device=device)
    bits = torch.as_tensor(masks.bits, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        t = tile_id[b % lb, h % lh, q_idx // block, kv_idx // block]
        return (t == FULL_TILE) | ((t >= 0) & bits[t.clamp(min=0), q_idx % block, kv_idx % block])
    return mask_mod


def block_mask(lay: BlockLayout, batch: int, heads: int, device, mask_mod):
    """A FlexAttention BlockMask with the layout's FULL / PARTIAL tiles and this mask_mod (the
    lowered one, or bits_mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask
    lb, lh, tq, tk = lay.shape

    def lists(tl):
        counts = torch.as_tensor(tl.counts(), dtype=torch.int32)
        indices = torch.zeros((lb, lh, tq, tk), dtype=torch.int32)
        for r in range(lb * lh * tq):
            row = tl.indices[tl.ptr[r]: tl.ptr[r + 1]]
            indices.view(-1, tk)[r, :len(row)] = torch.as_tensor(row, dtype=torch.int32)
        expand = lambda x: x.expand(batch, heads, *x.shape[2:]).contiguous().to(device)
        return expand(counts), expand(indices)

    partial, full = lists(lay.partial), lists(lay.full)
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=lay.block_m, mask_mod=mask_mod,
                                    seq_lengths=(lay.n_q, lay.n_k))


def share_block_mask(body, lay: BlockLayout, space: TableSpace, order, batch: int, heads: int, device):
    """The BlockMask of one share's layout: its mask_mod the torch lowering where the share is
    in positional order and every node has a rule, the PARTIAL tiles' bits otherwise."""
    if order is None and unlowered(body) is None:
        seg = space.inputs.get("segment_ids")
        inputs = {} if seg is None else {"segment_ids": torch.as_tensor(seg).long().to(device)}
        inputs.update({name: torch.as_tensor(x).to(device) for name, x in space.inputs.items()
                       if name not in FIXED_INPUTS and x is not None})   # declared inputs, as given
        mod = mask_mod(body, space.n_q, space.n_k, space.q_offset, heads, inputs, device)
    else:
        mod = bits_mask_mod(tile_masks(body, lay, space, order), device)
    return block_mask(lay, batch, heads, device, mod)


def compiled_flex():
    """torch.compile(flex_attention), made once per process (Flex's speed needs the compile).
    Every new shape and block mask recompiles; past dynamo's default limit (8) flex_attention
    would fall back to its slow eager path for the rest of the process, so the limits are raised."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        limits = torch._dynamo.config
        limits.recompile_limit = max(limits.recompile_limit, 128)
        limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 1024)
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


_COMPILED = None


def gives_lse(device) -> bool:
    """Whether compiled Flex returns the LSE (and has a backward) on this device: not on CPU
    (torch 2.13's CPU Flex kernels are inference-only)."""
    return device.type != "cpu"


def check_cpu_call(device, needs_lse: bool) -> None:
    """backend='flex' on CPU runs what torch.compile's CPU Flex kernels support (torch 2.13):
    inference without the LSE; a call that needs it is refused, not answered approximately."""
    if not gives_lse(device) and needs_lse:
        raise ValueError("backend='flex' on CPU runs compiled FlexAttention, which on CPU is forward-only and "
                         "returns no LSE: calls with return_lse=True, a backward, or patterns that run as several "
                         "shares need backend='cpu' (the same attention) or CUDA tensors")


@contextmanager
def autograd_inside_op():
    """Autograd recording inside a torch.library custom op's implementation, which runs below
    the autograd dispatch keys (`torch.enable_grad()` alone does not bring them back: a result
    built there has requires_grad False). Flex's backward is its autograd, and running it in the
    op keeps a training step one opaque node for torch.compile; the keys are restored on exit.
    Private API (torch._C): test_scores.py's Flex backward test fails without it."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


@dataclass(frozen=True)
class FlexAttention:
    """One share of one call run by compiled FlexAttention under the share's BlockMask. On CUDA
    the LSE is Flex's and the backward is Flex's own (the forward recomputed under autograd); on
    CPU, Flex's compiled kernels are inference-only, so the LSE is NaN and never read
    (check_cpu_call refuses the calls that would read it). score: the call's TorchScore, or
    None; score_mod_of: its inputs -> Flex's score_mod over them (scores.score_mod)."""
    mask: object
    scale: float
    score: object = None
    score_mod_of: Callable | None = None

    def _run(self, q, k, v, lse: bool, inputs: dict | None = None):
        mod = None if self.score_mod_of is None else self.score_mod_of(self.score.inputs if inputs is None else inputs)
        return compiled_flex()(q, k, v, score_mod=mod, block_mask=self.mask, scale=self.scale,
                               enable_gqa=q.shape[1] != k.shape[1], return_lse=lse)

    def forward(self, q, k, v):
        if not gives_lse(q.device):
            return self._run(q, k, v, False), torch.full(q.shape[:3], float("nan"))
        o, lse = self._run(q, k, v, True)
        return o, lse.float()

    def backward(self, q, k, v, o, lse, do, dlse):
        """dQ, dK, dV by Flex's autograd of this share's forward, and the score inputs' gradients
        added into score.grads. o and lse are the whole call's, merged over the shares by LSE
        (O = sum_s w_s O_s, w_s = exp(LSE_s - LSE)), so the share's outputs get the cotangents
        w_s dO and w_s (rowsum(dO (O_s - O)) + dLSE): with one share, w = 1 and O_s = O."""
        wanted = [] if self.score is None else list(self.score.grads)
        with torch.enable_grad(), autograd_inside_op():
            args = [x.detach().requires_grad_() for x in (q, k, v)]
            leaves = {name: self.score.inputs[name].detach().requires_grad_() for name in wanted}
            o_s, lse_s = self._run(*args, True, None if self.score is None else {**self.score.inputs, **leaves})
            w = torch.exp(lse_s.float() - lse.float()).nan_to_num_(0.0)   # rows no share allows: 0
            back = (do.float() * (o_s.float() - o.float())).sum(-1) + (0.0 if dlse is None else dlse.float())
            cotangents = ((w[..., None] * do.float()).to(o_s.dtype), (w * back).to(lse_s.dtype))
            grads = torch.autograd.grad((o_s, lse_s), [*args, *leaves.values()], cotangents, allow_unused=True)
        for name, g in zip(wanted, grads[3:]):
            if g is not None:
                self.score.grads[name] += g.float()
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads[:3]))
