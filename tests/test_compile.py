"""Calls as custom ops under torch.compile: opcheck, one graph and no break per kind of pattern,
fullgraph + dynamic shapes without recompiling per length, no host sync on the static path, and
(on a GPU) CUDA graphs of a decode and a training step."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sparsec
from sparsec import SparseSelfAttention
from sparsec.runtime.ops import input_list

EMBED, HEADS, DIM = 64, 4, 16


class Raw(nn.Module):
    """A bare call with return_lse=True: the loss reads both outputs, so dLSE flows too."""

    def __init__(self, src: str):
        super().__init__()
        self.kern = sparsec.compile(src)

    def forward(self, q, k, v, q_offset=None, **inputs):
        o, lse = self.kern(q, k, v, q_offset=q_offset, return_lse=True, **inputs)
        return o * torch.sigmoid(lse)[..., None]


def _documents(n: int, gen) -> torch.Tensor:
    return torch.randint(0, 3, (2, n), generator=gen).sort(-1).values


def _x(n, gen):
    return torch.randn(2, n, EMBED, generator=gen, requires_grad=True)


def _qkv(n_q, n_k, gen, kv_heads=HEADS):
    return tuple(torch.randn(2, h, n, DIM, generator=gen, requires_grad=True)
                 for h, n in ((HEADS, n_q), (kv_heads, n_k), (kv_heads, n_k)))


def _decode(n, gen):
    past = tuple(torch.randn(2, 2, n, DIM, generator=gen) for _ in range(2))
    return (_x(1, gen),), dict(past_kv=past)


# kind: (model, inputs(n, generator) -> (args, kwargs)); n is each call's length (the past's when decoding)
KINDS = {
    "static": (lambda: SparseSelfAttention("pattern p = band(8) + global(2)", EMBED, HEADS),
               lambda n, g: ((_x(n, g),), {})),
    "document": (lambda: SparseSelfAttention("pattern p = document & causal", EMBED, HEADS),
                 lambda n, g: ((_x(n, g),), dict(segment_ids=_documents(n, g)))),
    "lsh": (lambda: SparseSelfAttention("pattern p = lsh(4) & causal", EMBED, HEADS),
            lambda n, g: ((_x(n, g),), {})),
    "cluster": (lambda: SparseSelfAttention("pattern p = cluster(3)", EMBED, HEADS),
                lambda n, g: ((_x(n, g),), {})),
    "topk": (lambda: SparseSelfAttention("pattern p = topk(2, block=8, causal=true) + band(2)", EMBED, HEADS),
             lambda n, g: ((_x(n, g),), {})),
    "shares": (lambda: SparseSelfAttention("pattern p = band(4) + lsh(4) + global(1)", EMBED, HEADS),
               lambda n, g: ((_x(n, g),), {})),
    "gqa": (lambda: SparseSelfAttention("pattern p = causal & band(6)", EMBED, HEADS, num_kv_heads=2),
            lambda n, g: ((_x(n, g),), {})),
    "gqa_sorted": (lambda: SparseSelfAttention("pattern p = lsh(4) + sink(1)", EMBED, HEADS, num_kv_heads=1),
                   lambda n, g: ((_x(n, g),), {})),
    "decode": (lambda: SparseSelfAttention("pattern p = causal & (band(8) + global(2))", EMBED, HEADS,
                                           num_kv_heads=2), _decode),
    "kv_cache": (lambda: _Cached(), lambda n, g: ((_x(3, g),), dict(past_kv=tuple(
        torch.randn(2, HEADS, n, DIM, generator=g) for _ in range(2))))),
    "lse_offset": (lambda: Raw("pattern p = causal & band(5) + global(1)"),
                   lambda n, g: (_qkv(n // 2, n, g), dict(q_offset=n - n // 2))),
}


class _Cached(nn.Module):
    """SparseSelfAttention with a KV cache: the step's output and the extended cache both count."""

    def __init__(self):
        super().__init__()
        self.attn = SparseSelfAttention("pattern p = causal & band(4)", EMBED, HEADS)

    def forward(self, x, past_kv):
        y, (k, v) = self.attn(x, past_kv=past_kv, use_cache=True)
        return y + (k.mean() + v.mean())


def _leaves(args, model):
    return [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad] + list(model.parameters())


def _run(fn, model, args, kwargs):
    out = fn(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    leaves = _leaves(args, model)
    return [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))


