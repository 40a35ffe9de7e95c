"""Generated source: deterministic, headed, content-addressed in the cache, pinned by goldens."""
import importlib.metadata
import inspect
import json
import py_compile
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.codegen import emit_kernels
from sparsec.codegen import lower

GOLDEN = Path(__file__).parent / "golden"
GOLDENS = {
    "longformer": "pattern longformer = band(256) + global(16)",
    "bigbird": "pattern bigbird = blocks(64, band(1) + global(1) + last(1) + random(3))",
    "document_causal": "pattern document_causal = document & causal & band(512)",
}


@pytest.mark.parametrize("name", GOLDENS)
def test_goldens(name):
    """The pattern-dependent part of the source (header, glossary, pattern_rows, pattern_keep);
    SPARSEC_UPDATE_GOLDENS=1 rewrites them; review the diff like code."""
    gen = sparsec.compile(GOLDENS[name]).generated()
    helpers = gen.pattern.split("import triton.language as tl\n", 1)[1]
    assert helpers in gen.source and gen.source.count("def pattern_keep(") == 1   # said once, in the module
    source = gen.pattern
    path = GOLDEN / f"{name}.py"
    if os.environ.get("SPARSEC_UPDATE_GOLDENS"):
        path.write_text(source)
    assert source == path.read_text()


def test_source_is_deterministic_and_headed():
    a = sparsec.compile("pattern p = band(3) + random(2, seed=4)")
    b = sparsec.compile("param w = 3\npattern p = band(w)  +  random(2, seed=4)  # same canonical IR\n")
    assert a.source == b.source
    header = a.source.split("import triton")[0]
    for line in ("# pattern:      p", f"# canonical IR: {a.ir.body.show()}", "# tiles:        BLOCK_M, BLOCK_N, num_warps and num_stages are chosen at launch",
                 f"# content hash: {a.generated().digest}", "random2_keys", "pointer"):
        assert line in header
    assert "CONFIG" not in a.source and "BLOCK_M=" not in a.source   # one source serves every tile config


def test_each_table_parameter_is_declared_and_used():
    kern = sparsec.compile("pattern p = heads(random(2), blocks(4, random(3) + global([1, 2])))")
    gen = emit_kernels(kern.ir)
    signature = gen.source[gen.source.index("def sparse_attention_forward("):gen.source.index("HEAD_DIM: tl.constexpr")]
    body = gen.source[gen.source.index("HEAD_DIM: tl.constexpr"):]
    assert [t.key for t in gen.tables] == ["keys", "row0", "rows", "count"] * 2 + ["members", "count"]
    for t in gen.tables:
        assert t.name in signature and t.name in body


def test_floor_semantics_are_emitted():
    pred, _ = lower(sparsec.compile("pattern p = where((i - j) // 3 == -1 and (i - j) % 4 == 3)").ir.body)
    assert "_floordiv(" in pred and "_mod(" in pred and "//" not in pred and "%" not in pred
    # and they hold where truncation would differ: negative offsets with a few tile sizes
    kern = sparsec.compile("pattern p = where((i - j) // 3 == -1 or (j - i) % 4 == 3)")
    q, k, v = (torch.randn(1, 1, 21, 16) for _ in range(3))
    want = kern(q, k, v, backend="cpu")
    assert torch.allclose(kern(q, k, v, backend="interpret"), want, atol=1e-6)


