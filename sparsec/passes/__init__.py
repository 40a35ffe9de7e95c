"""The passes stage: pure IR -> IR rewrites, listed once in order, then shares and specialization per call."""
from __future__ import annotations

from typing import Callable

from ..ir.program import Definition
from .canonical import canonicalize, check_size, fold_constants, offset_range, simplify, subsumes
from .specialize import specialize

PASSES: list[tuple[str, Callable[[Definition], Definition]]] = [
    ("fold_constants", fold_constants),
    ("canonicalize", canonicalize),
    ("check_size", check_size),
]


def optimize(d: Definition, after_each: Callable[[str, Definition], None] = lambda name, d: None) -> Definition:
    """PASSES in order; after_each(name, result) sees each pass's result (the debug hook)."""
    for name, run in PASSES:
        d = run(d)
        after_each(name, d)
    return d


__all__ = ["PASSES", "canonicalize", "check_size", "fold_constants", "offset_range", "optimize", "simplify",
           "specialize", "subsumes"]
