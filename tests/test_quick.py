"""benchmarks/quick.py, the 10-minute GPU validation: its CPU dry run end to end through scripts/gpu.sh,
and the budgets that keep it inside the lent machine's command limit."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quick  # noqa: E402


def test_the_dry_run_passes_every_stage(tmp_path):
    out = tmp_path / "quick.json"
    env = {**os.environ, "PYTHON": sys.executable, "QUICK_OUT": str(out), "SPARSEC_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(["bash", "scripts/gpu.sh", "quick-dry"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    machine = data["machine"]
    assert data["dry_run"] and all(machine[k] for k in ("date", "torch", "triton", "git_commit"))
    stages = data["stages"]
    assert list(stages) == list(quick.STAGES) and all(s["status"] == "ok" for s in stages.values()), stages
    gpu_tests = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-m", "gpu", "tests/"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    expected = sum("::" in line for line in gpu_tests.splitlines())
    assert stages["tests"]["counts"] == {"SKIPPED": expected} and expected > 30   # no CUDA here: all skip
    results = stages["goals"]["results"]
    assert [(r["name"], r["n_q"], r["mode"] == "forward+backward") for r in results] == quick.goal_cases(
        quick.SETTINGS["dry"])
    assert all(r["impls"]["sparsec"]["median_ms"] > 0 and "error" not in r for r in results)
    assert {r["pattern"] for r in stages["launch_order"]["results"]} == {"band(1024) + global(16)", "bigbird"}
    assert stages["tuning"]["default_ms"] > 0
    table = done.stdout[done.stdout.index("quick on"):]
    assert "goal bigbird n=128 forward" in table and "launch order bigbird" in table


def test_a_stage_skips_the_cases_its_budget_cannot_hold(monkeypatch, tmp_path):
    """Fake cases of 10 s each at the smaller n (20 s at twice the n) in a 35 s budget: three run,
    the fourth would end past it and is skipped, and so is every later one."""
    clock = [0.0]
    monkeypatch.setattr(quick.time, "monotonic", lambda: clock[0])
    setting = {**quick.SETTINGS["dry"], "budgets": {"goals": 35}}

    def fake_case(name, source, n, backward, args, compiled=True):
        clock[0] += 10.0 * n / setting["n"][0]
        return {"name": name, "n_q": n, "mode": "forward+backward" if backward else "forward",
                "impls": {"sparsec": {}}}
    monkeypatch.setattr(quick.suite, "run_case", fake_case)
    report = quick.Report(tmp_path / "q.json", setting, dry=True)
    quick.goals_stage(report, setting, quick.Budget(35))
    stage = json.loads((tmp_path / "q.json").read_text())["stages"]["goals"]
    cases = quick.goal_cases(setting)
    assert len(stage["results"]) == 3 and len(stage["skipped"]) == len(cases) - 3
    assert stage["status"] == "cut" and clock[0] == 30.0
