"""Front end: the lark LALR parser and the untyped syntax tree it builds, every node with its span."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import lark
from lark import Lark, Transformer, v_args

from ..errors import Source, Span, SparsecError
from . import library
from ..ir.inputs import TYPES as INPUT_TYPES
from ..ir.limits import EXACT, NESTING


@dataclass(frozen=True)
class Syntax:
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Number(Syntax):
    value: int | float   # a float: a real literal (1.5, 2e-3)


@dataclass(frozen=True)
class Boolean(Syntax):
    value: bool


@dataclass(frozen=True)
class Name(Syntax):
    id: str


@dataclass(frozen=True)
class Keyword(Syntax):
    name: str
    value: Syntax


@dataclass(frozen=True)
class Call(Syntax):
    func: str
    args: tuple[Syntax, ...]
    keywords: tuple[Keyword, ...]


@dataclass(frozen=True)
class ListOf(Syntax):
    items: tuple[Syntax, ...]


@dataclass(frozen=True)
class Binary(Syntax):
    op: str  # ** and the comparisons == != < <= > >= (which do not chain)
    left: Syntax
    right: Syntax


@dataclass(frozen=True)
class Chain(Syntax):
    """operands[0] ops[0] operands[1] ops[1] ...: one left-associative precedence level (+ -, &,
    * // %, and, or), kept flat so that a long union or sum is not a deep tree."""
    ops: tuple[str, ...]
    operands: tuple[Syntax, ...]


@dataclass(frozen=True)
class Unary(Syntax):
    op: str  # - not
    operand: Syntax


@dataclass(frozen=True)
class Index(Syntax):
    """NAME[e, ...]: one element of a call-time input."""
    name: str
    items: tuple[Syntax, ...]


@dataclass(frozen=True)
class Declaration(Syntax):
    """The (dims) TYPE of an `input` statement."""
    dims: tuple[Syntax, ...]
    dtype: str


@dataclass(frozen=True)
class Scored(Syntax):
    """MASK with EXPR: the value of a pattern statement that modifies its scores."""
    mask: Syntax
    score: Syntax


@dataclass(frozen=True)
class Statement(Syntax):
    kind: str  # param | let | pattern (value: maybe Scored) | input (value: a Declaration)
    name: str
    value: Syntax


@dataclass(frozen=True)
class Module(Syntax):
    statements: tuple[Statement, ...]


def dump(node: Syntax, indent: int = 0) -> str:
    """The tree as indented lines with each node's line:col (what `sparsec emit ast` prints)."""
    pad = "  " * indent
    where = f"  @{node.span.line}:{node.span.column}" if node.span else ""
    if isinstance(node, Module):
        return "\n".join(dump(s, indent) for s in node.statements)
    if isinstance(node, Statement):
        return f"{pad}{node.kind} {node.name}{where}\n" + dump(node.value, indent + 1)
    if isinstance(node, (Number, Boolean)):
        return f"{pad}{type(node).__name__.lower()} {node.value}{where}"
    if isinstance(node, Name):
        return f"{pad}name {node.id}{where}"
    if isinstance(node, Keyword):
        return f"{pad}keyword {node.name}{where}\n" + dump(node.value, indent + 1)
    if isinstance(node, Call):
        kids = [*node.args, *node.keywords]
        return "\n".join([f"{pad}call {node.func}{where}"] + [dump(k, indent + 1) for k in kids])
    if isinstance(node, ListOf):
        return "\n".join([f"{pad}list{where}"] + [dump(k, indent + 1) for k in node.items])
    if isinstance(node, Index):
        return "\n".join([f"{pad}index {node.name}{where}"] + [dump(k, indent + 1) for k in node.items])
    if isinstance(node, Scored):
        return "\n".join([dump(node.mask, indent), f"{pad}with{where}", dump(node.score, indent + 1)])
    if isinstance(node, Declaration):
        return "\n".join([f"{pad}dims {node.dtype}{where}"] + [dump(k, indent + 1) for k in node.dims])
    if isinstance(node, Binary):
        return "\n".join([f"{pad}{node.op}{where}", dump(node.left, indent + 1), dump(node.right, indent + 1)])
    if isinstance(node, Chain):
        return "\n".join([f"{pad}{' '.join(node.ops)}{where}"] + [dump(k, indent + 1) for k in node.operands])
    if isinstance(node, Unary):
        return f"{pad}{node.op}{where}\n" + dump(node.operand, indent + 1)
    raise TypeError(node)


@lru_cache(maxsize=None)
def _parser() -> Lark:
    grammar = files("sparsec.grammar").joinpath("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


_CHAINS = {"disj": "or", "conj": "and", "inter": "&"}   # levels with one operator; sum and product carry theirs


class _Build(Transformer):
    """lark tree -> Syntax nodes; each method gets lark's `meta` for the span."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span | None:
        if getattr(meta, "empty", True):
            return None
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def __default__(self, data, children, meta):
        if data in _CHAINS:
            return Chain((_CHAINS[data],) * (len(children) - 1), tuple(children), span=self._span(meta))
        if data in ("sum", "product"):   # operand (op operand)*, the ops built by addop / mulop
            return Chain(tuple(children[1::2]), tuple(children[::2]), span=self._span(meta))
        if data in ("addop", "mulop"):
            return str(children[0])
        if data == "power":
            return Binary("**", children[0], children[1], span=self._span(meta))
        raise AssertionError(f"grammar rule without a builder: {data}")

    @v_args(meta=True)
    def start(self, meta, stmts):   # an empty program is reported at 1:1
        return Module(tuple(stmts), span=self._span(meta) or Span(self.source, 1, 1, 1, 1))

    def _statement(kind):
        @v_args(meta=True)
        def build(self, meta, children):
            name, value = children
            return Statement(kind, str(name), value, span=self._span(meta))
        return build

    param, let, pattern = _statement("param"), _statement("let"), _statement("pattern")

    @v_args(meta=True)
    def scored(self, meta, children):
        name, mask, score = children
        return Statement("pattern", str(name), Scored(mask, score, span=score.span), span=self._span(meta))

    @v_args(meta=True)
    def real(self, meta, children):
        value = float(str(children[0]).replace("_", ""))
        if not math.isfinite(value):
            raise SparsecError("real literal too large: it is not a finite 64-bit float", self._span(meta))
        return Number(value, span=self._span(meta))

    @v_args(meta=True)
    def input(self, meta, children):
        name, *dims, dtype = children
        if str(dtype) not in INPUT_TYPES:
            raise SparsecError(f"an input's type is one of {', '.join(INPUT_TYPES)}, found '{dtype}'",
                               Span(self.source, dtype.line, dtype.column, dtype.end_line, dtype.end_column))
        dims = tuple(d for d in dims if d is not None)
        return Statement("input", str(name), Declaration(dims, str(dtype), span=self._span(meta)),
                         span=self._span(meta))

    @v_args(meta=True)
    def index(self, meta, children):
        name, *items = children
        return Index(str(name), tuple(items), span=self._span(meta))

    @v_args(meta=True)
    def number(self, meta, children):
        digits = str(children[0]).replace("_", "")
        # past 2**256 (78 digits): refused, the longest before conversion (Python refuses 4300 digits)
        if len(digits.lstrip("0")) > 78 or int(digits) >= EXACT:
            raise SparsecError("integer literal too large: constants must stay below 2**256", self._span(meta))
        return Number(int(digits), span=self._span(meta))

    @v_args(meta=True)
    def true(self, meta, _):
        return Boolean(True, span=self._span(meta))

    @v_args(meta=True)
    def false(self, meta, _):
        return Boolean(False, span=self._span(meta))

    @v_args(meta=True)
    def name(self, meta, children):
        return Name(str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, arguments = children
        args, keywords = [], []
        for a in arguments or ():
            if isinstance(a, Keyword):
                keywords.append(a)
            elif keywords:
                raise SparsecError("positional argument after a keyword argument", a.span)
            else:
                args.append(a)
        return Call(str(func), tuple(args), tuple(keywords), span=self._span(meta))

    def arguments(self, children):
        return children

    @v_args(meta=True)
    def keyword(self, meta, children):
        return Keyword(str(children[0]), children[1], span=self._span(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return ListOf(tuple(c for c in children if c is not None), span=self._span(meta))

    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return Binary(str(op), left, right, span=self._span(meta))

    @v_args(meta=True)
    def negate(self, meta, children):
        return Unary("-", children[0], span=self._span(meta))

    @v_args(meta=True)
    def not_(self, meta, children):
        return Unary("not", children[0], span=self._span(meta))


_TOKEN_WORDS = {"LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','",
                "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "AMPERSAND": "'&'",
                "PERCENT": "'%'", "SLASH": "'/'", "REAL": "a real number", "WITH": "'with'",
                "DOUBLESLASH": "'//'", "DOUBLESTAR": "'**'", "CMP": "a comparison",
                "NAME": "a name", "INT": "an integer", "PARAM": "'param'", "LET": "'let'",
                "PATTERN": "'pattern'", "INPUT": "'input'", "$END": "end of input", "OR": "'or'", "AND": "'and'",
                "NOT": "'not'", "TRUE": "'true'", "FALSE": "'false'"}


def _describe(names) -> str:
    words = sorted({_TOKEN_WORDS.get(n, n) for n in names})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _point(source: Source, line: int, column: int) -> Span:
    return Span(source, line, column, line, column + 1)


def _check_nesting(tree: lark.Tree, source: Source) -> None:
    """No more than NESTING levels of calls, unary operators, ** and parenthesized operands (a flat
    chain is one level), found without recursion, so the builder's recursion stays shallow."""
    todo = [(tree, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > NESTING:
            m = node.meta
            raise SparsecError(f"nested too deeply: more than {NESTING} levels of calls, operators and "
                               f"parentheses (the limit)",
                               Span(source, m.line, m.column, m.end_line, m.end_column) if not m.empty else None)
        step = 0 if node.data in ("arguments", "addop", "mulop", "start") else 1
        todo.extend((c, depth + step) for c in node.children if isinstance(c, lark.Tree))


def parse(text: str, filename: str = "<string>") -> Module:
    """Parse a whole `.sa` program; every failure becomes a SparsecError at file:line:col. A
    leading UTF-8 byte order mark is read as nothing."""
    text = text.removeprefix("\ufeff")
    source = Source(text, filename)
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        raise SparsecError(f"unexpected character {text[e.pos_in_stream]!r}",
                           _point(source, e.line, e.column)) from None
    except lark.UnexpectedEOF as e:
        lines = text.splitlines() or [""]
        raise SparsecError(f"unexpected end of input, expected {_describe(e.expected)}",
                           _point(source, len(lines), len(lines[-1]) + 1)) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            lines = text.splitlines() or [""]
            raise SparsecError(f"unexpected end of input, expected {_describe(e.expected)}",
                               _point(source, len(lines), len(lines[-1]) + 1)) from None
        if tok.type == "CMP":
            raise SparsecError("comparisons do not chain: write 'a < b and b < c'",
                               Span(source, tok.line, tok.column, tok.end_line, tok.end_column)) from None
        raise SparsecError(f"unexpected {str(tok)!r}, expected {_describe(e.expected)}",
                           Span(source, tok.line, tok.column, tok.end_line, tok.end_column)) from None
    _check_nesting(tree, source)
    try:
        return _Build(source).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, SparsecError):
            raise e.orig_exc from None
        raise


def _path_like(s: str) -> bool:
    """One line ending in .sa, or with a folder in it and none of a program's brackets or spaces
    (`i // 2` is arithmetic, `patterns/bigbird` a path)."""
    if "\n" in s:
        return False
    return s.endswith(".sa") or (("/" in s or os.sep in s) and not any(c in s for c in "( "))


def read_source(path_or_source: str | os.PathLike) -> Source:
    """A library name (`bigbird`: grammar/library.py), a path (a Path, or a string that looks
    like one) or the program text itself."""
    if isinstance(path_or_source, str) and library.NAME.fullmatch(path_or_source):
        entry, _ = library.find(path_or_source)
        return Source(Path(entry.path).read_text(), entry.path)
    if isinstance(path_or_source, os.PathLike) or (isinstance(path_or_source, str) and _path_like(path_or_source)):
        path = Path(path_or_source)
        if not path.is_file():
            raise FileNotFoundError(f"path_or_source: no such .sa file: {path}")
        return Source(path.read_text(), str(path))
    if not isinstance(path_or_source, str):
        raise TypeError(f"path_or_source must be a path or the program text, got {type(path_or_source).__name__}")
    return Source(path_or_source, "<string>")
