"""Block-layout build time and peak memory on CPU: sparsec's analytic layout vs FlexAttention's
create_block_mask for one pattern; with --library, every pattern of the library at growing n
(each in a fresh process), against the goal of under 1 s and 200 MB at n = 2**20."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # use the checkout's sparsec without installing it

PATTERN = "pattern p = band(256) + global(16) + blocks(64, random(2))"
TILE = 128
RANDOM_BLOCK = 64  # the blocks(64, ...) of PATTERN: picks are per 64-block row
MB = 1 << 20


# ---- memory probes (Linux) -------------------------------------------------------------------------

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0), so each phase gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def phase(fn, repeats: int = 1) -> dict:
    """Run fn once cold, then `repeats` more times; times and the phase's peak RSS above its start."""
    before, reset = rss_mb(), reset_peak()
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"first_s": first, "times_s": times, "median_s": statistics.median(times) if times else first,
            "rss_before_mb": before, "peak_rss_mb": peak_mb(),
            "peak_rss_delta_mb": max(0.0, peak_mb() - before),  # RSS may shrink during the phase
            "peak_was_reset": reset, "result": out}


def limit_memory() -> None:
    """Cap the address space at physical RAM, so an oversized allocation raises in the worker
    instead of the OOM killer taking down the machine."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    resource.setrlimit(resource.RLIMIT_AS, (ram, ram))


# ---- the pattern as a FlexAttention mask_mod ----------------------------------------------------

def make_mask_mod(n: int):
    """The same union as PATTERN; the random blocks read sparsec's own picks from a lookup table
    (two int64 columns of key blocks per query block: O(n) memory, unlike a (blocks x blocks) table)."""
    import numpy as np
    import torch
    from sparsec.ir.random import random_keys
    blocks = -(-n // RANDOM_BLOCK)
    picks = torch.from_numpy(random_keys(seed=0, head=0, rows=np.arange(blocks), r=2, n_k=blocks))
    p0, p1 = picks[:, 0].contiguous(), picks[:, 1].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // RANDOM_BLOCK, kv_idx // RANDOM_BLOCK
        band = (q_idx - kv_idx).abs() <= 256
        glob = (q_idx < 16) | (kv_idx < 16)
        return band | glob | (p0[qb] == kb) | (p1[qb] == kb)

    return mask_mod


def flex_builder(eager: bool):
    from torch.nn.attention.flex_attention import create_block_mask
    if eager:
        return create_block_mask
    import torch
    return torch.compile(create_block_mask)  # what the _compile= flag's deprecation warning recommends


def flex_classes(bm, tk: int):
    """Dense (Tq, Tk) int8 grid from a BlockMask's index lists: 1 PARTIAL, 2 FULL, 0 EMPTY."""
    import numpy as np
    out = np.zeros((bm.kv_num_blocks.shape[-1], tk), np.int8)
    for num, idx, cls in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        num, idx = num[0, 0].numpy(), idx[0, 0].numpy()
        for r in range(len(num)):
            out[r, idx[r, :num[r]]] = cls
    return out


# ---- workers: one configuration per fresh process, result as JSON in a file --------------------

def worker_sparsec(n: int, repeats: int) -> dict:
    import sparsec
    after_imports = rss_mb()
    comp = phase(lambda: sparsec.compile(PATTERN), repeats)
    kern = comp.pop("result")
    build = phase(lambda: kern.layout(n, n, block_m=TILE, block_n=TILE), repeats)
    del build["result"]
    tracemalloc.start()  # a separate run: tracing slows numpy-heavy code, so it is not timed
    lay = kern.layout(n, n, block_m=TILE, block_n=TILE)
    build["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    return {"rss_after_imports_mb": after_imports, "compile": comp, "build": build,
            "process_peak_rss_delta_mb": max(comp["peak_rss_mb"], build["peak_rss_mb"]) - after_imports,
            "tiles": lay.shape[2:], "full": len(lay.full.indices), "partial": len(lay.partial.indices),
            "tile_density": lay.tile_density(), "layout_nbytes": lay.nbytes()}


def worker_flex(n: int, repeats: int, eager: bool) -> dict:
    import torch
    create = flex_builder(eager)
    after_imports = rss_mb()
    lookup = phase(lambda: make_mask_mod(n))   # outside the build timing
    mask_mod = lookup.pop("result")
    call = lambda: create(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=TILE)
    # the first call traces and compiles (torch.compile); its own phase so the build peak excludes it
    first = phase(call)
    first.pop("result")
    build = phase(call, repeats)
    bm = build.pop("result")
    return {"rss_after_imports_mb": after_imports, "torch_threads": torch.get_num_threads(),
            "lookup": lookup, "first_call": first, "build": build,
            "process_peak_rss_delta_mb": max(p["peak_rss_mb"] for p in (lookup, first, build)) - after_imports,
            "full": int(bm.full_kv_num_blocks.sum()), "partial": int(bm.kv_num_blocks.sum())}


