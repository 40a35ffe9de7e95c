"""Forward attention time: sparsec vs FlexAttention vs dense-mask SDPA, in one run.

For `band(256) + global(16)` and the BigBird library pattern (patterns/bigbird.sa), at
B=1, H=8, n=4096, D=64, fp32 on CPU, this times
  - sparsec: `kern(q, k, v, backend="cpu")` (the first call builds and caches the plan: "setup"),
  - FlexAttention: `torch.compile(flex_attention)` with its own block mask (from a mask_mod that
    expresses the same pattern; BigBird's random blocks are read from sparsec's per-head draws),
    at each --flex-block size ("setup": create_block_mask, then the compile + first call),
  - `scaled_dot_product_attention` with the dense bool mask (1, H, n, n) from `kern.mask`,
and reports the median per-call time, the speedup of sparsec over each peer, and each output's
max abs difference from a float64 masked softmax on the same mask (exit 1 if sparsec's exceeds
the tolerance: 1e-4 in fp32). Repeats run round-robin over the implementations, so that load from
other processes hits them alike.

    .venv/bin/python benchmarks/cpu_forward.py                 # -> benchmarks/results/cpu_forward.json
    .venv/bin/python benchmarks/cpu_forward.py --device cuda   # bf16, D=128, n=16384, backend="triton"
                                                               # -> benchmarks/results/gpu_forward_<gpu>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

# a fresh inductor cache, so FlexAttention's compile times are cold in every run (removed at exit)
_INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="cpu_forward_inductor_")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_CACHE.name)

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    create_block_mask,
    create_mask,
    flex_attention,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # use the checkout's sparsec without installing it
import sparsec
from sparsec.reference import attention
from sparsec.tools.bench import cpu_seconds, machine, peak_memory_mb, round_robin, sync, timed  # noqa: F401 (re-exported)
from sparsec.ir.random import random_keys

PATTERNS = {"band(256) + global(16)": "pattern p = band(256) + global(16)",
            "bigbird": str(ROOT / "patterns/bigbird.sa")}  # blocks(64, band(1) + global(1) + last(1) + random(3))
BIGBIRD_BLOCK = 64
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DEFAULTS = {"cpu": {"n": 4096, "dim": 64, "dtype": "float32", "backend": "cpu"},
            "cuda": {"n": 16384, "dim": 128, "dtype": "bfloat16", "backend": "triton"}}


# ---- the patterns as FlexAttention mask_mods ----------------------------------------------------

def mask_mod_for(name: str, n: int, heads: int, device):
    """(mask_mod, per_head): the same pairs as sparsec's pattern; tables are built here, untimed."""
    if name.startswith("band"):
        return (lambda b, h, q, k: ((q - k).abs() <= 256) | (q < 16) | (k < 16)), False
    blocks = -(-n // BIGBIRD_BLOCK)
    picks = torch.from_numpy(np.stack([random_keys(seed=0, head=h, rows=np.arange(blocks), r=3, n_k=blocks)
                                       for h in range(heads)])).to(device)  # (H, blocks, 3): draws depend on h
    p0, p1, p2 = (picks[..., i].contiguous() for i in range(3))

    def bigbird(b, h, q, k):
        qb, kb = q // BIGBIRD_BLOCK, k // BIGBIRD_BLOCK
        window = (qb - kb).abs() <= 1
        glob = (qb == 0) | (kb == 0) | (qb == blocks - 1) | (kb == blocks - 1)
        return window | glob | (p0[h, qb] == kb) | (p1[h, qb] == kb) | (p2[h, qb] == kb)

    return bigbird, True


def flex_mask_differences(mask_mod, mask: torch.Tensor, rows: int = 1024) -> int:
    """Pairs where the mask_mod and sparsec's dense mask (1, H, n, n) disagree, per head and row chunk."""
    differ = 0
    for h in range(mask.shape[1]):
        for r in range(0, mask.shape[2], rows):
            m = mask[0, h, r: r + rows]
            mod = lambda b, _h, q, k, h=h, r=r: mask_mod(b, _h + h, q + r, k)
            differ += int((create_mask(mod, 1, 1, m.shape[0], m.shape[1], device=mask.device)[0, 0] != m).sum())
    return differ


# ---- timing and memory ----------------------------------------------------------------------------

def quiet_rounds(foreign: list[float], threshold: float, label: str) -> list[int]:
    """The rounds in which other processes kept fewer than `threshold` cores busy; all rounds,
    with a warning, when fewer than 3 were that quiet."""
    quiet = [i for i, f in enumerate(foreign) if f < threshold]
    if len(quiet) < 3:
        print(f"warning: {label}: only {len(quiet)} of {len(foreign)} rounds had other processes below "
              f"{threshold} cores busy; medians over all rounds", file=sys.stderr)
        quiet = list(range(len(foreign)))
    return quiet


def result_path(cpu_stem: str, gpu_stem: str, device: str) -> str:
    """benchmarks/results/<cpu_stem>.json, or <gpu_stem>_<gpu name>.json on CUDA."""
    slug = cpu_stem if device == "cpu" else \
        gpu_stem + "_" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return str(ROOT / f"benchmarks/results/{slug}.json")


# ---- one pattern ------------------------------------------------------------------------------------

def reference(q, k, v, mask, scale: float) -> torch.Tensor:
    """sparsec.reference.attention (float64 masked softmax), per head and row chunk (bounded memory)."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    step = max(1, (1 << 25) // k.shape[2])
    for h in range(q.shape[1]):
        for r in range(0, q.shape[2], step):
            out[:1, h: h + 1, r: r + step] = attention(q[:1, h: h + 1, r: r + step], k[:1, h: h + 1],
                                                       v[:1, h: h + 1], mask[:1, h: h + 1, r: r + step], scale)[0]
    return out


def flex_impls(name: str, q, k, v, mask, flex, block_sizes, info: dict) -> tuple[dict, dict]:
    """Per block size, the timed call and its setup: create_block_mask (compiled: the first call
    compiles), then the flex_attention compile + first call. Also checks the mask_mod's pairs."""
    H, n, device = q.shape[1], q.shape[2], q.device
    mask_mod, per_head = mask_mod_for(name, n, H, device)
    info["flex_mask_pairs_differing"] = flex_mask_differences(mask_mod, mask)  # must be 0: same pattern
    build_mask, impls, setup = torch.compile(create_block_mask), {}, {}
    for bs in block_sizes:
        label = f"flex (block {bs})"
        try:
            make = lambda bs=bs: build_mask(mask_mod, None, H if per_head else None, n, n, device=device,
                                            BLOCK_SIZE=bs)
            bm, first = timed(make, device)
            bm, again = timed(make, device)
            call = lambda bm=bm: flex(q, k, v, block_mask=bm)
            setup[label] = {"create_block_mask_first_s": first, "create_block_mask_s": again,
                            "compile_and_first_call_s": timed(call, device)[1]}
            impls[label] = call
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
            setup[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return impls, setup


def summarize(impls: dict, setup: dict, times: dict, quiet: list[int], ref, device) -> dict:
    """Per implementation: setup, times, median over the quiet rounds, error, speedup of sparsec."""
    results = {}
    for label, before in setup.items():
        r = results[label] = dict(before)
        if label in impls:
            out, used = impls[label](), [times[label][i] for i in quiet]
            r.update(times_ms=[t * 1e3 for t in times[label]], median_ms=statistics.median(used) * 1e3,
                     min_ms=min(used) * 1e3, median_all_rounds_ms=statistics.median(times[label]) * 1e3,
                     max_abs_err=(out.double() - ref).abs().max().item(),
                     peak_memory_mb=peak_memory_mb(impls[label], device))
    for label, r in results.items():
        if label != "sparsec" and "median_ms" in r:
            r["sparsec_speedup"] = r["median_ms"] / results["sparsec"]["median_ms"]
    return results


def bench_pattern(name: str, args, device, dtype, flex) -> dict:
    n, H, D = args.n, args.heads, args.dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, device=device, dtype=dtype) for _ in range(3))
    kern = sparsec.compile(PATTERNS[name])
    mask, mask_s = timed(lambda: kern.mask(n, n, heads=H).to(device), device)
    lay = kern.layout(n, n, block_m=64, block_n=64, heads=H)
    per_slice = lay.shape[0] * lay.shape[1]  # the layout has a heads dimension of 1 when no head differs
    info = {"pattern": name, "ir": kern.ir.body.show(), "density": mask.sum().item() / mask.numel(),
            "dense_mask_s": mask_s, "dense_mask_mb": mask.numel() / 2**20,
            "tiles_64": {"visited_per_head": lay.tiles_visited() / per_slice,
                         "total_per_head": lay.shape[2] * lay.shape[3], "tile_density": lay.tile_density()}}
    ref = reference(q, k, v, mask, 1 / D ** 0.5)

    sp = lambda: kern(q, k, v, backend=args.backend)
    impls, setup = {"sparsec": sp}, {"sparsec": {"build_and_first_call_s": timed(sp, device)[1]}}  # caches the plan
    flex_calls, flex_setup = flex_impls(name, q, k, v, mask, flex, args.flex_block, info)
    impls.update(flex_calls)
    setup.update(flex_setup)
    try:
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        setup["sdpa dense mask"] = {"first_call_s": timed(sdpa, device)[1]}
        impls["sdpa dense mask"] = sdpa
    except (torch.OutOfMemoryError, RuntimeError) as e:  # on a GPU, where the dense mask does not fit
        setup["sdpa dense mask"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    times, foreign = round_robin(impls, device, args.warmup, args.repeats)
    quiet = quiet_rounds(foreign, args.quiet, name)
    info.update(foreign_cores_busy_per_round=foreign, rounds_used=quiet)
    info["results"] = summarize(impls, setup, times, quiet, ref, device)
    return info


# ---- report -------------------------------------------------------------------------------------


def table(patterns: list[dict]) -> str:
    lines = ["| pattern | impl | time ms (median) | min ms | sparsec speedup | max abs err | setup |",
             "|---|---|---|---|---|---|---|"]
    for p in patterns:
        for label, r in p["results"].items():
            setup = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in r.items()
                              if k.endswith("_s") and isinstance(v, float))
            if "error" in r:
                lines.append(f"| {p['pattern']} | {label} | {r['error'][:60]} | | | | {setup} |")
                continue
            speed = f"{r['sparsec_speedup']:.2f}x" if "sparsec_speedup" in r else "-"
            lines.append(f"| {p['pattern']} | {label} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {speed} | "
                         f"{r['max_abs_err']:.1e} | {setup} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, help="sequence length (default 4096 on cpu, 16384 on cuda)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, help="head dim (default 64 on cpu, 128 on cuda)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 cpu, bfloat16 cuda")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation before timing")
    ap.add_argument("--quiet", type=float, default=0.2,
                    help="rounds where other processes kept more cores busy than this are left out of the medians")
    ap.add_argument("--flex-block", type=int, nargs="+", default=[128, 64], help="FlexAttention BLOCK_SIZEs")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/{cpu_forward,gpu_forward_<gpu>}.json)")
    args = ap.parse_args()
    defaults = DEFAULTS[args.device]
    args.n, args.dim = args.n or defaults["n"], args.dim or defaults["dim"]
    args.backend, args.dtype = defaults["backend"], args.dtype or defaults["dtype"]
    if args.out is None:
        args.out = result_path("cpu_forward", "gpu_forward", args.device)
    return args