@pytest.mark.parametrize("kind", KINDS)
def test_one_graph_without_breaks(kind):
    make, inputs = KINDS[kind]
    torch._dynamo.reset()
    model = make()
    args, kwargs = inputs(40, torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def compiled_matches_eager(kind: str, backend: str, seed: int, **tolerance) -> int:
    """Compile the kind's model with fullgraph=True, dynamic=True on `backend`; at three lengths
    its outputs and gradients must equal eager's. Returns the frames compiled."""
    make, inputs = KINDS[kind]
    torch._dynamo.reset()
    model = make()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    gen = torch.Generator().manual_seed(seed)
    for n in (40, 72, 113):
        args, kwargs = inputs(n, gen)
        got, want = _run(compiled, model, args, kwargs), _run(model, model, args, kwargs)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, msg=lambda m: f"{kind} n={n}: {m}", **tolerance)
    return counter.frame_count


@pytest.mark.parametrize("kind", KINDS)
def test_fullgraph_dynamic_matches_eager_without_recompiling(kind):
    """aot_eager: dynamo, the fake kernels and AOT autograd, with eager kernels: equal to eager,
    one compiled frame for the three lengths."""
    assert compiled_matches_eager(kind, "aot_eager", seed=1) == 1


def test_inductor_in_a_fresh_process():
    """The default backend (inductor, C++ on the CPU), fullgraph and dynamic, every kind, in a
    process that has compiled nothing before: forward and backward against eager at three lengths
    (inductor's own fused projections differ from eager's in the last bits)."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        from test_compile import KINDS, compiled_matches_eager
        frames = {kind: compiled_matches_eager(kind, "inductor", seed=2, atol=1e-4, rtol=1e-4) for kind in KINDS}
        assert set(frames.values()) == {1}, frames
        print("ok", len(frames))
    """)
    env = dict(os.environ, SPARSEC_AUTOTUNE="0")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == f"ok {len(KINDS)}"


# ---- opcheck: schema, fake tensors, autograd registration, AOT dispatch ----

OPCHECK = [   # (source, backend, n_q, n_k, kv heads, q_offset); the interpreter's cases small (opcheck runs each often)
    ("band(8) + global(2)", "cpu", 40, 40, 4, None),
    ("band(4) + global([0, 5])", "interpret", 20, 20, 2, None),
    ("document & causal", "cpu", 33, 33, 4, None),
    ("band(4) + lsh(4)", "cpu", 40, 40, 2, None),
    ("topk(2, block=8) + cluster(3)", "cpu", 24, 40, 2, 16),
    ("causal & band(8)", "interpret", 1, 45, 1, None),   # decoding: the split-K path
]


def _op_inputs(src, n_q, n_k, kv_heads, gen):
    q = torch.randn(1, 4, n_q, DIM, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, n_k, DIM, generator=gen, requires_grad=True) for _ in range(2))
    inputs = dict(segment_ids=_documents(n_k, gen)[:1]) if "document" in src else {}
    return q, k, v, input_list(inputs)


@pytest.mark.parametrize("src, backend, n_q, n_k, kv_heads, q_offset", OPCHECK)
def test_opcheck(src, backend, n_q, n_k, kv_heads, q_offset):
    kern = sparsec.compile(f"pattern p = {src}")
    q, k, v, inputs = _op_inputs(src, n_q, n_k, kv_heads, torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.sparsec.attention.default,
                          (q, k, v, inputs, [], kern.key, None, q_offset, backend, True, True))
    with torch.no_grad():
        o, lse = torch.ops.sparsec.attention(q, k, v, inputs, [], kern.key, None, q_offset, backend, True, True)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    plain = [x.detach() for x in (q, k, v)]
    for grad_lse in (None, dlse):
        torch.library.opcheck(torch.ops.sparsec.attention_backward.default,
                              (*plain, o, lse, do, grad_lse, inputs, kern.key, None, q_offset, backend, False))


def test_opcheck_with_score_inputs():
    """A score expression's float input travels in score_inputs too, and gets its gradient there."""
    kern = sparsec.compile("input slopes(h) float\npattern p = band(9) with score - slopes[h] * abs(i - j)")
    q, k, v, inputs = _op_inputs("band", 40, 40, 2, torch.Generator().manual_seed(4))
    slopes = torch.rand(4, requires_grad=True)
    inputs = input_list({"slopes": slopes}, kern.input_names)
    torch.library.opcheck(torch.ops.sparsec.attention.default,
                          (q, k, v, inputs, [slopes], kern.key, None, None, "cpu", True, True))
    with torch.no_grad():
        o, lse = torch.ops.sparsec.attention(q, k, v, inputs, [slopes], kern.key, None, None, "cpu", True, True)
    plain = [x.detach() for x in (q, k, v)]
    torch.library.opcheck(torch.ops.sparsec.attention_backward.default,
                          (*plain, o, lse, torch.randn_like(o), None, inputs, kern.key, None, None, "cpu", True))


