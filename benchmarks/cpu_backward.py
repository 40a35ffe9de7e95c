"""Forward+backward attention time and memory: sparsec vs dense-mask SDPA vs FlexAttention, CPU or CUDA.

For `band(256) + global(16)` and the BigBird library pattern (patterns/bigbird.sa), at
B=1, H=8, n=4096, D=64, fp32 on CPU, with q, k, v requiring grad and a fixed random dO, this times
  - sparsec: `o = kern(q, k, v, backend="cpu")`, then `torch.autograd.grad(o, (q, k, v), dO)`
    (the first call builds and caches the plan: "setup"),
  - `scaled_dot_product_attention` with the dense bool mask (1, H, n, n) from `kern.mask`, likewise,
  - FlexAttention: `torch.compile(flex_attention)` with a block mask of the same pattern. torch has
    no CPU backward for it; the attempt is made once and its exception recorded (timed like the
    others only if it works),
each as forward+backward per call and, for context, the forward alone (grad enabled, as in a
training step). It reports median/min times, the speedup of sparsec over each peer, the max abs
error of O, dQ, dK, dV against float64 autograd through a dense masked softmax (exit 1 if
sparsec's relative error, max |g - ref| / max(1, max |ref|), exceeds 1e-4), and the peak resident
memory of one forward+backward call, measured in a fresh subprocess per implementation (RSS in a
process that has already run the others mostly shows the allocator's reuse). Repeats run
round-robin over the implementations, so that load from other processes hits them alike.

With --device cuda the defaults are bf16, D=128, n=16384 (H=8, B=1) and sparsec's backend="triton";
FlexAttention has a backward there and is timed at each --flex-block size (block masks from
torch.compile(create_block_mask), as in cpu_forward.py); SDPA runs if its dense mask fits the budget;
the tolerance is bf16's (3e-2 on O, 6e-2 on the gradients, relative); peak memory is the CUDA
allocator's peak in-process; and the report adds TFLOP/s over the allowed pairs (see NOTES).

    .venv/bin/python benchmarks/cpu_backward.py                 # -> benchmarks/results/cpu_backward.json
    .venv/bin/python benchmarks/cpu_backward.py --device cuda   # bf16, D=128, n=16384
                                                                # -> benchmarks/results/gpu_backward_<gpu>.json
    .venv/bin/python benchmarks/cpu_backward.py --n 512 --heads 2 --repeats 2 --out /tmp/cb.json  # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_forward as cf  # its machine description, timing loop and mask_mods; puts the checkout's sparsec on sys.path
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import sparsec
from sparsec.reference import attention

ROOT, PATTERNS, CPU = cf.ROOT, cf.PATTERNS, torch.device("cpu")
GRADS = ("o", "dq", "dk", "dv")
GRAD_TOLERANCE_FACTOR = {torch.float32: 1.0, torch.float16: 2.0, torch.bfloat16: 2.0}  # x cf.TOLERANCE for dQ/dK/dV
SDPA_MASK_BUDGET = 8 * 2**30  # bytes of dense bool mask (n * n * H) above which SDPA is skipped
FWD_BWD_FLOPS_FACTOR = 1 + 2.5  # FlashAttention's convention: backward = 2.5x the forward's FLOPs


def tolerance(dtype) -> dict[str, float]:
    """Bound on the relative error of O, dQ, dK, dV: cpu_forward.py's for O (fp32 1e-4, bf16 3e-2), the
    gradients' scaled by GRAD_TOLERANCE_FACTOR (bf16: 6e-2)."""
    tol = cf.TOLERANCE[dtype]
    return {g: tol * (1.0 if g == "o" else GRAD_TOLERANCE_FACTOR[dtype]) for g in GRADS}