def test_generated_modules_run_from_memory_never_from_the_cache(tmp_path, monkeypatch):
    """Nothing on disk decides what runs (issue 13): a source and an unchecked-hash .pyc planted
    where a file-importing loader would look (sparsec 0.1 wrote <pattern>_<digest>.py to the
    cache and imported it) are never executed, and the kernel's source is the generated text."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(cache))
    kern = sparsec.compile("pattern p = band(5) & causal")
    q = torch.randn(1, 1, 20, 16)
    gen = kern.generated()
    marker = tmp_path / "pwned"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    (cache / "__pycache__").mkdir(parents=True)
    planted = cache / f"p_{gen.digest}.py"
    planted.write_text(evil)
    py_compile.compile(str(planted), cfile=str(cache / "__pycache__" / f"p_{gen.digest}.cpython-311.pyc"),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    planted.write_text(gen.source)   # even a matching source next to a planted bytecode file
    out = kern(q, q, q, backend="interpret")
    assert not marker.exists()
    assert torch.allclose(out, kern(q, q, q, backend="cpu"), atol=1e-5)
    from sparsec.runtime.loader import load_kernel
    module = load_kernel(gen, kern.name, interpret=True)
    assert inspect.getsource(module.sparse_attention_forward.fn) in gen.source
    assert sorted(p.name for p in cache.rglob("*")) == sorted(["__pycache__", planted.name,
                                                               f"p_{gen.digest}.cpython-311.pyc"])


KERNELS = ("sparse_attention_forward", "sparse_attention_backward_delta", "sparse_attention_backward_dq",
           "sparse_attention_backward_dkdv")


def _compile_for_sm90(src: str, dtype: str, dim: int) -> tuple[str, dict]:
    """Compile the generated kernels with the real Triton compiler for an H100 (sm_90) target: no
    GPU needed (ptxas ships with Triton), and it catches what the interpreter lets through.
    Runs in a fresh process: Triton 3.9's interpreter leaves the language patched in its process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparsec.runtime.loader import load_kernel
    kern = sparsec.compile(src if "pattern" in src else f"pattern p = {src}")
    wide = dim > 128   # the runtime's default tiles for the largest head dims
    sizes = {}
    # the first share (positional order) and the last (sorted by bucket when the pattern has any)
    for share in sorted({0, len(kern.shares) - 1}):
        gen = kern.generated(share)
        module = load_kernel(gen, kern.name, interpret=False)
        pointers = {t.name for t in gen.tables if t.pointer} | {
            "FULL_PTR", "FULL_IDX", "PARTIAL_PTR", "PARTIAL_IDX", "SCHEDULE", "Q_ORDER", "K_ORDER"}
        typed = {t.name: {"float32": "*fp32", "int64": "*i64", "int8": "*i8"}[t.dtype]
                 for t in gen.score_tables if t.pointer} | {f"GRAD_{name}": "*fp32" for name in gen.grads}
        constants = dict(HEAD_DIM=dim, HEAD_DIM_PAD=1 << (dim - 1).bit_length(), BLOCK_M=64,
                         BLOCK_N=32 if wide else 64, EVEN_N=False, DOT_PRECISION="tf32", DOT_IN_FP32=False,
                         HAS_DLSE=True, PERMUTED=kern.shares[share].key is not None,
                         SCORED=kern.ir.score is not None, INPUT_GRADS=bool(gen.grads))
        for name in KERNELS:
            fn = getattr(module, name)
            signature = {arg: "constexpr" if arg in constants else f"*{dtype}" if arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
                         else "*fp32" if arg in ("LSE", "DELTA", "DLSE") else typed[arg] if arg in typed
                         else "*i32" if arg in pointers
                         else "fp32" if arg.endswith("_SCALE") else "i32" for arg in fn.arg_names}
            source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()
                                               if k in fn.arg_names})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
            sizes[name, share] = len(compiled.asm["cubin"])
    return triton.__version__, sizes


# The lent GPU machine's Triton (issue 19) is not the pinned one: scripts/install.sh puts it in a
# side folder, and the compile test runs with it too (PYTHONPATH first, torch from .venv).
SIDE_TRITON = Path(__file__).resolve().parents[1] / ".venv" / "triton-3.6"
TRITON_PINNED = importlib.metadata.version("triton")


@pytest.mark.parametrize("triton_version", ["pinned", "3.6"])
@pytest.mark.parametrize("src, dtype, dim", [
    ("blocks(64, band(1) + global(1) + last(1) + random(3))", "bf16", 128),
    ("causal & heads(band(8), stride(8), logsparse + chunk(16) - sink(2), dilated(3, 2) + last(2))", "fp16", 64),
    ("document & (lsh(4, rounds=2) + topk(2, block=8) + cluster(3) + global([1, 5]))", "fp32", 96),
    ("where(isqrt(i) == isqrt(j) or ilog2(j + 1) < 5 and sqrt(i) < ceil(log2(n)) or i * j ** 2 % 7 == h)",
     "bf16", 256),
    ("input slopes(h) float\ninput rel(h, 33) float\ninput gate(b, h, n_k) float\ninput keep(b, n_k) bool\n"
     "pattern p = causal & band(100) & where(keep[b, j]) with 30 * tanh((score - slopes[h] * (i - j) + "
     "rel[h, clamp(i - j, 0, 32)]) / 30) + log(gate[b, h, j])", "bf16", 64),
])
def test_generated_kernels_compile_for_a_gpu_target(src, dtype, dim, triton_version, monkeypatch, tmp_path):
    side = ""
    if triton_version != "pinned":
        if not (SIDE_TRITON / "triton" / "__init__.py").exists():
            pytest.fail(f"no Triton {triton_version} in {SIDE_TRITON}: run scripts/install.sh")
        side = str(SIDE_TRITON)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the compiler's triton, not the interpreter's (runtime/loader.py)
    # a fresh process, with the side Triton first on sys.path before anything imports triton
    script = (f"import sys, json; sys.path[:0] = [p for p in ({side!r}, {str(Path(__file__).parent)!r}) if p]; "
              f"from test_codegen import _compile_for_sm90; "
              f"v, sizes = _compile_for_sm90({src!r}, {dtype!r}, {dim}); "
              f"print(json.dumps([v, [[name, share, size] for (name, share), size in sizes.items()]]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    version, listed = json.loads(done.stdout.splitlines()[-1])
    sizes = {(name, share): size for name, share, size in listed}
    assert version == (TRITON_PINNED if triton_version == "pinned" else triton_version + ".0")
    assert {name for name, _ in sizes} == set(KERNELS) and all(size > 0 for size in sizes.values())
