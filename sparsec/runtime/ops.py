"""A call as torch.library custom ops, torch.ops.sparsec.attention and its backward: opaque to dynamo, so models compile whole.

Everything data-dependent (layouts of documents and content patterns, sorting by bucket, top-k
selection, split-K decisions, autotuning) happens inside the ops, on real tensors; under
torch.compile the graph holds one node per call, and its fake implementation (the output
shapes from the input shapes alone) is all dynamo and AOT autograd see. The pattern travels as
a registry key (a string: hashable, the same in every process for the same pattern), the call's
inputs (segment_ids, centroids, rotations, then the pattern's declared inputs) as a list of optional
tensors in that order (`CompiledPattern.input_names`).

The backward op recomputes what the forward bound (cached layouts for static patterns; content
ids and per-call layouts again for the others) rather than keeping it between the two ops:
nothing but tensors may cross from a forward op to its backward under torch.compile."""
from __future__ import annotations

import hashlib
import weakref
from typing import Optional

import torch
from torch import Tensor

from .call import INPUTS, check_input_names

# Registry key -> the living patterns compiled to that key (any of them serves: same IR, same tiles).
_PATTERNS: dict[str, weakref.WeakSet] = {}


def register(pattern, identity: str, name: str) -> str:
    """The key the ops know `pattern` by: its name and a digest of `identity` (everything its calls
    depend on), so that one pattern compiled in two processes has one key (the FX graph cache
    and torch.compile's guards see the same constant)."""
    key = f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:20]}"
    _PATTERNS.setdefault(key, weakref.WeakSet()).add(pattern)
    return key


def registered(key: str):
    for pattern in _PATTERNS.get(key, ()):
        return pattern
    raise ValueError(f"no sparsec pattern is registered as {key!r} in this process: sparsec.compile it "
                     f"before calling a graph that uses it")


def input_list(inputs: dict, names: tuple[str, ...] = INPUTS) -> list:
    """A call's keyword inputs as the ops take them: in `names` order (INPUTS, then the
    pattern's declared inputs), None where not given."""
    check_input_names(inputs, names)
    for name, x in inputs.items():
        if x is not None and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return [inputs.get(name) for name in names]


def score_input_list(pattern: str, inputs: dict, names: tuple[str, ...]) -> list:
    """The float inputs a score expression reads, in `names` order: all of them must be given."""
    for name in names:
        if inputs.get(name) is None:
            raise ValueError(f"pattern {pattern} reads the input {name}: pass {name}= (a float tensor)")
    return [inputs[name] for name in names]


def input_dict(given, names: tuple[str, ...]) -> dict:
    return {name: x for name, x in zip(names, given) if x is not None}


@torch.library.custom_op("sparsec::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, inputs: list[Optional[Tensor]], score_inputs: list[Tensor],
              pattern: str, scale: Optional[float], q_offset: Optional[int], backend: Optional[str],
              training: bool, return_lse: bool) -> tuple[Tensor, Tensor]:
    """(O, LSE) of one call: O of q's shape and dtype, LSE (B, Hq, n_q) float32, both contiguous
    (what the fake says: strides included). training: whether a backward will follow (the
    autotuner keys forward-only and training tiles apart); return_lse: whether the caller reads
    the LSE (backend='flex' on CPU computes none). score_inputs: the float inputs the score
    expression reads (`CompiledPattern.score_inputs`), also in `inputs`: a list with no None is
    what register_autograd can return gradients for."""
    kern = registered(pattern)
    out = kern.forward_op(q, k, v, input_dict(inputs, kern.input_names), scale, q_offset, backend, training,
                          return_lse)
    return tuple(x.contiguous() for x in out)


@attention.register_fake
def _attention_fake(q, k, v, inputs, score_inputs, pattern, scale, q_offset, backend, training, return_lse):
    B, H, n_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, n_q), dtype=torch.float32)


@torch.library.custom_op("sparsec::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Optional[Tensor],
                       inputs: list[Optional[Tensor]], pattern: str, scale: Optional[float],
                       q_offset: Optional[int], backend: Optional[str], input_grads: bool
                       ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dQ, dK, dV of one call, contiguous, from its output O, LSE and their gradients (dlse None:
    LSE unused); with input_grads, the gradients of the score expression's float inputs (in
    `score_inputs` order; empty tensors without input_grads)."""
    kern = registered(pattern)
    *out, grads = kern.backward_op(q, k, v, o, lse, do, dlse, input_dict(inputs, kern.input_names), scale, q_offset,
                                   backend, input_grads)
    return (*(x.contiguous() for x in out),   # a fresh empty per entry: outputs may not alias
            [grads[name].contiguous() if name in grads else q.new_empty(0) for name in kern.score_inputs])


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, o, lse, do, dlse, inputs, pattern, scale, q_offset, backend, input_grads):
    kern = registered(pattern)
    given = input_dict(inputs, kern.input_names)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            [given[name].new_empty(given[name].shape) if input_grads else q.new_empty(0)
             for name in kern.score_inputs])


def _setup(ctx, inputs, output):
    q, k, v, given, _, pattern, scale, q_offset, backend, _, _ = inputs
    o, lse = output
    ctx.given = [x is not None for x in given]
    ctx.save_for_backward(q, k, v, o, lse, *(x for x in given if x is not None))
    ctx.pattern, ctx.scale, ctx.q_offset, ctx.backend = pattern, scale, q_offset, backend
    ctx.set_materialize_grads(False)   # an unused LSE (or O) arrives as None, not zeros


def _backward(ctx, do, dlse):
    q, k, v, o, lse, *rest = ctx.saved_tensors
    rest = iter(rest)
    given = [next(rest) if present else None for present in ctx.given]
    if do is None:
        do = torch.zeros_like(o)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    wanted = list(ctx.needs_input_grad[4])   # per score input
    dq, dk, dv, grads = attention_backward(q, k, v, o, lse, do, dlse, given, ctx.pattern, ctx.scale, ctx.q_offset,
                                           ctx.backend, any(wanted))
    return dq, dk, dv, None, [g if want else None for g, want in zip(grads, wanted)], None, None, None, None, None, \
        None


attention.register_autograd(_backward, setup_context=_setup)
