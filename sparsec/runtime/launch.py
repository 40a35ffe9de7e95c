"""Launching generated kernels: table values, split-K decoding, the forward and backward of one call."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..codegen import Generated, TileConfig
from ..ir import expr as E
from ..ir.limits import saturate
from ..ir.pattern import Pattern, value
from ..ir.combinators import Blocks
from ..ir.tiles import TableSpace
from ..ir.where import read_tables
from ..layout import DeviceLayout
from .call import Call
from .loader import interpreting

# How many positions one coordinate of a node's children spans, by node type (default 1).
COORDINATE_SCALE = {Blocks: lambda p: value(p.size)}


def walk_scaled(p: Pattern, scale: int = 1):
    """(node, block scale) in pre-order, the numbering the lowering gives table parameters."""
    yield p, scale
    inner = scale * COORDINATE_SCALE.get(type(p), lambda p: 1)(p)
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
        out.append(_argument(t, found[t.node][t.key], call.device))
    return out


def _argument(t, x, device):
    """A table's kernel argument: a contiguous tensor of its dtype (never empty), or an int."""
    if not t.pointer:
        return int(x)
    dtype = getattr(torch, t.dtype)
    x = torch.as_tensor(x).to(device=device, dtype=dtype).contiguous()
    return x if x.numel() else torch.full((1,), -1, dtype=dtype, device=device)


def score_values(gen: Generated, score, device) -> list:
    """The values of the with expression's tables (codegen/score.py), from the call's inputs:
    per call, since inputs change with every call."""
    found = {}
    for decl in E.reads(score.expr):
        found.update({f"{decl.name}{key}": x for key, x in read_tables(decl, score.inputs[decl.name]).items()})
    return [_argument(t, found[t.key], device) for t in gen.score_tables]


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
    config: TileConfig
    interpret: bool
    order: tuple[torch.Tensor, torch.Tensor] | None = None
    score: object = None        # the call's TorchScore (runtime/scores.py) when the pattern has `with`
    score_tables: list = ()     # its tables' values (score_values), in the kernels' order
    grads: tuple = ()           # the float inputs the kernels take gradient pointers for (Generated.grads)
    lengths: tuple | None = None   # (n_q, n_k) the pattern is specialized for, when Q and K hold fewer rows
    # (context parallelism's compact buffers, read through orders); None: the call's own lengths

    def _lengths(self) -> tuple[int, int]:
        return (self.call.n_q, self.call.n_k) if self.lengths is None else self.lengths

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
                    SCORED=self.score is not None,
                    num_warps=self.config.num_warps, num_stages=self.config.num_stages)

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
        with interpreting(self.interpret):
            self.module.sparse_attention_forward[(tq * splits * c.batch * c.heads,)](
                q, k, v, o_part, lse_part, *q.stride(), *k.stride(), *v.stride(), *o_part.stride()[-4:],
                o_part.stride(0) if splits > 1 else 0, lse_part.stride(0) if splits > 1 else 0,
                c.n_q, c.n_k, *self._lengths(), c.q_offset, c.heads, c.heads // c.kv_heads, c.scale,
                c.scale * math.log2(math.e), splits,
                *lay.full, *lay.partial, lb, lh, tq, lay.schedule(c.batch, c.heads), *self._orders(q), *self.tables,
                *self.score_tables, EVEN_N=c.n_k % lay.block_n == 0, **self._common(q))
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
        grads = self._input_grads(q)
        scalars = (c.n_q, c.n_k, *self._lengths(), c.q_offset, c.heads, c.heads // c.kv_heads, c.scale,
                   c.scale * math.log2(math.e))
        with interpreting(self.interpret):
            self.module.sparse_attention_backward_delta[(tq, c.batch * c.heads)](
                o, do, dlse if dlse is not None else delta, delta, *o.stride(), *do.stride(), c.n_q, c.heads,
                HEAD_DIM=common["HEAD_DIM"], HEAD_DIM_PAD=common["HEAD_DIM_PAD"], BLOCK_M=lay.block_m,
                HAS_DLSE=dlse is not None)
            self.module.sparse_attention_backward_dq[(tq * c.batch * c.heads,)](
                q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                *scalars, *lay.full, *lay.partial, lb, lh, tq, lay.schedule(c.batch, c.heads), *self._orders(q),
                *self.tables, *self.score_tables,
                EVEN_N=c.n_k % lay.block_n == 0, **common)
            self.module.sparse_attention_backward_dkdv[(tk * c.batch * c.kv_heads,)](
                q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                *dk.stride(), *dv.stride(), *scalars, *lay.full_t, *lay.partial_t, lb, lh, tk,
                lay.schedule(c.batch, c.heads, c.heads // c.kv_heads), *self._orders(q),
                *self.tables, *self.score_tables, *grads, INPUT_GRADS=bool(self.score is not None and self.score.grads),
                **common)
        return dq, dk, dv

    def _input_grads(self, q) -> list:
        """The gradient buffers the dK/dV kernel adds into by atomics (fp32, each input's shape):
        the TorchScore's for the inputs that asked, scratch for the rest, any pointer when none did."""
        if self.score is None or not self.score.grads:
            return [q] * len(self.grads)
        return [self.score.grads[name] if name in self.score.grads else
                torch.zeros(self.score.inputs[name].shape, dtype=torch.float32, device=q.device) for name in self.grads]
