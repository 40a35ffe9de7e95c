"""A content-based pattern split into disjoint shares, each run in one token order.

lsh and cluster allow a pair when q's and k's buckets agree, so with q and k sorted by bucket
their pairs gather into tiles near the diagonal, and a layout of bucket ranges skips the rest.
One order serves one bucketing: a union whose terms bucket differently (cluster + band, or the
rounds of a multi-round lsh) is cut into shares. Share s computes term s minus the terms before
it, so the shares are disjoint and cover the union; the runtime merges their outputs by their
log-sum-exp, which is exactly attention over the union (routing.merge_by_lse)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from .. import passes
from ..ir import expr as E
from ..ir.content import Cluster, Lsh, LshRound, TopK
from ..ir.document import Document
from ..ir.random import Random
from ..ir.where import Where
from ..ir.pattern import Pattern
from ..ir.combinators import Blocks, Difference, Heads, Intersection, Union
from ..ir.positional import Chunk, Empty, OffsetPattern
from ..ir.rows import RowsOrColumns


@dataclass(frozen=True)
class Share:
    """One share: `key` is the lsh round or cluster whose buckets order q and k (None: the
    positional order); `body` is the pairs it computes; with `full`, the body is the key alone,
    so tiles whose q and k rows all hold one and the same bucket are FULL."""
    key: Pattern | None
    body: Pattern
    full: bool


def sort_key(p: Pattern) -> Pattern | None:
    """p itself when it is one bucketing (cluster, an lsh round, a one-round lsh), else None."""
    if isinstance(p, (Cluster, LshRound)) or (isinstance(p, Lsh) and p.rounds == E.Const(1)):
        return p
    return None


def _bucketed(p: Pattern) -> bool:
    return any(isinstance(n, (Lsh, Cluster)) for n in p.nodes())


def _heads_terms(p: Heads) -> list[Pattern]:
    """One term per (slot, term of its part), the other slots empty."""
    return [Heads(tuple(t if j == i else Empty(span=p.span) for j in range(len(p.parts))), span=p.span)
            for i, part in enumerate(p.parts) for t in terms(part)]


def _lsh_terms(p: Lsh) -> list[Pattern]:
    """A multi-round lsh with a constant round count: one term per round."""
    if isinstance(p.rounds, E.Const) and p.rounds.value > 1:
        return [LshRound(p.buckets, p.rounds, p.seed, r, span=p.span) for r in range(p.rounds.value)]
    return [p]


# How a node that holds a bucketing is written as a union of terms, by node type.
TERMS = {
    Union: lambda p: [t for part in p.parts for t in terms(part)],
    Intersection: lambda p: [passes.simplify(Intersection(combo, span=p.span))
                             for combo in itertools.product(*(terms(part) for part in p.parts))],
    Difference: lambda p: [Difference(t, p.right, span=p.span) for t in terms(p.left)],
    Heads: _heads_terms,
    Lsh: _lsh_terms,
}
NO_TERMS = (OffsetPattern, RowsOrColumns, Chunk, Random, Where, Document, LshRound, Cluster, TopK,
            Blocks)   # a term as they are (blocks: content parts are token-level, rejected inside it)


def terms(p: Pattern) -> list[Pattern]:
    """p as a union of terms, distributing & (and the left of -) over +, heads(...) over its
    slots and splitting lsh rounds, only where that can bring a bucketing to the top of a term."""
    rule = TERMS.get(type(p))
    return rule(p) if rule is not None and _bucketed(p) else [p]


def _heads_key(term: Heads) -> Pattern | None:
    used = [p for p in term.parts if not isinstance(p, Empty)]
    return key_of(used[0]) if len(used) == 1 else None


# The bucketing a term runs sorted by, by node type (bucketings themselves: sort_key).
KEY_OF = {
    Difference: lambda term: key_of(term.left),
    Heads: _heads_key,
    Intersection: lambda term: next((k for k in map(key_of, term.parts) if k is not None), None),
}
NO_KEY_OF = (OffsetPattern, RowsOrColumns, Chunk, Random, Where, Document, TopK, Union, Blocks)   # no key
# (Lsh, LshRound and Cluster are their own key through sort_key.)


def key_of(term: Pattern) -> Pattern | None:
    """The bucketing a term is an intersection with (the first, if several); for `a - b`, a's;
    for heads(...) with one slot in use, its slot's; else None."""
    if sort_key(term) is not None:
        return term
    rule = KEY_OF.get(type(term))
    return rule(term) if rule is not None else None


def active_heads(body: Pattern, heads: int) -> list[bool] | None:
    """Which heads a (specialized) share body can allow a pair in: False where every heads(...)
    slot it reaches for that head makes it empty; None when it has no heads(...)."""
    if not any(isinstance(n, Heads) for n in body.nodes()):
        return None
    pick = lambda p, h: pick(p.pick(h), h) if isinstance(p, Heads) else p.map_children(lambda c: pick(c, h))
    return [not isinstance(passes.simplify(pick(body, h)), Empty) for h in range(heads)]


def offset_bounds(body: Pattern) -> tuple[float, float] | None:
    """[lo, hi] that p - j lies in for every pair of a (specialized) share body, from the bands
    and causal it is an intersection with; None when it has none. A sorted share's tiles hold
    scattered positions, but a tile whose position ranges miss [lo, hi] holds no pair."""
    if isinstance(body, Difference):
        return offset_bounds(body.left)
    ranges = [r for r in map(passes.offset_range, body.parts if isinstance(body, Intersection) else (body,)) if r]
    if not ranges:
        return None
    return max(lo for lo, _ in ranges), min(hi for _, hi in ranges)


def split(body: Pattern) -> list[Share]:
    """The shares of an optimized body: first the terms in positional order (one share), then one
    share per bucketing. A body with no bucketing at the top of a term is one positional share
    (its content parts are then PARTIAL tiles everywhere: exact, at dense cost)."""
    groups: dict[Pattern | None, list[Pattern]] = {None: []}
    for t in terms(body):
        groups.setdefault(key_of(t), []).append(t)
    if list(groups) == [None]:
        return [Share(None, body, False)]
    shares, before = [], []
    for key, group in groups.items():
        if not group:
            continue
        part = group[0] if len(group) == 1 else Union(tuple(group), span=body.span)
        earlier = before[0] if len(before) == 1 else Union(tuple(before), span=body.span)
        shares.append(Share(key, Difference(part, earlier, span=body.span) if before else part,
                            key is not None and part == key and not before))
        before.extend(group)
    return shares
