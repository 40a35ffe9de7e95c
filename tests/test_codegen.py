"""Generated source: deterministic, headed, content-addressed in the cache, pinned by goldens."""
import os
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.codegen import TileConfig, emit_forward, lower
from sparsec.runtime import write_source

GOLDEN = Path(__file__).parent / "golden"
GOLDENS = {
    "longformer": "pattern longformer = band(256) + global(16)",
    "bigbird": "pattern bigbird = blocks(64, band(1) + global(1) + last(1) + random(3))",
    "document_causal": "pattern document_causal = document & causal & band(512)",
}


@pytest.mark.parametrize("name", GOLDENS)
def test_goldens(name):
    """SPARSEC_UPDATE_GOLDENS=1 rewrites them; review the diff like code."""
    source = sparsec.compile(GOLDENS[name]).source
    path = GOLDEN / f"{name}.py"
    if os.environ.get("SPARSEC_UPDATE_GOLDENS"):
        path.write_text(source)
    assert source == path.read_text()


def test_source_is_deterministic_and_headed():
    a = sparsec.compile("pattern p = band(3) + random(2, seed=4)")
    b = sparsec.compile("param w = 3\npattern p = band(w)  +  random(2, seed=4)  # same canonical IR\n")
    assert a.source == b.source
    header = a.source.split("import triton")[0]
    for line in ("# pattern:      p", f"# canonical IR: {a.ir.body.show()}", "# tile config:  BLOCK_M=64 BLOCK_N=64",
                 f"# content hash: {a.generated().digest}", "random2_keys", "pointer"):
        assert line in header
    assert a.generated(TileConfig(32, 32)).digest != a.generated().digest


def test_each_table_parameter_is_declared_and_used():
    kern = sparsec.compile("pattern p = heads(random(2), blocks(4, random(3) + global([1, 2])))")
    gen = emit_forward(kern.ir, TileConfig())
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


def test_source_is_written_atomically_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    kern = sparsec.compile("pattern p = band(5) & causal")
    path = write_source(kern.generated(), kern.name)
    assert path.parent == tmp_path / "cache" and kern.generated().digest in path.name
    assert path.read_text() == kern.source
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary file left behind
    q = torch.randn(1, 1, 20, 16)
    kern(q, q, q, backend="interpret")        # imports the interpreter config's source from the cache
    assert len(list(path.parent.glob("p_*.py"))) == 2
