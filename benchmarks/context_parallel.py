"""Context parallelism: bytes each rank receives under sparsec's plan against ring / all-gather, and gloo wall time.

Part 1, bytes (no processes: every rank's plan is computed on one machine, as each rank computes it
with rank= and world=): library patterns at n = 2^16, 2^18, 2^20 over P = 2, 4, 8 ranks, K+V of
4096 bytes per token (32 query heads, 8 K/V heads, D = 128, bf16), 128-token tiles. Per case: the
max and mean bytes a rank receives in one forward (K/V fetched, queries sent to it, partial
results back) over what ring attention or an all-gather receives ((P-1)/P of all K/V per rank),
and the work balance (the busiest rank's tile pairs over the mean).

Part 2, wall time on gloo (CPU processes, --world ranks, one thread each): one forward + backward
of band(256) + global(16) and band(256) & causal at --n, sparsec's context-parallel call against
an all-gather of K/V followed by the same kernels on every rank's rows (what torch's FlexAttention
context parallelism does). torch's ring `context_parallel` patches CUDA SDPA kernels and has no
CPU path, so it is not timed here.

    .venv/bin/python benchmarks/context_parallel.py       # -> benchmarks/results/context_parallel_cpu.json + .png
    .venv/bin/python benchmarks/context_parallel.py --quick
    .venv/bin/python benchmarks/context_parallel.py --content   # part 3 alone

Part 3, content patterns (lsh, cluster, topk): they run in gather mode, every rank fetching all
K/V. The bound any K/V-fetching plan could reach instead, from the dense mask of random q and k at
n = 8192, P = 8: per rank, the distinct key rows its query rows need over ring's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's sparsec, installed or not
import sparsec  # noqa: E402
import sparsec.distributed as sd  # noqa: E402
from sparsec.tools.bench import machine  # noqa: E402

SHAPE = dict(heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, block=128)
PATTERNS = {   # name -> (source, whether its layout differs per head: planned with heads=1 too)
    "band(4096)+global(16)": "pattern p = band(4096) + global(16)",
    "band(256)&causal": "pattern p = band(256) & causal",
    "band(256)+sink(16)": "pattern p = causal & (band(256, 0) + sink(16))",
    "longformer": "longformer",
    "streaming": "streaming",
    "bigbird": "bigbird",
    "bigbird, one draw for all heads": "bigbird",
    "document&causal": "pattern p = document & causal",
    "causal": "pattern p = causal",
}


def packing(n: int, docs: int = 64) -> torch.Tensor:
    """A packing of `docs` documents of random lengths (seed 0)."""
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(n - 1, generator=g)[: docs - 1] + 1).values
    seg = torch.zeros(1, n, dtype=torch.long)
    for c in cuts:
        seg[0, c:] += 1
    return seg


def bytes_table(sizes, worlds) -> list[dict]:
    rows = []
    for name, src in PATTERNS.items():
        kern = sparsec.compile(src)
        for n in sizes:
            for world in worlds:
                shape = dict(SHAPE, heads=1, kv_heads=1) if "one draw" in name else SHAPE
                extra = {"segment_ids": packing(n)} if "document" in src else {}
                t = time.perf_counter()
                plan = sd.plan(kern, n, rank=0, world=world, **shape, **extra)
                seconds = time.perf_counter() - t
                got, work = plan.bytes(), plan.work()
                ratio = [b["total"] / b["ring"] for b in got]
                ring_kv = (SHAPE["kv_heads"] * SHAPE["dim"] * 2 * 2) / (shape["kv_heads"] * shape["dim"] * 2 * 2)
                rows.append(dict(pattern=name, n=n, world=world, scheme=plan.scheme, mode=plan.mode,
                                 max_over_ring=max(ratio), mean_over_ring=statistics.mean(ratio),
                                 ring_over_max=max(b["ring"] for b in got) / max(1, max(b["total"] for b in got)),
                                 max_bytes=max(b["total"] for b in got) * ring_kv,
                                 ring_bytes=max(b["ring"] for b in got) * ring_kv,
                                 balance=max(work) / statistics.mean(work), plan_s=seconds))
                r = rows[-1]
                print(f"{name:32s} n=2^{n.bit_length() - 1} P={world} {r['scheme']:10s} max/ring {r['max_over_ring']:.4f} "
                      f"mean/ring {r['mean_over_ring']:.4f} balance {r['balance']:.3f} ({seconds:.1f} s)", flush=True)
    return rows


def _timing_worker(rank, world, n, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    H, D = 4, 64
    results = {}
    for src in ("pattern p = band(256) + global(16)", "pattern p = band(256) & causal"):
        kern = sparsec.compile(src, autotune=False)
        plan = sd.plan(kern, n, heads=H, dim=D, dtype=torch.float32, block=128)
        g = torch.Generator().manual_seed(0)
        q, k, v = (plan.shard(torch.randn(1, H, n, D, generator=g)).requires_grad_() for _ in range(3))
        start = int(plan.rows()[0])
        contiguous = bool((plan.rows() == torch.arange(start, start + len(plan.rows()))).all())

        def sparse():
            kern(q, k, v, plan=plan, backend="cpu").sum().backward()

        sizes = [len(plan.rows(r)) for r in range(world)]

        def whole(x):   # every rank's rows (padded to the longest for all_gather), in position order
            padded = torch.nn.functional.pad(x, (0, 0, 0, max(sizes) - x.shape[2]))
            return torch.cat([part[:, :, :m] for part, m in zip(dnn.all_gather(padded), sizes)], 2)

        def gathered():   # all K/V on every rank, then the same kernels on this rank's rows
            kern(q, whole(k), whole(v), q_offset=start, backend="cpu").sum().backward()
        impls = {"sparsec_cp": sparse}
        if contiguous:
            impls["allgather"] = gathered
        times = {}
        for name, fn in impls.items():
            fn()   # warm-up: plans, layouts
            ts = []
            for _ in range(repeats):
                dist.barrier()
                t = time.perf_counter()
                fn()
                dist.barrier()
                ts.append(time.perf_counter() - t)
            times[name] = statistics.median(ts)
        if "allgather" in times:   # the two agree (checked once per run)
            o_cp = plan.unshard(kern(q, k, v, plan=plan, backend="cpu").detach())
            o_ag = plan.unshard(kern(q, whole(k), whole(v), q_offset=start, backend="cpu").detach())
            times["max_abs_diff"] = float((o_cp - o_ag).abs().max())
        results[src] = dict(times, scheme=plan.scheme, bytes=plan.bytes()[rank])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def wall_times(n: int, world: int, repeats: int, out: Path) -> dict:
    store = Path(f"{out}.store")
    store.unlink(missing_ok=True)
    mp.start_processes(_timing_worker, args=(world, n, repeats, str(out)), nprocs=world, start_method="spawn")
    store.unlink(missing_ok=True)
    return json.loads(out.read_text())


CONTENT = {"reformer": ("reformer", None), "routing": ("routing", None), "moba": ("moba", None),
           "nsa_selection": ("moba", "nsa_selection")}


def content_bound(n: int, world: int, heads: int = 4, dim: int = 64) -> list[dict]:
    """Content patterns run in gather mode (all K/V to every rank). The best any K/V-fetching plan
    could do instead: per rank (contiguous shards), the distinct key rows its query rows need over
    any head, from the dense mask of random q and k, over ring's (P-1)/P n."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, n, dim, generator=g) for _ in range(2))
    rows, out = n // world, []
    for name, (path, pattern) in CONTENT.items():
        mask = sparsec.compile(path, pattern=pattern).mask(n, heads=heads, q=q, k=k).numpy()[0]
        fractions = []
        for r in range(world):
            need = mask[:, r * rows:(r + 1) * rows].any(axis=(0, 1))
            need[r * rows:(r + 1) * rows] = False
            fractions.append(float(need.sum() / (n - rows)))
        out.append(dict(pattern=name, n=n, world=world, heads=heads, density=float(mask.mean()),
                        max_over_ring=max(fractions), mean_over_ring=statistics.mean(fractions)))
        print(f"{name:14s} n={n} P={world}: needed keys / ring's, busiest {max(fractions):.3f}, "
              f"mean {statistics.mean(fractions):.3f}", flush=True)
    return out


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in PATTERNS:
        pts = sorted((r["n"], r["max_over_ring"]) for r in rows if r["pattern"] == name and r["world"] == 8)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (positions)")
    ax.set_ylabel("busiest rank's bytes / ring's (P = 8)")
    ax.set_title("sparsec context parallelism: bytes received per forward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n = 2^16 only, P = 2 and 8, a short timing")
    ap.add_argument("--n", type=int, default=16384, help="the timed sequence length")
    ap.add_argument("--world", type=int, default=2, help="gloo processes for the timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--content", action="store_true",
                    help="only the content patterns' bound (n = 8192, P = 8) -> context_parallel_content_cpu.json")
    args = ap.parse_args()
    if args.content:
        path = ROOT / "benchmarks" / "results" / "context_parallel_content_cpu.json"
        path.write_text(json.dumps(dict(machine=machine(torch.device("cpu")), rows=content_bound(8192, 8)), indent=1))
        print(f"wrote {path}")
        return
    sizes = [1 << 16] if args.quick else [1 << 16, 1 << 18, 1 << 20]
    worlds = [2, 8] if args.quick else [2, 4, 8]
    out = ROOT / "benchmarks" / "results"
    rows = bytes_table(sizes, worlds)
    timing = wall_times(4096 if args.quick else args.n, args.world, 1 if args.quick else args.repeats,
                        out / "context_parallel_timing.tmp.json")
    (out / "context_parallel_timing.tmp.json").unlink()
    print(json.dumps(timing, indent=1))
    result = dict(machine=machine(torch.device("cpu")), shape={k: str(v) for k, v in SHAPE.items()},
                  bytes=rows, timing=dict(n=args.n, world=args.world, repeats=args.repeats, results=timing))
    name = "context_parallel_cpu_quick" if args.quick else "context_parallel_cpu"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if not args.quick:
        plot(rows, out / "context_parallel_cpu.png")
    print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
