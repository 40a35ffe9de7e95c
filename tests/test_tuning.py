"""The autotuner without a GPU: candidates, the two-round search and the JSON cache, with fake timers."""
from __future__ import annotations

import errno
import io
import json
import os
import stat
import types
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import sparsec
from sparsec.runtime.call import check_call, default_config
from sparsec.runtime import tuning
from sparsec.runtime.cache import CacheError
from sparsec.codegen import TileConfig

H100_SHARED = 233472 - 1024


def brute_force_space():
    return [TileConfig(m, n, w, s) for m in (16, 32, 64, 128) for n in (16, 32, 64, 128)
            for w in (1, 2, 4, 8) for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("dim, size, n_q, n_k", [(128, 2, 16384, 16384), (256, 4, 4096, 4096), (64, 2, 20, 3000),
                                                 (16, 4, 70, 17)])
def test_candidates_are_the_runnable_configs(dim, size, n_q, n_k):
    got = tuning.candidates(dim, size, n_q, n_k, H100_SHARED)
    want = []
    for c in brute_force_space():   # the rules written out again, one by one
        pad = max(16, 1 << (dim - 1).bit_length())
        smem = (c.block_m + 2 * c.block_n * c.num_stages) * pad * size
        seq_q, seq_k = max(16, 1 << (n_q - 1).bit_length()), max(16, 1 << (n_k - 1).bit_length())
        per_warp = c.block_m * c.block_n / c.num_warps
        if smem <= H100_SHARED and c.block_m <= seq_q and c.block_n <= seq_k and 512 <= per_warp <= 4096:
            want.append(c)
    assert got == want and len(got) > 0


def test_candidates_examples():
    bf16 = tuning.candidates(128, 2, 16384, 16384, H100_SHARED)
    assert TileConfig(64, 64, 4, 3) in bf16            # (64 + 384) x 128 x 2 = 112 KiB
    assert TileConfig(128, 128, 8, 4) not in bf16      # (128 + 1024) x 128 x 2 = 288 KiB: too much
    assert TileConfig(16, 16, 1, 1) not in bf16        # 256 entries: under 512 per warp
    assert all(c.block_m <= 32 for c in tuning.candidates(64, 2, 20, 3000, H100_SHARED))


def separable_timer(rng, configs):
    """A fake device, drawn fresh: time = cost of the tile shape + cost of the warp count + cost
    of the pipeline depth, where tile shapes differ by more than the other two can make up."""
    tiles = sorted({(c.block_m, c.block_n) for c in configs})
    tile_cost = dict(zip(tiles, rng.permutation(len(tiles)).astype(float)))
    warp_cost = {w: rng.uniform(0, 0.4) for w in (1, 2, 4, 8)}
    depth_cost = {s: rng.uniform(0, 0.4) for s in (1, 2, 3, 4)}
    calls = []
    cost = lambda c: tile_cost[(c.block_m, c.block_n)] + warp_cost[c.num_warps] + depth_cost[c.num_stages]
    return lambda c: calls.append(c) or cost(c), calls, cost


@pytest.mark.parametrize("dim, size", [(64, 2), (128, 2), (256, 4)])
def test_search_finds_the_best_config_of_a_separable_device(dim, size):
    configs = tuning.candidates(dim, size, 8192, 8192, H100_SHARED)
    timer, calls, cost = separable_timer(np.random.default_rng(), configs)
    winner, timings = tuning.search(configs, timer)
    assert winner == min(configs, key=cost)      # brute force over every candidate
    tiles = {(c.block_m, c.block_n) for c in configs}
    assert len(calls) <= len(tiles) + tuning.FINALISTS * 4 + 4 < len(configs)


@pytest.mark.parametrize("seed", range(3))
def test_search_returns_the_fastest_it_timed(seed):
    """Whatever the device: each config timed once, all of them candidates, the winner the fastest."""
    configs = tuning.candidates(128, 2, 16384, 16384, H100_SHARED)
    rng = np.random.default_rng()
    times = {c: rng.uniform(1, 2) for c in configs}
    calls = []
    winner, timings = tuning.search(configs, lambda c: calls.append(c) or times[c])
    assert [t.config for t in timings] == calls and len(set(calls)) == len(calls) and set(calls) <= set(configs)
    assert winner == min(calls, key=times.get)


def test_search_skips_failures_and_breaks_ties_by_order():
    configs = tuning.candidates(64, 2, 4096, 4096, H100_SHARED)
    big = lambda c: c.block_m * c.block_n >= 8192
    winner, timings = tuning.search(configs, lambda c: None if big(c) else 1.0)
    assert winner == timings[0].config and not big(winner)
    assert any(t.ms is None for t in timings)
    assert tuning.search(configs, lambda c: None) == (None, tuning.search(configs, lambda c: None)[1])
    assert tuning.search(configs, lambda c: None)[0] is None


def test_a_budget_stops_the_search_with_the_best_so_far(monkeypatch):
    """A fake clock: each timing takes 1 s; with a 5 s budget, no timing starts after the 5th
    second once one succeeded, and the fastest of those timed wins."""
    configs = tuning.candidates(128, 2, 16384, 16384, H100_SHARED)
    clock = [0.0]
    monkeypatch.setattr(tuning.time, "monotonic", lambda: clock[0])
    times = {c: float(i % 7) + 1 for i, c in enumerate(configs)}

    def timer(c):
        clock[0] += 1.0
        return times[c]
    full = tuning.search(configs, timer)[1]
    clock[0] = 0.0
    winner, timings = tuning.search(configs, timer, budget_s=5)
    assert len(timings) == 6 < len(full) and [t.config for t in timings] == [t.config for t in full[:6]]
    assert winner == min((t.config for t in timings), key=times.get)
    failing = lambda c: clock.__setitem__(0, clock[0] + 1.0)   # every timing fails (None), 1 s each
    unbudgeted = tuning.search(configs, failing)[1]
    clock[0] = 0.0   # the budget does not stop a search that has nothing yet
    winner, timings = tuning.search(configs, failing, budget_s=5)
    assert winner is None and len(timings) == len(unbudgeted) > 6


def test_budget_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("SPARSEC_TUNE_BUDGET_S", raising=False)
    assert tuning.budget() is None and tuning.budget(30) == 30.0
    monkeypatch.setenv("SPARSEC_TUNE_BUDGET_S", "12.5")
    assert tuning.budget() == 12.5 and tuning.budget(3) == 3.0
    monkeypatch.setenv("SPARSEC_TUNE_BUDGET_S", "soon")
    with pytest.raises(ValueError, match="SPARSEC_TUNE_BUDGET_S must be a number of seconds, got 'soon'"):
        tuning.budget()
    for bad in (0, -1, True, "5"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            tuning.budget(bad)
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="positive number of seconds, got -2"):
        sparsec.compile("pattern p = causal").tune(q, q, q, budget_s=-2)


def key(**changes):
    base = dict(canonical_ir="band(4)", n_q=1000, n_k=1000, head_dim=128, dtype="bfloat16", group=1,
                device="NVIDIA H100 80GB HBM3", triton="3.9.0", mode="forward")
    return tuning.make_key(**{**base, **changes})


def test_keys_bucket_lengths_and_separate_everything_else():
    assert key() == key(n_q=1024, n_k=513 + 511) and key().n_q == 1024
    assert key(n_q=1025) != key()
    variants = [key(canonical_ir="band(5)"), key(head_dim=64), key(dtype="float16"), key(group=4),
                key(device="NVIDIA H200"), key(triton="3.8.0"), key(mode="training"), key(n_k=4096)]
    assert len({v.text() for v in variants + [key()]}) == len(variants) + 1


def test_cache_is_reused_by_another_process_without_timing(tmp_path):
    path = tmp_path / "tuning.json"
    configs = lambda: tuning.candidates(64, 2, 4096, 4096, H100_SHARED)
    timer, calls, _ = separable_timer(np.random.default_rng(), configs())
    first = tuning.tuned(key(), tuning.TuningCache(path), configs, timer)
    assert first is not None and calls

    def never(c):
        raise AssertionError("a cached key was timed again")
    assert tuning.tuned(key(), tuning.TuningCache(path), configs, never) == first     # a fresh reader
    assert tuning.tuned(key(n_q=900), tuning.TuningCache(path), configs, never) == first   # same bucket
    stored = json.loads(path.read_text())["entries"][key().text()]
    assert TileConfig(**stored["config"]) == first and stored["ms"] == min(t for _, t in stored["timed"])
    calls = []
    again = tuning.tuned(key(), tuning.TuningCache(path), configs, lambda c: calls.append(c) or 1.0, retune=True)
    assert calls and again == calls[0]   # retune times again; all tie, so the first timed wins


def test_cache_merges_writers_and_survives_a_bad_file(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    a, b = tuning.TuningCache(path), tuning.TuningCache(path)
    assert a.get(key()) is None
    a.put(key(), TileConfig(32, 32, 2, 2), 1.0, [])
    b.put(key(dtype="float16"), TileConfig(64, 32, 4, 3), 2.0, [])   # b read before a wrote: merged on write
    fresh = tuning.TuningCache(path)
    assert fresh.get(key()) == TileConfig(32, 32, 2, 2) and fresh.get(key(dtype="float16")) == TileConfig(64, 32, 4, 3)
    assert tuning.cache_at(path) is tuning.cache_at(path)


BAD_ENTRIES = [   # what a planted tuning.json may hold: none of it is ever used, nor pasted into source
    {"block_m": "64, X=open('/tmp/pwned', 'w')", "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 48, "block_n": 64, "num_warps": 4, "num_stages": 3},      # not a power of two
    {"block_m": 64.0, "block_n": 64, "num_warps": 4, "num_stages": 3},    # not an int
    {"block_m": True, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "extra": 1},
    {"block_m": 64, "block_n": 64, "num_warps": 4},
    {"block_m": 1 << 40, "block_n": 64, "num_warps": 4, "num_stages": 3},
    "64x64", None, [64, 64, 4, 3],
]


@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_invalid_cache_entries_are_ignored_and_reported_once(tmp_path, bad):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": tuning.FORMAT, "entries": {key().text(): {"config": bad}}}))
    cache = tuning.TuningCache(path)
    with pytest.warns(RuntimeWarning, match="invalid entry"):
        assert cache.get(key()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get(key()) is None          # reported once
    configs = lambda: [TileConfig(32, 32, 2, 2), TileConfig(64, 64, 4, 3)]
    assert tuning.tuned(key(), cache, configs, lambda c: c.block_m / 100) == TileConfig(32, 32, 2, 2)
    assert tuning.TuningCache(path).get(key()) == TileConfig(32, 32, 2, 2)   # tuned again, replaced


@pytest.mark.parametrize("fields", [dict(block_m="64"), dict(num_warps=3), dict(block_n=512), dict(num_stages=0),
                                    dict(block_m=64.0), dict(num_stages=False)])
def test_a_tile_config_cannot_hold_anything_else(fields):
    with pytest.raises(ValueError, match="powers of two"):
        TileConfig(**fields)
    assert TileConfig(np.int64(32)).block_m == 32 and type(TileConfig(np.int64(32)).block_m) is int


def test_cache_directory_faults_give_one_clear_error(tmp_path, monkeypatch):
    """A file where the directory should be, a name the file system refuses, a full disk: one
    CacheError naming the directory and SPARSEC_CACHE_DIR, no temporary file left behind; the
    tuner keeps its winner for the process (a warning), `kern.tune` raises."""
    (tmp_path / "file").write_text("")
    cases = [tmp_path / "file" / "tuning.json", tmp_path / ("x" * 300) / "tuning.json"]
    for path in cases:
        with pytest.raises(CacheError, match="SPARSEC_CACHE_DIR") as e:
            tuning.TuningCache(path).put(key(), TileConfig(), 1.0, [])
        assert str(path.parent) in str(e.value) and isinstance(e.value, OSError)
    full = tmp_path / "full"
    real_replace = os.replace

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(CacheError, match="No space left on device"):
        tuning.TuningCache(full / "tuning.json").put(key(), TileConfig(), 1.0, [])
    assert list(full.iterdir()) == []                               # the temporary file is gone
    configs = lambda: [TileConfig(32, 32, 2, 2)]
    cache = tuning.TuningCache(full / "tuning.json")
    with pytest.warns(RuntimeWarning, match="kept for this process only"):
        assert tuning.tuned(key(), cache, configs, lambda c: 1.0) == TileConfig(32, 32, 2, 2)
    assert cache.get(key()) == TileConfig(32, 32, 2, 2)              # in memory
    with pytest.raises(CacheError):
        tuning.tuned(key(), cache, configs, lambda c: 1.0, retune=True, must_save=True)
    monkeypatch.setattr(os, "replace", real_replace)


def test_cache_directory_and_files_are_private(tmp_path):
    path = tmp_path / "a" / "b" / "tuning.json"
    tuning.TuningCache(path).put(key(), TileConfig(), 1.0, [])
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["tuning.json"]


def test_progress_bar():
    out = io.StringIO()
    configs = tuning.candidates(64, 2, 4096, 4096, H100_SHARED)
    winner, timings = tuning.search(configs, lambda c: c.block_m / 100, tuning.Progress("tuning p", out))
    text = out.getvalue()   # tqdm's bar: the label, done/total, the latest and the best
    assert text.startswith("\rtuning p") and text.endswith("\n")
    assert f"{len(timings)}/{len(timings)}" in text and f"best {winner.block_m}x{winner.block_n}" in text


def test_check_config():
    assert tuning.check_config(None) is None
    assert tuning.check_config({"block_m": 32}) == TileConfig(32, 64, 4, 3)
    with pytest.raises(ValueError, match="powers of two"):
        tuning.check_config(TileConfig(48, 64))
    with pytest.raises(TypeError, match="unknown keys"):
        tuning.check_config({"block_k": 32})
    with pytest.raises(TypeError, match="config must be"):
        sparsec.compile("pattern p = causal", config=(64, 64))
    with pytest.raises(TypeError, match="autotune"):
        sparsec.compile("pattern p = causal", autotune="yes")


def test_given_config_is_what_runs():
    """config= picks the tiles and launch options the generated kernels get (interpreter) and the
    CPU path's tiles."""
    config = TileConfig(32, 16, 2, 2)
    kern = sparsec.compile("pattern p = band(20) + global(3)", config=config)
    q, k, v = (torch.randn(1, 2, 90, 32, dtype=torch.float64).float() for _ in range(3))
    mask = kern.mask(90, heads=2)
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5).masked_fill(~mask, -torch.inf), -1) \
        @ v.double()
    for backend in ("interpret", "cpu"):
        assert (kern(q, k, v, backend=backend).double() - ref).abs().max() < 1e-4
    (bound,) = kern.bind(q, k, v, backend="interpret")
    assert bound.runner.config == config and (bound.runner.lay.block_m, bound.runner.lay.block_n) == (32, 16)
    assert any(key[0] == "plan" and key[2] == config for key in kern._cache if isinstance(key, tuple))


def test_tune_without_a_gpu_is_a_notice(capsys):
    kern = sparsec.compile("pattern p = causal")
    q = torch.randn(1, 1, 64, 16)
    assert kern.tune(q, q, q) == [default_config("cpu", check_call("p", frozenset(), q, q, q, None, None, {}))]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "autotuner is skipped" in err


def test_call_path_tunes_once_then_reads_the_cache(monkeypatch, tmp_path):
    """The GPU path of CompiledPattern._config with the device faked: the key, the persisted winner, the
    per-kernel memo, and autotune=False / config= bypassing the tuner."""
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(shared_memory_per_multiprocessor=H100_SHARED + 1024))
    timed = []
    fake = lambda c: (c.block_m * 7 + c.block_n * 3 + c.num_stages) % 11 + 1   # ms on a made-up device

    def fake_timer(runner_for, args, training):
        return lambda c: timed.append((c, training)) or fake(c)
    monkeypatch.setattr(tuning, "kernel_timer", fake_timer)
    q = torch.randn(1, 2, 500, 64, dtype=torch.float16)
    call = check_call("p", frozenset(), q, q, q, None, None, {})
    kern = sparsec.compile("pattern p = band(64) + global(8)", autotune=True)
    body = kern.shares[0].body
    chosen = kern._config(0, body, call, "triton", {}, None, (q, q, q), False)
    n_timed = len(timed)
    # the plumbing: the call path times this call's candidates and keeps the fastest it timed
    # (search's own choices are tested above)
    assert {c for c, _ in timed} <= set(tuning.candidates(64, 2, 500, 500, H100_SHARED))
    assert chosen == min((c for c, _ in timed), key=fake)
    assert n_timed and not any(training for _, training in timed)
    assert kern._config(0, body, call, "triton", {}, None, (q, q, q), False) == chosen and len(timed) == n_timed
    other = sparsec.compile("pattern p = band(64) + global(8)", autotune=True)   # a new kernel (or process): from the file
    assert other._config(0, body, replace(call, n_q=480, n_k=480), "triton", {}, None, (q, q, q), False) == chosen
    assert len(timed) == n_timed
    entry = json.loads((tmp_path / "tuning.json").read_text())["entries"]
    assert len(entry) == 1 and "device=Fake GPU" in next(iter(entry)) and "mode=forward" in next(iter(entry))
    kern._config(0, body, call, "triton", {}, None, (q, q, q), True)   # training: its own key, timed again
    assert len(timed) > n_timed and timed[-1][1]
    monkeypatch.setenv("SPARSEC_AUTOTUNE", "0")
    assert sparsec.compile("pattern p = causal").autotune is False
    monkeypatch.setenv("SPARSEC_AUTOTUNE", "1")
    assert sparsec.compile("pattern p = causal").autotune is True
    fixed = TileConfig(32, 32, 2, 2)
    assert sparsec.compile("pattern p = band(64)", config=fixed)._config(0, body, call, "triton", {}, None,
                                                                        (q, q, q), False) == fixed
    off = sparsec.compile("pattern p = band(64)", autotune=False)
    assert off._config(0, body, call, "triton", {}, None, (q, q, q), False) == default_config("triton", call)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tuning_on_the_device(monkeypatch, tmp_path):
    """Real timings on a few candidates: the winner is stored, a new kernel reads it without
    timing, and the tuned kernel is still exact."""
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    few = [TileConfig(32, 32, 2, 2), TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3)]
    monkeypatch.setattr(tuning, "candidates", lambda *a: few)
    src = "pattern p = band(256) + global(16)"
    q, k, v = (torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kern = sparsec.compile(src, autotune=True)
    (chosen,) = kern.tune(q, k, v)
    assert chosen in few
    entry = next(iter(json.loads((tmp_path / "tuning.json").read_text())["entries"].values()))
    assert len(entry["timed"]) == 3 and all(ms > 0 for _, ms in entry["timed"])
    monkeypatch.setattr(tuning, "kernel_timer", lambda *a: pytest.fail("a cached key was timed again"))
    again = sparsec.compile(src, autotune=True)
    o = again(q, k, v)
    mask = again.mask(4096).cuda()
    s = (q.double() @ k.double().transpose(-1, -2) / 128 ** 0.5).masked_fill(~mask, -torch.inf)
    assert (o.double() - torch.softmax(s, -1) @ v.double()).abs().max() < 3e-2