def goals(patterns: list[dict]) -> dict:
    """The issue's goals: faster than FlexAttention (at its best block size), >= 5x faster than SDPA."""
    out = {}
    for p in patterns:
        r = p["results"]
        flex_ms = [x["median_ms"] for label, x in r.items() if label.startswith("flex") and "median_ms" in x]
        out[p["pattern"]] = {"faster_than_best_flex": bool(flex_ms) and r["sparsec"]["median_ms"] < min(flex_ms),
                             "5x_faster_than_sdpa": r.get("sdpa dense mask", {}).get("sparsec_speedup", 0) >= 5}
        print(f"goal {p['pattern']}: faster than Flex (best block size) "
              f"{'yes' if out[p['pattern']]['faster_than_best_flex'] else 'NO'}, >= 5x faster than dense-mask SDPA "
              f"{'yes' if out[p['pattern']]['5x_faster_than_sdpa'] else 'NO'}")
    return out


NOTES = {
    "times": "median/min of `repeats` calls after `warmup`, interleaved round-robin over the implementations; "
             "setup phases are single calls, timed separately",
    "quiet_rounds": "median_ms/min_ms use only the rounds (one call of each implementation) in which other processes "
                    "kept fewer than `quiet` cores busy (from /proc/stat); median_all_rounds_ms uses all",
    "sparsec_speedup": "peer median / sparsec median (> 1: sparsec is faster)",
    "max_abs_err": "vs a float64 masked softmax with the dense mask from kern.mask",
    "peak_memory_mb": "CUDA only: the allocator's peak in one call above memory in use",
    "flex": "torch.compile(flex_attention); block masks from torch.compile(create_block_mask) (its first call "
            "compiles; BigBird's random-picks table is built untimed); compiles start from an empty inductor cache "
            "(TORCHINDUCTOR_CACHE_DIR, unless set)"}


