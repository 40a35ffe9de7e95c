"""`sparsec bench`: one pattern at one shape timed against its peers in the same run (round robin,
medians), with TFLOP/s over the allowed pairs, speedups, layout build time and peak memory."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import peers
from ..reference import attention
from ..runtime.call import check_call, choose_backend, default_config
from ..runtime.flex import check_cpu_call
from ..compiled import CompiledPattern

PEERS = ("flex", "sdpa", "dense", "backend_flex")   # backend_flex: sparsec's call with backend="flex"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    """What to time: a shape, a dtype, the peers, and how."""
    n_q: int
    n_k: int
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False          # time forward + backward instead of forward
    vs: tuple[str, ...] = PEERS
    repeats: int = 5
    warmup: int = 1
    flex_block: int = 128
    mask_limit_gib: float = 2.0     # SDPA's dense bool mask, and the float64 reference, above this: skipped
    seed: int | None = None         # q, k, v: fresh each run unless given
    inputs: dict = field(default_factory=dict)   # call inputs (segment_ids=...); documents drawn when missing
    compiled: bool = True           # time the call under torch.compile(fullgraph=True) too


# ---- timing ---------------------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[object, float]:
    """(result, seconds) of one call."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) so far (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:
        return 0.0, 0.0
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def round_robin(impls: dict, device, warmup: int, repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """Per implementation, `repeats` call times (s) after `warmup` calls, interleaved so that load
    from other processes hits them alike; and per round, the cores other processes kept busy."""
    for fn in impls.values():
        for _ in range(warmup):
            timed(fn, device)
    times, foreign = {name: [] for name in impls}, []
    for _ in tqdm(range(repeats), desc=f"timing {len(impls)} implementations", unit="round", file=sys.stderr,
                  leave=False):
        (busy, own), t = cpu_seconds(), time.perf_counter()
        for name, fn in impls.items():
            times[name].append(timed(fn, device)[1])
        (busy2, own2), wall = cpu_seconds(), time.perf_counter() - t
        foreign.append(max(0.0, (busy2 - busy) - (own2 - own)) / wall)
    return times, foreign


def peak_memory_mb(fn, device) -> float | None:
    """CUDA: the allocator's peak during one call above what was in use before. CPU: None."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def machine(device) -> dict:
    """What the figures were taken on: host, versions, commit, GPU."""
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    root = Path(__file__).resolve().parents[2]   # the checkout
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                    check=False).stdout.strip() if shutil.which("git") else ""
    version = lambda name: next((d.version for d in importlib.metadata.distributions() if d.metadata["Name"] == name),
                                None)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "cpus_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "triton": version("triton"),
           "git_commit": git("rev-parse", "HEAD") or os.environ.get("SPARSEC_COMMIT"),   # a copy without .git:
           "git_dirty": bool(git("status", "--porcelain", "--", "sparsec"))}              # the caller says which
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False) if shutil.which("nvidia-smi") else None
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   cuda=torch.version.cuda, driver=smi.stdout.strip().splitlines()[0] if smi and smi.stdout.strip()
                   else None)
    return out


# ---- one case ---------------------------------------------------------------------------------------------

def documents(batch: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Segment ids for a document pattern: up to 8 documents of random lengths per batch row."""
    out = np.zeros((batch, n), np.int64)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(7, n - 1), replace=False))
        out[b] = np.searchsorted(cuts, np.arange(n), side="right")
    return torch.from_numpy(out)


