"""A context-parallel call's forward and backward: fetch K/V tiles, send out query tiles, run the kernels on compact buffers, merge by LSE."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import pipeline
from ..layout import LayoutRequest, Placement, reindex
from ..runtime.call import Call
from ..runtime.content import merge_by_lse
from .exchange import Moves, Pending, Tally, move, start


@dataclass(frozen=True)
class Side:
    """One of a rank's two computations over compact buffers: query rows q_rows against key rows
    k_rows (positions of the sequence). keep(block_m, block_n), when given, says at those tile
    sizes which of the layout's tiles this side computes (a predicate over its tiles)."""
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    keep: object = None

    def runner(self, kern, body, layout_at, n: int, call: Call, backend: str, config, inputs: dict):
        """The share's backend bound to these rows (pipeline.bind with a Placement order), or
        None when there are no query rows. layout_at(block_m, block_n): the sequence's layout."""
        if not len(self.q_rows) or not len(self.k_rows):
            return None
        B, H = call.batch, call.heads
        pos = lambda rows: rows.to(call.device, torch.int32).expand(B, H, -1).contiguous()
        rows = (self.q_rows.numpy(), self.k_rows.numpy())
        keep = None if self.keep is None else self.keep(config.block_m, config.block_n)
        placed = Placement(pos(self.q_rows), pos(self.k_rows), lambda bm, bn: reindex(layout_at(bm, bn), *rows, keep))
        r = LayoutRequest(0, body, kern.shares[0].full, n, n, 0, H, B, config.block_m, config.block_n, call.device,
                          inputs, placed)
        memo: dict = {}   # its own cache: the sides of one rank share every shape key
        cached = lambda key, make: memo[key] if key in memo else memo.setdefault(key, make())
        local = Call(B, H, call.kv_heads, len(self.q_rows), len(self.k_rows), call.dim, 0, call.scale, call.device)
        return pipeline.bind(backend, r, local, config, lambda: kern.generated(0), cached, kern.name)


