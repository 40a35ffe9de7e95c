"""Launch order: every program exactly once, heaviest work class first, stable within a class."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparsec
from sparsec.layout import DeviceLayout


def expected_order(work: np.ndarray) -> list[int]:
    """The rule written directly: class floor(log2 w) + 1 (0 for no work) descending, then job number."""
    cls = [0 if w == 0 else math.floor(math.log2(w)) + 1 for w in work]
    return sorted(range(len(work)), key=lambda j: (-cls[j], j))


def row_work(lists, batch: int, heads: int) -> np.ndarray:
    """Tiles visited per (b, h, tile), from a host layout's CSR lists, broadcast to (batch, heads)."""
    lb, lh, tiles = lists.shape
    counts = np.diff(lists.ptr).reshape(lb, lh, tiles)
    return np.broadcast_to(counts, (batch, heads, tiles))


@pytest.mark.parametrize("src, heads, group", [
    ("band(100) + global(16)", 2, 1),
    ("causal", 3, 1),
    ("heads(band(40), causal, global(8) + band(8))", 3, 1),
    ("random(3) + sink(4)", 4, 2),
    ("dilated(64, 2) - band(7)", 4, 4),
])
def test_schedule_matches_the_rule(src, heads, group):
    kern = sparsec.compile(f"pattern p = {src}")
    batch, n_q, n_k = 2, 333, 301
    lay = kern.layout(n_q, n_k, 32, 16, heads=heads)
    dev = DeviceLayout.of(lay, torch.device("cpu"))
    forward = dev.schedule(batch, heads).numpy()
    work = row_work(lay.full, batch, heads) + row_work(lay.partial, batch, heads)
    assert forward.dtype == np.int32
    assert forward.tolist() == expected_order(work.reshape(-1))
    backward = dev.schedule(batch, heads, group).numpy()
    work_t = row_work(lay.full_t, batch, heads) + row_work(lay.partial_t, batch, heads)
    work_t = work_t.reshape(batch, heads // group, group, -1).sum(2)
    assert backward.tolist() == expected_order(work_t.reshape(-1))
    assert sorted(backward.tolist()) == list(range(batch * (heads // group) * lay.shape[3]))
    assert dev.schedule(batch, heads) is dev.schedule(batch, heads)   # kept with the layout


def test_global_rows_launch_first():
    """band + global: the dense global query tile of every head starts before any band tile."""
    kern = sparsec.compile("pattern p = band(256) + global(16)")
    n, heads = 4096, 4
    dev = DeviceLayout.of(kern.layout(n, block_m=64, block_n=64), torch.device("cpu"))
    order = dev.schedule(1, heads).tolist()
    tiles = n // 64
    assert sorted(order[:heads]) == [h * tiles for h in range(heads)]
    # interior band rows (one class) keep their positional order within a head: L2 reuse of shared keys
    interior = [j for j in order if j // tiles == 0 and 8 <= j % tiles < tiles - 8]
    assert interior == sorted(interior) and len(interior) == tiles - 16


def test_positional_order_for_comparison(monkeypatch):
    kern = sparsec.compile("pattern p = band(256) + global(16)")
    dev = DeviceLayout.of(kern.layout(2048, block_m=64, block_n=64), torch.device("cpu"))
    classes = dev.schedule(1, 2)
    monkeypatch.setenv("SPARSEC_LAUNCH_ORDER", "positional")
    assert dev.schedule(1, 2).tolist() == list(range(2 * 32)) != classes.tolist()
    monkeypatch.setenv("SPARSEC_LAUNCH_ORDER", "random")
    with pytest.raises(ValueError, match="SPARSEC_LAUNCH_ORDER must be one of classes, positional"):
        dev.schedule(1, 3)