def worker_check(n: int, eager: bool) -> dict:
    """Tile classes of sparsec vs FlexAttention, plus the token masks, so a mismatch can be placed."""
    import sparsec
    from sparsec.layout import tile_classes
    from torch.nn.attention.flex_attention import create_mask
    kern = sparsec.compile(PATTERN)
    lay = kern.layout(n, n, block_m=TILE, block_n=TILE)
    ours = lay.classes()[0, 0]
    mask_mod = make_mask_mod(n)
    theirs = flex_classes(flex_builder(eager)(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=TILE), ours.shape[1])
    dense_sparsec = kern.mask(n, n)[0, 0].numpy()
    dense_flex = create_mask(mask_mod, None, None, n, n, device="cpu")[0, 0].numpy()
    truth = tile_classes(dense_sparsec, TILE, TILE)  # classes of sparsec's own dense mask
    differ = lambda a, b: int(((a > 0) != (b > 0)).sum())
    return {"n": n, "tiles": list(ours.shape),
            "sparsec_nonempty": int((ours > 0).sum()), "flex_nonempty": int((theirs > 0).sum()),
            "nonempty_tiles_differing": differ(ours, theirs), "classes_differing": int((ours != theirs).sum()),
            "token_pairs_differing_dense_masks": int((dense_sparsec != dense_flex).sum()),
            "sparsec_layout_vs_own_dense_mask_classes_differing": int((ours != truth).sum()),
            "agree": bool((ours == theirs).all())}


LIBRARY_TILE = 128
GOAL_N, GOAL_S, GOAL_MB = 1 << 20, 1.0, 200.0


def library() -> list[tuple[str, str]]:
    """(file, pattern) for every pattern statement of patterns/*.sa."""
    from sparsec.grammar.elaborate import pattern_names
    from sparsec.grammar.syntax import parse
    return [(str(path.relative_to(ROOT)), name) for path in sorted((ROOT / "patterns").glob("*.sa"))
            for name in pattern_names(parse(path.read_text(), str(path)))]


def worker_library(spec: str, n: int, repeats: int) -> dict:
    """One library pattern at n: kern.layout(n, n, 128, 128) as the hardening issue measured it
    (heads=1; head-dependent patterns build head 0), or for content-based patterns the layouts a
    call builds, share_layouts(q, k), on seeded Gaussian q, k (B = H = 1, D = 64; the inputs and
    their float64 ids are made before the phase starts being measured only for q and k)."""
    import numpy as np
    import torch
    import sparsec
    from sparsec.tools import bench
    path, name = spec.split(":")
    kern = sparsec.compile(str(ROOT / path), pattern=name)
    after_imports = rss_mb()
    rng = np.random.default_rng(0)
    seg = bench.documents(1, n, rng).numpy() if "segment_ids" in kern.needs else None
    if {"q", "k"} & kern.needs:
        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, 1, n, 64, generator=gen) for _ in range(2))
        extra = {"segment_ids": torch.from_numpy(seg)} if seg is not None else {}
        build = lambda: kern.share_layouts(q, k, LIBRARY_TILE, LIBRARY_TILE, **extra)
        what = "share_layouts(q, k)"
    else:
        build = lambda: [(None, kern.layout(n, n, LIBRARY_TILE, LIBRARY_TILE, segment_ids=seg), None)]
        what = "layout(n, n, 128, 128)"
    res = phase(build, repeats)
    lays = [lay for _, lay, _ in res.pop("result")]
    tracemalloc.start()
    build()
    res["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    return {"pattern": name, "file": path, "ir": kern.ir.body.show(), "built": what, "n": n,
            "rss_after_imports_mb": after_imports, "build": res, "shares": len(lays),
            "tiles_visited": sum(lay.tiles_visited() for lay in lays),
            "tiles": sum(int(np.prod(lay.shape)) for lay in lays),
            "layout_nbytes": sum(lay.nbytes() for lay in lays)}