def test_unregistered_key_is_a_clear_error():
    q = torch.randn(1, 1, 8, DIM)
    with pytest.raises(ValueError, match="no sparsec pattern is registered as 'nope'"):
        torch.ops.sparsec.attention(q, q, q, [None, None, None], [], "nope", None, None, "cpu", False, False)


def test_one_pattern_one_key_in_every_process():
    """The key is a digest of the pattern, so a graph compiled in one process (the FX graph
    cache) names the same pattern in the next; different tiles or patterns differ."""
    script = "import sparsec; print(sparsec.compile('pattern p = band(8) + global(2)').key)"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == sparsec.compile("pattern p = band(8) + global(2)").key
    keys = {sparsec.compile("pattern p = band(8) + global(2)", config=sparsec.TileConfig(32, 32, 4, 2)).key,
            sparsec.compile("pattern p = band(8) + global(3)").key, other.stdout.strip()}
    assert len(keys) == 3


# ---- no host synchronisation on the static path ----

def _masked(index) -> bool:
    """Indexing by a bool tensor: its result's size is a count the host must wait for."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in parts)


# What waits for the device, as (owner, name, when): tensor methods that read values on the
# host, host data made into tensors (on CUDA: a copy from pageable memory), bool-mask indexing.
SYNCS = [(torch.Tensor, name, None) for name in (
    "item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")] + [
    (torch, name, None) for name in ("as_tensor", "tensor", "from_numpy")] + [
    (torch.Tensor, "__getitem__", lambda args: _masked(args[1])),
    (torch.Tensor, "__setitem__", lambda args: _masked(args[1]))]


@pytest.fixture
def host_syncs(monkeypatch):
    """Each call of SYNCS from sparsec's own code, recorded (the interpreter's own numpy work
    is not ours to count)."""
    package = os.path.dirname(sparsec.__file__)
    seen = []
    for owner, name, when in SYNCS:
        original = getattr(owner, name)

        def spy(*args, __original=original, __name=name, __when=when, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(package) and (__when is None or __when(args)):
                seen.append(f"{__name} from {os.path.relpath(caller.co_filename, package)}:"
                            f"{sys._getframe(1).f_lineno}")
            return __original(*args, **kwargs)
        monkeypatch.setattr(owner, name, spy)
    return seen


@pytest.mark.parametrize("n_q, n_k", [(70, 70), (1, 90)])
def test_static_call_path_never_waits_for_the_device(host_syncs, n_q, n_k):
    """After a first call (which builds and caches the layout, tables and schedules), a static
    pattern's forward and backward on the kernel path ('interpret' runs GeneratedAttention, as on
    CUDA) call nothing that synchronises: what a CUDA graph capture needs."""
    kern = sparsec.compile("pattern p = causal & (band(8) + global([0, 5]) + random(2))")   # with tables
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, n_q, DIM, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, n_k, DIM, generator=gen, requires_grad=True) for _ in range(2))
    step = lambda: torch.autograd.grad(kern(q, k, v, backend="interpret").sum(), (q, k, v))
    step()
    host_syncs.clear()
    step()
    assert host_syncs == []


# ---- CUDA graphs (on a GPU) ----

def _captured(fn):
    """fn captured in a CUDA graph after warm-up calls on a side stream (which build and cache
    the layouts; torch.cuda.set_sync_debug_mode('error') then shows the call waits for nothing)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("step", ["decode", "training"])
def test_cuda_graph_replays_a_step(step):
    """A decode step (n_q = 1 over a 4K cache: the split-K path) and a training step (forward and
    backward at 2K) of band + global, captured once and replayed on new inputs: equal to eager."""
    kern = sparsec.compile("pattern p = band(256) + global(16)")
    n_q, n_k = (1, 4096) if step == "decode" else (2048, 2048)
    q = torch.randn(2, 8, n_q, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, n_k, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    for x in (q, k, v):
        x.requires_grad_(step == "training")

    def fn():
        o = kern(q, k, v)
        return (o, *torch.autograd.grad(o, (q, k, v), do)) if step == "training" else (o,)
    graph, out = _captured(fn)
    with torch.no_grad():
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = fn()
    for got, expected in zip(out, want, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