def run(kern: CompiledPattern, case: Case) -> dict:
    """Time the case: sparsec and each requested peer, interleaved; a peer that cannot run it is
    reported with the reason. Times are medians in ms; speedups are peer time / sparsec time."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    kv_heads = case.kv_heads or case.heads
    gen = torch.Generator(device="cpu")
    gen.manual_seed(case.seed if case.seed is not None else int.from_bytes(os.urandom(4), "little"))
    draw = lambda h, n: torch.randn(case.batch, h, n, case.dim, generator=gen).to(device, dtype)
    q, k, v = draw(case.heads, case.n_q), draw(kv_heads, case.n_k), draw(kv_heads, case.n_k)
    scale = case.dim ** -0.5
    inputs = dict(case.inputs)
    if "segment_ids" in kern.needs and "segment_ids" not in inputs:
        inputs["segment_ids"] = documents(case.batch, case.n_k, np.random.default_rng(gen.initial_seed()))
    inputs = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in inputs.items()}
    if case.backward:
        for x in (q, k, v):
            x.requires_grad_(True)
    grad = torch.randn(q.shape, generator=gen).to(device, dtype) if case.backward else None
    backend = choose_backend(None, device)
    result = dict(pattern=kern.name, ir=kern.ir.body.show(), **{f: getattr(case, f) for f in (
        "n_q", "n_k", "batch", "heads", "dim", "dtype", "device")}, kv_heads=kv_heads, backend=backend,
        mode="forward+backward" if case.backward else "forward")

    def step(forward):
        """One timed call: the forward, and with case.backward its backward too."""
        if not case.backward:
            return lambda: forward()
        return lambda: torch.autograd.backward(forward(), grad, inputs=[q, k, v])

    impls, setup, skipped, outputs = {}, {}, {}, {}

    def add(name, make):
        """Build a peer (timed as its setup), run it once (its first call: compiles), keep its output."""
        try:
            t = time.perf_counter()
            fn = make()
            with torch.no_grad():
                outputs[name] = timed(fn, device)[0]
            setup[name] = time.perf_counter() - t
            impls[name] = step(fn)
        except peers.Skipped as why:
            skipped[name] = str(why)

    t = time.perf_counter()
    if backend == "triton":
        configs = kern.tune(q, k, v, **inputs)
    else:
        call = check_call(kern.name, kern.needs, q, k, v, scale, None, inputs)
        configs = [kern.config or default_config(backend, call)] * len(kern.shares)
    result["tune_s"] = time.perf_counter() - t
    result["config"] = [asdict(c) for c in configs]   # per share
    add("sparsec", lambda: lambda: kern(q, k, v, scale=scale, **inputs))
    if case.compiled:
        add("compiled", lambda: compiled_call(kern, q, k, v, scale, inputs))
    limit = int(case.mask_limit_gib * 2**30)
    masks, why_not = None, None
    try:
        masks = peers.tile_masks(kern, case.n_q, case.n_k, case.heads, case.flex_block,
                                 segment_ids=inputs.get("segment_ids"))
        result["pairs"] = masks.pairs(case.batch, case.heads)
        result["density"] = result["pairs"] / (case.batch * case.heads * case.n_q * case.n_k)
    except peers.Skipped as why:
        result["pairs"], why_not = None, str(why)

    def flex():
        if masks is None:
            raise peers.Skipped(why_not)
        return peers.flex(masks, q, k, v, scale)
    makers = dict(flex=flex, sdpa=lambda: peers.masked_sdpa(kern, q, k, v, scale, limit, inputs),
                  dense=lambda: peers.dense(q, k, v, scale), backend_flex=lambda: flex_backend(kern, q, k, v, scale, inputs))
    for name in case.vs:
        add(name, makers[name])
    if not case.backward:   # what a call adds to its kernels: argument checks, cache lookups, layouts
        add("kernels", lambda: kernels_only(kern, q, k, v, scale, inputs, backend))
    result["layout_build_ms"], result["tile_pairs"] = layout_stats(kern, case, inputs, configs[0])

    times, foreign = round_robin(impls, device, case.warmup, case.repeats)
    result["foreign_cores_busy"] = foreign
    errors = accuracy(kern, q, k, v, scale, outputs, inputs, limit)
    base = float(np.median(times["sparsec"]))
    flops = (14 if case.backward else 4) * case.dim * (result["pairs"] or 0)
    result["impls"] = {}
    if "kernels" in impls:   # per call, outside the kernels: eager, and compiled (dynamo's guards instead of Python)
        kernels = float(np.median(times["kernels"]))
        result["call_overhead"] = dict(kernels_only_ms=kernels * 1e3, share_of_call=(base - kernels) / base,
                                       eager_ms=(base - kernels) * 1e3)
        if "compiled" in impls:
            result["call_overhead"]["compiled_ms"] = (float(np.median(times["compiled"])) - kernels) * 1e3
    for name in ("sparsec", *(["compiled"] if case.compiled else []), *case.vs):
        if name in skipped:
            result["impls"][name] = {"skipped": skipped[name]}
            continue
        median = float(np.median(times[name]))
        result["impls"][name] = dict(
            median_ms=median * 1e3, times_ms=[x * 1e3 for x in times[name]], setup_s=setup[name],
            tflops=flops / median / 1e12 if flops else None, sparsec_speedup=median / base,
            peak_mb=peak_memory_mb(impls[name], device), **errors.get(name, {}))
    # throughput over the pairs each computes: sparsec its tiles' pairs, dense every pair
    per_pair = (14 if case.backward else 4) * case.dim / 1e12
    if result["tile_pairs"] and "median_ms" in result["impls"]["sparsec"]:
        result["impls"]["sparsec"]["tile_tflops"] = per_pair * result["tile_pairs"] / base
    if "median_ms" in result["impls"].get("dense", {}):
        all_pairs = case.batch * case.heads * case.n_q * case.n_k
        result["impls"]["dense"]["tile_tflops"] = per_pair * all_pairs / (result["impls"]["dense"]["median_ms"] / 1e3)
    return result


def layout_stats(kern: CompiledPattern, case: Case, inputs: dict, config) -> tuple[float | None, int | None]:
    """(ms, pairs): a cold host build of the layout at sparsec's tiles (`kern.layout` caches
    nothing), and the pairs its tiles hold (what the kernel computes, masked or not); None for
    content-based patterns, whose layouts are built per call."""
    if {"q", "k"} & kern.needs:
        return None, None
    seg = inputs.get("segment_ids")
    t = time.perf_counter()
    lay = kern.layout(case.n_q, case.n_k, config.block_m, config.block_n, heads=case.heads,
                      segment_ids=None if seg is None else seg.cpu())
    ms = (time.perf_counter() - t) * 1e3
    lb, lh, _, _ = lay.shape
    return ms, lay.tiles_visited() * lay.block_m * lay.block_n * (case.batch // lb) * (case.heads // lh)


def kernels_only(kern: CompiledPattern, q, k, v, scale: float, inputs: dict, backend: str):
    """sparsec's kernels with the layout, tables and config resolved beforehand (kern.bind): a call
    minus kernels_only is the per-call overhead. Only for one positional share."""
    if len(kern.shares) != 1 or kern.shares[0].key is not None:
        raise peers.Skipped("several shares or a sorted share: no single runner to time alone")
    (bound,) = kern.bind(q, k, v, scale, backend=backend, **inputs)
    return lambda: bound.runner.forward(*bound.args)[0]


def flex_backend(kern: CompiledPattern, q, k, v, scale: float, inputs: dict):
    """sparsec's call with backend='flex': compiled FlexAttention under the layout's BlockMask. Its
    setup is the first call (block mask and Flex's compile)."""
    try:   # the op's own refusal, as a reason in the report
        check_cpu_call(q.device, q.requires_grad or len(kern.shares) > 1)
    except ValueError as why:
        raise peers.Skipped(str(why)) from None
    return lambda: kern(q, k, v, scale=scale, backend="flex", **inputs)


def compiled_call(kern: CompiledPattern, q, k, v, scale: float, inputs: dict):
    """The call under torch.compile(fullgraph=True): a graph of one torch.ops.sparsec.attention.
    Its setup is the compile; compiled minus kernels_only is the compiled call's overhead."""
    fn = torch.compile(lambda q, k, v: kern(q, k, v, scale=scale, **inputs), fullgraph=True)
    return lambda: fn(q, k, v)


def accuracy(kern: CompiledPattern, q, k, v, scale: float, outputs: dict, inputs: dict, limit: int) -> dict:
    """Each output's max abs difference from float64 attention under the reference mask (when
    the mask and the float64 scores fit in `limit`), else from sparsec's output. Dense attention
    computes another function (every key): not compared."""
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    small = 9 * B * H * n_q * n_k <= limit and not {"q", "k"} & kern.needs
    if small:
        mask = kern.mask(n_q, n_k, heads=H, **{n: x.cpu() for n, x in inputs.items()}).to(q.device)
        ref, against = attention(q.detach(), k.detach(), v.detach(), mask, scale)[0], "float64 reference"
    else:
        ref, against = outputs["sparsec"].double(), "sparsec"
    return {name: {"max_abs_err": float((o.double() - ref).abs().max()), "err_against": against}
            for name, o in outputs.items() if name != "dense" and (small or name != "sparsec")}


def table(result: dict) -> str:
    """The report for one case, as text."""
    head = (f"{result['pattern']}: {result['ir']}\n  n_q={result['n_q']} n_k={result['n_k']} B={result['batch']} "
            f"H={result['heads']}/{result['kv_heads']} D={result['dim']} {result['dtype']} {result['mode']} on "
            f"{result['device']} ({result['backend']})")
    if result.get("pairs"):
        head += f"; density {100 * result['density']:.2f}%"
    if result.get("layout_build_ms") is not None:
        head += f"; layout build {result['layout_build_ms']:.1f} ms"
    lines = [head, f"  {'impl':<13}{'median ms':>12}{'TFLOP/s':>10}{'sparsec is':>12}{'setup s':>10}{'max err':>10}"]
    for name, r in result["impls"].items():
        if "skipped" in r:
            lines.append(f"  {name:<13}skipped: {r['skipped']}")
            continue
        tflops = "-" if r["tflops"] is None else f"{r['tflops']:.3f}"
        speed = "" if name == "sparsec" else f"{r['sparsec_speedup']:.2f}x"
        err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-"
        lines.append(f"  {name:<13}{r['median_ms']:>12.3f}{tflops:>10}{speed:>12}{r['setup_s']:>10.2f}{err:>10}")
    if result.get("call_overhead"):
        o = result["call_overhead"]
        compiled = f", compiled {o['compiled_ms']:.3f} ms" if "compiled_ms" in o else ""
        lines.append(f"  a call spends {100 * o['share_of_call']:.1f}% outside its kernels "
                     f"(kernels alone {o['kernels_only_ms']:.3f} ms; outside them eager {o['eager_ms']:.3f} ms"
                     f"{compiled})")
    return "\n".join(lines)
