"""Front end, second half: the untyped syntax tree -> typed IR (names resolved, arities and types checked)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from . import syntax as S
from ..errors import Span, SparsecError
from ..ir.limits import EXACT, NESTING
from ..ir import expr as E
from ..ir import nodes as N
from ..ir.inputs import InputDecl
from ..ir.program import Binding, Definition

LENGTHS = ("n", "n_q", "n_k")
PAIR_NAMES = ("i", "j", "h")  # defined inside where(...) only
BARE = {"full": N.Full, "empty": N.Empty, "causal": N.Causal, "logsparse": N.LogSparse, "document": N.Document}
REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "num", "bool", "pattern" or "input" (the name of a declared input)
    default: object = REQUIRED  # REQUIRED, a Python value, or the name of an earlier parameter


# Signatures of the primitives that take arguments: positional order = keyword names, as in Python.
SIGNATURES: dict[str, tuple[Callable, tuple[Param, ...]]] = {
    "band": (N.Band, (Param("before", "num"), Param("after", "num", "before"))),
    "dilated": (N.Dilated, (Param("w", "num"), Param("d", "num"))),
    "stride": (N.Stride, (Param("s", "num"),)),
    "chunk": (N.Chunk, (Param("c", "num"),)),
    "global": (N.Global, (Param("g", "num"),)),
    "last": (N.Last, (Param("g", "num"),)),
    "sink": (N.Sink, (Param("g", "num"),)),
    "random": (N.Random, (Param("r", "num"), Param("seed", "num", 0))),
    "where": (N.Where, (Param("cond", "bool"),)),
    "blocks": (N.Blocks, (Param("size", "num"), Param("body", "pattern"))),
    "lsh": (N.Lsh, (Param("buckets", "num"), Param("rounds", "num", 1), Param("seed", "num", 0))),
    "cluster": (N.Cluster, (Param("k", "num"), Param("iters", "num", 10), Param("seed", "num", 0))),
    "topk": (N.TopK, (Param("k", "num"), Param("block", "num"), Param("causal", "bool", False),
                      Param("by", "input", None))),
}
KEYWORD_ALIASES = {"band": {"w": ("before", "after")}}
RESERVED = set(LENGTHS) | set(PAIR_NAMES) | set(BARE) | set(SIGNATURES) | {"heads", "score"} | set(E.FUNCTIONS)


def _describe(node: S.Syntax) -> str:
    if isinstance(node, S.Number):
        return "a number"
    if isinstance(node, S.Boolean):
        return "a boolean"
    if isinstance(node, S.ListOf):
        return "a list"
    if isinstance(node, S.Call):
        return f"{node.func}(...)"
    if isinstance(node, S.Name):
        return f"'{node.id}'"
    return f"an expression with '{node.ops[0] if isinstance(node, S.Chain) else node.op}'"


class Scope:
    """What the statements so far have defined, in order."""

    def __init__(self):
        self.numbers: dict[str, Binding] = {}
        self.patterns: dict[str, N.Pattern] = {}
        self.inputs: dict[str, InputDecl] = {}
        self.scores: dict[str, E.Expr] = {}   # pattern name -> its with expression (spec section 7)
        self.in_score = False                 # elaborating a with expression: `score` is defined
        self.uses: dict[str, frozenset[str]] = {}  # name -> the numeric names its definition uses
        self.depths: dict[int, tuple] = {}          # id(expression) -> (depth with lets inlined, it)

    # ---- patterns ----
    def pattern(self, node: S.Syntax) -> N.Pattern:
        sp = node.span
        if isinstance(node, S.Chain) and node.ops[0] in ("+", "-", "&"):
            return self._combine(node)
        if isinstance(node, S.Name):
            if node.id in BARE:
                return BARE[node.id](span=sp)
            if node.id in self.scores:
                raise SparsecError(f"pattern '{node.id}' modifies its scores (with ...), so it cannot be used "
                                   f"inside another pattern: `with` belongs to a pattern statement", sp)
            if node.id in self.patterns:
                return self.patterns[node.id]
            if node.id in SIGNATURES or node.id == "heads":
                raise SparsecError(f"{node.id} needs arguments, e.g. {node.id}(...)", sp)
            if node.id in self.numbers or node.id in LENGTHS:
                raise SparsecError(f"'{node.id}' is a number, expected a pattern", sp)
            raise SparsecError(f"unknown pattern '{node.id}'", sp)
        if isinstance(node, S.Call):
            return self.primitive(node)
        raise SparsecError(f"expected a pattern, found {_describe(node)}", sp)

    def _combine(self, chain: S.Chain) -> N.Pattern:
        """a + b + c is one n-ary union (likewise &), a - b a difference, left to right; a left
        operand of the same kind (even a named one) joins the union or intersection."""
        kinds = {"+": N.Union, "&": N.Intersection}
        acc = self.pattern(chain.operands[0])
        for op, operand in zip(chain.ops, chain.operands[1:]):
            right = self.pattern(operand)
            span = _between(chain.operands[0], operand) or chain.span
            if op == "-":
                acc = N.Difference(acc, right, span=span)
            else:
                kind = kinds[op]
                acc = kind((acc.parts if type(acc) is kind else (acc,)) + (right,), span=span)
            self._deep(acc)
        return acc

    def primitive(self, call: S.Call) -> N.Pattern:
        name, sp = call.func, call.span
        if name in BARE:
            raise SparsecError(f"{name} takes no arguments; write '{name}'", sp)
        if name == "heads":
            if call.keywords or not call.args:
                raise SparsecError("heads takes one or more patterns: heads(p0, p1, ...)", sp)
            return self._deep(N.Heads(tuple(self.pattern(a) for a in call.args), span=sp))
        if name == "global" and len(call.args) == 1 and isinstance(call.args[0], S.ListOf) and not call.keywords:
            items = call.args[0].items
            if not items:
                raise SparsecError("global([...]) needs at least one position", call.args[0].span)
            return self._deep(N.GlobalSet(tuple(self.number(x) for x in items), span=sp))
        if name not in SIGNATURES:
            if name in E.FUNCTIONS:
                raise SparsecError(f"{name}(...) is a number, expected a pattern", sp)
            raise SparsecError(f"unknown primitive '{name}'", sp)
        build, params = SIGNATURES[name]
        values = self.bind_arguments(call, params)
        return self._deep(build(**values, span=sp))

    def bind_arguments(self, call: S.Call, params: tuple[Param, ...]) -> dict:
        usage = f"{call.func}({', '.join(p.name if p.default is REQUIRED else f'{p.name}=...' for p in params)})"
        if len(call.args) > len(params):
            raise SparsecError(f"{call.func} takes at most {len(params)} argument(s): {usage}", call.args[len(params)].span)
        given: dict[str, S.Syntax] = {p.name: a for p, a in zip(params, call.args)}
        names = {p.name for p in params}
        for kw in call.keywords:
            targets = KEYWORD_ALIASES.get(call.func, {}).get(kw.name, (kw.name,))
            for target in targets:
                if target not in names:
                    raise SparsecError(f"{call.func} has no argument '{kw.name}': {usage}", kw.span)
                if target in given:
                    raise SparsecError(f"{call.func}: argument '{kw.name}' given twice", kw.span)
                given[target] = kw.value
        out = {}
        for p in params:
            if p.name in given:
                node = given[p.name]
                out[p.name] = (self.pattern(node) if p.kind == "pattern" else
                               self.condition(node, in_where=call.func == "where") if p.kind == "bool" else
                               self.ranking(node) if p.kind == "input" else self.number(node))
            elif p.default is REQUIRED:
                raise SparsecError(f"{call.func} is missing argument '{p.name}': {usage}", call.span)
            elif p.default is None:
                out[p.name] = None
            elif isinstance(p.default, str):
                out[p.name] = out[p.default]
            else:
                out[p.name] = E.Const(p.default, span=call.span)
        return out

    def ranking(self, node: S.Syntax) -> str:
        """topk's by=NAME: a float input of shape (b, h, query blocks, key blocks) (spec section 6)."""
        if not isinstance(node, S.Name) or node.id not in self.inputs:
            raise SparsecError("by= takes the name of a declared input, "
                               "input NAME(b, h, ceil_div(n_q, B), ceil_div(n_k, B)) float", node.span)
        decl = self.inputs[node.id]
        if decl.dtype != "float" or len(decl.dims) != 4 or decl.dims[:2] != ("b", "h"):
            raise SparsecError(f"by={node.id}: topk ranks key blocks by a float input of dims (b, h, query "
                               f"blocks, key blocks), declared here as {decl.show()[6:]}", node.span)
        return decl.name

    # ---- numbers and conditions ----
    # Each expression tracks its depth once its lets are written out (a let counts its own), so
    # that no later pass recurses past NESTING levels: the limit is checked where it is passed.
    def number(self, node: S.Syntax, in_where: bool = False) -> E.Expr:
        sp = node.span
        if isinstance(node, S.Number):
            return E.Const(node.value, span=sp)
        if isinstance(node, S.Unary) and node.op == "-":
            if isinstance(node.operand, S.Number):  # a literal -3 is one constant, as it prints
                return E.Const(-node.operand.value, span=sp)
            return self._deep(E.Apply("neg", (self.number(node.operand, in_where),), span=sp))
        if isinstance(node, S.Name):
            if node.id in LENGTHS or node.id in self.numbers:
                return E.Var(node.id, span=sp)
            if node.id == "score":
                if self.in_score:
                    return E.Var("score", span=sp)
                raise SparsecError("'score' is only defined in a pattern's with expression "
                                   "(pattern NAME = MASK with EXPR)", sp)
            if node.id in PAIR_NAMES:
                if in_where:
                    return E.Var(node.id, span=sp)
                raise SparsecError(f"'{node.id}' is only defined inside where(...) and with expressions", sp)
            if node.id == "b" and in_where:
                raise SparsecError("'b' (the batch row) is only defined in the index of an input read, "
                                   "NAME[b, ...]", sp)
            if node.id in self.patterns or node.id in BARE:
                raise SparsecError(f"'{node.id}' is a pattern, expected a number", sp)
            if node.id in self.inputs:
                raise SparsecError(f"'{node.id}' is an input: read one element, {node.id}[...]", sp)
            raise SparsecError(f"unknown name '{node.id}'", sp)
        if isinstance(node, S.Index):
            read = self.read(node, in_where)
            if read.decl.dtype == "bool":
                raise SparsecError(f"'{node.name}' is a bool input, used here as a number", sp)
            return read
        if isinstance(node, S.Chain) and node.ops[0] in ("+", "-", "*", "/", "//", "%"):
            acc = self.number(node.operands[0], in_where)
            for op, operand in zip(node.ops, node.operands[1:]):
                acc = self._deep(E.Apply(op, (acc, self.number(operand, in_where)),
                                         span=_between(node.operands[0], operand) or sp))
            return acc
        if isinstance(node, S.Binary) and node.op == "**":
            return self._deep(E.Apply("**", (self.number(node.left, in_where), self.number(node.right, in_where)),
                                      span=sp))
        if isinstance(node, S.Call) and node.func in E.FUNCTIONS:
            low, high = E.OPS[node.func].arity
            if node.keywords:
                raise SparsecError(f"{node.func} takes no keyword arguments", node.keywords[0].span)
            if len(node.args) < low or (high >= 0 and len(node.args) > high):
                want = f"{low}" if low == high else f"at least {low}"
                raise SparsecError(f"{node.func} takes {want} argument(s), got {len(node.args)}", sp)
            args = [self.number(a, in_where) for a in node.args[node.func == "select":]]
            if node.func == "select":   # select(cond, a, b)
                args.insert(0, self.condition(node.args[0], in_where))
            return self._deep(E.Apply(node.func, tuple(args), span=sp))
        if isinstance(node, S.Call) and (node.func in SIGNATURES or node.func in ("heads",)):
            raise SparsecError(f"{node.func}(...) is a pattern, expected a number", sp)
        if isinstance(node, S.Call):
            raise SparsecError(f"unknown function '{node.func}'", sp)
        raise SparsecError(f"expected a number, found {_describe(node)}", sp)

    def condition(self, node: S.Syntax, in_where: bool) -> E.Expr:
        sp = node.span
        if isinstance(node, S.Boolean):
            return E.Const(node.value, span=sp)
        if isinstance(node, S.Chain) and node.ops[0] in ("and", "or"):   # one n-ary and / or
            return self._deep(E.Apply(node.ops[0], tuple(self.condition(a, in_where) for a in node.operands), span=sp))
        if isinstance(node, S.Unary) and node.op == "not":
            return self._deep(E.Apply("not", (self.condition(node.operand, in_where),), span=sp))
        if isinstance(node, S.Binary) and node.op in ("==", "!=", "<", "<=", ">", ">="):
            return self._deep(E.Apply(node.op, (self.number(node.left, in_where), self.number(node.right, in_where)),
                                      span=sp))
        if isinstance(node, S.Name) and node.id in self.inputs:
            raise SparsecError(f"'{node.id}' is an input: read one element, {node.id}[...]", sp)
        if isinstance(node, S.Index):
            read = self.read(node, in_where)
            if read.decl.dtype != "bool":
                article = "an" if read.decl.dtype == "int" else "a"
                raise SparsecError(f"'{node.name}' is {article} {read.decl.dtype} input, used here as a condition "
                                   f"(compare it: {node.name}[...] != 0)", sp)
            return read
        raise SparsecError(f"expected a condition (a comparison, and/or/not, true/false), found {_describe(node)}", sp)

    def read(self, node: S.Index, in_where: bool) -> E.Read:
        """NAME[e, ...] of a declared input: inside where(...) only, one index per dim, each an
        integer expression over i, j, h, b, the lengths and params."""
        sp = node.span
        decl = self.inputs.get(node.name)
        if decl is None:
            what = "a pattern" if node.name in self.patterns or node.name in BARE else \
                "a number" if node.name in self.numbers or node.name in LENGTHS else None
            raise SparsecError(f"'{node.name}' is {what}, not an input" if what else
                               f"unknown input '{node.name}' (declare it: input {node.name}(...) TYPE)", sp)
        if not in_where:
            raise SparsecError(f"inputs are read inside where(...) and with expressions only; {node.name}[...] is "
                               f"outside them", sp)
        if len(node.items) != len(decl.dims):
            raise SparsecError(f"'{node.name}' has {len(decl.dims)} dim(s) ({decl.show().split('(', 1)[1].split(')')[0]}), "
                               f"indexed here with {len(node.items)}", sp)
        index = tuple(E.Var("b", span=x.span) if isinstance(x, S.Name) and x.id == "b" else self.number(x, in_where)
                      for x in node.items)
        return self._deep(E.Read(decl, index, span=sp))

    def score(self, node: S.Syntax) -> E.Expr:
        """A with expression: a number over score, i, j, h, the lengths, params and input reads."""
        self.in_score = True
        try:
            return self.number(node, in_where=True)
        finally:
            self.in_score = False

    def declaration(self, st: S.Statement) -> InputDecl:
        """input NAME(DIMS) TYPE: each dim b, h, or an integer expression of the lengths and params."""
        dims = []
        for d in st.value.dims:
            if isinstance(d, S.Name) and d.id in ("b", "h"):
                dims.append(d.id)
                continue
            if isinstance(d, S.Name) and d.id in ("i", "j"):
                raise SparsecError(f"an input's dims are b, h or lengths (n, n_q, n_k and expressions of them), "
                                   f"not '{d.id}'", d.span)
            dims.append(self.number(d))
        return InputDecl(st.name, tuple(dims), st.value.dtype, span=st.span)

    def _deep(self, e):
        """e (an expression or a pattern node), if its depth once lets and named patterns are
        written out is within NESTING. Its parts' depths are known already: one step per node."""
        parts = e.args if isinstance(e, E.Apply) else e.index if isinstance(e, E.Read) else \
            e.children() + tuple(e.arguments().values())
        depth = 1 + max((self._depth(a) for a in parts), default=0)
        if depth > NESTING:
            what = "operations" if isinstance(e, E.Expr) else "parts"
            raise SparsecError(f"this nests {depth} {what} deep once its lets and named patterns are written out "
                               f"(the limit is {NESTING})", e.span)
        self.depths[id(e)] = (depth, e)
        return e

    def _depth(self, e) -> int:
        while isinstance(e, E.Var) and e.name in self.numbers:   # a let: the depth of its value
            e = self.numbers[e.name].value
        return self.depths[id(e)][0] if id(e) in self.depths else 0

    # ---- statements ----
    def statement(self, st: S.Statement) -> None:
        if st.name in RESERVED:
            raise SparsecError(f"'{st.name}' is a built-in name and cannot be redefined", st.span)
        if st.name in self.numbers or st.name in self.patterns or st.name in self.inputs:
            raise SparsecError(f"'{st.name}' is already defined", st.span)
        if st.kind == "input":
            self.inputs[st.name] = self.declaration(st)
            self.uses[st.name] = frozenset().union(*(E.names(d) for d in self.inputs[st.name].dims
                                                     if not isinstance(d, str)))
        elif st.kind == "pattern":
            scored = isinstance(st.value, S.Scored)
            self.patterns[st.name] = self.pattern(st.value.mask if scored else st.value)
            self.uses[st.name] = _numeric_names(self.patterns[st.name])
            if scored:
                self.scores[st.name] = self.score(st.value.score)
                self.uses[st.name] |= E.names(self.scores[st.name]) - {"score", "i", "j", "h", "b"}
        else:
            value = self.number(st.value)
            self.numbers[st.name] = Binding(st.kind, st.name, value, st.span)
            self.uses[st.name] = E.names(value)

    def closure(self, names: frozenset[str]) -> tuple[Binding, ...]:
        """The bindings that `names` need, directly or through other bindings, in source order."""
        need, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name in self.numbers and name not in need:
                need.add(name)
                todo.extend(self.uses[name])
        return tuple(b for name, b in self.numbers.items() if name in need)


