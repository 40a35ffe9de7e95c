"""What a user gets from the package: library names, `sparsec list` and --version, sources that are
paths or text, the CPU path without triton, and the testing kit (sparsec.testing)."""
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import sparsec
from sparsec import testing
from sparsec.grammar import library
from sparsec.tools.cli import main


def test_a_library_name_compiles_the_library_file():
    files = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "patterns").glob("*.sa"))
    assert library.names() == files and {"alibi", "bigbird", "block_local"} <= set(files)
    by_name, by_path = sparsec.compile("bigbird"), sparsec.compile("patterns/bigbird.sa")
    assert by_name.ir == by_path.ir and by_name.program.filename.endswith("bigbird.sa")
    with pytest.raises(ValueError, match=f"no library pattern named 'bigbrd'; the library has {', '.join(files[:3])}, "):
        sparsec.compile("bigbrd")
    inner = sparsec.compile("reformer_bidirectional")   # a pattern's own name picks it in its file
    assert inner.name == "reformer_bidirectional" and inner.ir == sparsec.compile(
        "patterns/reformer.sa", pattern="reformer_bidirectional").ir


def test_the_library_from_a_checkout_without_installing(monkeypatch):
    """On the GPU machine sparsec runs from the checkout on PYTHONPATH (scripts/gpu.sh): no
    sparsec.patterns package there, so the library is the checkout's patterns/ folder."""
    from sparsec.grammar import library

    def not_installed(name):
        raise ModuleNotFoundError(name)
    monkeypatch.setattr(library, "files", not_installed)
    assert {"bigbird", "longformer", "reformer"} <= set(library.names())
    assert sparsec.compile("bigbird").ir.body.show().startswith("blocks(64")


@pytest.mark.parametrize("source, error", [("patterns/bigbird", "no such .sa file: patterns/bigbird"),
                                           ("missing.sa", "no such .sa file: missing.sa")])
def test_a_missing_path_is_no_such_file(source, error):
    with pytest.raises(FileNotFoundError, match=error):
        sparsec.compile(source)


def test_one_line_programs_with_slashes_are_programs():
    assert sparsec.compile("pattern p = where(i // 4 == j // 4)").name == "p"


def test_list_and_version(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for e in library.entries():
        assert e.name in out and e.density is not None
    assert "Big Bird: Transformers for Longer Sequences" in out and "14.83%" in out
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"sparsec {sparsec.__version__}"


def test_the_cpu_path_needs_no_triton():
    """With triton unimportable, a CPU call runs, and a Triton backend is a one-line error."""
    script = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton is blocked")
        sys.meta_path.insert(0, NoTriton())
        import importlib.util
        importlib.util.find_spec = (lambda find: lambda name, *a: None if name.split(".")[0] == "triton"
                                    else find(name, *a))(importlib.util.find_spec)
        import torch, sparsec
        kern = sparsec.compile("bigbird")
        q = torch.randn(1, 2, 130, 16, requires_grad=True)
        kern(q, q, q).sum().backward()
        try:
            kern(q, q, q, backend="interpret")
        except RuntimeError as e:
            print(e)
        assert "triton" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == ("backend='interpret' runs the generated Triton kernels, and triton is not installed "
                                   "(pip install triton, Linux only); backend='cpu' needs no triton")


# ---- the testing kit ----

KIT = ["band(5) + global(2)", "document & causal", "lsh(4) + band(1)", "causal & topk(2, block=8)"]


@pytest.mark.parametrize("src", KIT)
def test_the_kit_passes_on_sparsec(src):
    kern = sparsec.compile(f"pattern p = {src}")

    @settings(max_examples=8, deadline=None, database=None)
    @given(testing.attention_inputs(kern, max_n=48))
    def check(call):
        testing.assert_matches_reference(kern, **call)
    check()


def test_the_kit_names_the_worst_pair(monkeypatch):
    """A reference under another mask (band(4) where the kernel runs band(5)) must fail, and say where."""
    kern, other = sparsec.compile("pattern p = band(5)"), sparsec.compile("pattern p = band(4)")
    monkeypatch.setattr(kern, "mask", other.mask)
    q = torch.randn(1, 2, 30, 16)
    with pytest.raises(AssertionError, match=r"O: worst \|got - want\| = .* at \(b, h, row, d\) \(0, \d, \d+, \d+\) "
                                             r"\(got .*, want .*\); tolerance .* \(0\.0001 x max\(1, \|want\|\)\)"):
        testing.assert_matches_reference(kern, q, q, q)


def test_check_examples_runs_drawn_calls(capsys):
    assert main(["check", "document", "--examples", "3", "--backend", "cpu"]) == 0
    assert "cpu: 3 drawn calls match the float64 reference, forward and backward" in capsys.readouterr().out


def test_the_built_wheel_works_outside_the_checkout(tmp_path):
    """The wheel, installed into a fresh venv (its dependencies borrowed from this one's
    site-packages, nothing downloaded), run from a folder with no checkout: the library ships."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sparsec-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    borrowed = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if "site-packages" in p]
    (Path(purelib) / "borrowed.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = lambda *args: subprocess.run(args, cwd=outside, capture_output=True, text=True, timeout=600)
    done = run(python, "-c", "import sparsec, torch; q = torch.randn(1, 2, 200, 16); "
                             "print(sparsec.__file__, sparsec.compile('bigbird')(q, q, q).shape)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(venv) in done.stdout and "torch.Size([1, 2, 200, 16])" in done.stdout
    listed = run(venv / "bin" / "sparsec", "list")
    assert listed.returncode == 0 and "bigbird" in listed.stdout and "streaming" in listed.stdout
    checked = run(venv / "bin" / "sparsec", "check", "bigbird", "--examples", "5")
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "cpu: 5 drawn calls match" in checked.stdout and "interpret: 5 drawn calls match" in checked.stdout


@pytest.mark.parametrize("interpret_env, expected", [(None, "set TRITON_INTERPRET=1 before the first import"),
                                                     ("1", "ok")])
def test_the_interpreter_after_triton_was_imported_first(interpret_env, expected):
    """torch._dynamo (torch.compile, Flex, transformers) imports triton for the compiler: then the
    interpreter says how to start instead of failing deep in Triton; with TRITON_INTERPRET=1 from
    the start it runs."""
    script = textwrap.dedent("""
        import torch._dynamo, torch, sparsec
        q = torch.randn(1, 1, 20, 16)
        try:
            sparsec.compile("pattern p = band(3)")(q, q, q, backend="interpret")
            print("ok")
        except RuntimeError as e:
            print(e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret_env:
        env["TRITON_INTERPRET"] = interpret_env
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
