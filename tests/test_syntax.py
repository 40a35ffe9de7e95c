"""Parser and elaboration goldens: the exact error text users see, and the syntax tree."""
import pytest

import sparsec
from sparsec.grammar.syntax import dump, parse


def error_of(src: str, **params) -> str:
    with pytest.raises(sparsec.SparsecError) as e:
        sparsec.compile(src, **params)
    return str(e.value)


@pytest.mark.parametrize("src, expected", [
    ("pattern a = band(3",
     "<string>:1:19: error: unexpected end of input, expected ')', ','\npattern a = band(3\n                  ^"),
    ("pattern a = band(3) $ 2",
     "<string>:1:21: error: unexpected character '$'\npattern a = band(3) $ 2\n                    ^"),
    ("pattern = 3",
     "<string>:1:9: error: unexpected '=', expected a name\npattern = 3\n        ^"),
    ("param w = 3\npattern a = band(w, before=1)",
     "<string>:2:21: error: band: argument 'before' given twice\npattern a = band(w, before=1)\n                    ^^^^^^^^"),
    ("pattern a = band(-1)",
     "<string>:1:18: error: band: w must be at least 0, got -1\npattern a = band(-1)\n                 ^^"),
    ("pattern a = bnad(3)",
     "<string>:1:13: error: unknown primitive 'bnad'\npattern a = bnad(3)\n            ^^^^^^^"),
    ("pattern a = band(3, 4, 5)",
     "<string>:1:24: error: band takes at most 2 argument(s): band(before, after=...)\npattern a = band(3, 4, 5)\n                       ^"),
    ("pattern a = causal & w",
     "<string>:1:22: error: unknown pattern 'w'\npattern a = causal & w\n                     ^"),
    ("param w = 2\npattern a = causal + w",
     "<string>:2:22: error: 'w' is a number, expected a pattern\npattern a = causal + w\n                     ^"),
    ("pattern a = band(i)",
     "<string>:1:18: error: 'i' is only defined inside where(...) and with expressions\npattern a = band(i)\n                 ^"),
    ("pattern a = where(i + j)",
     "<string>:1:19: error: expected a condition (a comparison, and/or/not, true/false), found an expression with '+'"
     "\npattern a = where(i + j)\n                  ^^^^^"),
    ("pattern a = stride(0)",
     "<string>:1:20: error: stride: s must be at least 1, got 0\npattern a = stride(0)\n                   ^"),
    ("pattern a = lsh(63)",
     "<string>:1:17: error: lsh: buckets must be even, got 63\npattern a = lsh(63)\n                ^^"),
    ("pattern a = blocks(4, document)",
     "<string>:1:23: error: document is defined on tokens and cannot be used inside blocks(...)"
     "\npattern a = blocks(4, document)\n                      ^^^^^^^^"),
    ("pattern a = topk(4)",
     "<string>:1:13: error: topk is missing argument 'block': topk(k, block, causal=..., by=...)\npattern a = topk(4)\n            ^^^^^^^"),
    ("let n = 4\npattern a = full",
     "<string>:1:1: error: 'n' is a built-in name and cannot be redefined\nlet n = 4\n^^^^^^^^^"),
    ("pattern a = where(0 < i < 3)",
     "<string>:1:25: error: comparisons do not chain: write 'a < b and b < c'\npattern a = where(0 < i < 3)\n                        ^"),
    ("pattern a = band(3 // 0)",
     "<string>:1:18: error: division by zero\npattern a = band(3 // 0)\n                 ^^^^^^"),
    ("param w = 1",
     "<string>:1:1: error: the program defines no pattern (write 'pattern NAME = ...')\nparam w = 1\n^^^^^^^^^^^"),
])
def test_error_goldens(src, expected):
    assert error_of(src) == expected


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.sa"
    path.write_text("# a comment\npattern ok = band(4)\npattern bad = ok + chunk(0)\n")
    assert error_of(path) == (f"{path}:3:26: error: chunk: c must be at least 1, got 0\n"
                              "pattern bad = ok + chunk(0)\n                         ^")


def test_errors_that_depend_on_n_are_reported_at_the_argument():
    kern = sparsec.compile("pattern a = band(n - 100)")
    with pytest.raises(sparsec.SparsecError) as e:
        kern.mask(10)
    assert str(e.value).startswith("<string>:1:18: error: band: w must be at least 0, got -90")


def test_syntax_tree_golden():
    tree = parse("param w = 2\npattern p = blocks(4, band(w) & causal) + global([0, -1])\n")
    assert dump(tree) == """param w  @1:1
  number 2  @1:11
pattern p  @2:1
  +  @2:13
    call blocks  @2:13
      number 4  @2:20
      &  @2:23
        call band  @2:23
          name w  @2:28
        name causal  @2:33
    call global  @2:43
      list  @2:50
        number 0  @2:51
        -  @2:54
          number 1  @2:55"""


def test_precedence():
    ir = lambda s: sparsec.compile("pattern p = " + s).source_ir.body.show()
    assert ir("band(1) + causal & chunk(4) - sink(1)") == "band(1) + causal & chunk(4) - sink(1)"
    assert ir("(band(1) + causal) & chunk(4)") == "(band(1) + causal) & chunk(4)"
    assert ir("band(1 + 2 * 3 ** 2 // 4 % 5)") == "band(1 + 2 * 3 ** 2 // 4 % 5)"
    k = sparsec.compile("pattern p = band(1 + 2 * 3 ** 2 // 4 % 5)")
    assert k.ir.body.show() == f"band({1 + 2 * 3 ** 2 // 4 % 5})"


def test_floor_semantics_in_constants():
    k = sparsec.compile("pattern p = band(-7 // 2 + 10) & stride(-7 % 3 + 5) & global(isqrt(99) + ilog2(9) + ceil_div(7, 2))")
    assert k.ir.body.show() == f"band({-7 // 2 + 10}) & stride({-7 % 3 + 5}) & global({9 + 3 + 4})"


def test_reals_round_down_where_an_integer_is_needed():
    k = sparsec.compile("pattern p = band(sqrt(n)) + sink(log2(n) * 2)")
    body = sparsec.passes.specialize(k.ir, 1000, 1000, 0, 1)
    import math
    assert body.show() == f"band({math.floor(math.sqrt(1000))}) + sink({math.floor(math.log2(1000) * 2)})"
