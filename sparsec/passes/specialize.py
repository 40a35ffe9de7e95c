"""Specialization: a pattern's arguments evaluated, checked and saturated for one call's lengths."""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.limits import check_lengths
from ..ir.program import Definition


def specialize(d: Definition | N.Pattern, n_q: int, n_k: int, q_offset: int, heads: int) -> N.Pattern:
    """The body (of a definition, or a pattern itself) with every argument evaluated for these
    lengths, checked and saturated; where(...) conditions checked over the call's rows
    (positions q_offset .. q_offset + n_q - 1), keys and heads."""
    why = check_lengths(n_q, n_k, q_offset)
    if why:
        raise ValueError(why)
    body = d.body if isinstance(d, Definition) else d
    return body.specialize({"n": n_k, "n_k": n_k, "n_q": n_q, "rows": (q_offset, q_offset + n_q - 1),
                            "heads": heads})
