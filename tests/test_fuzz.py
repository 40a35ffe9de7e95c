"""Fuzzing as a property: programs drawn from the grammar and mutations of the library files either
compile, or fail with a located SparsecError, within a time bound; what compiles gives masks,
layouts and CPU results, or again a located error. HYPOTHESIS_PROFILE=fuzz runs the long profile
(3,000 programs per source, one in ten through the interpreter too); CI's takes about half a minute."""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import sparsec
from sparsec.ir.inputs import expected_shape

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = 3000 if LONG else 400
SECONDS = 20 if LONG else 10      # per program: compile, and on a small call, mask, layout and kernels
LIBRARY = sorted((Path(__file__).parents[1] / "patterns").glob("*.sa"))

PRIMITIVES = ["band", "dilated", "stride", "chunk", "global", "last", "sink", "random", "where", "blocks",
              "heads", "lsh", "cluster", "topk"]
FUNCTIONS = ["min", "max", "abs", "isqrt", "ilog2", "ceil_div", "sqrt", "log2", "ceil", "floor"]
NAMES = ["i", "j", "h", "n", "n_q", "n_k", "w", "x", "p", "causal", "full", "empty", "document", "logsparse", "zz"]
EXTREMES = [0, 1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**80, 10**400]
OPERATORS = ["+", "-", "*", "//", "%", "**", "&", "and", "or", "==", "!=", "<", "<=", ">", ">="]
KEYWORDS = ["seed", "rounds", "iters", "block", "causal", "before", "after", "w", "k", "bogus"]

numbers = st.one_of(st.integers(-5, 70), st.sampled_from(EXTREMES)).map(str)
leaves = st.one_of(numbers, st.sampled_from(NAMES), st.sampled_from(["true", "false"]))


def _grow(children):
    args = st.lists(st.one_of(children, st.builds("{}={}".format, st.sampled_from(KEYWORDS), children)),
                    max_size=4).map(", ".join)
    return st.one_of(
        st.builds("({} {} {})".format, children, st.sampled_from(OPERATORS), children),
        st.builds("{} {} {}".format, children, st.sampled_from(OPERATORS), children),
        st.builds("-{}".format, children), st.builds("not {}".format, children),
        st.builds("{}({})".format, st.sampled_from(PRIMITIVES + FUNCTIONS), args),
        st.builds("[{}]".format, st.lists(children, max_size=3).map(", ".join)),
    )


expressions = st.recursive(leaves, _grow, max_leaves=12)
statements = st.one_of(st.builds("param w = {}".format, expressions), st.builds("let x = {}".format, expressions),
                       st.builds("pattern p = {}".format, expressions))
programs = st.builds(lambda body, last: "\n".join(body + [f"pattern q = {last}"]),
                     st.lists(statements, max_size=3), expressions)

# typed programs: mostly well-formed, so the later stages (specialization, layouts, kernels) see
# extreme and n-dependent arguments, deep where(...) conditions and every primitive
small_or_extreme = st.one_of(st.integers(-3, 40), st.sampled_from(EXTREMES[:12])).map(str)
def integer_expressions(names: list[str]):
    return st.recursive(
        st.one_of(small_or_extreme, st.sampled_from(["n", "n_q", "n_k"] + names)),
        lambda c: st.one_of(st.builds("({} {} {})".format, c, st.sampled_from(["+", "-", "*", "//", "%"]), c),
                            st.builds("{} ** {}".format, c, st.integers(0, 70)),
                            st.builds("{}({})".format, st.sampled_from(["isqrt", "ilog2", "abs", "sqrt", "log2"]), c),
                            st.builds("{}({}, {})".format, st.sampled_from(["min", "max", "ceil_div"]), c, c)),
        max_leaves=4)


integers = integer_expressions(["w", "x"])
pair_integers = st.recursive(
    st.one_of(st.sampled_from(["i", "j", "h"]), integers),
    lambda c: st.one_of(st.builds("({} {} {})".format, c, st.sampled_from(["+", "-", "*", "//", "%"]), c),
                        st.builds("{} ** {}".format, c, st.integers(0, 4))), max_leaves=4)
conditions = st.recursive(
    st.builds("{} {} {}".format, pair_integers, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), pair_integers),
    lambda c: st.one_of(st.builds("({} and {})".format, c, c), st.builds("({} or {})".format, c, c),
                        st.builds("not ({})".format, c)), max_leaves=4)
primitives = st.one_of(
    st.sampled_from(["causal", "full", "empty", "logsparse", "document"]),
    st.builds("{}({})".format, st.sampled_from(["band", "stride", "chunk", "global", "last", "sink", "random", "lsh",
                                                "cluster"]), integers),
    st.builds("{}({}, {})".format, st.sampled_from(["band", "dilated"]), integers, integers),
    st.builds("global([{}, {}])".format, integers, integers),
    st.builds("random({}, seed={})".format, integers, integers),
    st.builds("topk({}, block={})".format, integers, integers),
    st.builds("lsh({}, rounds={}, seed={})".format, integers, integers, integers),
    st.builds("where({})".format, conditions))
typed_patterns = st.recursive(
    primitives,
    lambda c: st.one_of(st.builds("({} {} {})".format, c, st.sampled_from(["+", "&", "-"]), c),
                        st.builds("heads({}, {})".format, c, c), st.builds("blocks({}, {})".format, integers, c)),
    max_leaves=5)
typed_programs = st.builds("param w = {}\nlet x = {}\npattern p = {}".format, integer_expressions([]),
                           integer_expressions(["w"]), typed_patterns)

