"""A context-parallel call as torch.library custom ops, as runtime/ops.py makes an ordinary call: opaque to dynamo, collectives inside.

The plan travels as a registry key (a string: ranks make their plans in the same order, so a
plan has the same key on every rank). `sparsec::context_parallel` returns this rank's O and LSE
and, for its backward, the fetched key and value rows and the received query rows: only tensors may
cross from a forward op to its backward under torch.compile, and fetching them again would
repeat the forward's collectives. Gather mode (content patterns) fetches K/V whole with
`sparsec::context_parallel_gather`, then makes the ordinary call.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from .attention import attend, attend_backward, gather, gather_backward

_PLANS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_COUNT = itertools.count()


def register(plan) -> str:
    """The key the ops know `plan` by: its pattern's key and its place among this process's plans."""
    key = f"{plan.kern.key}-plan{next(_COUNT)}"
    _PLANS[key] = plan
    return key


def registered(key: str):
    plan = _PLANS.get(key)
    if plan is None:
        raise ValueError(f"no sparsec.distributed plan is registered as {key!r} in this process: make it with "
                         f"sd.plan before calling a graph that uses it")
    return plan


@torch.library.custom_op("sparsec::context_parallel", mutates_args=())
def context_parallel(q: Tensor, k: Tensor, v: Tensor, plan: str, scale: float, backend: Optional[str]
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(O, LSE) of this rank's rows, then the fetched key and value rows and the received query
    rows, which the backward reads."""
    p = registered(plan)
    return tuple(x.contiguous() for x in attend(p.exchanges, *p._bound(q, k, v, scale, backend), p.group, p.tally,
                                                 q, k, v))


@context_parallel.register_fake
def _context_parallel_fake(q, k, v, plan, scale, backend):
    p = registered(plan)
    B, H, n_r, D = q.shape
    fetched, received = p.received_rows()
    return (q.new_empty(q.shape), q.new_empty((B, H, n_r), dtype=torch.float32),
            k.new_empty((B, k.shape[1], fetched, D)), v.new_empty((B, v.shape[1], fetched, D)),
            q.new_empty((B, H, received, D)))


@torch.library.custom_op("sparsec::context_parallel_backward", mutates_args=())
def context_parallel_backward(q: Tensor, k: Tensor, v: Tensor, k_far: Tensor, v_far: Tensor, q_in: Tensor, o: Tensor,
                              lse: Tensor, do: Tensor, dlse: Tensor, plan: str, scale: float,
                              backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    p = registered(plan)
    out = attend_backward(p.exchanges, *p._bound(q, k, v, scale, backend), p.group, p.tally, q, k, v, k_far, v_far,
                          q_in, o, lse, do, dlse)
    return tuple(x.contiguous() for x in out)


@context_parallel_backward.register_fake
def _context_parallel_backward_fake(q, k, v, k_far, v_far, q_in, o, lse, do, dlse, plan, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, plan, scale, backend = inputs
    o, lse, k_far, v_far, q_in = output
    ctx.save_for_backward(q, k, v, k_far, v_far, q_in, o, lse)
    ctx.plan, ctx.scale, ctx.backend = plan, scale, backend
    ctx.set_materialize_grads(False)   # an unused LSE (or O) arrives as None


def _backward(ctx, do, dlse, *buffers):
    q, k, v, k_far, v_far, q_in, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
    dq, dk, dv = context_parallel_backward(q, k, v, k_far, v_far, q_in, o, lse, do.contiguous(), dlse.contiguous(),
                                           ctx.plan, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


context_parallel.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("sparsec::context_parallel_gather", mutates_args=())
def context_parallel_gather(k: Tensor, v: Tensor, plan: str) -> tuple[Tensor, Tensor]:
    """Every rank's K and V rows, in position order (gather mode)."""
    p = registered(plan)
    return tuple(x.contiguous() for x in gather(p.exchanges, p.key_order, p.group, p.tally, k, v))


@context_parallel_gather.register_fake
def _gather_fake(k, v, plan):
    B, Hkv, _, D = k.shape
    n = registered(plan).n
    return k.new_empty((B, Hkv, n, D)), v.new_empty((B, Hkv, n, D))


@torch.library.custom_op("sparsec::context_parallel_gather_backward", mutates_args=())
def context_parallel_gather_backward(dk: Tensor, dv: Tensor, plan: str, n_local: int) -> tuple[Tensor, Tensor]:
    p = registered(plan)
    return tuple(x.contiguous() for x in gather_backward(p.exchanges, p.key_order, p.group, p.tally, n_local,
                                                         dk, dv))


@context_parallel_gather_backward.register_fake
def _gather_backward_fake(dk, dv, plan, n_local):
    B, Hkv, _, D = dk.shape
    return dk.new_empty((B, Hkv, n_local, D)), dv.new_empty((B, Hkv, n_local, D))


def _gather_setup(ctx, inputs, output):
    k, _, plan = inputs
    ctx.plan, ctx.n_local = plan, k.shape[2]


def _gather_grad(ctx, dk, dv):
    dk, dv = context_parallel_gather_backward(dk.contiguous(), dv.contiguous(), ctx.plan, ctx.n_local)
    return dk, dv, None


context_parallel_gather.register_autograd(_gather_grad, setup_context=_gather_setup)
