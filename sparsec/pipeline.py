"""The pipeline, listed once: each stage is one function, in order; SPARSEC_DEBUG=stage,... prints them.

    stage       subpackage  what it makes
    parse       grammar     .sa text -> syntax tree (lark LALR, spans on every node)
    elaborate   grammar     syntax tree -> IR Definition, params bound
    passes      passes      Definition -> canonical Definition (passes.PASSES, in order)
    shares      passes      canonical body -> disjoint shares, each run in one token order
    specialize  passes      a share's body -> its arguments evaluated for one call's lengths
    layout      layout      specialized body + call -> BlockLayout / DeviceLayout (layout.BUILDERS)
    emit        codegen     a share's body -> the source of its Triton module ("source")
    bind        runtime     all of the above -> a runner: the backend (generated kernels, CPU path or
                            FlexAttention) bound to one share of one call

`compile` runs the first three; a call runs the others per share (cached per shape where the
share reads no call input). `watching` sends a stage's output to any sink: SPARSEC_DEBUG sends
it to stderr, `sparsec emit` to stdout."""
from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable

from . import passes as P
from .codegen import Generated, TileConfig, emit_kernels
from .errors import Source
from .grammar import elaborate as Elab
from .grammar import syntax as S
from .ir.program import Definition
from .ir.tiles import TableSpace
from .layout import LayoutRequest, device_layout, host_layout
from .passes.shares import Share
from .passes.shares import split as split_body
from .runtime import cpu, flex, scores
from .runtime.call import Call
from .runtime.launch import GeneratedAttention, score_values, table_values
from .runtime.loader import load_kernel

STAGES = ("parse", "elaborate", "passes", "shares", "specialize", "layout", "emit", "bind")
ALIASES = {"source": "emit"}
_WATCHERS: list[tuple[frozenset, Callable[[str, str], None]]] = []


@contextmanager
def watching(stages, sink: Callable[[str, str], None]):
    """Within the block, sink(stage, text) receives the printed output of each named stage."""
    names = frozenset(ALIASES.get(s, s) for s in stages)
    unknown = names - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage {', '.join(sorted(unknown))}; the stages are {', '.join(STAGES)} "
                         f"(source = emit)")
    _WATCHERS.append((names, sink))
    try:
        yield
    finally:
        _WATCHERS.remove((names, sink))


def _debug_stages() -> frozenset:
    wanted = [s.strip() for s in os.environ.get("SPARSEC_DEBUG", "").split(",") if s.strip()]
    return frozenset(ALIASES.get(s, s) for s in wanted)


def trace(stage: str, show: Callable[[], str]) -> None:
    """Print a stage's output where asked (show is only called then)."""
    if not _WATCHERS and not os.environ.get("SPARSEC_DEBUG"):   # the common case, on every call
        return
    sinks = [sink for names, sink in _WATCHERS if stage in names]
    if stage in _debug_stages():
        sinks.append(lambda stage, text: print(f"--- {stage}:\n{text}", file=sys.stderr))
    if sinks:
        text = show()
        for sink in sinks:
            sink(stage, text)


# ---- the stages, in order ----

def parse(program: Source) -> S.Module:
    module = S.parse(program.text, program.filename)
    trace("parse", lambda: S.dump(module))
    return module


def elaborate(module: S.Module, pattern: str | None, params: dict[str, Any]) -> Definition:
    d = Elab.bind_params(Elab.elaborate(module, pattern), module, params)
    trace("elaborate", lambda: f"# {d.name}: as written\n{d.show()}")
    return d


def optimize(d: Definition) -> Definition:
    return P.optimize(d, lambda name, d: trace("passes", lambda: f"# after {name}\n{d.show()}"))


def split_shares(d: Definition) -> list[Share]:
    shares = split_body(d.body)
    trace("shares", lambda: "\n".join(
        f"# share {i} ({'positional order' if s.key is None else 'sorted by ' + s.key.show()})\n{s.body.show()}"
        for i, s in enumerate(shares)))
    return shares


def specialize(body, call: Call):
    out = P.specialize(body, call.n_q, call.n_k, call.q_offset, call.heads)
    trace("specialize", out.show)
    return out


def build_layout(r: LayoutRequest, cached, form: str = "device"):
    """The layout of one share for one call: form "device" (the kernels') or "host" (the CPU path's)."""
    lay = (device_layout if form == "device" else host_layout)(r, cached)
    trace("layout", lambda: f"share {r.share}: {lay!r}")
    return lay


def emit(name: str, body, score=None) -> Generated:
    gen = emit_kernels(Definition(name, (), body, score=score))
    trace("emit", lambda: gen.source)
    return gen


def bind(backend: str, r: LayoutRequest, call: Call, config: TileConfig, generated: Callable[[], Generated],
         cached, name: str, score=None):
    """The backend bound to one share of one call: its layout and tables (or CPU plan). score:
    the call's TorchScore (runtime/scores.py) when the pattern modifies its scores. The request's
    lengths are the pattern's; the call's are the rows of its tensors (fewer for a compact buffer
    of context parallelism, whose rows the order places; else the same)."""
    needs = r.body.inputs_read()
    positions = replace(call, n_q=r.n_q, n_k=r.n_k, q_offset=r.q_offset)
    shape = (r.share, config, *call.shape_key())

    def per_shape(what, make):
        """Cached by shape when the share reads no call input; else made per call."""
        return make() if needs else cached((what, *shape), make)

    if backend in ("cpu", "flex"):   # masks read content ids once computed, never q and k themselves
        known = {k: x for k, x in r.inputs.items() if "content" not in r.inputs or k not in ("q", "k")}
        space = TableSpace(r.n_q, r.n_k, r.q_offset, call.heads, call.batch, 1, known)
        rows = None if r.order is None else (r.order.q_pos.cpu().numpy(), r.order.k_pos.cpu().numpy())
        if backend == "cpu":
            plan = per_shape("plan", lambda: cpu.plan(r.body, build_layout(r, cached, "host"), space, call.kv_heads,
                                                      per_batch=bool(needs), order=rows))
            runner = cpu.CpuAttention(plan, call.scale, score, call.q_offset)
        else:
            mask = per_shape("block mask", lambda: flex.share_block_mask(
                r.body, build_layout(r, cached, "host"), space, rows, call.batch, call.heads, call.device))
            runner = flex.FlexAttention(mask, call.scale, score, None if score is None else functools.partial(
                scores.score_mod, score.expr, call.q_offset, call.n_q, call.n_k,
                positions=None if r.order is None else (r.order.q_pos.long(), r.order.k_pos.long())))
    else:
        interpret = backend == "interpret"
        gen = generated()
        module = load_kernel(gen, name, interpret)
        tables = per_shape("tables", lambda: table_values(gen, r.body, positions, r.inputs))
        runner = GeneratedAttention(module, build_layout(r, cached), tables, call, config, interpret,
                                    None if r.order is None else (r.order.q_pos, r.order.k_pos), score,
                                    [] if score is None else score_values(gen, score, call.device), gen.grads,
                                    None if positions == call else (r.n_q, r.n_k))
    trace("bind", lambda: f"share {r.share}: {backend} {config.show()}")
    return runner