def library_main(args) -> None:
    start = time.perf_counter()
    rows = []
    for path, name in library():
        for n in args.n:
            r = run_worker(args, "library", n, args.flex_timeout, spec=f"{path}:{name}")
            r.setdefault("pattern", name)
            r.setdefault("n", n)
            rows.append(r)
            b = r.get("build", {})
            print(f"{name:24s} n={n:8d}  " + (r["error"] if "error" in r else
                  f"{b['median_s'] * 1e3:9.1f} ms  +{b['peak_rss_delta_mb']:7.1f} MB RSS  "
                  f"{r['tracemalloc_peak_mb'] if 'tracemalloc_peak_mb' in r else b.get('tracemalloc_peak_mb', 0):7.1f} MB "
                  f"traced  {r['tiles_visited']:9d} tiles visited"), flush=True)
    goal = {}
    for r in rows:
        if r["n"] == GOAL_N:
            b = r.get("build")
            met = b is not None and b["median_s"] < GOAL_S and b["peak_rss_delta_mb"] < GOAL_MB
            goal[r["pattern"]] = {"met": bool(met), "median_s": b and b["median_s"],
                                  "peak_rss_delta_mb": b and b["peak_rss_delta_mb"],
                                  "tiles_visited": r.get("tiles_visited"), "error": r.get("error")}
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "machine": machine(), "commit": commit(),
        "tile": [LIBRARY_TILE, LIBRARY_TILE], "goal": f"n = {GOAL_N}: under {GOAL_S:g} s and {GOAL_MB:g} MB",
        "notes": {
            "what": "kern.layout(n, n, 128, 128) (heads=1), or share_layouts(q, k) for content-based patterns; "
                    "document patterns get 8 packed documents of random lengths",
            "times": "median_s: median of --repeats builds after a first (cold) one, in a fresh process per row",
            "memory": "peak_rss_delta_mb: peak RSS during the builds minus RSS before them (reset per phase); "
                      "tracemalloc_peak_mb: numpy's peak in a separate, untimed build (torch tensors not traced)"},
        "goal_at_1m": goal, "results": rows, "wall_s": time.perf_counter() - start}
    out = Path(args.out if args.out_given else ROOT / "benchmarks/results/layout_build_library_cpu.json")
    out.write_text(json.dumps(report, indent=1, default=lambda x: list(x)) + "\n")
    print(f"goal met at n = {GOAL_N}: {sum(g['met'] for g in goal.values())} of {len(goal)}; wrote {out}")


def commit() -> dict:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "sparsec"))}


