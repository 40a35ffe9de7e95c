"""Launch order: the kernels' programs, heaviest work class first, so a few dense rows start early.

A GPU starts programs roughly in launch order. In the plain (tile, head) order a dense row (a
global query tile, the bottom of a causal mask) that happens to launch in the last wave runs on
alone after every other program has finished, and sets the kernel's time. Longest-processing-time
first avoids that tail. Sorting strictly by work would scatter neighbouring tiles of one head over
the whole launch and lose the L2 reuse of their shared key tiles, so programs are only sorted by
*class*, floor(log2(tiles visited)): a dense row (8x the work of a band row) moves ahead of all
band rows, while rows of one class keep their (batch x head, tile) order. Rows that visit nothing
go last.
"""
from __future__ import annotations

import os

import torch

ORDERS = ("classes", "positional")   # SPARSEC_LAUNCH_ORDER: positional is the plain grid, for comparison


def launch_order() -> str:
    order = os.environ.get("SPARSEC_LAUNCH_ORDER", "classes")
    if order not in ORDERS:
        raise ValueError(f"SPARSEC_LAUNCH_ORDER must be one of {', '.join(ORDERS)}, got {order!r}")
    return order


def work_classes(work: torch.Tensor) -> torch.Tensor:
    """floor(log2(w)) + 1 for w > 0 tiles visited, 0 for none."""
    w = work.to(torch.int64)
    out = torch.zeros_like(w)
    positive = w > 0
    out[positive] = torch.floor(torch.log2(w[positive].double())).long() + 1
    return out


def heaviest_first(full_ptr: torch.Tensor, partial_ptr: torch.Tensor, layout_shape: tuple[int, int, int],
                   batch: int, heads: int, group: int = 1) -> torch.Tensor:
    """The launch order of a (batch x heads/group, tiles) grid as int32 program numbers
    bh * tiles + tile, heaviest class first, stable within a class.

    full_ptr, partial_ptr: a layout's CSR pointers over rows (LB, LH, tiles), whose leading dims
    broadcast to (batch, heads). group > 1 (the dK/dV grid under GQA): a program serves `group`
    consecutive query heads and its work is their sum. SPARSEC_LAUNCH_ORDER=positional gives the
    plain (batch x head, tile) order instead (benchmarks/launch_order.py compares the two)."""
    lb, lh, tiles = layout_shape
    rows = lb * lh * tiles
    work = (full_ptr[1:rows + 1] - full_ptr[:rows]) + (partial_ptr[1:rows + 1] - partial_ptr[:rows])
    work = work.view(lb, lh, tiles).expand(batch, heads, tiles)
    if group > 1:
        work = work.reshape(batch, heads // group, group, tiles).sum(2)
    if launch_order() == "positional":
        return torch.arange(work.numel(), dtype=torch.int32, device=work.device)
    order = torch.sort(-work_classes(work.reshape(-1)), stable=True).indices
    return order.to(torch.int32)
