"""The hardening issue's reproducers, made small: every integer exact or a located error, compile
cost bounded by the text, deep inputs handled or refused at a stated limit, no raw exceptions."""
import dataclasses
import math
import re

import numpy as np
import pytest
import torch

import sparsec
from sparsec.passes import canonical
from sparsec.ir import expr as E
from sparsec.ir.limits import NESTING, SATURATED, saturate
from sparsec.ir.tiles import EMPTY
from sparsec.layout import tile_classes

from test_kernel import check


def error_of(src: str, call=None) -> str:
    with pytest.raises(sparsec.SparsecError) as e:
        kern = sparsec.compile(src)
        if call:
            call(kern)
    return str(e.value)


# ---- integers: exact, or a located error -------------------------------------------------------------

# each with its mask written from the spec at the unsaturated values (p: position, j: key)
PAST_INT32 = {
    "band(2**63 - 1)": lambda p, j: np.ones_like(p - j, bool),
    "band(2**63 - 1, 0)": lambda p, j: j <= p,
    "band(2**200, -(2**200))": lambda p, j: (p - j <= 2**200) & (p - j >= 2**200),   # empty at these n
    "global(2**40) - band(2**31)": lambda p, j: np.zeros_like(p - j, bool),
    "chunk(2**62) & stride(2**33)": lambda p, j: p == j,
    "last(2**31 + 5)": lambda p, j: np.ones_like(p - j, bool),
    "dilated(2**31, 2**31)": lambda p, j: p == j,
    "blocks(2**40, band(1))": lambda p, j: np.ones_like(p - j, bool),
    "global([3, 2**31, 2**62])": lambda p, j: (p == 3) | (j == 3),
}


@pytest.mark.parametrize("src", PAST_INT32)
def test_arguments_past_int32_are_exact(src):
    """band(2**63 - 1) once wrapped int64 interval arithmetic into an empty layout; arguments of
    2**31 and more raised Triton's InterpreterError. Saturated (limits.py), they keep their mask."""
    kern = sparsec.compile(f"pattern p = {src}")
    for n_q, n_k, off in ((37, 37, None), (20, 45, 3)):
        off_ = n_k - n_q if off is None else off
        mask = kern.mask(n_q, n_k, q_offset=off).numpy()[0, 0]
        pos, keys = np.arange(n_q)[:, None] + off_, np.arange(n_k)[None, :]
        assert np.array_equal(mask, np.broadcast_to(PAST_INT32[src](pos, keys), mask.shape)), src
        lay = kern.layout(n_q, n_k, 8, 8, q_offset=off).classes()[0, 0]
        truth = tile_classes(mask, 8, 8)
        assert ((truth > EMPTY) <= (lay > EMPTY)).all()          # no allowed tile missed
        for backend in ("cpu", "interpret"):
            check(kern, backend, 1, 2, 1, n_q, n_k, 16, torch.float32, q_offset=off)


def test_saturation_is_exact_at_the_position_bounds():
    assert saturate(2**63) == SATURATED == 2**31 - 1 and saturate(-(2**40)) == -SATURATED
    # the extreme offsets the bounds allow stay strictly inside +-SATURATED
    assert (2**30 - 1) - 0 < SATURATED and (-(2**30) + 1) - (2**30 - 1) > -SATURATED
    with pytest.raises(ValueError, match="2\\*\\*30"):
        sparsec.compile("pattern p = causal").layout(2**30 + 1, block_m=2**20, block_n=2**20)
    with pytest.raises(ValueError, match="within"):
        sparsec.compile("pattern p = causal").mask(4, q_offset=-(2**30))


@pytest.mark.parametrize("src, where", [
    ("where(i ** 64 == j)", "i ** 64"),
    ("where(i * 2**62 == j * 2**62)", "i * 2**62"),
    ("where(i // (j - 3) == 1)", "j - 3"),
    ("where(isqrt(i - 20) < 2)", "isqrt(i - 20)"),
    ("where(log2(j) < 3)", "log2(j)"),
    ("where(i ** -1 == j)", "i ** -1"),
    ("where(i < 2**64)", "2**64"),
])
def test_where_values_beyond_64_bits_or_domains_are_located_errors(src, where):
    """They wrapped silently (or gave NaN in a kernel); now every sub-expression is checked over
    the call's rows, keys and heads, at the expression, naming those ranges."""
    for call in (lambda k: k.mask(16), lambda k: k.layout(16, block_m=16, block_n=16),
                 lambda k: k(*(torch.randn(1, 1, 16, 16) for _ in range(3)))):
        text = error_of(f"pattern p = {src}", call)
        line = text.splitlines()
        assert line[0].startswith("<string>:1:") and "where rows i are 0..15" in line[0], text
        column = int(line[0].split(":")[2])
        assert line[1][column - 1:].startswith(where), text    # the caret is under the expression
        assert line[2].index("^") == column - 1


