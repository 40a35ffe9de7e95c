"""The canonical passes: constants folded, unions and intersections flattened and simplified, sizes bounded."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Callable

from ..ir import expr as E
from ..ir import nodes as N
from ..errors import SparsecError
from ..ir.limits import EXPR_NODES, IR_NODES
from ..ir.program import Definition


def fold_constants(d: Definition) -> Definition:
    """Substitute every param and let into the body and fold what became constant; then check
    the arguments that are known now (those that do not depend on n). A let used twice stays one
    shared sub-expression, and a named pattern used twice one shared node, so this costs the
    program's length however often names are reused."""
    env: dict[str, E.Expr] = {}
    memo: dict = {}
    for b in d.bindings:
        env[b.name] = E.substitute(b.value, env, memo=memo)
    body = _fold(d.body, env, memo, {})
    for node in body.nodes():
        for e in node.arguments().values():
            _check_expression(e)
        node.check()
    score = None if d.score is None else E.substitute(d.score, env, memo=memo)
    if score is not None:
        _check_expression(score)
    return replace(d, bindings=(), body=body, inputs=tuple(E.substitute_dims(x, env, memo) for x in d.inputs),
                   score=score)


def _fold(p: N.Pattern, env, memo: dict, done: dict) -> N.Pattern:
    if id(p) not in done:
        done[id(p)] = (p.map_arguments(lambda e: E.substitute(e, env, memo=memo))
                       .map_children(lambda c: _fold(c, env, memo, done)), p)
    return done[id(p)][0]


def _check_expression(e: E.Expr) -> None:
    """Arguments stay small enough to print, hash and evaluate (lets may double them each line;
    their depth elaboration has bounded already)."""
    _within(E.size(e), EXPR_NODES, "this expression", "operations once its lets are written out", e.span)


def check_size(d: Definition) -> Definition:
    """The pattern written out as a tree (shared named parts once per use, as the kernels and the
    printer see it) stays within IR_NODES nodes; elaboration has bounded its depth."""
    _within(d.body.tree_size(), IR_NODES, f"pattern {d.name}", "nodes once its named parts are written out", d.span)
    return d


def _within(count: int, limit: int, what: str, unit: str, span) -> None:
    if count > limit:
        raise SparsecError(f"{what} has {count} {unit} (the limit is {limit} {unit.split()[0]})", span)


# ---- canonical form ------------------------------------------------------------------------------

def _consts(p: N.Pattern):
    """The argument values of a node when all are constants, else None."""
    args = p.arguments()
    if all(isinstance(a, E.Const) for a in args.values()):
        return {k: a.value for k, a in args.items()}
    return None


def offset_range(p: N.Pattern):
    """[lo, hi] of p - j allowed by a band or causal with constant arguments, else None."""
    if isinstance(p, N.Causal):
        return (0, math.inf)
    v = _consts(p) if isinstance(p, N.Band) else None
    return (-v["after"], v["before"]) if v else None


def _band(lo, hi, like: N.Pattern) -> N.Pattern:
    if hi == math.inf:
        return N.Causal(span=like.span) if lo == 0 else None
    return N.Band(E.Const(int(hi)), E.Const(int(-lo)), span=like.span)


def _reach_inside(big, small, vb, vs) -> bool:
    """dilated(w, d) reaches offsets up to w * d either way: inside a band's offset range."""
    lo, hi = offset_range(big)
    return lo <= -vs["w"] * vs["d"] and vs["w"] * vs["d"] <= hi


def _fewer(key: str):
    return lambda big, small, vb, vs: vs[key] <= vb[key]


# Sufficient rules that every pair of `small` is a pair of `big`, by (type(big), type(small)),
# for nodes whose arguments are constants (bands and causal are compared by offset range first).
SUBSUMES: dict[tuple[type, type], Callable] = {
    (N.Band, N.Dilated): _reach_inside,
    (N.Causal, N.Dilated): _reach_inside,
    (N.Global, N.Global): _fewer("g"),
    (N.Global, N.Sink): _fewer("g"),
    (N.Sink, N.Sink): _fewer("g"),
    (N.Last, N.Last): _fewer("g"),
    (N.Chunk, N.Chunk): lambda big, small, vb, vs: vb["c"] % vs["c"] == 0,
    (N.Stride, N.Stride): lambda big, small, vb, vs: vs["s"] % vb["s"] == 0,
    (N.Stride, N.Dilated): lambda big, small, vb, vs: vs["d"] % vb["s"] == 0,
}
# Node types that no rule takes as the smaller side: subsumed only by an equal node, full, or a
# band (by offset range) when they are one.
NO_SUBSUMES = (N.Full, N.Empty, N.Causal, N.Band, N.LogSparse, N.GlobalSet, N.Random, N.Where, N.Document,
               N.Lsh, N.Cluster, N.TopK, N.Union, N.Intersection, N.Difference, N.Heads, N.Blocks)


def subsumes(big: N.Pattern, small: N.Pattern) -> bool:
    """A sufficient test that every pair of `small` is a pair of `big`."""
    if big == small or isinstance(big, N.Full) or isinstance(small, N.Empty):
        return True
    a, b = offset_range(big), offset_range(small)
    if a and b:
        return a[0] <= b[0] and b[1] <= a[1]
    rule = SUBSUMES.get((type(big), type(small)))
    vb, vs = _consts(big), _consts(small)
    return rule is not None and vb is not None and vs is not None and bool(rule(big, small, vb, vs))


