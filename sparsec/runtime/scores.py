"""A score modification in torch ops: S' of every pair (CPU path, reference, Flex) and its gradients."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..ir import derivative
from ..ir.expr import Var
from ..ir.score import float_reads
from ..layout.expressions import to_torch

SCORE = Var("score")


def score_names(s, i, j, h, b, n_q: int, n_k: int, inputs: dict) -> dict:
    """What a with expression reads: the raw score, the coordinates, the lengths and the inputs."""
    return {"score": s, "i": i, "j": j, "h": h, "b": b, "n": n_k, "n_q": n_q, "n_k": n_k, **inputs}


@dataclass
class TorchScore:
    """The with expression of one call, specialized for its lengths, over the call's inputs.

    Coordinates are broadcastable tensors: i the query positions (q_offset included), j the key
    positions, h the query heads, b the batch rows. grads: per float input that asked for one,
    its gradient so far (float32, the input's shape as given), summed over the pairs that
    `backward` has seen."""
    expr: object
    inputs: dict                   # name -> tensor, as given (on the call's device)
    n_q: int
    n_k: int
    grads: dict = field(default_factory=dict)

    def want_grads(self, names) -> None:
        for decl in float_reads(self.expr):
            if decl.name in names and decl.name not in self.grads:
                x = self.inputs[decl.name]
                self.grads[decl.name] = torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def _names(self, s, i, j, h, b) -> dict:
        return score_names(s, i, j, h, b, self.n_q, self.n_k, self.inputs)

    def apply(self, s, i, j, h, b) -> torch.Tensor:
        """S' = EXPR on every pair of s (any float dtype; the result has s's dtype and shape)."""
        out = torch.as_tensor(to_torch(self.expr, self._names(s, i, j, h, b)), device=s.device)
        out = torch.broadcast_to(out, s.shape).to(s.dtype)
        # a new, writable tensor: callers mask it in place, and `with score` must not alias s
        return out.clone() if out.data_ptr() == s.data_ptr() or out.stride() != s.stride() else out

    def backward(self, s, i, j, h, b, ds: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to the raw scores s, given ds = dLoss/dS' of each pair, and
        the float inputs' gradients added into self.grads, from the derivatives of ir/derivative.py
        (in torch ops: no autograd, which a custom op's backward does not have). A pair whose ds
        is 0 (masked, or S' = -inf) contributes exactly 0, even where a derivative is infinite."""
        names = self._names(s, i, j, h, b)
        zero = ds == 0
        memo: dict = {}

        def per_pair(d):
            value = torch.as_tensor(to_torch(d, names, memo=memo), device=ds.device)
            return torch.where(zero, 0.0, ds * value)
        by_score, by_read = self.derivatives
        for read, d in by_read:
            if read.decl.name in self.grads:
                index = [torch.as_tensor(to_torch(a, names, memo=memo), device=ds.device) for a in read.index]
                self._scatter(read, index, torch.broadcast_to(per_pair(d), ds.shape))
        return per_pair(by_score).to(s.dtype)

    @cached_property
    def derivatives(self):
        """d EXPR / d score, and (read, d EXPR / d read) per float read: once per call, not per step."""
        return (derivative.derivative(self.expr, SCORE),
                [(r, derivative.derivative(self.expr, r)) for r in derivative.float_read_nodes(self.expr)])

    def _scatter(self, e, index, values: torch.Tensor) -> None:
        """grads[input][index] += values per pair (reads outside the extent get nothing; a b or h
        axis given as 1 sums into its one element)."""
        grad = self.grads[e.decl.name]
        flat = torch.zeros(values.shape, dtype=torch.int64, device=values.device)
        ok = torch.ones(values.shape, dtype=torch.bool, device=values.device)
        stride = 1
        for k in range(len(e.decl.dims) - 1, -1, -1):
            size, at = grad.shape[k], torch.as_tensor(index[k], device=values.device)
            if e.decl.dims[k] in ("b", "h") and size == 1:
                continue
            ok &= (at >= 0) & (at < size)
            flat += at.clamp(0, size - 1) * stride
            stride *= size
        grad.view(-1).index_add_(0, flat[ok], values[ok].float())


def score_mod(expr, q_offset: int, n_q: int, n_k: int, inputs: dict, positions=None):
    """Flex's score_mod(score, b, h, q_idx, kv_idx) of a specialized with expression: the same
    torch rules (layout/expressions.TORCH_OPS), on int64 coordinates, in the score's dtype.
    positions: a sorted share's (q rows, k rows) (B, H, n), the original row of each sorted row
    Flex indexes; None in the positional order."""
    def score_mod(score, b, h, q_idx, kv_idx):
        if positions is not None:
            q_idx, kv_idx = positions[0][b, h, q_idx], positions[1][b, h, kv_idx]
        names = score_names(score, (q_idx + q_offset).long(), kv_idx.long(), h.long(), b.long(), n_q, n_k, inputs)
        out = to_torch(expr, names)
        return (out if torch.is_tensor(out) else score * 0 + out).to(score.dtype)
    return score_mod