def inputs(n: int, H: int, D: int, device=CPU, dtype=torch.float32):
    """q, k, v (requiring grad) and dO, the same in every process (seeded)."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, H, n, D, device=device, dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def reference(q, k, v, do, mask, scale: float) -> dict[str, torch.Tensor]:
    """O, dQ, dK, dV by float64 autograd through dense masked softmax attention (sparsec.reference.attention), one head at a time
    (bounded memory), on q's device (the mask may be on the CPU). Every row of these patterns has an
    allowed key, so no row is all -inf."""
    out = {g: torch.empty(q.shape, dtype=torch.float64, device=q.device) for g in GRADS}
    for h in range(q.shape[1]):
        qh, kh, vh = (x[0, h].detach().double().requires_grad_() for x in (q, k, v))
        o = attention(qh, kh, vh, mask[0, h].to(q.device), scale)[0]
        grads = torch.autograd.grad(o, (qh, kh, vh), do[0, h].double())
        for g, x in zip(GRADS, (o.detach(), *grads)):
            out[g][0, h] = x
    return out


def fwd_bwd(fwd, q, k, v, do):
    """One training step's attention: the forward, then dQ, dK, dV (autograd.grad: nothing accumulates)."""
    o = fwd()
    return (o, *torch.autograd.grad(o, (q, k, v), do))


# ---- memory, in a fresh process per implementation ------------------------------------------------

def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure_memory(args) -> dict:
    """Peak RSS during one forward+backward above RSS just before it. Inputs (and SDPA's dense mask,
    sparsec's plan) exist before the first reading. The peak is VmHWM after resetting it through
    /proc/self/clear_refs; where that is refused, ru_maxrss (then a peak from before can hide it)."""
    q, k, v, do = inputs(args.n, args.heads, args.dim, CPU, getattr(torch, args.dtype))
    kern, out = sparsec.compile(PATTERNS[args.pattern]), {}
    if args.measure_memory == "sdpa":
        mask = kern.mask(args.n, args.n, heads=args.heads)
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        fwd = lambda: kern(q, k, v, backend="cpu")
        gc.collect()
        before = status_mb("VmRSS")
        with torch.no_grad():
            fwd()  # builds and caches the plan (the backward uses the same one)
        out["plan_and_no_grad_forward_increase_mb"] = status_mb("VmRSS") - before
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before, peak, out["method"] = status_mb("VmRSS"), lambda: status_mb("VmHWM"), "VmHWM reset by clear_refs"
    except OSError:
        maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        before, peak, out["method"] = maxrss(), maxrss, "ru_maxrss"
    result = fwd_bwd(fwd, q, k, v, do)  # kept alive to the reading: O, dQ, dK, dV are part of the cost
    out.update(rss_before_mb=before, peak_increase_mb=peak() - before, outputs_mb=4 * result[0].nbytes / 2**20)
    return out