def _flatten(node, kind, identity) -> list:
    """The parts of an n-ary node with nested parts of the same kind spliced in, the identity
    (empty for +, full for &) and repeats dropped."""
    out = []
    for q in (q for p in node.parts for q in (p.parts if isinstance(p, kind) else (p,))):
        if not isinstance(q, identity) and q not in out:
            out.append(q)
    return out


def _keep_extremes(parts, redundant) -> list:
    """Drop each part made redundant by another (of two equivalent parts, the first stays)."""
    return [p for k, p in enumerate(parts)
            if not any(redundant(p, q) and (not redundant(q, p) or m < k) for m, q in enumerate(parts) if m != k)]


def _rebuild(node, parts, none):
    """node with these parts, the node itself when they are its own (so a fixed point is seen by
    identity, not by comparing two equal copies of a large pattern)."""
    if not parts:
        return none(span=node.span)
    if len(parts) == len(node.parts) and all(a is b for a, b in zip(parts, node.parts)):
        return node
    return parts[0] if len(parts) == 1 else type(node)(tuple(parts), span=node.span)


def _merge_bands(parts: list) -> list:
    """Bands (and causal) of a union whose offset ranges overlap or touch are one band."""
    for x, y in itertools.combinations(range(len(parts)), 2):
        a, b = offset_range(parts[x]), offset_range(parts[y])
        if a and b and a[0] <= b[1] + 1 and b[0] <= a[1] + 1:
            band = _band(min(a[0], b[0]), max(a[1], b[1]), parts[x])
            if band is not None:
                return _merge_bands(parts[:x] + [band] + parts[x + 1:y] + parts[y + 1:])
    return parts


def _union(u: N.Union) -> N.Pattern:
    parts = _flatten(u, N.Union, N.Empty)
    if any(isinstance(p, N.Full) for p in parts):
        return N.Full(span=u.span)
    parts = _merge_bands(parts)
    parts = _keep_extremes(parts, lambda p, q: subsumes(q, p))  # in a union the larger part stays
    return _rebuild(u, parts, N.Empty)


def _intersection(x: N.Intersection) -> N.Pattern:
    parts = _flatten(x, N.Intersection, N.Full)
    if any(isinstance(p, N.Empty) for p in parts):
        return N.Empty(span=x.span)
    ranges = [(offset_range(p), p) for p in parts]
    bands = [(r, p) for r, p in ranges if r]
    if len(bands) > 1:  # bands and causal meet in one offset range
        lo = max(r[0] for r, _ in bands)
        hi = min(r[1] for r, _ in bands)
        if lo > hi:
            return N.Empty(span=x.span)
        band = _band(lo, hi, bands[0][1])
        rest = [p for r, p in ranges if not r]
        parts = [band] + rest if band is not None else parts
    parts = _keep_extremes(parts, subsumes)  # in an intersection the smaller part stays
    return _rebuild(x, parts, N.Full)


def _difference(d: N.Difference) -> N.Pattern:
    if isinstance(d.right, N.Empty):
        return d.left
    if isinstance(d.left, N.Empty) or subsumes(d.right, d.left):
        return N.Empty(span=d.span)
    return d


def _heads(h: N.Heads) -> N.Pattern:
    return h.parts[0] if all(p == h.parts[0] for p in h.parts) else h


def _blocks(b: N.Blocks) -> N.Pattern:
    if isinstance(b.body, (N.Full, N.Empty)) or b.size == E.Const(1):
        return b.body
    if isinstance(b.body, N.Blocks) and isinstance(b.size, E.Const) and isinstance(b.body.size, E.Const):
        # floor(floor(i / a) / b) == floor(i / (a b)), and ceil(ceil(n / a) / b) == ceil(n / (a b))
        return N.Blocks(E.Const(b.size.value * b.body.size.value, span=b.size.span), b.body.body, span=b.span)
    return b


RULES: dict[type, Callable[[N.Pattern], N.Pattern]] = {
    N.Union: _union, N.Intersection: _intersection, N.Difference: _difference,
    N.Heads: _heads, N.Blocks: _blocks,
}


def _rewrite(p: N.Pattern, done: dict) -> N.Pattern:
    if id(p) not in done:   # a shared sub-pattern is rewritten once and stays shared
        q = p.map_children(lambda c: _rewrite(c, done))
        rule = RULES.get(type(q))
        done[id(p)] = (rule(q) if rule else q, p)
    return done[id(p)][0]


def simplify(body: N.Pattern) -> N.Pattern:
    """The rewrite rules above, repeated until nothing changes."""
    for _ in range(32):
        new = _rewrite(body, {})
        if new == body:
            break
        body = new
    return body


def canonicalize(d: Definition) -> Definition:
    """Flatten unions and intersections, merge bands (band & causal is a one-sided band), drop
    empty, full and subsumed terms, collapse nested blocks; repeated until nothing changes."""
    return replace(d, body=simplify(d.body))


