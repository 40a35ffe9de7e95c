"""Which builder makes a share's layout for a call: one ordered table, scanned top to bottom."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ir.pattern import Pattern
from ..ir.tiles import FIXED_INPUTS, TableSpace
from ..passes.shares import active_heads, offset_bounds
from .block import BlockLayout, DeviceLayout
from .build import build_layout
from . import input_tiles
from .documents import DocumentLayouts, static_part
from .placed import Placement
from .selections import SelectionLayouts, supported
from .sorted import SortedOrder

Cached = Callable[[tuple, Callable], object]   # (key, make) -> the value, made once per key


@dataclass(frozen=True)
class LayoutRequest:
    """One share of one call at one tile size: what a layout is built for. body is the share's
    specialized body; full says the share is its bucketing alone (sorted tiles may be FULL);
    inputs: the call's inputs by name (the builders read segment_ids and content, the ids and
    selections of its content parts); order: a sorted share's order, or the Placement of a compact
    buffer's rows (placed.py), else None."""
    share: int
    body: Pattern
    full: bool
    n_q: int
    n_k: int
    q_offset: int
    heads: int
    batch: int
    block_m: int
    block_n: int
    device: torch.device
    inputs: dict
    order: SortedOrder | Placement | None = None

    def shape(self) -> tuple:
        """The key of what a layout of a share that reads no call input depends on."""
        return (self.share, self.block_m, self.block_n, self.n_q, self.n_k, self.q_offset, self.heads, self.device)


def _sorted(r: LayoutRequest, cached: Cached) -> DeviceLayout:
    """Tiles whose bucket ranges meet, less those its bands, causal or heads(...) slots rule out."""
    offsets, heads = cached(("sorted", *r.shape()),
                            lambda: (offset_bounds(r.body), active_heads(r.body, r.heads)))
    return r.order.layout(r.block_m, r.block_n, r.full, offsets, r.q_offset, heads)


def _selection(r: LayoutRequest, cached: Cached) -> DeviceLayout:
    """The top-k selection's tiles combined with the static parts' class grids (kept per shape)."""
    static = cached(("selections", *r.shape()), lambda: SelectionLayouts.of(
        r.body, r.n_q, r.n_k, r.q_offset, r.block_m, r.block_n, r.heads, r.device))
    return static.build(r.inputs["content"], r.batch)


def _document(r: LayoutRequest, cached: Cached) -> DeviceLayout:
    """`document & X`: X's tiles once per shape, intersected with each tile's segment range."""
    (static,) = static_part(r.body)
    documents = cached(("documents", *r.shape()), lambda: DocumentLayouts.of(
        None if static is None else build_layout(static, r.n_q, r.n_k, r.block_m, r.block_n, r.q_offset, r.heads),
        r.n_q, r.n_k, r.q_offset, r.block_m, r.block_n, r.device))
    return documents.build(r.inputs["segment_ids"])


def _content_host(r: LayoutRequest, cached: Cached) -> BlockLayout:
    """Content parts beside a document: the analytic build, per batch row."""
    space = TableSpace(r.n_q, r.n_k, r.q_offset, r.heads, r.batch, 1,
                       {name: r.inputs[name] for name in ("segment_ids", "content") if name in r.inputs})
    return build_layout(r.body, r.n_q, r.n_k, r.block_m, r.block_n, r.q_offset, r.heads, space=space)


def _declared(r: LayoutRequest) -> bool:
    return any(name not in FIXED_INPUTS for name in r.body.inputs_read())


def _declared_device(r: LayoutRequest, cached: Cached) -> DeviceLayout:
    """A pattern whose input-reading parts have device rules (input_tiles.py): built per call on
    the inputs' device, its static parts once per shape."""
    inputs = {name: torch.as_tensor(x, device=r.device) for name, x in r.inputs.items() if name not in FIXED_INPUTS}
    inputs = {name: x.double() if x.is_floating_point() else x for name, x in inputs.items()}   # compared exactly
    space = input_tiles.Space(r.n_q, r.n_k, r.q_offset, r.block_m, r.block_n, r.batch,
                              r.heads if r.body.varies_with_head() else 1, r.device, inputs)
    return input_tiles.build(r.body, space, cached)


def _declared_host(r: LayoutRequest, cached: Cached) -> BlockLayout:
    """A pattern that reads declared inputs: the analytic build per batch row, each where(...)
    reading them classified from their values per tile (ir/intervals.py), never pair by pair."""
    space = TableSpace(r.n_q, r.n_k, r.q_offset, r.heads, r.batch, 1, dict(r.inputs))
    return build_layout(r.body, r.n_q, r.n_k, r.block_m, r.block_n, r.q_offset, r.heads, space=space)


def _static_host(r: LayoutRequest, cached: Cached) -> BlockLayout:
    """The analytic build (segment ids copied to the host when the pattern reads them)."""
    seg = r.inputs.get("segment_ids")
    return build_layout(r.body, r.n_q, r.n_k, r.block_m, r.block_n, r.q_offset, r.heads,
                        None if seg is None else seg.cpu().numpy())


@dataclass(frozen=True)
class Builder:
    """A way to build a layout: when it applies, and its device form, host form or both (a
    missing form is the other one copied: device -> host, or host -> device)."""
    name: str
    applies: Callable[[LayoutRequest], bool]
    device: Callable[[LayoutRequest, Cached], DeviceLayout] | None = None
    host: Callable[[LayoutRequest, Cached], BlockLayout] | None = None


def _document_static(r: LayoutRequest) -> bool:
    return r.body.inputs_read() == {"segment_ids"} and static_part(r.body) is not None


BUILDERS: tuple[Builder, ...] = (
    Builder("placed rows", lambda r: isinstance(r.order, Placement), host=lambda r, cached: r.order.tiles(
        r.block_m, r.block_n)),
    Builder("sorted share", lambda r: r.order is not None, device=_sorted),
    Builder("top-k selection", lambda r: supported(r.body), device=_selection),
    Builder("document & static", _document_static, device=_document, host=_static_host),
    Builder("content beside document", lambda r: bool({"q", "k"} & r.body.inputs_read()), host=_content_host),
    Builder("declared inputs on the device", lambda r: _declared(r) and input_tiles.supported(r.body),
            device=_declared_device, host=_declared_host),
    Builder("declared inputs", _declared, host=_declared_host),
    Builder("static", lambda r: True, host=_static_host),
)


def choose(r: LayoutRequest, cached: Cached) -> Builder:
    """The first builder that applies, decided once per share and shape (the tests walk the body)."""
    return cached(("builder", *r.shape(), type(r.order).__name__), lambda: next(b for b in BUILDERS if b.applies(r)))


def device_layout(r: LayoutRequest, cached: Cached) -> DeviceLayout:
    """The share's layout on the call's device, by the first builder that applies; a host build
    of a share that reads no call input is made once per shape."""
    builder = choose(r, cached)
    if builder.device is not None:
        return builder.device(r, cached)
    make = lambda: builder.host(r, cached).to(r.device)
    return cached(("layout", *r.shape()), make) if not r.body.inputs_read() else make()


def host_layout(r: LayoutRequest, cached: Cached) -> BlockLayout:
    """The same layout as a host BlockLayout (what the CPU path plans from)."""
    builder = choose(r, cached)
    if builder.host is not None:
        return builder.host(r, cached)
    return builder.device(r, cached).to_host(r.n_q, r.n_k, r.q_offset)