FRAGMENTS = ["(", ")", ",", "+", "-", "&", "**", "2**64", "n", "where(", "not ", "i", "j", "band(", "0", "#",
             "\ufeff", "\x00", "é", "\n", "pattern", "=", "blocks(0, ", "heads(", "global([", "10**80"]


@st.composite
def mutants(draw):
    """A library file with a few edits: a slice deleted, a fragment inserted, a line repeated, a
    number replaced by an extreme one."""
    text = draw(st.sampled_from(LIBRARY)).read_text()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["delete", "insert", "repeat", "number"]))
        if edit == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif edit == "insert":
            text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
        elif edit == "repeat":
            lines = text.splitlines()
            k = draw(st.integers(0, max(0, len(lines) - 1)))
            text = "\n".join(lines[:k] + lines[k:k + 1] * draw(st.integers(2, 30)) + lines[k:])
        else:
            digits = [k for k, c in enumerate(text) if c.isdigit()]
            if digits:
                k = draw(st.sampled_from(digits))
                text = text[:k] + str(draw(st.sampled_from(EXTREMES))) + text[k + 1:]
    return text


class TooSlow(Exception):
    pass


@contextmanager
def time_bound(seconds: int):
    """The body must finish within `seconds` (SIGALRM; the fuzz tests run on Linux)."""
    def alarm(signum, frame):
        raise TooSlow(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def assert_located(e: sparsec.SparsecError, text: str) -> None:
    lines = str(e).splitlines()
    assert e.span is not None and len(lines) == 3 and lines[2].strip().startswith("^"), (text, str(e))
    assert lines[0].startswith(f"{e.span.source.filename}:{e.span.line}:{e.span.column}: error: "), str(e)


INPUT_ELEMENTS = 1 << 24   # the most elements exercise draws for one declared input (a mutant may declare 2**30)


def exercise(kern: sparsec.CompiledPattern, interpret: bool) -> None:
    """A small call of every kind the program allows: mask, layout, the CPU path (and the
    interpreter in the long profile), with the call inputs the pattern needs."""
    n_q, n_k, heads = 19, 23, 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, heads, n_q, 16, generator=gen), *(torch.randn(1, 1, n_k, 16, generator=gen) for _ in "kv")
    call_inputs = {"segment_ids": torch.tensor([[0] * 9 + [1] * 14])} if "segment_ids" in kern.needs else {}
    for d in kern.ir.inputs:   # declared inputs: bools, ints in [0, n_k), positive floats
        shape = expected_shape(d, 1, heads, {"n": n_k, "n_q": n_q, "n_k": n_k})
        if np.prod(shape, dtype=np.float64) > INPUT_ELEMENTS:   # a legal dim, but more than this machine holds
            return
        call_inputs[d.name] = (torch.rand(shape, generator=gen) < 0.5 if d.dtype == "bool" else
                               torch.randint(0, n_k, shape, generator=gen) if d.dtype == "int" else
                               torch.rand(shape, generator=gen) + 0.05)
    content = {"q": q, "k": k} if {"q", "k"} & kern.needs else {}
    kern.mask(n_q, n_k, heads=heads, **content, **call_inputs)
    if not content:
        kern.layout(n_q, n_k, 8, 8, heads=heads, **call_inputs)
    kern(q, k, v, backend="cpu", **call_inputs)
    if interpret and kern.ir.score is None:   # the kernels refuse score expressions (not lowered yet)
        kern(q, k, v, backend="interpret", **call_inputs)


def outcome(text: str, interpret: bool = False) -> str:
    """'ok' or 'error', after checking that every failure is a located SparsecError in time."""
    with time_bound(SECONDS):
        try:
            kern = sparsec.compile(text)
        except sparsec.SparsecError as e:
            assert_located(e, text)
            return "error"
        try:
            exercise(kern, interpret)
        except sparsec.SparsecError as e:
            assert_located(e, text)
            return "error"
    return "ok"


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def sometimes(text: str) -> bool:
    """The interpreter compiles each new kernel for seconds: the long profile runs one program in ten."""
    return LONG and hash(text) % 10 == 0


@FUZZ
@given(programs)
def test_programs_from_the_grammar_compile_or_fail_located(text):
    outcome(text, interpret=sometimes(text))


@FUZZ
@given(typed_programs)
def test_typed_programs_with_extreme_arguments_run_or_fail_located(text):
    outcome(text, interpret=sometimes(text))


@FUZZ
@given(mutants())
def test_mutated_library_files_compile_or_fail_located(text):
    outcome(text, interpret=sometimes(text))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.stem)
def test_the_library_itself_runs(path):
    for name in sparsec.compile(path).patterns:
        kern = sparsec.compile(path, pattern=name)
        with time_bound(SECONDS):
            exercise(kern, interpret=False)


def test_the_harness_catches_what_it_is_for(monkeypatch):
    """The property fails on a raw exception, an unlocated error and a hang: it can fail."""
    with pytest.raises(AssertionError):
        assert_located(sparsec.SparsecError("no place"), "")
    monkeypatch.setattr(sparsec, "compile", lambda text: (_ for _ in ()).throw(RecursionError("deep")))
    with pytest.raises(RecursionError):
        outcome("pattern p = band(1)")
    monkeypatch.setattr(sys.modules[__name__], "SECONDS", 1)
    monkeypatch.setattr(sparsec, "compile", lambda text: time.sleep(5))
    with pytest.raises(TooSlow):
        outcome("pattern p = band(1)")
