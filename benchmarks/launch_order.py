"""Launch order ablation: programs heaviest work class first (the default) vs the plain grid order,
on patterns whose rows differ in work, in one run (interleaved rounds, medians).

The order only matters where programs outnumber what the device runs at once, so this is a GPU
measurement; on CPU the Triton interpreter runs programs one by one and the CPU path has no
launch order (it runs here only as a smoke test, through the interpreter, at small n).

    .venv/bin/python benchmarks/launch_order.py                 # CUDA: bf16, D=128, H=16, n=16K and 64K
    -> benchmarks/results/launch_order_<gpu>.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # use the checkout's sparsec without installing it
import sparsec
from sparsec.tools import bench

PATTERNS = {"band(1024) + global(16)": "pattern p = band(1024) + global(16)",   # 16 dense rows in 16K
            "causal": "pattern p = causal",                                     # work grows down the rows
            "bigbird": str(ROOT / "patterns/bigbird.sa")}                       # global + last block rows


def measure(name: str, source: str, n: int, heads: int, dim: int, dtype: str, repeats: int) -> dict:
    """One pattern at one n: median ms of each launch order, interleaved rounds, the same tiles."""
    cuda = torch.cuda.is_available()
    device, backend = ("cuda", "triton") if cuda else ("cpu", "interpret")
    kern = sparsec.compile(source, autotune=False)   # the same tiles for both orders
    q, k, v = (torch.randn(1, heads, n, dim, device=device).to(bench.DTYPES[dtype]) for _ in range(3))

    def call(order):
        def run():
            os.environ["SPARSEC_LAUNCH_ORDER"] = order   # read when a layout's order is first made
            return kern(q, k, v, backend=backend)
        return run
    try:
        times, _ = bench.round_robin({order: call(order) for order in ("classes", "positional")}, device,
                                     warmup=2, repeats=repeats)
    finally:
        os.environ.pop("SPARSEC_LAUNCH_ORDER", None)
    row = {"pattern": name, "n": n, **{f"{o}_ms": float(np.median(t)) * 1e3 for o, t in times.items()}}
    row["positional_over_classes"] = row["positional_ms"] / row["classes_ms"]
    return row


def main() -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 65536] if cuda else [512])
    ap.add_argument("--heads", type=int, default=16 if cuda else 2)
    ap.add_argument("--dim", type=int, default=128 if cuda else 32)
    ap.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bfloat16" if cuda else "float32")
    ap.add_argument("--repeats", type=int, default=20 if cuda else 2)
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if cuda else "cpu"
    results = []
    for name, source in PATTERNS.items():
        for n in args.n:
            row = measure(name, source, n, args.heads, args.dim, args.dtype, args.repeats)
            results.append(row)
            print(f"{name:<26} n={n:<6} classes {row['classes_ms']:9.3f} ms  positional {row['positional_ms']:9.3f} ms"
                  f"  ({row['positional_over_classes']:.3f}x)", flush=True)
    slug = "cpu" if not cuda else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = Path(args.out or ROOT / f"benchmarks/results/launch_order_{slug}.json")
    out.write_text(json.dumps({"machine": bench.machine(device), "command": sys.argv, "heads": args.heads,
                               "dim": args.dim, "dtype": args.dtype, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