def main() -> int:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start, load_before = time.perf_counter(), os.getloadavg()
    flex = torch.compile(flex_attention)
    print(f"B=1 H={args.heads} n={args.n} D={args.dim} {dtype} on {device}, sparsec backend={args.backend}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    patterns = []
    for name in PATTERNS:
        p = bench_pattern(name, args, device, dtype, flex)
        patterns.append(p)
        print(f"{name}: density {p['density']:.4f}, 64x64 tiles visited {p['tiles_64']['visited_per_head']:.0f}"
              f" / {p['tiles_64']['total_per_head']} per head, flex mask pairs differing "
              f"{p['flex_mask_pairs_differing']}, other processes' busy cores per round "
              f"{[round(f, 2) for f in p['foreign_cores_busy_per_round']]}", flush=True)
    print("\n" + table(patterns) + "\n")
    reached = goals(patterns)
    wall, load_after = time.perf_counter() - start, os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; wall time {wall:.0f} s")

    tol = TOLERANCE[dtype]
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable, *sys.argv]), "machine": machine(device),
              "config": {"batch": 1, "heads": args.heads, "n": args.n, "dim": args.dim, "dtype": args.dtype,
                         "device": args.device, "sparsec_backend": args.backend, "flex_block_sizes": args.flex_block,
                         "repeats": args.repeats, "warmup": args.warmup, "quiet": args.quiet, "tolerance": tol},
              "notes": NOTES, "load_average_1min_before_after": [load_before[0], load_after[0]],
              "goals": reached, "patterns": patterns, "wall_s": wall}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    bad = [p["pattern"] for p in patterns if not p["results"]["sparsec"]["max_abs_err"] <= tol]
    if bad:
        print(f"FAIL: sparsec's max abs error exceeds {tol:g} for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