def test_where_in_range_at_small_n_runs_and_is_refused_where_it_would_wrap():
    kern = sparsec.compile("pattern p = where(i * i * i * i == j * j * j * j or i < 2)")
    check(kern, "cpu", 1, 1, 1, 40, 40, 16, torch.float32)
    with pytest.raises(sparsec.SparsecError, match="64-bit"):
        kern.mask(70000, 16)    # i**4 reaches 2**64 for i near 65536


@pytest.mark.parametrize("src, message", [
    ("band(2**300)", "below 2\\*\\*256"),
    ("band(" + "9" * 5000 + ")", "integer literal too large"),
    ("let a = 2**4000\npattern p = band(a)", "below 2\\*\\*256"),
    ("pattern p = band(sqrt(2**200))", None),
    ("pattern p = band(log2(2**255))", None),
    ("random(3, seed=2**63)", "seed must be at most"),
    ("lsh(4, rounds=2**62)", "rounds must be at most 64"),
    ("lsh(2**20)", "buckets must be at most"),
    ("cluster(4, iters=2**31)", "iters must be at most 1000"),
    ("cluster(2**17)", "k must be at most"),
])
def test_constants_and_work_counts_are_bounded(src, message):
    src = src if src.startswith(("let", "pattern")) else f"pattern p = {src}"
    if message is None:
        sparsec.compile(src).mask(8)
        return
    text = error_of(src)
    assert text.startswith("<string>:") and len(text.splitlines()) == 3
    assert re.search(message, text), text


def test_param_overrides_are_bounded_like_constants():
    with pytest.raises(ValueError, match="2\\*\\*256"):
        sparsec.compile("param w = 3\npattern p = band(w)", w=2**300)
    sparsec.compile("param w = 3\npattern p = band(w)", w=2**100).mask(8)


def test_segment_ids_keep_all_their_bits():
    """ids 0 and 2**32 were cast to int32 and became one document, while kern.mask kept them apart."""
    kern = sparsec.compile("pattern p = document & causal")
    seg = torch.tensor([[0] * 9 + [2**32] * 8 + [2**33 + 1] * 7, [5] * 24])
    mask = kern.mask(24, segment_ids=seg)
    assert not mask[0, 0, 12, :9].any()
    for backend in ("cpu", "interpret"):
        check(kern, backend, 2, 2, 2, 24, 24, 16, torch.float32, call_inputs={"segment_ids": seg})


# ---- compile cost bounded by the text ----------------------------------------------------------------

