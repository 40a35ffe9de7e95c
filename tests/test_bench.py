"""The benchmark harness on CPU: the peers compute the same pattern, the report is consistent, and
the bench and tune commands behave."""
from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import sparsec
from sparsec.runtime import flex
from sparsec.tools import bench, peers
from sparsec.tools.cli import main

CASES = [  # (pattern, n_q, n_k, heads, block)
    ("band(100) + global(16)", 1000, 1000, 2, 128),
    ("heads(band(40), causal, dilated(8, 3))", 300, 520, 3, 64),
    ("blocks(16, band(1) + global(1) + random(3))", 257, 257, 2, 32),
    ("causal & sink(4) + chunk(50)", 200, 200, 1, 16),
]


def densify(masks: flex.TileMasks, n_q: int, n_k: int) -> np.ndarray:
    """The (LB, LH, n_q, n_k) mask the tiles describe: FULL tiles whole, PARTIAL tiles their bits."""
    lb, lh, tq, tk = masks.tile_id.shape
    block = masks.layout.block_m
    out = np.zeros((lb, lh, tq * block, tk * block), bool)
    for b, h, t, j in zip(*np.nonzero(masks.tile_id != flex.EMPTY_TILE)):
        tile = masks.tile_id[b, h, t, j]
        out[b, h, t * block:(t + 1) * block, j * block:(j + 1) * block] = True if tile == flex.FULL_TILE else \
            masks.bits[tile]
    return out[..., :n_q, :n_k]


