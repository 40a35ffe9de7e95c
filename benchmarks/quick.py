"""The GPU validation that fits a lent machine's 10-minute command: the gpu tests, the goals at 16K and
64K, tuned vs default tiles and the launch order, each stage within its own time budget, into one JSON.

A stage starts its cases in priority order and skips (and records as skipped) a case its budget
cannot hold, judged from the cases it has run, so the whole run stays under its total whatever
a case turns out to cost on the device. The JSON is rewritten after every case: a run killed
from outside keeps what it measured. A short table is printed last.

    scripts/gpu.sh quick        # on the GPU: bf16, D=128, H=16, n = 16K and 64K; budgets total 480 s
    scripts/gpu.sh quick-dry    # anywhere (CI): the same stages at toy sizes on the CPU (--dry-run)
    -> $OUT/quick_<gpu>.json when $OUT is set (the device call's output folder), else
       benchmarks/results/quick_<gpu>.json; --out PATH to choose
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]   # the checkout's sparsec, and suite / launch_order
import launch_order  # noqa: E402
import sparsec  # noqa: E402
import suite  # noqa: E402
from sparsec.tools import bench  # noqa: E402

BAND_GLOBAL = "pattern band_global = band(1024) + global(16)"
BIGBIRD = str(ROOT / "patterns/bigbird.sa")
GOALS = {"band(1024) + global(16)": BAND_GLOBAL, "bigbird": BIGBIRD, "full": "pattern dense = full"}

# per setting: sizes, peers, and each stage's budget in seconds (their sum leaves a margin under
# the lent machine's 600 s per command for the start, the imports and the final write)
SETTINGS = {
    "gpu": dict(device="cuda", n=(16384, 65536), heads=16, dim=128, dtype="bfloat16", repeats=5, warmup=2,
                vs="flex,sdpa,dense", tune_n=16384, launch_n=16384, launch_repeats=10,
                budgets=dict(tests=170, goals=230, tuning=50, launch_order=30)),
    "dry": dict(device="cpu", n=(128, 256), heads=2, dim=32, dtype="float32", repeats=1, warmup=0,
                vs="sdpa,dense", tune_n=128, launch_n=64, launch_repeats=1,
                budgets=dict(tests=300, goals=120, tuning=60, launch_order=120)),
}


class Report:
    """The run's JSON: machine, settings, and per stage its status, wall time and results;
    written whole after every change."""

    def __init__(self, path: Path, setting: dict, dry: bool):
        self.path = path
        self.data = {"machine": bench.machine(setting["device"]), "command": sys.argv, "dry_run": dry,
                     "setting": {k: v for k, v in setting.items() if k != "budgets"},
                     "budgets_s": setting["budgets"], "stages": {}}
        self.write()

    def stage(self, name: str, **fields) -> dict:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.write()
        return self.data["stages"][name]

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class Budget:
    """A stage's clock: whether a case expected to take `estimate` seconds still fits."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fits(self, estimate: float = 0.0) -> bool:
        return self.elapsed() + estimate <= self.seconds


# ---- the stages ----------------------------------------------------------------------------------