def counted(monkeypatch, owner, name):
    """Count the calls of owner.name from now on (a measure of work that does not depend on time)."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_named_patterns_used_twice_cost_their_text(monkeypatch):
    """18 lines of `pattern p{k+1} = p{k} + p{k}` took 19 s: each pass rewrote 2**18 inlined
    copies. Shared nodes are rewritten once: the rewrites grow with the lines, not 2**lines."""
    lines = 60
    src = "\n".join(["pattern p0 = band(1) + global(2)"] + [f"pattern p{k + 1} = p{k} + p{k}" for k in range(lines)])
    rewrites = counted(monkeypatch, canonical, "_rewrite")
    kern = sparsec.compile(src)
    assert kern.ir.body.show() == "band(1) + global(2)"
    assert len(rewrites) < 40 * lines, len(rewrites)
    # shared parts that do not simplify away: a stated limit, found on the shared nodes
    src = "\n".join(["pattern p0 = band(1)"] + [f"pattern p{k + 1} = p{k} & (p{k} - stride({k + 2}))"
                                                for k in range(40)])
    rewrites.clear()
    assert "nodes once its named parts are written out (the limit is 10000 nodes)" in error_of(src)
    assert len(rewrites) < 40 * 40 * 4, len(rewrites)


def test_let_chains_cost_their_length(monkeypatch):
    """A let chain over n was re-evaluated as a tree on every layout (2**22 additions at 22
    lines); shared sub-expressions are evaluated once per specialization."""
    additions = []
    plus = E.OPS["+"]
    monkeypatch.setitem(E.OPS, "+", dataclasses.replace(
        plus, evaluate=lambda *a: additions.append(1) or plus.evaluate(*a)))
    src = "\n".join(["let a0 = n"] + [f"let a{k + 1} = a{k} + a{k}" for k in range(12)]
                    + ["pattern p = band(a12 // 4096)"])
    kern = sparsec.compile(src)
    kern.layout(8192, block_m=128, block_n=128)
    assert kern.mask(64).all()                  # band(n) at n = 64
    assert len(additions) <= 2 * 12, len(additions)   # two specializations; as a tree, 2 * 4095
    longer = "\n".join(["let a0 = n"] + [f"let a{k + 1} = a{k} + a{k}" for k in range(22)]
                       + ["pattern p = band(a22 // 4096)"])
    assert "operations once its lets are written out (the limit is 10000 operations)" in error_of(longer)


# ---- deep inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("src", [
    " + ".join(f"band({k}, -{k})" for k in range(600)),        # 600 terms: one flat union
    "where(" + " or ".join(f"i == {3 * k} and j == {k}" for k in range(300)) + ")",
    "heads(" + ", ".join(f"band({k})" for k in range(200)) + ")",
    "global(1) + " + " + ".join(f"where(i % {k + 2} == j % {k + 3})" for k in range(120)),
])
def test_long_and_wide_inputs_compile_and_run(src):
    kern = sparsec.compile(f"pattern p = {src}")
    for backend in ("cpu", "interpret"):
        check(kern, backend, 1, 2, 2, 33, 33, 16, torch.float32)


@pytest.mark.parametrize("src", [
    "where(" + "not " * 5000 + "i < j)",
    "band(" + " ** ".join(["1"] * 3000) + ")",
    "full - (" * 200 + "band(1)" + ")" * 200,
])
def test_too_deep_inputs_are_refused_at_the_stated_limit(src):
    text = error_of(f"pattern p = {src}")
    assert f"more than {NESTING} levels" in text and text.startswith("<string>:1:"), text
    assert sparsec.compile("pattern p = band(" + "(" * 300 + "1" + ")" * 300 + ")")   # parentheses alone: no depth


def test_nesting_through_names_is_bounded_too():
    src = "\n".join(["pattern p0 = band(1)"] + [f"pattern p{k + 1} = band({k + 2}) - p{k}" for k in range(150)])
    assert f"(the limit is {NESTING})" in error_of(src)
    src = "\n".join(["let a0 = n"] + [f"let a{k + 1} = a{k} + 1" for k in range(150)] + ["pattern p = band(a150)"])
    text = error_of(src)
    assert f"(the limit is {NESTING})" in text and text.startswith("<string>:")


def test_every_stage_works_at_the_nesting_limit():
    """A pattern as deep as the limit allows, with a where(...) filling the rest: each recursive
    view (printer, passes, mask, layout, lowering, both backends, the backward) stays within
    Python's recursion limit, also under pytest."""
    inner = "band(1)"
    for k in range(40):
        inner = f"band({k + 2}) - ({inner})" if k % 2 else f"causal & ({inner} + chunk({k + 3}))"
    deep_where = "where(i" + " + 1" * 35 + " < j + 9)"
    kern = sparsec.compile(f"pattern p = {inner} + {deep_where}")
    depth = lambda p: 1 + max(map(depth, p.children()), default=0)
    assert depth(kern.ir.body) + 36 >= NESTING - 5
    sparsec.compile(kern.ir.show())
    str(kern.cost)
    kern.layout(40, block_m=16, block_n=16)
    q = torch.randn(1, 1, 40, 16, requires_grad=True)
    for backend in ("cpu", "interpret"):
        check(kern, backend, 1, 1, 1, 40, 40, 16, torch.float32)
        kern(q, q, q, backend=backend).sum().backward()


# ---- front-end corners -----------------------------------------------------------------------------

def test_byte_order_mark_and_empty_programs():
    assert sparsec.compile("\ufeffpattern p = band(1)").ir.body.show() == "band(1)"
    for src in ("", "# only a comment\n", "\ufeff"):
        text = error_of(src)
        assert text.startswith("<string>:1:1: error: the program defines no pattern"), text


def test_reals_of_huge_integers_are_numbers_not_numpy_errors():
    """sqrt and log2 of integers past 64 bits raised numpy's TypeError; they are reals (float64)."""
    kern = sparsec.compile("pattern p = band(sqrt(2**200) // 2**99) + sink(ceil(log2(2**255)) - 250)")
    body = sparsec.passes.specialize(kern.ir, 8, 8, 0, 1)
    assert body.show() == f"band({math.isqrt(2**200) // 2**99}) + sink(5)"