def memory_in_subprocess(impl: str, name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--measure-memory", impl, "--pattern", name,
           "--n", str(args.n), "--heads", str(args.heads), "--dim", str(args.dim), "--dtype", args.dtype]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1][:300]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def cuda_memory(fn) -> dict:
    """CUDA: the allocator's peak during one forward+backward (fn) above what was allocated just before
    it, in this process (inputs, the dense mask, sparsec's cached plan and the reference exist before)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()  # kept alive to the reading: O, dQ, dK, dV are part of the cost
    torch.cuda.synchronize()
    return {"method": "torch.cuda.reset_peak_memory_stats, then max_memory_allocated (in-process)",
            "allocated_before_mb": before / 2**20, "peak_increase_mb": (torch.cuda.max_memory_allocated() - before)
            / 2**20, "outputs_mb": sum(x.nbytes for x in result) / 2**20}


# ---- one pattern ------------------------------------------------------------------------------------

def flex_attempt(name: str, q, k, v, do, block_size: int | None, info: dict):
    """fwd of torch.compile(flex_attention) with the pattern's block mask (BLOCK_SIZE block_size, None:
    torch's default) if one forward+backward works (on CPU not in torch 2.13: the exception is recorded
    in `info`), else None. On CUDA, as cpu_forward.py: torch.compile(create_block_mask), timed."""
    H, n, device = q.shape[1], q.shape[2], q.device
    mask_mod, per_head = cf.mask_mod_for(name, n, H, device)
    try:
        kw = {} if block_size is None else {"BLOCK_SIZE": block_size}
        build = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask
        make = lambda: build(mask_mod, None, H if per_head else None, n, n, device=device, **kw)
        if device.type == "cuda":
            bm, info["create_block_mask_first_s"] = cf.timed(make, device)  # the first call compiles
            bm, info["create_block_mask_s"] = cf.timed(make, device)
        else:
            bm = make()
        flex = torch.compile(flex_attention)
        fwd = lambda: flex(q, k, v, block_mask=bm)
        info["compile_and_first_call_s"] = cf.timed(lambda: fwd_bwd(fwd, q, k, v, do), device)[1]
        return fwd
    except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
        info["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        print(f"{name}: FlexAttention forward+backward on {device.type.upper()} fails: {info['error']}", flush=True)
        return None


def stats(ts: list[float], quiet: list[int]) -> dict:
    used = [ts[i] for i in quiet]
    return {"median_ms": statistics.median(used) * 1e3, "min_ms": min(used) * 1e3,
            "median_all_rounds_ms": statistics.median(ts) * 1e3, "times_ms": [t * 1e3 for t in ts]}


def bench_pattern(name: str, args, device, dtype) -> dict:
    n, H, D = args.n, args.heads, args.dim
    q, k, v, do = inputs(n, H, D, device, dtype)
    kern = sparsec.compile(PATTERNS[name])
    mask, mask_s = cf.timed(lambda: kern.mask(n, n, heads=H), CPU)  # on the CPU; copied to `device` for SDPA
    pairs = int(mask.sum())
    info = {"pattern": name, "ir": kern.ir.body.show(), "density": mask.sum().item() / mask.numel(),
            "dense_mask_s": mask_s, "dense_mask_mb": mask.numel() * mask.element_size() / 2**20,
            "allowed_pairs": pairs, "flops": {"fwd": 4 * pairs * D, "fwd_bwd": 4 * pairs * D * FWD_BWD_FLOPS_FACTOR}}
    ref = reference(q, k, v, do, mask, 1 / D ** 0.5)

    sp = lambda: kern(q, k, v, backend=args.backend)
    fwds = {"sparsec": sp}
    results = {"sparsec": {"build_and_first_call_s": cf.timed(lambda: fwd_bwd(sp, q, k, v, do), device)[1]}}
    if mask.numel() * mask.element_size() > SDPA_MASK_BUDGET:
        results["sdpa dense mask"] = {"skipped": f"dense mask {mask.numel() / 2**30:.1f} GiB exceeds the "
                                                 f"{SDPA_MASK_BUDGET / 2**30:.0f} GiB budget", "peak_memory": None}
    else:
        try:
            dense = mask.to(device)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            results["sdpa dense mask"] = {"first_call_s": cf.timed(lambda: fwd_bwd(sdpa, q, k, v, do), device)[1]}
            fwds["sdpa dense mask"] = sdpa
        except (torch.OutOfMemoryError, RuntimeError) as e:  # on a GPU, where SDPA's n x n tensors do not fit
            results["sdpa dense mask"] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "peak_memory": None}
            dense = None  # frees its copy on the GPU
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for bs in args.flex_block:
        label = "flex" if bs is None else f"flex (block {bs})"
        results[label] = {}
        flex = flex_attempt(name, q, k, v, do, bs, results[label])
        if flex is not None:
            fwds[label] = flex
        else:
            results[label]["peak_memory"] = None  # nothing to measure

    # both phases of every implementation in one interleaved loop, so that load hits all of them alike
    impls = {}
    for label, fwd in fwds.items():
        impls[(label, "fwd_bwd")] = lambda fwd=fwd: fwd_bwd(fwd, q, k, v, do)
        impls[(label, "fwd")] = fwd
    times, foreign = cf.round_robin(impls, device, args.warmup, args.repeats)
    quiet = cf.quiet_rounds(foreign, args.quiet, name)
    info.update(foreign_cores_busy_per_round=foreign, rounds_used=quiet)

    for label, fwd in fwds.items():
        r = results[label]
        r["fwd_bwd"], r["fwd"] = stats(times[(label, "fwd_bwd")], quiet), stats(times[(label, "fwd")], quiet)
        got = fwd_bwd(fwd, q, k, v, do)
        r["max_abs_err"] = {g: (x.double() - ref[g]).abs().max().item() for g, x in zip(GRADS, got)}
        r["rel_err"] = {g: r["max_abs_err"][g] / max(1.0, ref[g].abs().max().item()) for g in GRADS}
        r["tflops"] = {ph: info["flops"][ph] / (r[ph]["median_ms"] * 1e-3) / 1e12 for ph in ("fwd_bwd", "fwd")}
        del got
        if device.type == "cuda":  # in this process: the allocator's peak
            r["peak_memory"] = cuda_memory(lambda: fwd_bwd(fwd, q, k, v, do))
        elif not label.startswith("flex"):  # sparsec and SDPA on CPU: fresh processes, one after the other
            r["peak_memory"] = memory_in_subprocess("sdpa" if label.startswith("sdpa") else "sparsec", name, args)
    for label, r in results.items():
        if label != "sparsec" and "fwd" in r:
            r["sparsec_speedup"] = {ph: r[ph]["median_ms"] / results["sparsec"][ph]["median_ms"]
                                    for ph in ("fwd_bwd", "fwd")}
    info["results"] = results
    return info


# ---- report -------------------------------------------------------------------------------------

def table(patterns: list[dict]) -> str:
    lines = [("| pattern | impl | fwd+bwd ms (median) | min ms | fwd ms (median) | sparsec speedup fwd+bwd (fwd) "
              "| TFLOP/s fwd+bwd (fwd) | peak mem MB | max abs err o / dq / dk / dv | setup |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in patterns:
        for label, r in p["results"].items():
            setup = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in r.items() if k.endswith("_s"))
            why = r.get("error") or r.get("skipped")
            if why:
                lines.append(f"| {p['pattern']} | {label} | {why[:70]} | | | | | | | {setup} |")
                continue
            s = r.get("sparsec_speedup")
            speed = f"{s['fwd_bwd']:.2f}x ({s['fwd']:.2f}x)" if s else "-"
            mem = (r.get("peak_memory") or {}).get("peak_increase_mb")
            errs = " / ".join(f"{r['max_abs_err'][g]:.1e}" for g in GRADS)
            tflops = f"{r['tflops']['fwd_bwd']:.3g} ({r['tflops']['fwd']:.3g})"
            lines.append(f"| {p['pattern']} | {label} | {r['fwd_bwd']['median_ms']:.1f} | {r['fwd_bwd']['min_ms']:.1f}"
                         f" | {r['fwd']['median_ms']:.1f} | {speed} | {tflops} | {'-' if mem is None else f'{mem:.0f}'}"
                         f" | {errs} | {setup} |")
    return "\n".join(lines)


NOTES = {
    "times": "median/min of `repeats` calls after `warmup`, interleaved round-robin over the implementations and "
             "phases; fwd_bwd is `o = fwd()` then torch.autograd.grad(o, (q, k, v), dO); fwd is the forward alone "
             "with grad enabled (it saves what the backward needs); setup phases are single calls, timed separately",
    "quiet_rounds": "median_ms/min_ms use only the rounds (one call of each implementation and phase) in which "
                    "other processes kept fewer than `quiet` cores busy (from /proc/stat); median_all_rounds_ms "
                    "uses all",
    "sparsec_speedup": "peer median / sparsec median (> 1: sparsec is faster), per phase",
    "max_abs_err": "of O, dQ, dK, dV vs float64 autograd through a dense masked softmax (mask from kern.mask); "
                   "rel_err divides by max(1, max |ref|); exit 1 if sparsec's rel_err exceeds config.tolerance_rel "
                   "(O) or config.tolerance_rel_grads (dQ, dK, dV)",
    "tflops": "FLOPs over the pairs the pattern allows (allowed_pairs, all heads), the same count for every "
              "implementation, divided by its median time: forward 4 * allowed_pairs * D (QK^T and PV), "
              "forward+backward 3.5x that (FlashAttention's convention: the backward is 2.5x the forward)",
    "sdpa dense mask": "scaled_dot_product_attention with kern.mask's bool (1, H, n, n) mask; skipped (with the "
                       "reason) when that mask exceeds config.sdpa_mask_budget_bytes",
    "peak_memory": "one forward+backward in a fresh process (python benchmarks/cpu_backward.py --measure-memory "
                   "IMPL): peak RSS during the call (VmHWM, reset through /proc/self/clear_refs just before; "
                   "ru_maxrss where refused) minus RSS before it. Inputs exist before; so does SDPA's dense mask "
                   "(its own size: dense_mask_mb, not counted in the increase) and sparsec's cached plan (built by "
                   "a no_grad forward first: plan_and_no_grad_forward_increase_mb). The increase includes the "
                   "outputs O, dQ, dK, dV (outputs_mb)",
    "flex": "torch.compile(flex_attention) with create_block_mask of the same mask_mod as cpu_forward.py; torch "
            "has no CPU backward for it, so one forward+backward is attempted and its exception recorded"}
NOTES_CUDA = {
    **NOTES,
    "times": NOTES["times"] + "; each call is timed between torch.cuda.synchronize() calls",
    "peak_memory": "one forward+backward in this process: torch.cuda.max_memory_allocated after "
                   "torch.cuda.reset_peak_memory_stats, minus memory_allocated just before (allocated_before_mb: "
                   "inputs, the dense mask on the GPU when SDPA runs, the float64 reference, sparsec's cached plan). "
                   "The increase includes the outputs O, dQ, dK, dV (outputs_mb)",
    "flex": "torch.compile(flex_attention), forward and backward, at each of config.flex_block_sizes; block masks "
            "from torch.compile(create_block_mask) of the same mask_mod as cpu_forward.py (its first call compiles: "
            "create_block_mask_first_s); compiles start from an empty inductor cache (TORCHINDUCTOR_CACHE_DIR, "
            "unless set)"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, help="sequence length (default 4096 on cpu, 16384 on cuda)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, help="head dim (default 64 on cpu, 128 on cuda)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 cpu, bfloat16 cuda")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and phase")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation and phase before timing")
    ap.add_argument("--quiet", type=float, default=0.2,
                    help="rounds where other processes kept more cores busy than this are left out of the medians")
    ap.add_argument("--flex-block", type=int, nargs="+",
                    help="FlexAttention BLOCK_SIZEs (default: 128 64 on cuda; on cpu one attempt at torch's default)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/{cpu_backward,gpu_backward_<gpu>}.json)")
    ap.add_argument("--measure-memory", choices=["sparsec", "sdpa"], help=argparse.SUPPRESS)  # the subprocess
    ap.add_argument("--pattern", choices=list(PATTERNS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cpu_backward.py: error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() "
                 "is False)")
    defaults = cf.DEFAULTS[args.device]  # as cpu_forward.py: n, dim, dtype and sparsec's backend per device
    args.n, args.dim = args.n or defaults["n"], args.dim or defaults["dim"]
    args.backend, args.dtype = defaults["backend"], args.dtype or defaults["dtype"]
    args.flex_block = args.flex_block or ([128, 64] if args.device == "cuda" else [None])
    if args.out is None:
        args.out = cf.result_path("cpu_backward", "gpu_backward", args.device)
    return args


def main() -> int:
    args = parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory(args)))
        return 0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start, load_before = time.perf_counter(), os.getloadavg()
    where = f"cuda ({torch.cuda.get_device_name(device)}), sparsec backend={args.backend}" \
        if device.type == "cuda" else "cpu"
    print(f"B=1 H={args.heads} n={args.n} D={args.dim} {args.dtype} on {where}, forward+backward, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    patterns = []
    for name in PATTERNS:
        p = bench_pattern(name, args, device, dtype)
        patterns.append(p)
        print(f"{name}: density {p['density']:.4f}, dense mask {p['dense_mask_mb']:.0f} MB, other processes' busy "
              f"cores per round {[round(f, 2) for f in p['foreign_cores_busy_per_round']]}", flush=True)
    print("\n" + table(patterns) + "\n")
    wall, load_after = time.perf_counter() - start, os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; wall time {wall:.0f} s")

    tol = tolerance(dtype)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable, *sys.argv]), "machine": cf.machine(device),
              "config": {"batch": 1, "heads": args.heads, "n": args.n, "dim": args.dim, "dtype": args.dtype,
                         "device": args.device, "sparsec_backend": args.backend, "repeats": args.repeats,
                         "warmup": args.warmup, "quiet": args.quiet, "tolerance_rel": tol["o"],
                         "tolerance_rel_grads": tol["dq"], "flex_block_sizes": args.flex_block,
                         "sdpa_mask_budget_bytes": SDPA_MASK_BUDGET},
              "notes": NOTES_CUDA if device.type == "cuda" else NOTES,
              "load_average_1min_before_after": [load_before[0], load_after[0]],
              "patterns": patterns, "wall_s": wall}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    bad = [p["pattern"] for p in patterns if not all(p["results"]["sparsec"]["rel_err"][g] <= tol[g] for g in GRADS)]
    if bad:
        print(f"FAIL: sparsec's relative error exceeds {tol['o']:g} (O) / {tol['dq']:g} (dQ, dK, dV) for "
              f"{', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
