"""The Python API of spec section 4 besides calling kernels: compile, mask, layout, cost."""
import numpy as np
import pytest
import torch

import sparsec


def test_compile_from_path_or_text(tmp_path):
    path = tmp_path / "two.sa"
    path.write_text("pattern a = band(2)\npattern b = causal\n")
    assert sparsec.compile(path).name == "b"
    assert sparsec.compile(str(path), pattern="a").name == "a"
    assert sparsec.compile("pattern a = band(2)\n").name == "a"
    with pytest.raises(FileNotFoundError, match="no such .sa file"):
        sparsec.compile(str(tmp_path / "missing.sa"))
    with pytest.raises(ValueError, match="pattern='c': no such pattern; the program defines a, b"):
        sparsec.compile(path, pattern="c")
    with pytest.raises(TypeError, match="path_or_source"):
        sparsec.compile(42)


def test_mask_shape_dtype_and_default_offset():
    kern = sparsec.compile("pattern p = causal")
    m = kern.mask(3, 5, heads=2)
    assert m.dtype == torch.bool and m.shape == (1, 2, 3, 5)
    # bottom-right alignment: the 3 queries are the last 3 positions of 5
    assert m[0, 0].tolist() == [[j <= i + 2 for j in range(5)] for i in range(3)]
    assert kern.mask(3, 5, q_offset=0)[0, 0].tolist() == [[j <= i for j in range(5)] for i in range(3)]


def test_mask_runtime_input_errors():
    with pytest.raises(ValueError, match="segment_ids= of shape"):
        sparsec.compile("pattern p = document").mask(4)
    with pytest.raises(ValueError, match="has no document part"):
        sparsec.compile("pattern p = full").mask(4, segment_ids=np.zeros((1, 4), int))
    with pytest.raises(ValueError, match="content-based: pass q="):
        sparsec.compile("pattern p = lsh(4)").mask(4)
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="heads % Hkv == 0"):
        sparsec.compile("pattern p = lsh(4)").mask(4, heads=3, q=q, k=torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="document: query positions"):
        sparsec.compile("pattern p = document").mask(6, 4, segment_ids=np.zeros((1, 4), int))


def test_gqa_content_mask_uses_the_shared_kv_head():
    rng = np.random.default_rng()
    q, k = rng.standard_normal((2, 4, 6, 8)), rng.standard_normal((2, 2, 6, 8))
    kern = sparsec.compile("pattern p = cluster(3, iters=2)")
    m = kern.mask(6, heads=4, q=q, k=k).numpy()
    single = kern.mask(6, heads=1, q=q[:, 3:4], k=k[:, 1:2]).numpy()
    assert m.shape == (2, 4, 6, 6) and (m[:, 3] == single[:, 0]).all()
