"""Differentiable sparse attention: a torch.autograd.Function around a backend's forward and backward."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class SparseAttentionFunction(torch.autograd.Function):
    """O, LSE = attention(q, k, v) under one call's layout. `runner` is the backend bound to the
    call (runtime.GeneratedAttention or cpu.CpuAttention): it has forward(q, k, v) -> (O, LSE)
    and backward(q, k, v, O, LSE, dO, dLSE) -> (dq, dk, dv). What is saved for the backward is
    q, k, v, O and LSE (the runner holds the layout), never an n x n matrix."""

    @staticmethod
    def forward(ctx, q, k, v, runner):
        o, lse = runner.forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.runner = runner
        ctx.set_materialize_grads(False)  # an unused LSE (or O) arrives as None, not zeros
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv = ctx.runner.backward(q, k, v, o, lse, do, dlse)
        return dq, dk, dv, None


def attend(runner, q, k, v):
    """Through autograd when a gradient is wanted, directly otherwise (no saved state)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return SparseAttentionFunction.apply(q, k, v, runner)
    return runner.forward(q, k, v)
