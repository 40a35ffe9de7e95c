"""A compiled pattern's IR: the named constants it uses and its body, printable as a .sa program."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Span
from . import expr as E
from .inputs import InputDecl
from .pattern import Pattern


@dataclass(frozen=True)
class Binding:
    kind: str  # "param" (overridable) or "let"
    name: str
    value: E.Expr
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Definition:
    name: str
    bindings: tuple[Binding, ...]
    body: Pattern
    span: Span | None = field(default=None, compare=False, repr=False)
    inputs: tuple[InputDecl, ...] = ()   # the declared call-time inputs the body and score read
    score: E.Expr | None = None          # the with expression (spec section 7): S' of each allowed pair

    def show(self) -> str:
        lines = [f"{b.kind} {b.name} = {E.show(b.value)}" for b in self.bindings]
        lines += [decl.show() for decl in self.inputs]
        scored = "" if self.score is None else f" with {E.show(self.score)}"
        return "\n".join(lines + [f"pattern {self.name} = {self.body.show()}{scored}"]) + "\n"
