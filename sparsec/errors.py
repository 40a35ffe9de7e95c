"""Source spans and the one error type users see: `file:line:col: error: message` with a caret."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """The text of a `.sa` program and the name it is reported under."""
    text: str
    filename: str = "<string>"

    def line(self, number: int) -> str:
        lines = self.text.splitlines()
        return lines[number - 1] if 0 < number <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """Where a node came from: 1-based line and column of its first and last character."""
    source: Source
    line: int
    column: int
    end_line: int
    end_column: int

    def __repr__(self) -> str:  # keep IR reprs short: the source text is not part of a node's identity
        return f"Span({self.line}:{self.column})"


class SparsecError(Exception):
    """A user error, reported at a place in the source when one is known."""

    def __init__(self, message: str, span: Span | None = None):
        super().__init__(message)
        self.message = message
        self.span = span

    def __str__(self) -> str:
        if self.span is None:
            return f"error: {self.message}"
        s = self.span
        text = s.source.line(s.line)
        width = (s.end_column - s.column) if s.end_line == s.line and s.end_column > s.column else 1
        caret = " " * (s.column - 1) + "^" * max(1, width)
        return f"{s.source.filename}:{s.line}:{s.column}: error: {self.message}\n{text}\n{caret}"
