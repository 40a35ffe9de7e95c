"""Score modifications (spec section 7): `pattern p = MASK with EXPR`, from the grammar to the CPU path's forward and
backward and Flex's score_mod, against float64 autograd of the dense reference on inputs drawn fresh each run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import sparsec
from sparsec import testing
from sparsec.errors import SparsecError
from sparsec.ir import derivative as Dv
from sparsec.ir import expr as E

from conftest import KERNEL_EXAMPLES, patterns


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 31))


# ---- front end: printing, located errors ----

ROUND_TRIPS = [
    "input slopes(h) float\npattern alibi = causal with score - slopes[h] * (i - j)",
    "param cap = 50\npattern g = causal & band(4095, 0) with cap * tanh(score / cap)",
    "input rel(h, 257) float\npattern t5 = band(128) with score + rel[h, j - i + 128]",
    "pattern p = full with select(i >= j, score, score * 0.5) + clamp(score, -2.5e-3, 1.0) - softplus(-score)",
    "input gate(b, h, n_k) float\npattern p = causal with score + log(gate[b, h, j]) + sigmoid(exp(-1.5) * score)",
]


@pytest.mark.parametrize("src", ROUND_TRIPS)
def test_printed_program_parses_back_to_the_same_ir(src):
    kern = sparsec.compile(src)
    again = sparsec.compile(kern.ir.show())
    assert again.ir == kern.ir and again.ir.score == kern.ir.score
    assert " with " in kern.ir.show()


ERRORS = [   # (source, message, line, column)
    ("pattern p = where(score > 0)", "'score' is only defined in a pattern's with expression", 1, 19),
    ("pattern a = causal with score * 2\npattern b = a + band(3)", "pattern 'a' modifies its scores", 2, 13),
    ("pattern p = causal with select(score, 1, 2)", "expected a condition", 1, 32),
    ("param score = 3\npattern p = causal", "'score' is a built-in name", 1, 1),
    ("pattern p = causal with score + gate[j]", "unknown input 'gate'", 1, 33),
    ("input keep(n_k) bool\npattern p = causal with score + keep[j]", "'keep' is a bool input, used here as a number",
     2, 33),
    ("pattern p = causal with tanh(score, 2)", "tanh takes 1 argument(s), got 2", 1, 25),
    ("pattern p = (causal with score) + band(2)", "", 1, 21),      # with is not part of an expression
    ("pattern p = causal with score + 1e999", "real literal too large", 1, 33),
]


@pytest.mark.parametrize("src, message, line, column", ERRORS)
def test_misuses_are_located_errors(src, message, line, column):
    with pytest.raises(SparsecError) as info:
        sparsec.compile(src)
    assert message in info.value.message
    assert (info.value.span.line, info.value.span.column) == (line, column)


def test_an_integer_part_that_overflows_is_an_error_at_the_call():
    kern = sparsec.compile("pattern p = causal with score + (i * j * j) / 2")
    q = torch.randn(1, 1, 8, 16)
    kern(q, q, q)
    with pytest.raises(SparsecError, match="integer overflow"):
        kern.score_function(1 << 22)


def test_a_param_beyond_64_bits_in_real_arithmetic_is_located():   # the fuzzer's gemma2 mutation
    kern = sparsec.compile("param cap = 46116860184273879040\npattern p = causal with cap * tanh(score / cap)")
    q = torch.randn(1, 1, 8, 16)
    for backend in ("cpu", "interpret"):
        with pytest.raises(SparsecError, match="does not fit the 64-bit integers") as info:
            kern(q, q, q, backend=backend)
        assert (info.value.span.line, info.value.span.column) == (1, 13)


def test_missing_inputs_are_named():
    q = torch.randn(1, 1, 20, 16)
    alibi = sparsec.compile("alibi")
    with pytest.raises(ValueError, match="reads the input slopes: pass slopes="):
        alibi(q, q, q)


# ---- derivatives: the rule table against sympy ----

DERIVED = [
    "score * score - 3 * score", "exp(score / 4) + log(score * score + 1)", "50 * tanh(score / 50)",
    "sigmoid(score) * softplus(score - 1)", "sqrt(score * score + 2) / (score + 7)", "score ** 3 - abs(score)",
    "clamp(score, -0.5, 0.75) + min(score, 1 - score, 0.25) + max(score, 0.1)",
    "select(score > 0.2, score * 2, -score) + log2(score * score + 1)",
]


@pytest.mark.parametrize("text", DERIVED)
def test_derivative_rules_match_sympy(text):
    e = sparsec.compile(f"pattern p = full with {text}").ir.score
    d = Dv.derivative(e, E.Var("score"))
    s = sympy.Symbol("score", real=True)
    want = sympy.lambdify(s, sympy.diff(E.to_sympy(e, {"score": s}), s), "math")
    for x in np.random.default_rng().uniform(-3, 3, 40):
        if any(abs(x - edge) < 1e-6 for edge in (-0.5, 0.75, 0.25, 0.5, 0.1, 0.2, 0.0)):
            continue   # a kink: the rules pick one side, sympy none
        got = E.evaluate(d, {"score": float(x)})
        assert math.isclose(got, float(want(x)), rel_tol=1e-9, abs_tol=1e-9), (text, x, got, want(x))


def test_derivative_by_a_read():
    e = sparsec.compile("input g(n_k) float\npattern p = full with score * g[j] + exp(g[j]) - g[j + 1]").ir.score
    reads = Dv.float_read_nodes(e)
    assert [E.show(r) for r in reads] == ["g[j]", "g[j + 1]"]
    env = {"score": 0.7, "j": 3, "g": np.array([0.1, 0.2, 0.3, 0.4, 0.5])}
    assert math.isclose(E.evaluate(Dv.derivative(e, reads[0]), env), 0.7 + math.exp(0.4))
    assert E.evaluate(Dv.derivative(e, reads[1]), env) == -1


# ---- the CPU path and the generated kernels, forward and backward, against float64 autograd ----

def _call(kern, B, H, Hkv, n_q, n_k, D, q_offset, inputs, backend="cpu"):
    """kern's O and gradients (q, k, v, then each float input) against testing.reference's."""
    gen = torch.Generator().manual_seed(_seed())
    q = torch.randn(B, H, n_q, D, generator=gen)
    k, v = (torch.randn(B, Hkv, n_k, D, generator=gen) for _ in range(2))
    floats = [name for name in inputs if name in kern.score_inputs]   # those a gradient reaches
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + [inputs[n].clone().requires_grad_() for n in floats]
    given = {**inputs, **dict(zip(floats, leaves[3:]))}
    o, lse = kern(*leaves[:3], q_offset=q_offset, return_lse=True, backend=backend, **given)
    wants = [x.double().requires_grad_() for x in (q, k, v)] + [inputs[n].double().requires_grad_() for n in floats]
    want_o, want_lse = testing.reference(kern, *wants[:3], q_offset=q_offset,
                                         **{**inputs, **dict(zip(floats, wants[3:]))})
    do = torch.randn(o.shape, dtype=torch.float64, generator=gen)
    # an input read only in a condition (select(g > 0, ...)) has gradient 0: the reference's
    # autograd sees it unused, so unused inputs count as zeros on both sides
    got = torch.autograd.grad(o, leaves, do.float(), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(want_o, wants, do, allow_unused=True, materialize_grads=True)
    return (o, lse, got), (want_o, want_lse, want)


def _close(got, want, tol=2e-4):
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, float(want[torch.isfinite(want)].abs().max()) if torch.isfinite(want).any() else 1.0)
    same_inf = torch.isinf(got) & torch.isinf(want) & (got.sign() == want.sign())
    err = torch.where(same_inf, 0.0, (got - want).abs()).nan_to_num(float("inf")).max()
    assert err <= tol * scale, f"max error {float(err):.3e} (scale {scale:.3g})"


def _rand(*shape, low=-1.0, high=1.0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(_seed())) * (high - low) + low


CASES = [   # (source, B, H, Hkv, n_q, n_k, q_offset, inputs)
    ("input slopes(h) float\npattern p = causal with score - slopes[h] * (i - j)", 2, 4, 2, 70, 130, None,
     {"slopes": _rand(4, low=0.01, high=0.5)}),
    ("param cap = 2\npattern p = causal & band(40, 0) with cap * tanh(score / cap)", 1, 2, 2, 150, 150, 0, {}),
    ("input rel(h, 41) float\npattern p = band(25) with score + rel[h, j - i + 20]", 1, 2, 1, 100, 100, 0,
     {"rel": _rand(2, 41)}),    # reads past the table (|j - i| > 20) are 0
    ("input gate(b, h, n_k) float\npattern p = causal & band(30, 0) with score + log(gate[b, h, j])", 2, 2, 2, 90, 90, 0,
     {"gate": _rand(2, 1, 90, low=0.05, high=1.0)}),   # h broadcast
    ("input w(b, n_q) float\npattern p = band(10) + global(2) with select(i >= j, score * w[b, i - n_k + n_q], "
     "clamp(score, -0.3, 0.3)) + min(score, 0.2) - abs(score) / 4 + softplus(score) * sigmoid(score)", 2, 2, 2, 60, 80,
     20, {"w": _rand(2, 60, low=0.5, high=1.5)}),
    ("pattern p = blocks(16, band(1) + random(2, seed=5)) with exp(score / 8) - score ** 2 / 16", 1, 2, 2, 96, 96, 0,
     {}),
    # content shares run in bucket order: the expression reads the sorted rows' original positions
    ("input slopes(h) float\ninput gate(b, h, n_k) float\npattern p = (lsh(4, rounds=2) & causal) + band(3, 0) "
     "with score - slopes[h] * (i - j) + log(gate[b, h, j])", 2, 4, 2, 70, 70, 0,
     {"slopes": _rand(4, low=0.01, high=0.5), "gate": _rand(2, 4, 70, low=0.05, high=1.0)}),
    ("input rel(h, 41) float\npattern p = causal & (cluster(3) + band(5, 0)) with score + rel[h, j - i + 20]",
     1, 2, 1, 50, 80, 30, {"rel": _rand(2, 41)}),
]


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("src, B, H, Hkv, n_q, n_k, q_offset, inputs", CASES)
def test_backends_match_the_reference(src, B, H, Hkv, n_q, n_k, q_offset, inputs, backend):
    """O, LSE and the gradients of q, k, v and every float input: the CPU path, and the generated
    kernels (pattern_score, its slope in dS, input gradients by atomics) under the interpreter."""
    kern = sparsec.compile(src)
    (o, lse, got), (want_o, want_lse, want) = _call(kern, B, H, Hkv, n_q, n_k, 16, q_offset, inputs, backend)
    _close(o, want_o)
    _close(lse, want_lse)
    for g, w in zip(got, want):
        _close(g, w)


# spec section 7's examples, as the spec writes them
SECTION_7 = """
input slopes(h) float
pattern alibi   = causal with score - slopes[h] * (i - j)
param cap = 50
pattern gemma   = causal & band(4095, 0) with cap * tanh(score / cap)
input rel(h, 257) float
pattern t5      = band(128) with score + rel[h, j - i + 128]
input gate(b, h, n_k) float
input blockscore(b, h, ceil_div(n_q, 64), ceil_div(n_k, 64)) float
pattern sparsek = causal & (band(64, 0) + topk(8, block=64, by=blockscore)) with score + log(gate[b, h, j])
"""


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("name", ["alibi", "gemma", "t5", "sparsek"])
def test_the_spec_examples_match_the_reference(name, backend):
    kern = sparsec.compile(SECTION_7, pattern=name)
    lengths = {"n": 300, "n_q": 300, "n_k": 300}
    inputs = testing.draw_inputs(kern, 2, 2, lengths, torch.Generator().manual_seed(_seed()))
    if "blockscore" in inputs:
        inputs["blockscore"] = torch.randn(inputs["blockscore"].shape)
    (o, lse, got), (want_o, want_lse, want) = _call(kern, 2, 2, 1, 300, 300, 16, 0, inputs, backend)
    _close(o, want_o)
    _close(lse, want_lse)
    assert len(got) == 3 + len(kern.score_inputs)
    for g, w in zip(got, want):
        _close(g, w)


def test_reference_is_the_formula():
    """testing.reference under a with expression against ALiBi written out by hand."""
    kern = sparsec.compile("alibi")
    q, k, v = (torch.randn(1, 3, 40, 16, dtype=torch.float64) for _ in range(3))
    slopes = torch.rand(3, dtype=torch.float64)
    i, j = torch.arange(40).view(-1, 1), torch.arange(40).view(1, -1)
    s = q @ k.transpose(-1, -2) / 4 - slopes.view(1, 3, 1, 1) * (i - j)
    want = torch.softmax(s.masked_fill(j > i, -math.inf), -1) @ v
    got, _ = testing.reference(kern, q, k, v, slopes=slopes)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_minus_inf_scores_contribute_nothing(backend):
    """log(0) gates: those pairs count for nothing, a row whose gates are all 0 gives O = 0 and
    LSE = -inf, and no gradient is NaN (a pair with S' = -inf contributes 0, also to the gate)."""
    kern = sparsec.compile("input gate(b, h, n_k) float\npattern p = causal with score + log(gate[b, h, j])")
    gate = _rand(1, 2, 64, low=0.1, high=1.0)
    gate[..., 5:40] = 0.0
    gate[:, 1, :] = torch.where(torch.arange(64) < 40, 0.0, gate[:, 1, :])   # head 1: rows < 40 see only zeros
    (o, lse, got), (want_o, want_lse, want) = _call(kern, 1, 2, 2, 64, 64, 16, 0, {"gate": gate}, backend)
    _close(o, want_o)
    _close(lse, want_lse)
    assert torch.isneginf(lse[0, 1, :40]).all() and (o[0, 1, :40] == 0).all()
    for g, w in zip(got[:3], want[:3]):
        _close(g, w)
    assert torch.isfinite(got[3]).all()
    alive = gate > 0
    _close(got[3][alive], want[3][alive])


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_with_score_alone_is_the_mask(backend):
    plain, scored = sparsec.compile("pattern p = band(9) + sink(3)"), sparsec.compile("pattern p = band(9) + sink(3) "
                                                                                       "with score")
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    assert torch.allclose(plain(q, k, v, backend=backend), scored(q, k, v, backend=backend), atol=1e-6)


def test_library_systems_learn_their_inputs():
    """One step of gradient descent on ALiBi's slopes lowers a loss: the gradient points downhill."""
    kern = sparsec.compile("alibi")
    q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
    target = torch.randn(1, 4, 64, 16)
    slopes = torch.full((4,), 0.3, requires_grad=True)
    loss = ((kern(q, k, v, slopes=slopes) - target) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, [slopes])
    with torch.no_grad():
        after = ((kern(q, k, v, slopes=slopes - 1e-3 * grad / grad.norm()) - target) ** 2).sum()
    assert after < loss


@pytest.mark.parametrize("src", [
    "alibi",
    "input gate(b, h, n_k) float\ninput keep(b, n_k) bool\npattern p = (band(7) + sink(2)) & where(keep[b, j]) "
    "with score + log(gate[b, h, j]) - abs(i - j) / 8",
])
@pytest.mark.parametrize("backend, examples", [("cpu", 12), ("interpret", 5)])
def test_drawn_calls_match_the_reference(src, backend, examples):
    """testing.attention_inputs draws the declared inputs too: odd lengths, GQA, offsets, decoding."""
    kern = sparsec.compile(src)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(testing.attention_inputs(kern, max_n=70))
    def one_call(call):
        testing.assert_matches_reference(kern, backend=backend, **call)
    one_call()


# ---- Flex: the same expression as a score_mod ----

@pytest.mark.parametrize("src, inputs", [
    ("input slopes(h) float\npattern p = causal & band(60, 0) with score - slopes[h] * (i - j)",
     {"slopes": torch.tensor([0.05, 0.2])}),
    ("input rel(h, 41) float\npattern p = band(25) with 3 * tanh(score / 3) + rel[h, j - i + 20]",
     {"rel": torch.randn(2, 41)}),
])
def test_flex_score_mod_is_the_cpu_path(src, inputs):
    kern = sparsec.compile(src)
    q, k, v = (torch.randn(2, 2, 130, 16) for _ in range(3))
    with torch.no_grad():
        got = kern(q, k, v, backend="flex", **inputs)
        want = kern(q, k, v, backend="cpu", **inputs)
    assert torch.allclose(got, want, atol=2e-5)
    mod = kern.score_mod(130, heads=2, **inputs)
    s = torch.tensor(0.8)
    expect = kern.score_function(130, heads=2, **inputs)(torch.full((1, 2, 130, 130), 0.8))[0, 1, 7, 9]
    assert torch.allclose(mod(s, torch.tensor(0), torch.tensor(1), torch.tensor(7), torch.tensor(9)), expect.float())


def test_a_sorted_shares_score_mod_reads_original_positions():
    """Under Flex a sorted share's q_idx and kv_idx are sorted rows: the score_mod reads their
    original positions (Flex runs several shares on CUDA only, so the mapping is checked here)."""
    from sparsec.runtime.scores import score_mod
    kern = sparsec.compile("input slopes(h) float\npattern p = lsh(4) & causal with score - slopes[h] * (i - j)")
    slopes = torch.tensor([0.1, 0.3])
    q_pos = torch.stack([torch.randperm(20) for _ in range(2)])[None]   # (B=1, H=2, n_q=20)
    k_pos = torch.stack([torch.randperm(30) for _ in range(2)])[None]
    mod = score_mod(kern.ir.score, 10, 20, 30, {"slopes": slopes}, (q_pos, k_pos))
    b, h = torch.tensor(0), torch.tensor(1)
    for row, key in [(0, 0), (3, 17), (19, 29)]:
        got = mod(torch.tensor(0.5), b, h, torch.tensor(row), torch.tensor(key))
        want = 0.5 - 0.3 * (q_pos[0, 1, row] + 10 - k_pos[0, 1, key])
        assert torch.allclose(got, want.float())


def _dense_flex(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False):
    """FlexAttention's meaning written densely in eager torch, with autograd on CPU (which CPU Flex
    lacks): visited blocks of the BlockMask, its mask_mod, the score_mod, and O = 0, LSE = -inf on
    rows with nothing allowed. A stand-in for compiled Flex, so the CPU suite can run the sparsec
    side of backend='flex''s backward."""
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    if enable_gqa:
        k, v = (x.repeat_interleave(H // x.shape[1], 1) for x in (k, v))
    b, h, qi, ki = (torch.arange(n).view([-1 if d == axis else 1 for d in range(4)])
                    for axis, n in enumerate((B, H, n_q, n_k)))
    s = q @ k.transpose(-1, -2) * scale
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki)
    bq, bk = block_mask.BLOCK_SIZE
    visited = block_mask.to_dense().bool().repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :n_q, :n_k]
    s = s.masked_fill(~(visited & block_mask.mask_mod(b, h, qi, ki)), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0).detach()
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    some = total > 0
    o = (p @ v) / torch.where(some, total, 1.0)
    lse = torch.where(some, m + torch.log(torch.where(some, total, 1.0)), float("-inf")).squeeze(-1)
    return (o, lse) if return_lse else o


@pytest.mark.parametrize("case", [0, 2, 6])   # ALiBi (GQA, n_q != n_k), a relative table, lsh + band shares
def test_flex_backward_runs_in_the_op_merges_shares_and_gives_input_gradients(monkeypatch, case):
    """backend='flex''s backward: Flex's autograd recorded inside the custom op
    (flex.autograd_inside_op), each share's cotangents weighted by its part of the merged LSE,
    and the score inputs' gradients, for O and LSE against float64 autograd of the reference.
    Compiled Flex has no CPU backward, so _dense_flex stands in for it: this checks sparsec's side."""
    from sparsec.runtime import flex
    monkeypatch.setattr(flex, "compiled_flex", lambda: _dense_flex)
    monkeypatch.setattr(flex, "gives_lse", lambda device: True)
    src, B, H, Hkv, n_q, n_k, q_offset, inputs = CASES[case]
    kern = sparsec.compile(src)
    gen = torch.Generator().manual_seed(_seed())
    qkv = [torch.randn(B, heads, n, 16, generator=gen) for heads, n in ((H, n_q), (Hkv, n_k), (Hkv, n_k))]
    floats = [name for name in inputs if name in kern.score_inputs]
    leaves = [x.clone().requires_grad_() for x in qkv] + [inputs[n].clone().requires_grad_() for n in floats]
    o, lse = kern(*leaves[:3], q_offset=q_offset, return_lse=True, backend="flex",
                  **{**inputs, **dict(zip(floats, leaves[3:]))})
    wants = [x.double().requires_grad_() for x in qkv] + [inputs[n].double().requires_grad_() for n in floats]
    want_o, want_lse = testing.reference(kern, *wants[:3], q_offset=q_offset, **{**inputs, **dict(zip(floats, wants[3:]))})
    do, dl = torch.randn(o.shape, generator=gen, dtype=torch.float64), torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    finite = torch.isfinite(want_lse)
    got = torch.autograd.grad((o * do).sum() + (torch.where(finite, lse, 0) * dl).sum(), leaves, allow_unused=True,
                              materialize_grads=True)
    want = torch.autograd.grad((want_o * do).sum() + (torch.where(finite, want_lse, 0) * dl).sum(), wants,
                               allow_unused=True, materialize_grads=True)
    _close(o, want_o)
    _close(lse, want_lse)
    for g, w in zip(got, want):
        _close(g, w)


# ---- properties: random pattern trees with random with expressions ----

def _score_expressions():
    atoms = st.sampled_from(["score", "score", "(i - j)", "g[h, j]", "g[h, j - i + 2]", "0.5", "h"])
    return st.recursive(atoms, lambda e: st.one_of(
        st.builds("({} + {})".format, e, e), st.builds("({} * {})".format, e, e),
        st.builds("({} - {} / 4)".format, e, e), st.builds("tanh({})".format, e),
        st.builds("sigmoid({})".format, e), st.builds("softplus({})".format, e),
        st.builds("clamp({}, -1.5, 2)".format, e), st.builds("min({}, {})".format, e, e),
        st.builds("abs({})".format, e), st.builds("select({} > 0, {}, {})".format, e, e, e)), max_leaves=5
    ).map("score + {}".format)   # O must depend on q and k for their gradients to exist


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@settings(max_examples=KERNEL_EXAMPLES // 2 + 3, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(src=patterns, expr=_score_expressions(), B=st.integers(1, 2), Hkv=st.integers(1, 2),
       group=st.integers(1, 2), n_q=st.integers(1, 40), n_k=st.integers(1, 40),
       q_offset=st.one_of(st.none(), st.integers(-4, 40)))
def test_random_scored_patterns_match_the_reference(backend, src, expr, B, Hkv, group, n_q, n_k, q_offset):
    """O, LSE, dQ, dK, dV and the float input's gradient of a random pattern tree under a random
    with expression (reads inside and past the input's extent), against float64 autograd."""
    try:
        kern = sparsec.compile(f"input g(h, n_k) float\npattern p = {src} with {expr}")
    except SparsecError as e:   # a random argument that makes an empty band: rejected, at the band
        assert "band" in e.message and src[e.span.column - 13:].startswith("band"), e
        return
    H = Hkv * group
    inputs = {"g": _rand(H, n_k)} if "g[" in expr else {}
    (o, lse, got), (want_o, want_lse, want) = _call(kern, B, H, Hkv, n_q, n_k, 16, q_offset, inputs, backend)
    _close(o, want_o)
    _close(lse, want_lse)
    for g, w in zip(got, want):
        _close(g, w)