def in_fresh_process(fn, *args):
    """FlexAttention's compiles kept out of the test process (it no longer breaks the interpreter:
    runtime/loader.py imports triton for it first)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


@pytest.mark.parametrize("src, n_q, n_k, heads, block", CASES)
def test_tile_masks_are_the_reference_mask(src, n_q, n_k, heads, block):
    kern = sparsec.compile(f"pattern p = {src}")
    masks = peers.tile_masks(kern, n_q, n_k, heads, block)
    want = kern.mask(n_q, n_k, heads=heads).numpy()
    got = densify(masks, n_q, n_k)
    assert (np.broadcast_to(got, want.shape) == want).all()
    assert masks.pairs(2, heads) == 2 * int(want.sum())


def test_tile_masks_of_documents():
    kern = sparsec.compile("pattern p = document & causal")
    seg = bench.documents(2, 300, np.random.default_rng())
    masks = peers.tile_masks(kern, 300, 300, 4, 64, segment_ids=seg)
    want = kern.mask(300, heads=1, segment_ids=seg).numpy()
    assert masks.tile_id.shape[0] == 2 and (densify(masks, 300, 300) == want).all()


def _flex_mask_differences(src, n_q, n_k, heads, block) -> int:
    from torch.nn.attention.flex_attention import create_mask
    kern = sparsec.compile(f"pattern p = {src}")
    masks = peers.tile_masks(kern, n_q, n_k, heads, block)
    block_mask = flex.block_mask(masks.layout, 1, heads, "cpu", flex.bits_mask_mod(masks, "cpu"))
    got = create_mask(block_mask.mask_mod, 1, heads, n_q, n_k, device="cpu")
    return int((got != kern.mask(n_q, n_k, heads=heads).expand_as(got)).sum())


@pytest.mark.parametrize("src, n_q, n_k, heads, block", CASES[:2])
def test_flex_mask_mod_is_the_pattern_everywhere(src, n_q, n_k, heads, block):
    assert in_fresh_process(_flex_mask_differences, src, n_q, n_k, heads, block) == 0


def _bench_every_peer():
    kern = sparsec.compile("pattern p = band(64) + global(8)")
    case = bench.Case(512, 512, batch=1, heads=2, dim=32, vs=("flex", "sdpa", "dense"), repeats=2)
    return bench.run(kern, case), int(kern.mask(512, heads=2).sum())


def test_bench_run_reports_every_peer_on_cpu():
    r, pairs = in_fresh_process(_bench_every_peer)
    assert r["pairs"] == pairs and 0 < r["density"] < 1
    impls = r["impls"]
    assert set(impls) == {"sparsec", "compiled", "flex", "sdpa", "dense"}
    for name in ("sparsec", "compiled", "flex", "sdpa"):
        assert impls[name]["err_against"] == "float64 reference" and impls[name]["max_abs_err"] < 1e-4
    for name, x in impls.items():
        assert len(x["times_ms"]) == 2 and x["median_ms"] == pytest.approx(float(np.median(x["times_ms"])))
        assert x["sparsec_speedup"] == pytest.approx(x["median_ms"] / impls["sparsec"]["median_ms"])
        assert x["tflops"] == pytest.approx(4 * 32 * r["pairs"] / (x["median_ms"] / 1e3) / 1e12)
    overhead = r["call_overhead"]   # timed in the same rounds: noise can make the share slightly negative
    assert overhead["kernels_only_ms"] > 0 and overhead["share_of_call"] < 1
    assert overhead["eager_ms"] == pytest.approx(impls["sparsec"]["median_ms"] - overhead["kernels_only_ms"])
    assert overhead["compiled_ms"] == pytest.approx(impls["compiled"]["median_ms"] - overhead["kernels_only_ms"])
    assert r["layout_build_ms"] > 0 and r["config"] == [{"block_m": 64, "block_n": 64, "num_warps": 1, "num_stages": 1}]


def test_bench_skips_what_a_peer_cannot_run():
    kern = sparsec.compile("pattern p = lsh(8) & causal")
    r = bench.run(kern, bench.Case(128, 128, heads=1, dim=16, repeats=1, compiled=False))
    assert "content-based" in r["impls"]["flex"]["skipped"] and "content-based" in r["impls"]["sdpa"]["skipped"]
    assert r["pairs"] is None and r["impls"]["sparsec"]["median_ms"] > 0
    small = bench.Case(256, 256, heads=1, dim=16, repeats=1, vs=("sdpa",), mask_limit_gib=1e-6, compiled=False)
    r = bench.run(sparsec.compile("pattern p = causal"), small)
    assert "GiB" in r["impls"]["sdpa"]["skipped"]
    assert "max_abs_err" not in r["impls"]["sparsec"]   # no float64 reference that large: nothing to compare


def test_bench_backward_times_the_gradient():
    r = bench.run(sparsec.compile("pattern p = causal"), bench.Case(256, 256, heads=2, dim=16, repeats=1,
                                                                   backward=True, vs=("dense", "backend_flex")))
    assert r["mode"] == "forward+backward" and "call_overhead" not in r
    assert "backend='flex' on CPU runs compiled FlexAttention" in r["impls"]["backend_flex"]["skipped"]
    assert r["impls"]["sparsec"]["tflops"] == pytest.approx(
        14 * 16 * r["pairs"] / (r["impls"]["sparsec"]["median_ms"] / 1e3) / 1e12)


def test_bench_and_tune_commands(tmp_path, capsys):
    path = tmp_path / "p.sa"
    path.write_text("pattern p = band(32) + global(4)\n")
    out = tmp_path / "r.json"
    assert main(["bench", str(path), "--n", "200", "300", "--heads", "2", "--dim", "16", "--repeats", "1",
                 "--vs", "sdpa,dense", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("sparsec is") == 2 and "wrote" in text
    data = json.loads(out.read_text())
    assert [r["n_q"] for r in data["results"]] == [200, 300] and "torch" in data["machine"]
    assert main(["bench", str(path), "--n", "64", "--vs", "flux"]) == 1
    assert "--vs takes a comma list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", str(path), "--n", "0"])
    if not torch.cuda.is_available():
        assert main(["bench", str(path), "--n", "64", "--device", "cuda"]) == 1
        assert "no CUDA device here" in capsys.readouterr().err
    assert main(["tune", str(path), "--n", "128"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
