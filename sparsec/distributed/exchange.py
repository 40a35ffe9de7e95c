"""The collectives of a context-parallel call: rows of (B, H, rows, D) tensors moved by one uneven all-to-all, bytes tallied."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Tally:
    """Bytes this rank has received, by what moved (kv, queries, partials; and in the backward
    grads), counted from the tensors the collectives filled."""
    received: dict = field(default_factory=dict)

    def add(self, what: str, x: torch.Tensor) -> None:
        self.received[what] = self.received.get(what, 0) + x.numel() * x.element_size()


@dataclass(frozen=True)
class Moves:
    """One all-to-all of rows: `send[d]` the local row indices this rank sends to rank d,
    `recv[s]` how many rows it receives from rank s (in s's send order). Every rank issues it,
    moving nothing or not: a collective one rank skips hangs the others."""
    send: list[torch.Tensor]
    recv: list[int]

    def reverse(self, sent_back: list[torch.Tensor]) -> "Moves":
        """The way back: what came from s returns to s (sent_back[s]: those rows' local indices)."""
        return Moves(sent_back, [len(x) for x in self.send])

    def sent_rows(self) -> torch.Tensor:
        """Every row sent, in send order (where what comes back on the reverse lands)."""
        return torch.cat(self.send)

    def arrivals(self) -> list[torch.Tensor]:
        """Per rank, the indices of the rows that came from it, in arrival order."""
        ends = torch.cumsum(torch.tensor([0, *self.recv]), 0)
        return [torch.arange(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


@dataclass(frozen=True)
class Pending:
    """An all-to-all in flight: `wait` gives its rows (B, H, rows, D) once they have arrived."""
    into: torch.Tensor
    work: object

    def wait(self, tally: Tally | None = None, what: str = "") -> torch.Tensor:
        self.work.wait()
        if tally is not None:
            tally.add(what, self.into)
        return self.into.permute(1, 2, 0, 3)


def start(x: torch.Tensor, moves: Moves, group) -> Pending:
    """Rows x[:, :, send[d]] to each rank d, issued without waiting: the rows from rank 0 arrive
    first, each rank's in its send order. Rows travel as one contiguous (rows, B, H, D) block."""
    B, H, _, D = x.shape
    out_rows = x.index_select(2, moves.sent_rows().to(x.device)).permute(2, 0, 1, 3).contiguous()
    into = x.new_empty((sum(moves.recv), B, H, D))
    work = dist.all_to_all_single(into, out_rows, output_split_sizes=list(moves.recv),
                                  input_split_sizes=[len(i) for i in moves.send], group=group, async_op=True)
    return Pending(into, work)


def move(x: torch.Tensor, moves: Moves, group, tally: Tally | None = None, what: str = "") -> torch.Tensor:
    """The same, waited for: (B, H, sum(recv), D)."""
    return start(x, moves, group).wait(tally, what)
