"""IR views: printing round-trips, passes preserve the mask, canonical forms, and the symbolic cost."""
import numpy as np
import pytest
import sympy
from hypothesis import given, strategies as st

import sparsec
from sparsec.compiled import N
from sparsec.ir import expr as E
from sparsec.ir.tiles import Grid
from sparsec.passes import PASSES
from sparsec.passes.canonical import canonicalize, fold_constants

from conftest import patterns, shapes

SPEC_EXAMPLES = """
param w = 256                  # overridable default
let s = isqrt(n)
pattern local   = band(w) & causal
pattern bigbird = blocks(64, band(1) + global(1) + last(1) + random(3, seed=0))
pattern sparse_transformer = causal & heads(band(s), stride(s))
pattern axial = where(i // 64 == j // 64 or i % 64 == j % 64)
pattern content = lsh(64, rounds=2) & causal + cluster(16) + topk(4, block=64, causal=true)
pattern misc = dilated(4, 2) + chunk(32) + global([0, 5, 9]) + last(2) + sink(4) + logsparse + document
pattern algebra = full - (band(3) & stride(2)) + empty
"""


def reparse(d):
    """Parse the printed definition again and elaborate the same pattern."""
    return sparsec.compile(d.show(), pattern=d.name).source_ir


@pytest.mark.parametrize("name", ["local", "bigbird", "sparse_transformer", "axial", "content", "misc", "algebra"])
def test_spec_examples_round_trip_before_and_after_every_pass(name):
    d = sparsec.compile(SPEC_EXAMPLES, pattern=name).source_ir
    assert reparse(d) == d
    for _, run in PASSES:
        d = run(d)
        assert reparse(d) == d


@given(patterns)
def test_random_programs_round_trip(src):
    try:
        kern = sparsec.compile(f"param q = 3\npattern p = {src}")
    except sparsec.SparsecError:
        return  # e.g. a random argument that makes an empty band: rejected with a message
    assert reparse(kern.source_ir) == kern.source_ir
    assert reparse(kern.ir) == kern.ir


def lengths(n_q, n_k, offset, heads):
    """What Pattern.specialize reads: the lengths, the call's row positions and its heads."""
    off = n_k - n_q if offset is None else offset
    return {"n": n_k, "n_k": n_k, "n_q": n_q, "rows": (off, off + n_q - 1), "heads": heads}


def masks(body, n_q, n_k, offset, heads):
    off = n_k - n_q if offset is None else offset
    pos, keys = np.arange(n_q) + off, np.arange(n_k)
    return np.stack([body.mask(Grid(pos, keys, n_q, n_k, h)) for h in range(heads)])


@given(patterns, shapes())
def test_passes_preserve_the_mask(src, shape):
    n_q, n_k, offset, heads = shape
    try:
        d = sparsec.compile(f"pattern p = {src}").source_ir
    except sparsec.SparsecError:
        return
    env = lengths(n_q, n_k, offset, heads)
    before = masks(fold_constants(d).body.specialize(env), n_q, n_k, offset, heads)
    after = masks(canonicalize(fold_constants(d)).body.specialize(env), n_q, n_k, offset, heads)
    assert (before == after).all()


@pytest.mark.parametrize("src, canonical", [
    ("band(4) & causal", "band(4, 0)"),
    ("causal & band(3, 5)", "band(3, 0)"),
    ("band(2) + band(5, 1) + band(0, 4)", "band(5, 4)"),
    ("band(2) + band(9, -5)", "band(2) + band(9, -5)"),   # a gap between them: two bands
    ("band(2) & band(5, 1)", "band(2, 1)"),
    ("causal + band(5, -1)", "causal"),
    ("(sink(2) + global(4)) + (full & chunk(8))", "global(4) + chunk(8)"),
    ("band(3) + empty + band(3)", "band(3)"),
    ("band(3) - full", "empty"),
    ("band(-1, 3) & causal", "empty"),
    ("band(1, -1) & causal", "band(1, -1)"),
    ("heads(band(1), band(1))", "band(1)"),
    ("blocks(2, blocks(3, band(1)))", "blocks(6, band(1))"),
    ("blocks(1, chunk(4)) + blocks(5, full)", "full"),
    ("stride(4) + stride(2) + dilated(3, 6)", "stride(2)"),
    ("band(isqrt(n)) & causal", "band(isqrt(n)) & causal"),  # unknown until n is: left alone
])
def test_canonical_forms(src, canonical):
    assert sparsec.compile(f"pattern p = {src}").ir.body.show() == canonical


