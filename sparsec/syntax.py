"""Front end: the lark LALR parser and the untyped syntax tree it builds, every node with its span."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

import lark
from lark import Lark, Transformer, v_args

from .errors import Source, Span, SparsecError


@dataclass(frozen=True)
class Syntax:
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Number(Syntax):
    value: int


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
    op: str  # + - & * // % ** == != < <= > >= and or
    left: Syntax
    right: Syntax


@dataclass(frozen=True)
class Unary(Syntax):
    op: str  # - not
    operand: Syntax


@dataclass(frozen=True)
class Statement(Syntax):
    kind: str  # param | let | pattern
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
    if isinstance(node, Binary):
        return "\n".join([f"{pad}{node.op}{where}", dump(node.left, indent + 1), dump(node.right, indent + 1)])
    if isinstance(node, Unary):
        return f"{pad}{node.op}{where}\n" + dump(node.operand, indent + 1)
    raise TypeError(node)


@lru_cache(maxsize=None)
def _parser() -> Lark:
    grammar = files("sparsec").joinpath("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


_BINARY = {"add": "+", "sub": "-", "intersect": "&", "mul": "*", "floordiv": "//", "mod": "%",
           "power": "**", "and_": "and", "or_": "or"}


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
        if data in _BINARY:
            return Binary(_BINARY[data], children[0], children[1], span=self._span(meta))
        raise AssertionError(f"grammar rule without a builder: {data}")

    @v_args(meta=True)
    def start(self, meta, stmts):
        return Module(tuple(stmts), span=self._span(meta))

    def _statement(kind):
        @v_args(meta=True)
        def build(self, meta, children):
            name, value = children
            return Statement(kind, str(name), value, span=self._span(meta))
        return build

    param, let, pattern = _statement("param"), _statement("let"), _statement("pattern")

    @v_args(meta=True)
    def number(self, meta, children):
        return Number(int(str(children[0]).replace("_", "")), span=self._span(meta))

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
                "PERCENT": "'%'", "DOUBLESLASH": "'//'", "DOUBLESTAR": "'**'", "CMP": "a comparison",
                "NAME": "a name", "INT": "an integer", "PARAM": "'param'", "LET": "'let'",
                "PATTERN": "'pattern'", "$END": "end of input", "OR": "'or'", "AND": "'and'",
                "NOT": "'not'", "TRUE": "'true'", "FALSE": "'false'"}


def _describe(names) -> str:
    words = sorted({_TOKEN_WORDS.get(n, n) for n in names})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _point(source: Source, line: int, column: int) -> Span:
    return Span(source, line, column, line, column + 1)


def parse(text: str, filename: str = "<string>") -> Module:
    """Parse a whole `.sa` program; every failure becomes a SparsecError at file:line:col."""
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
    try:
        return _Build(source).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, SparsecError):
            raise e.orig_exc from None
        raise