@dataclass(frozen=True)
class Exchanges:
    """This rank's moves: K/V rows fetched (`fetch`, arriving grouped by owner, `fetch_order`
    sorting them by position), query rows sent out (`queries`, `query_order` likewise on the
    serving rank), and whether the key buffer puts the fetched rows first."""
    fetch: Moves
    fetch_order: torch.Tensor
    fetched_first: bool            # the buffer is [fetched, local] (this rank holds the last tile) or [local, fetched]
    queries: Moves
    query_order: torch.Tensor

    def buffer(self, local: torch.Tensor, fetched: torch.Tensor) -> torch.Tensor:
        fetched = fetched.index_select(2, self.fetch_order.to(fetched.device))
        return torch.cat([fetched, local] if self.fetched_first else [local, fetched], 2)

    def split(self, buf: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(local rows, fetched rows in arrival order) of a key buffer's gradient."""
        m = buf.shape[2] - n_local
        local, fetched = (buf[:, :, m:], buf[:, :, :m]) if self.fetched_first else (buf[:, :, :n_local],
                                                                                   buf[:, :, n_local:])
        back = torch.empty_like(fetched)
        back[:, :, self.fetch_order.to(buf.device)] = fetched
        return local, back


def merge(o: torch.Tensor, lse: torch.Tensor, parts_o: torch.Tensor, parts_lse: torch.Tensor,
          rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (O, LSE) of every row merged with partial results for rows `rows` (repeats allowed):
    LSE = log sum exp over a row's parts, O = sum exp(LSE_part - LSE) O_part. Rows no part
    reaches keep O = 0 and LSE = -inf. (runtime.content.merge_by_lse merges whole-shape shares;
    here each sent row has its own number of parts, so the sums are scatters.)"""
    if not len(rows):
        return o, lse
    index = torch.cat([torch.arange(lse.shape[-1], device=lse.device), rows.to(lse.device)])
    all_lse = torch.cat([lse, parts_lse], -1)
    top = torch.full_like(lse, float("-inf")).scatter_reduce(-1, index.expand_as(all_lse), all_lse, "amax")
    top = torch.where(torch.isneginf(top), 0.0, top)
    weight = torch.exp(all_lse - top[..., index])
    total = torch.zeros_like(lse).scatter_add(-1, index.expand_as(all_lse), weight)
    merged = torch.where(total == 0, float("-inf"), top + torch.log(total))
    share = (weight / torch.where(total == 0, 1.0, total)[..., index]).unsqueeze(-1)
    out = torch.zeros(o.shape, dtype=torch.float32, device=o.device)
    out.index_add_(2, index, share * torch.cat([o, parts_o], 2).float())
    return out.to(o.dtype), merged


def _empty_like_rows(x: torch.Tensor, rows: int, width: int | None = None) -> torch.Tensor:
    B, H, _, D = x.shape
    return x.new_zeros((B, H, rows, D if width is None else width))


def fetch(ex: Exchanges, k, v, group, tally: Tally) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value buffers: local rows and the rows fetched from their owners."""
    kv = move(torch.cat([k, v], -1), ex.fetch, group, tally, "kv")
    D = k.shape[-1]
    return ex.buffer(k, kv[..., :D]), ex.buffer(v, kv[..., D:])


def give_back(ex: Exchanges, dk_fetched, dv_fetched, group) -> Pending:
    """What this rank computed for the rows it fetched (their dK, dV in arrival order), on its way
    back to their owners; `added` sums it into the owners' dK, dV."""
    return start(torch.cat([dk_fetched, dv_fetched], -1), ex.fetch.reverse(ex.fetch.arrivals()), group)


def added(ex: Exchanges, dk, dv, back: Pending, tally: Tally) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV of the local rows (fp32): dk, dv plus the returned gradients of the rows others fetched."""
    grads = back.wait(tally, "grads").float()
    at, D = ex.fetch.sent_rows().to(dk.device), dk.shape[-1]
    return dk.float().index_add_(2, at, grads[..., :D]), dv.float().index_add_(2, at, grads[..., D:])


def attend(ex: Exchanges, near, far, remote, group, tally: Tally, q, k, v):
    """O and LSE of this rank's rows, and what the backward needs (the fetched key and value
    rows in position order, the received query rows). The K/V rows and the sent query rows are
    issued first and travel while the local rows attend the local keys (`near`); then the local
    rows attend the fetched keys (`far`), the received rows the local keys (`remote`), whose
    partial results go back and merge by LSE. Every rank issues every collective, in the same order."""
    kv_in, q_in = start(torch.cat([k, v], -1), ex.fetch, group), start(q, ex.queries, group)
    o, lse = near.forward(q, k, v)                                      # overlaps the two transfers
    kv = kv_in.wait(tally, "kv").index_select(2, ex.fetch_order.to(q.device))
    k_far, v_far = kv[..., :k.shape[-1]].clone(), kv[..., k.shape[-1]:].clone()   # own storage, even with 0 rows
    q_in = q_in.wait(tally, "queries").index_select(2, ex.query_order.to(q.device))
    if far is not None:
        o, lse = merge_by_lse([(o, lse), far.forward(q, k_far, v_far)], q.dtype)
    if remote is not None:
        o_in, lse_in = remote.forward(q_in, k, v)
    else:
        o_in, lse_in = _empty_like_rows(q, 0), q.new_zeros((*q.shape[:2], 0), dtype=torch.float32)
    back = ex.queries.reverse(_back_rows(ex))
    parts_o = move(o_in, back, group, tally, "partials")
    parts_lse = move(lse_in.unsqueeze(-1), back, group, tally, "partials")[..., 0]
    o, lse = merge(o, lse, parts_o, parts_lse, ex.queries.sent_rows())
    return o, lse, k_far, v_far, q_in


def attend_backward(ex: Exchanges, near, far, remote, group, tally: Tally, q, k, v, k_far, v_far, q_in, o, lse,
                    do, dlse):
    """dQ, dK, dV of this rank's rows: each part's gradient from the merged O and LSE (the parts
    are disjoint pairs, as shares are), the received rows' dQ and the fetched rows' dK, dV sent
    back and summed. The sent rows' O, dO, LSE and dLSE travel while the local rows' parts run,
    and the fetched rows' gradients while the received rows' part runs. Every rank issues every
    collective, in the same order."""
    # the sent rows' merged O, dO, LSE and dLSE go where their partial results were computed
    rows_in = start(torch.cat([o, do.to(o.dtype)], -1), ex.queries, group)
    stats_in = start(torch.stack([lse, dlse.float()], -1), ex.queries, group)
    dq, dk, dv = near.backward(q, k, v, o, lse, do, dlse.float())
    dk_far, dv_far = torch.zeros_like(k_far), torch.zeros_like(v_far)
    if far is not None:
        dq_far, dk_sorted, dv_sorted = far.backward(q, k_far, v_far, o, lse, do, dlse.float())
        dq = dq.float() + dq_far.float()
        fetch_order = ex.fetch_order.to(q.device)   # position order back to arrival order
        dk_far[:, :, fetch_order], dv_far[:, :, fetch_order] = dk_sorted, dv_sorted
    back = give_back(ex, dk_far, dv_far, group)
    order = ex.query_order.to(q.device)
    rows_in = rows_in.wait(tally, "grads").index_select(2, order)
    stats_in = stats_in.wait(tally, "grads").index_select(2, order)
    D = q.shape[-1]
    if remote is not None:
        dq_in, dk_in, dv_in = remote.backward(q_in, k, v, rows_in[..., :D].contiguous(), stats_in[..., 0],
                                              rows_in[..., D:].contiguous(), stats_in[..., 1].contiguous())
    else:
        dq_in, dk_in, dv_in = _empty_like_rows(q, 0), torch.zeros_like(k), torch.zeros_like(v)
    dq_back = move(dq_in, ex.queries.reverse(_back_rows(ex)), group, tally, "grads")
    dq = dq.float().index_add_(2, ex.queries.sent_rows().to(q.device), dq_back.float())
    dk, dv = added(ex, dk, dv, back, tally)
    dk, dv = dk + dk_in.float(), dv + dv_in.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def gather(ex: Exchanges, order: torch.Tensor, group, tally: Tally, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Content patterns' K and V: every rank's rows fetched, put in position order (`order`: the
    buffer's rows sorted by position)."""
    k_buf, v_buf = fetch(ex, k, v, group, tally)
    order = order.to(k.device)
    return k_buf.index_select(2, order), v_buf.index_select(2, order)


def gather_backward(ex: Exchanges, order: torch.Tensor, group, tally: Tally, n_local: int, dk, dv):
    """The gradient of this rank's K and V rows: each rank's gradient rows summed at their owner."""
    order = order.to(dk.device)
    dk_buf, dv_buf = torch.empty_like(dk), torch.empty_like(dv)
    dk_buf[:, :, order], dv_buf[:, :, order] = dk, dv
    (dk_local, dk_fetched), (dv_local, dv_fetched) = ex.split(dk_buf, n_local), ex.split(dv_buf, n_local)
    dk_local, dv_local = added(ex, dk_local, dv_local, give_back(ex, dk_fetched, dv_fetched, group), tally)
    return dk_local.to(dk.dtype), dv_local.to(dv.dtype)


def _back_rows(ex: Exchanges) -> list[torch.Tensor]:
    """For each rank that sent query rows here, where they sit in the sorted received rows, in its
    send order: the rows of their partial results (and dQ) to send back."""
    inverse = torch.argsort(ex.query_order)
    return [inverse[rows] for rows in ex.queries.arrivals()]