def test_params_fold_and_override():
    src = "param w = 4\nlet v = w * 2 + 1\npattern p = band(v) + sink(w)"
    assert sparsec.compile(src).ir.body.show() == "band(9) + sink(4)"
    assert sparsec.compile(src, w=10).ir.body.show() == "band(21) + sink(10)"
    with pytest.raises(ValueError, match="v=: no such param .it is a let"):
        sparsec.compile(src, v=3)
    with pytest.raises(ValueError, match="x=: no such param; the program declares: w"):
        sparsec.compile(src, x=3)
    with pytest.raises(TypeError, match="w= must be an int"):
        sparsec.compile(src, w=2.5)


def test_debug_switch_prints_ir_after_each_pass(monkeypatch, capsys):
    monkeypatch.setenv("SPARSEC_DEBUG", "passes")
    sparsec.compile("param w = 2\npattern p = band(w) & causal")
    err = capsys.readouterr().err
    assert "--- passes:\n# after fold_constants\npattern p = band(2) & causal" in err
    assert "--- passes:\n# after canonicalize\npattern p = band(2, 0)" in err


def count(src, n):
    return int(sparsec.compile(f"pattern p = {src}").mask(n).numpy().sum())


@pytest.mark.parametrize("src", ["full", "causal", "band(7)", "band(5, 2)", "dilated(3, 4)", "global(5)",
                                 "global([1, 8, 30])", "last(6)", "sink(9)", "random(3)", "blocks(8, band(1))"])
def test_cost_is_exact_for_primitives(src):
    kern = sparsec.compile(f"pattern p = {src}")
    for n in (64, 200):
        assert kern.cost.subs(N, n) == count(src, n)


@pytest.mark.parametrize("src, rel", [("stride(16)", 0.05), ("chunk(16)", 0.0), ("logsparse", 0.15),
                                      ("band(64) + global(16)", 0.02), ("causal & stride(8)", 0.02)])
def test_cost_estimates_are_close(src, rel):
    n = 1024
    assert abs(float(sympy.N(sparsec.compile(f"pattern p = {src}").cost.subs(N, n))) - count(src, n)) <= rel * count(src, n)


def test_cost_is_symbolic_in_params():
    kern = sparsec.compile("param w = 256\npattern p = band(w)")
    w = sympy.Symbol("w", integer=True)
    assert sympy.simplify(kern.symbolic_cost() - (N * (2 * w + 1) - w * (w + 1))) == 0
    assert kern.cost == 513 * N - 65792


@given(st.integers(0, 12), st.integers(1, 5), shapes())
def test_fold_constants_preserves_the_mask(w, c, shape):
    """The body read with its params and lets as an environment equals the folded body."""
    n_q, n_k, offset, heads = shape
    src = f"param w = {w}\nlet c = {c} + w // 4\nlet s = isqrt(n) + 1\npattern p = band(w) + chunk(c) & stride(s) + sink(c - 1)"
    d = sparsec.compile(src).source_ir
    env = lengths(n_q, n_k, offset, heads)
    for b in d.bindings:
        env[b.name] = E.evaluate(b.value, env)
    before = masks(d.body.specialize(env), n_q, n_k, offset, heads)
    after = masks(fold_constants(d).body.specialize(lengths(n_q, n_k, offset, heads)), n_q, n_k, offset, heads)
    assert (before == after).all()
