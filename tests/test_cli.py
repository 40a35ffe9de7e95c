"""The command line: each stage printed, check, show, and the exit codes of section 5."""
import subprocess
import sys

import pytest

from sparsec.cli import main

BIGBIRD = "pattern bigbird = blocks(64, band(1) + global(1) + last(1) + random(3, seed=0))\n"


@pytest.fixture
def sa(tmp_path):
    def write(text, name="p.sa"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


def test_emit_ast_ir_layout(sa, capsys):
    path = sa("param w = 4\npattern p = band(w) & causal + sink(2)\n")
    assert main(["emit", "ast", path]) == 0
    assert "call band  @2:13" in capsys.readouterr().out
    assert main(["emit", "ir", path]) == 0
    out = capsys.readouterr().out
    assert "# after canonicalize\npattern p = band(4, 0) + sink(2)" in out
    assert "# cost (allowed pairs at n_q = n_k = n)" in out
    assert main(["emit", "ir", path, "-p", "w=9"]) == 0
    assert "band(9, 0)" in capsys.readouterr().out
    assert main(["emit", "layout", path, "--n", "256", "--block", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "tiles=4x4" in out and "    1: - | 0 1\n" in out


def test_check_passes_on_bigbird(sa, capsys):
    assert main(["check", sa(BIGBIRD), "--n", "1000"]) == 0
    out = capsys.readouterr().out
    assert "0 allowed tiles missed, 0 tiles wrongly FULL" in out and "OK" in out


def test_check_supplies_inputs_for_runtime_patterns(sa, capsys):
    assert main(["check", sa("pattern p = document & causal + lsh(8) & band(4)"), "--n", "300"]) == 0
    assert "using synthetic inputs: segment_ids, q, k" in capsys.readouterr().out


def test_show_writes_a_png(sa, tmp_path):
    out = tmp_path / "mask.png"
    assert main(["show", sa(BIGBIRD), "--n", "3000", "--block", "128", "128", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_errors_exit_1_with_the_caret(sa, capsys):
    path = sa("pattern p = band(3) +\n")
    assert main(["emit", "ir", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:1:22: error: unexpected end of input")
    assert main(["emit", "ir", sa("pattern p = band(3)"), "--pattern", "q"]) == 1
    assert "pattern='q': no such pattern; the program defines p" in capsys.readouterr().err
    assert main(["check", "/nonexistent.sa"]) == 1


def test_bad_usage_exits_2(sa):
    for argv in (["emit", "bytecode", sa(BIGBIRD)], ["check", sa(BIGBIRD), "-p", "w"], ["show", sa(BIGBIRD)],
                 ["check", sa(BIGBIRD), "--n", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_console_script_runs(sa):
    done = subprocess.run([sys.executable, "-m", "sparsec.cli", "emit", "ir", sa(BIGBIRD)], capture_output=True, text=True)
    assert done.returncode == 0 and "blocks(64" in done.stdout
