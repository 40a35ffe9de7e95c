"""document: packed sequences attend within their segment (a key match of segment_ids)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import conditions
from .pattern import Pattern
from .tiles import input_value


@dataclass(frozen=True, eq=False)
class Document(conditions.MatchedKeys, Pattern):
    """segment_ids[b, p] == segment_ids[b, j]: packed sequences attend within their document."""
    keyword: ClassVar[str] = "document"
    needs: ClassVar[frozenset[str]] = frozenset({"segment_ids"})
    token_level: ClassVar[bool] = True

    def _ids(self, inputs, lo, hi):
        seg = np.asarray(input_value(inputs, "segment_ids", "document"))
        if len(lo) and (lo.min() < 0 or hi.max() >= len(seg)):
            raise ValueError(f"document: query positions {lo.min()}..{hi.max()} fall outside segment_ids "
                             f"of length {len(seg)}; segment_ids must have shape (B, n_k) and q_offset >= 0")
        return seg

    def mask(self, grid):
        seg = self._ids(grid.inputs, grid.pos, grid.pos)
        return seg[grid.pos][:, None] == seg[grid.keys][None, :]

    def sides(self, t) -> conditions.Sides:
        """A key match of the ids at the query positions with the ids at the keys (conditions.py):
        packed (sorted) ids give each query tile one key range, found by binary search."""
        seg = self._ids(t.inputs, t.q_lo, t.q_hi)
        rows, keys = conditions.coordinates(t.q_lo, t.q_hi), np.arange(len(seg))
        return conditions.Sides.of(t, rows, seg[rows], keys, seg)

    def cost(self, env):
        return env["n"] ** 2  # depends on the documents: an upper bound

    def lower(self, cx):
        ids, stride = cx.table(self, "ids", dtype="int64"), cx.table(self, "stride", pointer=False)
        mine = cx.let(f"{ids} + {cx.batch}.to(tl.int64) * {stride}", "document_ids", hoist=True)
        rows = cx.let(f"tl.load({mine} + {cx.rows}, mask=({cx.rows} >= 0) & ({cx.rows} < {cx.n_k}), other=-1)",
                      "document_rows", hoist=True)
        cols = cx.let(f"tl.load({mine} + {cx.cols}, mask={cx.cols} < {cx.n_k}, other=-2)", "document_cols")
        return f"({rows}[:, None] == {cols}[None, :])"

    def tables(self, space):
        seg = space.inputs["segment_ids"]  # (B, n_k), int64 as given (never narrowed: ids may be huge)
        return {"ids": seg, "stride": seg.shape[1]}