def _between(first: S.Syntax, last: S.Syntax):
    """The span from the start of `first` to the end of `last` (None if either has none)."""
    a, b = first.span, last.span
    if a is None or b is None:
        return None
    return Span(a.source, a.line, a.column, b.end_line, b.end_column)


def _numeric_names(p: N.Pattern) -> frozenset[str]:
    memo: dict = {}
    return frozenset().union(*(E.names(e, memo=memo) for node in p.nodes() for e in node.arguments().values()))


def _inputs_read(p: N.Pattern, score: E.Expr | None, declared: dict[str, InputDecl]) -> tuple[InputDecl, ...]:
    """The declared inputs the body and its score expression read, in order of first use."""
    out = {}
    exprs = [e for node in p.nodes() for e in node.arguments().values()] + ([score] if score is not None else [])
    for node in p.nodes():   # inputs named as arguments (topk's by=) rather than read in an expression
        for name in node.declarations():
            out.setdefault(name, declared[name])
    for e in exprs:
        for decl in E.reads(e):
            out.setdefault(decl.name, decl)
    return tuple(out.values())


def elaborate(module: S.Module, pattern: str | None = None) -> Definition:
    """The Definition of one pattern of a parsed program (by name, or the last one)."""
    scope = Scope()
    for st in module.statements:
        scope.statement(st)
    if not scope.patterns:
        raise SparsecError("the program defines no pattern (write 'pattern NAME = ...')", module.span)
    if pattern is None:
        pattern = list(scope.patterns)[-1]
    if pattern not in scope.patterns:
        raise ValueError(f"pattern={pattern!r}: no such pattern; the program defines {', '.join(scope.patterns)}")
    body = scope.patterns[pattern]
    st = next(s for s in module.statements if s.kind == "pattern" and s.name == pattern)
    score = scope.scores.get(pattern)
    inputs = _inputs_read(body, score, scope.inputs)
    names = scope.uses[pattern].union(*(scope.uses[d.name] for d in inputs))
    return Definition(pattern, scope.closure(names), body, st.span, inputs, score)


def pattern_names(module: S.Module) -> list[str]:
    return [s.name for s in module.statements if s.kind == "pattern"]


def bind_params(d: Definition, module: S.Module, params: dict[str, Any]) -> Definition:
    """The definition with the given parameter values in place of the defaults."""
    declared = [s.name for s in module.statements if s.kind == "param"]
    for name, v in params.items():
        if name not in declared:
            lets = [s.name for s in module.statements if s.kind == "let"]
            why = " (it is a let, not a param)" if name in lets else ""
            raise ValueError(f"{name}=: no such param{why}; the program declares: {', '.join(declared) or 'none'}")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}= must be an int, got {type(v).__name__}")
        if abs(v) >= EXACT:
            raise ValueError(f"{name}= must be below 2**256 in magnitude (as every constant of the language), got {v}")
    bindings = tuple(Binding(b.kind, b.name, E.Const(int(params[b.name])), b.span)
                     if b.kind == "param" and b.name in params else b for b in d.bindings)
    return replace(d, bindings=bindings)