RESULT = re.compile(r"^(tests/\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def tests_stage(report: Report, setting: dict, budget: Budget) -> None:
    """pytest -m gpu, verbose, stopped at the budget; each finished test's outcome parsed from its
    line, so a stopped run still says what passed."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    env = {**os.environ, "SPARSEC_TUNE_BUDGET_S": os.environ.get("SPARSEC_TUNE_BUDGET_S", "20")}  # the tuner's test
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget.seconds, env=env)
        out, status = done.stdout + done.stderr, "ok" if done.returncode in (0, 5) else "failed"
    except subprocess.TimeoutExpired as e:
        out, status = (e.stdout or b"").decode() + (e.stderr or b"").decode(), "cut"
    outcomes = {}
    for line in out.splitlines():
        m = RESULT.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
    counts = {k: sum(v == k for v in outcomes.values()) for k in sorted(set(outcomes.values()))}
    report.stage("tests", status=status, wall_s=budget.elapsed(), counts=counts,
                 failed=[t for t, v in outcomes.items() if v in ("FAILED", "ERROR")], log_tail=out[-6000:])


def goal_cases(setting: dict) -> list[tuple[str, int, bool]]:
    """(pattern, n, backward), most wanted first: every pattern at the smaller n before the larger,
    the forward before forward + backward."""
    return [(name, n, backward) for n in setting["n"] for backward in (False, True) for name in GOALS]


def goals_stage(report: Report, setting: dict, budget: Budget) -> None:
    args = SimpleNamespace(batch=1, **{k: setting[k] for k in ("heads", "dim", "dtype", "device", "vs", "repeats",
                                                               "warmup")})
    os.environ["SPARSEC_AUTOTUNE"] = "0"   # the default tiles here; tuning is its own stage
    results, skipped, last = [], [], None   # last: (n, seconds) of the latest case, for the estimate
    for name, n, backward in goal_cases(setting):
        estimate = 0.0 if last is None else last[1] * n / last[0]
        if not budget.fits(estimate):
            skipped.append(f"{name} n={n} {'forward+backward' if backward else 'forward'}")
            continue
        t = time.monotonic()
        results.append(suite.run_case(name, GOALS[name], n, backward, args, compiled=False))
        results[-1]["case_wall_s"] = time.monotonic() - t
        last = (n, results[-1]["case_wall_s"])
        report.stage("goals", status="running", wall_s=budget.elapsed(), results=results, skipped=skipped)
    failed = [r for r in results if "error" in r]
    report.stage("goals", status="failed" if failed else "cut" if skipped else "ok", wall_s=budget.elapsed(),
                 goals=suite.goals(results), results=results, skipped=skipped)


def tuning_stage(report: Report, setting: dict, budget: Budget) -> None:
    """BigBird, forward: tiles from a search cut to the budget's remainder vs the default tiles,
    timed in the same rounds."""
    device, n = setting["device"], setting["tune_n"]
    q, k, v = (torch.randn(1, setting["heads"], n, setting["dim"], device=device).to(bench.DTYPES[setting["dtype"]])
               for _ in range(3))
    tuned, default = sparsec.compile(BIGBIRD, autotune=True), sparsec.compile(BIGBIRD, autotune=False)
    t = time.monotonic()
    configs = tuned.tune(q, k, v, budget_s=max(budget.seconds * 0.7 - budget.elapsed(), 1.0))
    tune_s = time.monotonic() - t
    impls = {"tuned": lambda: tuned(q, k, v), "default": lambda: default(q, k, v)}
    times, _ = bench.round_robin(impls, device, warmup=2, repeats=max(setting["repeats"], 3))
    ms = {name: float(np.median(x)) * 1e3 for name, x in times.items()}
    report.stage("tuning", status="ok", wall_s=budget.elapsed(), pattern="bigbird", n=n, tune_s=tune_s,
                 tuned_configs=[c.show() for c in configs], tuned_ms=ms["tuned"], default_ms=ms["default"],
                 default_over_tuned=ms["default"] / ms["tuned"])


def launch_order_stage(report: Report, setting: dict, budget: Budget) -> None:
    rows, skipped, last = [], [], 0.0
    for name, source in (("band(1024) + global(16)", BAND_GLOBAL), ("bigbird", BIGBIRD)):
        if not budget.fits(last):
            skipped.append(name)
            continue
        t = time.monotonic()
        rows.append(launch_order.measure(name, source, setting["launch_n"], setting["heads"], setting["dim"],
                                         setting["dtype"], setting["launch_repeats"]))
        last = time.monotonic() - t
        report.stage("launch_order", status="running", wall_s=budget.elapsed(), results=rows, skipped=skipped)
    report.stage("launch_order", status="cut" if skipped else "ok", wall_s=budget.elapsed(), results=rows,
                 skipped=skipped)


STAGES = {"tests": tests_stage, "goals": goals_stage, "tuning": tuning_stage, "launch_order": launch_order_stage}


# ---- the table ---------------------------------------------------------------------------------

def table(data: dict) -> str:
    m, lines = data["machine"], []
    lines.append(f"quick on {m.get('gpu') or m.get('cpu')} | torch {m['torch']} triton {m['triton']} "
                 f"driver {m.get('driver')} | commit {m['git_commit']} | {m['date']}")
    for name, s in data["stages"].items():
        lines.append(f"{name:<13} {s.get('status', '?'):<7} {s.get('wall_s', 0):6.1f} s"
                     + (f"  {s['error']}" if "error" in s else ""))
    tests = data["stages"].get("tests", {})
    if tests.get("counts"):
        lines.append("  tests: " + ", ".join(f"{v} {k.lower()}" for k, v in tests["counts"].items())
                     + (f"; failed: {', '.join(tests['failed'][:6])}" if tests.get("failed") else ""))
    goals = data["stages"].get("goals", {})
    for r in goals.get("results", []):
        if "error" in r:
            lines.append(f"  {r['name']:<24} n={r['n_q']:<6} {r['mode']:<16} error: {r['error'][:80]}")
            continue
        impls = r["impls"]
        peer = lambda p: (f"{p} {impls[p]['median_ms']:.3f} ({impls[p]['sparsec_speedup']:.2f}x)"
                          if "median_ms" in impls.get(p, {}) else f"{p} -")
        lines.append(f"  {r['name']:<24} n={r['n_q']:<6} {r['mode']:<16} sparsec {impls['sparsec']['median_ms']:.3f} ms  "
                     + "  ".join(peer(p) for p in ("flex", "sdpa", "dense")))
    for goal, v in goals.get("goals", {}).items():
        verdict = "met" if v["met"] else "not met" if v["met"] is not None else "unmeasured"
        lines.append(f"  goal {goal}: {'-' if v['value'] is None else round(v['value'], 3)} ({verdict})")
    if goals.get("skipped"):
        lines.append(f"  goals skipped (budget): {'; '.join(goals['skipped'])}")
    tune = data["stages"].get("tuning", {})
    if "tuned_ms" in tune:
        lines.append(f"  tuning {tune['pattern']} n={tune['n']}: tuned {tune['tuned_ms']:.3f} ms "
                     f"({', '.join(tune['tuned_configs'])}, {tune['tune_s']:.0f} s) vs default {tune['default_ms']:.3f} ms"
                     f" = {tune['default_over_tuned']:.2f}x")
    for row in data["stages"].get("launch_order", {}).get("results", []):
        lines.append(f"  launch order {row['pattern']} n={row['n']}: classes {row['classes_ms']:.3f} ms, "
                     f"positional {row['positional_ms']:.3f} ms ({row['positional_over_classes']:.3f}x)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: proves the script, measures nothing")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    ap.add_argument("--out", help="JSON path")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("quick.py: no CUDA device here; --dry-run runs the same stages at toy sizes on the CPU")
    setting = SETTINGS["dry" if args.dry_run else "gpu"]
    slug = "cpu_dry" if args.dry_run else suite.device_slug("cuda")
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results"
    report = Report(Path(args.out) if args.out else folder / f"quick_{slug}.json", setting, args.dry_run)
    for name in args.stages:
        budget = Budget(setting["budgets"][name])
        print(f"quick: {name} (budget {budget.seconds:.0f} s)", flush=True)
        try:
            STAGES[name](report, setting, budget)
        except Exception as e:   # one stage failing must not lose the others
            report.stage(name, status="failed", wall_s=budget.elapsed(), error=f"{type(e).__name__}: {e}")
    print(table(report.data))
    print(f"wrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