def run_worker(args, kind: str, n: int, timeout: float, spec: str | None = None) -> dict:
    """Re-run this script as a worker in a fresh process; a failure comes back as {'error': why}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--repeats", str(args.repeats),
               "--worker-out", str(out)] + (["--flex-eager"] if args.flex_eager else []) + \
            (["--spec", spec] if spec else [])
        # a fresh inductor cache, so the first call's compile time is cold in every run
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        t = time.perf_counter()
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and its compile subprocesses
            proc.communicate()
            return {"error": f"timeout after {timeout:g} s", "wall_s": time.perf_counter() - t}
        wall = time.perf_counter() - t
        if proc.returncode == -signal.SIGKILL:
            return {"error": "killed by SIGKILL (likely out of memory)", "wall_s": wall}
        if proc.returncode or not out.exists():
            return {"error": f"worker exited {proc.returncode}: {log.strip()[-500:]}", "wall_s": wall}
        return dict(json.loads(out.read_text()), wall_s=wall)


def worker_main(args) -> None:
    limit_memory()
    try:
        if args.worker == "sparsec":
            res = worker_sparsec(args.n[0], args.repeats)
        elif args.worker == "flex":
            res = worker_flex(args.n[0], args.repeats, args.flex_eager)
        elif args.worker == "library":
            res = worker_library(args.spec, args.n[0], args.repeats)
        else:
            res = worker_check(args.n[0], args.flex_eager)
    except MemoryError as e:
        res = {"error": f"out of memory: MemoryError {e}"}
    except RuntimeError as e:  # torch reports a failed allocation as RuntimeError
        oom = "allocate memory" in str(e) or "out of memory" in str(e).lower()
        res = {"error": ("out of memory: " if oom else "exception: RuntimeError: ") + str(e).splitlines()[0][:300]}
    except Exception as e:
        res = {"error": f"exception: {type(e).__name__}: {str(e)[:300]}"}
    Path(args.worker_out).write_text(json.dumps(res, default=lambda x: list(x)))


# ---- report -------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "ram_gb": round(ram / 2**30, 1),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "numpy": importlib.metadata.version("numpy")}


def extrapolate(rows: list[dict]) -> None:
    """For a flex timeout, a rough n^2 guess from the last n that finished (marked as a guess)."""
    last = None
    for r in rows:
        f = r["flex"]
        if "error" not in f:
            last = (r["n"], f["build"]["median_s"])
        elif last and f["error"].startswith("timeout"):
            f["extrapolated_build_s"] = {"value": last[1] * (r["n"] / last[0]) ** 2,
                                         "how": f"n^2 scaling of the median from n={last[0]}; not measured"}


def table(rows: list[dict]) -> str:
    head = ("n", "sparsec compile", "sparsec build", "sparsec RSS / tracemalloc", "flex build",
            "flex 1st call", "flex RSS build / whole", "time flex/sparsec")
    lines = [head]
    for r in rows:
        s, f = r["sparsec"], r["flex"]
        if "error" in s:
            lines.append((str(r["n"]), s["error"]))
            continue
        sp = (f"{s['compile']['first_s'] * 1e3:.0f} ms", f"{s['build']['median_s'] * 1e3:.1f} ms",
              f"{s['build']['peak_rss_delta_mb']:.0f} / {s['build']['tracemalloc_peak_mb']:.0f} MB")
        if "error" in f:
            guess = f.get("extrapolated_build_s")
            why = f["error"] + (f" (~{guess['value']:.0f} s by n^2 extrapolation)" if guess else "")
            lines.append((str(r["n"]), *sp, why))
            continue
        t_ratio = f["build"]["median_s"] / s["build"]["median_s"]
        lines.append((str(r["n"]), *sp, f"{f['build']['median_s']:.2f} s", f"{f['first_call']['first_s']:.1f} s",
                      f"{f['build']['peak_rss_delta_mb']:.0f} / {f['process_peak_rss_delta_mb']:.0f} MB",
                      f"{t_ratio:.0f}x"))
    # error rows are shorter: their last cell (the reason) is printed unpadded
    widths = [max(len(line[k]) for line in lines if len(line) == len(head)) for k in range(len(head))]
    fmt = lambda line: "  ".join([c.rjust(w) for c, w in zip(line, widths)][:len(line) - (len(line) < len(head))]
                                 + [line[-1]] * (len(line) < len(head)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(x) for x in lines[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[65536, 1048576], help="sequence lengths (n_q = n_k)")
    ap.add_argument("--flex-timeout", type=float, default=600, help="seconds per FlexAttention configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/layout_build_cpu.json"))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after the first (cold) one")
    ap.add_argument("--check-n", type=int, default=4096, help="n of the tile-by-tile cross-check")
    ap.add_argument("--flex-eager", action="store_true",
                    help="call create_block_mask uncompiled (default: torch.compile(create_block_mask))")
    ap.add_argument("--library", action="store_true",
                    help="every library pattern at each --n (default 65536 262144 1048576), sparsec only")
    ap.add_argument("--worker", choices=["sparsec", "flex", "check", "library"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out_given = "--out" in sys.argv
    if args.worker:
        return worker_main(args)
    if args.library:
        if "--n" not in sys.argv:
            args.n = [1 << 16, 1 << 18, 1 << 20]
        if "--repeats" not in sys.argv:
            args.repeats = 3
        return library_main(args)

    start = time.perf_counter()
    flex_mode = ("create_block_mask (eager, uncompiled)" if args.flex_eager else
                 "torch.compile(create_block_mask): compiles on CPU and is far faster than eager, which "
                 "materializes the dense n x n mask and its int64 intermediates")
    print(f"pattern: {PATTERN}\ntile {TILE}x{TILE}, flex: {flex_mode}", flush=True)
    check = run_worker(args, "check", args.check_n, args.flex_timeout)
    print(f"cross-check at n={args.check_n}: {check}", flush=True)
    rows = []
    for n in args.n:
        rows.append({"n": n, "sparsec": run_worker(args, "sparsec", n, args.flex_timeout)})
        print(f"n={n} sparsec done", flush=True)
        rows[-1]["flex"] = run_worker(args, "flex", n, args.flex_timeout)
        print(f"n={n} flex done: {rows[-1]['flex'].get('error', 'ok')}", flush=True)
    extrapolate(rows)
    print("\n" + table(rows))
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s")

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(), "pattern": PATTERN, "tile": [TILE, TILE], "flex_mode": flex_mode,
        "flex_lookup": "random-block picks as two int64 (n/64,) tensors, built outside the timed build",
        "notes": {
            "times": "build median_s: median of --repeats runs after a first (cold) run in a fresh process; "
                     "sparsec compile is timed separately; flex first_call is the first create_block_mask call, "
                     "with torch.compile (unless eager) from a "
                     "fresh inductor cache",
            "memory": "peak_rss_delta_mb: peak RSS during the phase minus RSS at its start (peak reset per "
                      "phase via /proc/self/clear_refs); process_peak_rss_delta_mb: over the whole worker, "
                      "minus RSS after imports; tracemalloc covers numpy, not torch tensors",
            "timeouts": "--flex-timeout bounds each whole worker process, imports and compile included"},
        "check": check, "results": rows, "wall_s": wall}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=lambda x: list(x)) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
