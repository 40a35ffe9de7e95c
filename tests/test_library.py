"""The pattern library (patterns/*.sa): every pattern compiles, its optimized IR prints as source
that parses back to the same IR, and each file's default pattern has the density its header states.

Header lines read here (see any patterns/*.sa):
    # density: n=4096 heads=1 value=0.123456                 exact, checked to 1e-6
    # density: n=4096 heads=1 approx=0.0123 tolerance=0.005   random / content-based
    # density-inputs: segment_len=512                          segment_ids = arange(n) // 512
    # density-inputs: qk=standard_normal D=64 B=1 seed=0       q then k from default_rng(seed)
    # density-inputs: NAME=fill:V | normal | bernoulli:P | randint:HIGH | permutation seed=S
                                                             a declared input (spec section 6), B = 1:
                                                             V everywhere; standard normal; true with
                                                             probability P;
                                                             ints in [0, HIGH); a permutation of the
                                                             last axis per (b, h); from default_rng(S)
Density is the fraction of allowed (query, key) pairs at n_q = n_k = n, averaged over batch and heads.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import torch

import sparsec
from sparsec import testing
from sparsec.grammar.elaborate import pattern_names
from sparsec.ir.inputs import expected_shape
from sparsec.grammar.syntax import parse
from test_kernel import check

LIBRARY = Path(__file__).resolve().parent.parent / "patterns"
FILES = sorted(LIBRARY.glob("*.sa"))

# The systems the language contract asks the library to express (spec section 3), by file.
EXPECTED_FILES = {
    "longformer", "bigbird", "sparse_transformer", "star", "block_local", "logsparse", "longnet",
    "streaming", "reformer", "routing", "moba", "prefix_lm", "document",
    "alibi", "softcap", "t5_bias",   # score modifications (spec section 7)
    "expire_span", "sparsebert", "adaptive", "sinkhorn", "sparsek",   # call-time inputs (spec section 6)
}

DENSITY = re.compile(
    r"^# density: n=(?P<n>\d+) heads=(?P<heads>\d+) "
    r"(?:value=(?P<value>[0-9.]+)|approx=(?P<approx>[0-9.]+) tolerance=(?P<tol>[0-9.]+))\s*$",
    re.MULTILINE)
INPUTS = re.compile(r"^# density-inputs: (?P<items>.*)$", re.MULTILINE)


def _names(path: Path) -> list[str]:
    return pattern_names(parse(path.read_text(), str(path)))


def _density_line(path: Path) -> dict:
    found = [m.groupdict() for m in DENSITY.finditer(path.read_text())]
    assert len(found) == 1, f"{path.name}: expected exactly one '# density: ...' line, found {len(found)}"
    return found[0]


def _inputs(path: Path) -> dict[str, str]:
    found = INPUTS.findall(path.read_text())
    assert len(found) <= 1, f"{path.name}: more than one '# density-inputs:' line"
    return dict(item.split("=", 1) for item in found[0].split()) if found else {}


def _runtime(kern, spec: dict[str, str], n: int, heads: int) -> dict:
    """The call-time inputs the header's density-inputs line describes."""
    kwargs = {}
    if "segment_ids" in kern.needs:
        assert "segment_len" in spec, "document pattern without '# density-inputs: segment_len=L'"
        kwargs["segment_ids"] = (np.arange(n, dtype=np.int64) // int(spec["segment_len"]))[None, :]
    if {"q", "k"} & kern.needs:
        assert spec.get("qk") == "standard_normal", "content-based pattern without '# density-inputs: qk=...'"
        rng = np.random.default_rng(int(spec["seed"]))
        shape = (int(spec["B"]), heads, n, int(spec["D"]))
        kwargs["q"] = rng.standard_normal(shape).astype(np.float32)
        kwargs["k"] = rng.standard_normal(shape).astype(np.float32)
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    for d in kern.ir.inputs:
        if d.name in kern.score_only:   # the mask does not read it
            continue
        assert d.name in spec, f"pattern reads the input {d.name} without '# density-inputs: {d.name}=...'"
        shape = expected_shape(d, 1, heads, {"n": n, "n_q": n, "n_k": n})
        how, _, arg = spec[d.name].partition(":")
        kwargs[d.name] = DRAWS[how](rng, shape, arg)
    return kwargs


DRAWS = {   # how a density-inputs line fills a declared input
    "fill": lambda rng, shape, v: np.full(shape, float(v)),
    "normal": lambda rng, shape, _: rng.standard_normal(shape),
    "bernoulli": lambda rng, shape, p: rng.random(shape) < float(p),
    "randint": lambda rng, shape, high: rng.integers(0, int(high), shape),
    "permutation": lambda rng, shape, _: np.stack([rng.permutation(shape[-1]) for _ in range(
        int(np.prod(shape[:-1])))]).reshape(shape),
}


ALL_PATTERNS = [pytest.param(path, name, id=f"{path.stem}:{name}") for path in FILES for name in _names(path)]


def test_library_has_every_system():
    assert {p.stem for p in FILES} >= EXPECTED_FILES


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_header(path):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must start with a header comment"
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", text.split("\npattern ")[0]), f"{path.name}: header cites no arXiv id"
    assert "Deviations" in text, f"{path.name}: header lists no deviations"
    _density_line(path)


@pytest.mark.parametrize("path,name", ALL_PATTERNS)
def test_compiles_and_printed_ir_round_trips(path, name):
    kern = sparsec.compile(str(path), pattern=name)
    assert kern.name == name
    printed = kern.ir.body.show()
    declared = "".join(d.show() + "\n" for d in kern.ir.inputs)   # what the body reads
    again = sparsec.compile(f"{declared}pattern {kern.name} = " + printed)
    assert again.ir.body == kern.ir.body, f"{printed!r} re-parses to {again.ir.body.show()!r}"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_default_pattern_density(path):
    kern = sparsec.compile(str(path))
    assert kern.name == _names(path)[-1]
    line = _density_line(path)
    n, heads = int(line["n"]), int(line["heads"])
    mask = kern.mask(n, n, heads=heads, **_runtime(kern, _inputs(path), n, heads))
    assert mask.shape[1:] == (heads, n, n)
    density = mask.sum().item() / mask.numel()
    if line["value"] is not None:
        assert density == pytest.approx(float(line["value"]), abs=1e-6)
    else:
        assert abs(density - float(line["approx"])) <= float(line["tol"]), (
            f"density {density:.6f}, header says {line['approx']} +- {line['tol']}")


def test_prefix_lm_is_causal_plus_sink():
    """The identity the prefix_lm header states: causal + where(i < P and j < P) == causal + sink(P)."""
    kern = sparsec.compile(str(LIBRARY / "prefix_lm.sa"), prefix=24)
    same = sparsec.compile("pattern p = causal + sink(24)")
    for n_q, n_k in ((64, 64), (20, 64), (64, 64 + 7)):
        assert bool((kern.mask(n_q, n_k) == same.mask(n_q, n_k)).all())


@pytest.mark.parametrize("path,name", ALL_PATTERNS)
def test_runs_through_the_generated_kernel(path, name):
    """Every library pattern, through its generated Triton kernel (interpreter), against float64."""
    kern = sparsec.compile(str(path), pattern=name)
    if not kern.ir.inputs and kern.ir.score is None:   # check() knows masks, not inputs or scores
        check(kern, "interpret", 1, 2, 1, 130, 130, 16, torch.float32)
        return
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    q, k, v = (torch.randn(1, 2, 130, 16, generator=gen) for _ in range(3))
    inputs = testing.draw_inputs(kern, 1, 2, {"n": 130, "n_q": 130, "n_k": 130}, gen)
    testing.assert_matches_reference(kern, q, k, v, backend="interpret", **inputs)
