"""Content-based parts at call time, on the tensors' device: bucket ids, clusters and top-k
selections in torch; q, k, v gathered into a share's sorted order and scattered back; the merge
of shares by log-sum-exp. Nothing here is n x n: ids are O(n D) (computed a block of rows at a
time), layouts O(tiles visited); top-k scores are (query blocks x key blocks), ranked in slices."""
from __future__ import annotations

import functools

import torch

from ..ir.content import Cluster, Lsh, LshRound, TopK, rotations, spherical_start
from ..ir.document import Document
from ..ir.pattern import Pattern, value
from ..ir.combinators import Blocks, Difference, Heads, Intersection, Union
from ..ir.positional import Chunk, OffsetPattern
from ..ir.rows import RowsOrColumns
from ..ir.random import Random
from ..ir.where import Where
from ..layout.sorted import SortedOrder
from .call import Call


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)


@functools.lru_cache(maxsize=64)
def _seeded(draw, *args) -> torch.Tensor:
    """A seeded draw of the reference (numpy, on the host: the same numbers on every device), kept."""
    return torch.from_numpy(draw(*args))


ROWS_AT_ONCE = 1 << 14       # rows of q or k made float64 and scored at once
SCORES_AT_ONCE = 1 << 22     # top-k scores (query blocks x key blocks) ranked at once


def _float64_rows(x: torch.Tensor, group: int = 1):
    """(start, end, rows): x's rows a block at a time, in float64, each K/V head repeated for the
    `group` query heads it serves; memory is one block's, whatever n."""
    for s in range(0, x.shape[2], ROWS_AT_ONCE):
        part = x[:, :, s:s + ROWS_AT_ONCE].double()
        yield s, s + part.shape[2], part.repeat_interleave(group, dim=1) if group > 1 else part


def _lsh(node: Lsh, q, k, group: int, given) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket ids (B, H, rounds, n): argmax over [x R_r, -x R_r] per round (ties: the smaller id)."""
    if given is None:
        given = _seeded(rotations, value(node.seed), value(node.rounds), q.shape[-1], value(node.buckets))
    rot = given.to(device=q.device, dtype=torch.float64)

    def ids(x, g):
        out = torch.empty((x.shape[0], x.shape[1] * g, len(rot), x.shape[2]), dtype=torch.int32, device=x.device)
        for s, e, rows in _float64_rows(x, g):
            for r, turn in enumerate(rot):   # argmax of [xR, -xR] without building it: the first max, or min
                xr = rows @ turn
                high, low = xr.argmax(-1, keepdim=True), xr.argmin(-1, keepdim=True)
                first = xr.gather(-1, high) >= -xr.gather(-1, low)    # a tie goes to the first half
                out[:, :, r, s:e] = torch.where(first, high, low + xr.shape[-1])[..., 0]
        return out
    return ids(q, 1), ids(k, group)


def _cluster(node: Cluster, q, k, group: int, given) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ids (B, H, 1, n): the nearest centroid by cosine; centroids given (H, C, D), or
    `iters` rounds of spherical k-means on each (b, h)'s keys from the seeded start (the keys
    scored a block at a time: memory O(block x clusters))."""
    B, H = q.shape[:2]
    if given is not None:
        mu = given.to(device=q.device, dtype=torch.float64)[None].expand(B, -1, -1, -1)
    else:
        start = _seeded(spherical_start, value(node.seed), value(node.k), q.shape[-1]).to(q.device)
        mu = start.expand(B, H, -1, -1)
        for _ in range(value(node.iters)):
            sums = torch.zeros_like(mu)
            for _, _, rows in _float64_rows(k, group):
                kn = _unit(rows)
                assign = (kn @ mu.transpose(-1, -2)).argmax(-1)
                sums.scatter_add_(2, assign[..., None].expand_as(kn), kn)
            norm = sums.norm(dim=-1, keepdim=True)
            mu = torch.where(norm > 0, sums / torch.where(norm > 0, norm, 1.0), mu)  # empty: stays

    def ids(x, g):
        out = torch.empty((B, H, 1, x.shape[2]), dtype=torch.int32, device=x.device)
        for s, e, rows in _float64_rows(x, g):
            out[:, :, 0, s:e] = (_unit(rows) @ mu.transpose(-1, -2)).argmax(-1)
        return out
    return ids(q, 1), ids(k, group)


def _topk(node: TopK, q, k, group: int, q_offset: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen (B, H, I, J) bool and its table (B, H, I, t) of key blocks, padded with -1: each
    query block I of the call keeps the `k` key blocks J with the largest mean(q_I) . mean(k_J),
    or with by=NAME the largest NAME[b, h, I - I0, J] (ties: the smaller J), among J < I with
    causal=true. Ranked SCORES_AT_ONCE scores at a time."""
    size, top = value(node.block), value(node.k)
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    first = q_offset // size
    row_of = torch.div(torch.arange(n_q, device=q.device) + q_offset, size, rounding_mode="floor") - first
    rows = (q_offset + n_q - 1) // size - first + 1
    q_sum = torch.zeros((B, H, rows, D), dtype=torch.float64, device=q.device)
    for s, e, part in _float64_rows(q):
        q_sum.index_add_(2, row_of[s:e], part)
    blocks = -(-n_k // size)
    block_of = torch.div(torch.arange(n_k, device=k.device), size, rounding_mode="floor")   # no padding to a
    k_sum = torch.zeros((B, H, blocks, D), dtype=torch.float64, device=k.device)           # whole block
    for s, e, part in _float64_rows(k, group):
        k_sum.index_add_(2, block_of[s:e], part)
    k_count = torch.bincount(block_of, minlength=blocks).double()
    given = None if node.by is None else _ranking(inputs[node.by], B, H, rows, blocks, q.device)
    width = min(top, blocks)
    chosen = torch.zeros((B, H, rows, blocks), dtype=torch.bool, device=q.device)
    table = torch.empty((B, H, rows, width), dtype=torch.int32, device=q.device)
    cols = torch.arange(blocks, device=q.device)
    step = max(1, SCORES_AT_ONCE // max(1, B * H * blocks))
    for r in range(0, rows, step):
        at = torch.arange(r, min(rows, r + step), device=q.device)
        score = (q_sum[:, :, at] @ k_sum.transpose(-1, -2)) / k_count if given is None else given[:, :, at]
        candidate = (cols[None, :] < (at + first)[:, None]) if value(node.causal) \
            else torch.ones((len(at), blocks), dtype=torch.bool, device=q.device)
        score = torch.where(candidate, score, float("-inf"))
        order = torch.sort(-score, dim=-1, stable=True).indices[..., :width]
        picked = candidate.expand(B, H, -1, -1).gather(-1, order)
        chosen[:, :, at] = torch.zeros(score.shape, dtype=torch.bool, device=q.device).scatter_(-1, order, picked)
        table[:, :, at] = torch.where(picked, order, -1).int()
    return chosen, table


def _ranking(x: torch.Tensor, B: int, H: int, rows: int, blocks: int, device) -> torch.Tensor:
    """topk's by= input as (B, H, rows, blocks) float64 on device: b and h axes of size 1
    broadcast, entries past its extent 0 (the language's out-of-range read)."""
    out = torch.zeros((x.shape[0], x.shape[1], rows, blocks), dtype=torch.float64, device=device)
    r, c = min(rows, x.shape[2]), min(blocks, x.shape[3])
    out[:, :, :r, :c] = x[:, :, :r, :c].detach().to(device=device, dtype=torch.float64)
    return out.expand(B, H, rows, blocks)


def _lsh_round(node: LshRound, q, k, group: int, inputs: dict, call: Call, out: dict):
    """One round of a multi-round lsh: its slice of the whole lsh's ids (computed once)."""
    whole = Lsh(node.buckets, node.rounds, node.seed)
    if whole not in out:
        out[whole] = _lsh(whole, q, k, group, inputs.get("rotations"))
    return tuple(x[:, :, node.round: node.round + 1].contiguous() for x in out[whole])


# The values of each content node for a call, by node type (subclasses first: an LshRound is an Lsh).
CONTENT_VALUES = {
    LshRound: _lsh_round,
    Lsh: lambda node, q, k, group, inputs, call, out: _lsh(node, q, k, group, inputs.get("rotations")),
    Cluster: lambda node, q, k, group, inputs, call, out: _cluster(node, q, k, group, inputs.get("centroids")),
    TopK: lambda node, q, k, group, inputs, call, out: _topk(node, q, k, group, call.q_offset, inputs),
}
NO_CONTENT_VALUES = (OffsetPattern, RowsOrColumns, Chunk, Random, Where, Document, Union, Intersection, Difference,
                     Heads, Blocks)   # read no q or k


def content_values(nodes, q, k, call: Call, inputs: dict) -> dict[Pattern, tuple[torch.Tensor, ...]]:
    """Each content node's ids or selection for this call, on q's device, computed in float64
    from q and k (k of each query head's group), leading dims (B, H), a block of rows at a time."""
    group = call.heads // call.kv_heads
    q, k = q.detach(), k.detach()
    out: dict[Pattern, tuple[torch.Tensor, ...]] = {}
    for node in nodes:
        rule = CONTENT_VALUES.get(type(node))
        if rule is not None and node not in out:
            out[node] = rule(node, q, k, group, inputs, call, out)
    return out



def gather(order: SortedOrder, q, k, v, group: int):
    """q, k, v in the order's row order; k and v get one copy per query head (each head sorts its
    own)."""
    k, v = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (k, v))
    q_rows, k_rows = _flat(order.q_pos), _flat(order.k_pos)
    return _rows_in(q, q_rows), _rows_in(k, k_rows), _rows_in(v, k_rows)


def gather_rows(order: SortedOrder, o, lse, do, dlse):
    """A call's O, LSE and their gradients in the order's query rows (dlse may be None)."""
    rows = _flat(order.q_pos)
    return (_rows_in(o, rows), _rows_in(lse[..., None], rows)[..., 0], _rows_in(do, rows),
            None if dlse is None else _rows_in(dlse[..., None], rows)[..., 0])


def scatter(order: SortedOrder, o, lse):
    """O and LSE back in the original row order."""
    rows = _flat(order.q_pos)
    return _rows_out(o, rows), _rows_out(lse[..., None], rows)[..., 0]


def ungather(order: SortedOrder, dq, dk, dv, group: int):
    """The adjoint of gather: dQ back in place; dK and dV back in place and summed over the query
    heads that shared a K/V head."""
    q_rows, k_rows = _flat(order.q_pos), _flat(order.k_pos)
    dk, dv = (_rows_out(x, k_rows) for x in (dk, dv))
    if group > 1:
        dk, dv = (x.unflatten(1, (-1, group)).sum(2) for x in (dk, dv))
    return _rows_out(dq, q_rows), dk, dv


def _rows_in(x, rows):
    return x.reshape(-1, x.shape[-1]).index_select(0, rows).view(x.shape)


def _rows_out(x, rows):
    """x's flattened rows put back at `rows` (each row is named once: a permutation)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.empty_like(flat).index_copy_(0, rows, flat).view(x.shape)


def _flat(pos: torch.Tensor) -> torch.Tensor:
    """Rows (B, H, n) of each (b, h) as rows of the (B * H * n)-row flattening: one index_select
    moves whole rows (a gather with an expanded index would read one index per element)."""
    B, H, n = pos.shape
    base = torch.arange(B * H, device=pos.device, dtype=torch.long).view(B, H, 1) * n
    return (pos.long() + base).reshape(-1)


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a union of disjoint shares from each share's (O, LSE):
    LSE = log sum_s exp(LSE_s), O = sum_s exp(LSE_s - LSE) O_s. Differentiable; rows no share
    reaches keep O = 0 and LSE = -inf, with zero gradients rather than NaN."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])
    none = torch.isneginf(lses).all(0)
    lse = torch.where(none, float("-inf"), torch.logsumexp(torch.where(none, 0.0, lses), 0))
    weights = torch.exp(lses - torch.where(none, 0.0, lse))
    o = sum(w[..., None] * o_s.float() for w, (o_s, _) in zip(weights, parts))
    return o.to(dtype), lse
