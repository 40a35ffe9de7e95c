"""Lowering of a with expression: the pattern_score helpers (S', dS'/dscore, the float inputs' gradients)."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..ir import derivative
from ..ir import expr as E
from ..ir.where import read_element, read_load
from .lowering import FAN_IN, Emitter, Lowering, TableParam

SCORE_NODE = -1   # the node number of the score tables: they belong to no pattern node
# an input's kernel table: the score is computed in fp32 as the dot's result is, a mask in exact integers
SCORE_DTYPES = {"bool": "int8", "int": "int64", "float": "float32"}


@dataclass
class ScoreEmitter(Emitter):
    """An Emitter for one helper, with its int64 coordinates bound once (Coordinates)."""
    coordinates: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoweredScore:
    """The helpers' source, the tables they read (per call, from the score's inputs) and the
    float inputs whose gradient pointers pattern_input_grads takes, in its signature's order."""
    source: str
    tables: tuple[TableParam, ...]
    grads: tuple[str, ...]


class Coordinates(Mapping):
    """score, i, j, h, b and the lengths as Triton sources, each bound to an int64 name on its
    first use in the helper (once): over the tile ("pair"), over its key columns alone ("keys": a
    read of j without i), its rows alone ("rows") or neither ("one")."""
    SOURCES = {"i": "pos", "j": "keys", "h": "h", "b": "b", "n": "LEN_K", "n_k": "LEN_K", "n_q": "LEN_Q"}

    def __init__(self, cx: Lowering, shape: str):
        self.cx, self.shape = cx, shape
        self.names = ["score", "h", "b", "n", "n_k", "n_q"] + (["i"] if shape in ("pair", "rows") else []) + \
            (["j"] if shape in ("pair", "keys") else [])

    def __getitem__(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(name)
        if name == "score":
            return "s"
        bound = self.cx.out.coordinates
        src = self.SOURCES[name]
        if src not in bound:
            bound[src] = self.cx.let(f"{src}.to(tl.int64)", f"{src.lower()}64_", hoist=True)
        if self.shape == "pair" and name in "ij":
            return f"{bound[src]}[:, None]" if name == "i" else f"{bound[src]}[None, :]"
        return bound[src]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def _table(cx: Lowering, key: str, pointer: bool, dtype: str = "int32") -> str:
    name = f"score_{key}"
    if not any(t.name == name for t in cx.out.tables):
        cx.out.tables.append(TableParam(name, SCORE_NODE, key, pointer, dtype=dtype))
    return name


def _read(cx: Lowering, e: E.Read, index: list[str]) -> str:
    return read_load(e, index, lambda *a: _table(cx, *a), cx.shallow, SCORE_DTYPES)


def _expression(cx: Lowering, e: E.Expr, shape: str = "pair") -> str:
    # real operators compute in fp32 here, as the scores themselves are (the mask's stay float64)
    src = E.to_triton(e, Coordinates(cx, shape), cx.shallow, FAN_IN, lambda r, index: _read(cx, r, index))
    return src.replace("_real(", "_real32(")


def _tile(cx: Lowering, e: E.Expr) -> str:
    """e over the tile as an fp32 (BLOCK_M, BLOCK_N) value, whatever its own shape."""
    return cx.let(f"({_expression(cx, e)}) + tl.zeros_like(s)", "t")


def _helper(signature: str, doc: str, out: Emitter, result: str | None) -> str:
    lines = out.hoisted + out.body + ([f"return {result}"] if result else [])
    return f"@triton.jit\ndef {signature}:\n    \"\"\"{doc}\"\"\"\n" + textwrap.indent("\n".join(lines) or "pass", "    ")


ARGS = "s, pos, keys, h, b, LEN_Q, LEN_K"


def lower_score(score: E.Expr | None) -> LoweredScore:
    """The three helpers of a with expression (for a pattern without one: S' = score, never called)."""
    if score is None:
        return LoweredScore(SCORELESS, (), ())
    tables: list[TableParam] = []   # shared by the three helpers: one parameter list

    def fresh() -> Lowering:
        return Lowering(ScoreEmitter(names={"s", "pos", "keys", "h", "b", "ds", "live"}, tables=tables))
    reads = derivative.float_read_nodes(score)
    grads = tuple(dict.fromkeys(r.decl.name for r in reads))
    value, slope, accumulate = fresh(), fresh(), fresh()
    s_prime = _tile(value, score)
    d_score = _tile(slope, derivative.derivative(score, E.Var("score")))
    for r in reads:
        _accumulate(accumulate, r, derivative.derivative(score, r))
    params = "".join(f", {t.name}" for t in tables)
    grad_params = "".join(f", GRAD_{name}" for name in grads)
    source = "\n\n\n".join([
        _helper(f"pattern_score({ARGS}{params})",
                f"S' = {E.show(score)} over one tile, from its raw scores s (qk * scale)", value.out,
                f"{s_prime}.to(tl.float32)"),
        _helper(f"pattern_score_grad({ARGS}{params})", "dS'/dscore over one tile", slope.out,
                f"{d_score}.to(tl.float32)"),
        _helper(f"pattern_input_grads(ds, live, {ARGS}{params}{grad_params})",
                "dLoss/dinput += ds * dS'/dinput over the pairs of one tile that count (live, ds != 0), "
                "by atomics: summed over the tile's rows first where a read does not depend on i",
                accumulate.out, None)])
    return LoweredScore(source + "\n", tuple(tables), grads)


def _accumulate(cx: Lowering, r: E.Read, d: E.Expr) -> None:
    """The atomic adds of one float read: ds * d per pair, reduced over the axes its index does
    not depend on, into GRAD_<input> at the read's (in-range) element."""
    used = set().union(*(E.names(a) for a in r.index))
    shape = "pair" if {"i", "j"} <= used else "rows" if "i" in used else "keys" if "j" in used else "one"
    per_pair = cx.let(f"tl.where(live & (ds != 0), ds * {_tile(cx, d)}, 0.0)", "g")  # 0 * inf is 0 here
    value = {"pair": per_pair, "rows": f"tl.sum({per_pair}, 1)", "keys": f"tl.sum({per_pair}, 0)",
             "one": f"tl.sum(tl.sum({per_pair}, 1), 0)"}[shape]
    offset, inside = read_element(r, [_expression(cx, a, shape) for a in r.index], lambda *a: _table(cx, *a),
                                  cx.shallow)
    target = f"GRAD_{r.decl.name} + {offset}" if inside is None else \
        f"GRAD_{r.decl.name} + tl.where({inside}, {offset}, 0)"
    cx.out.body.append(f"tl.atomic_add({target}, {value}" + ("" if inside is None else f", mask={inside}") + ")")


SCORELESS = f'''@triton.jit
def pattern_score({ARGS}):
    """No with expression: S' = score (the kernels take their unscored path and never call these)."""
    return s


@triton.jit
def pattern_score_grad({ARGS}):
    return s * 0 + 1.0


@triton.jit
def pattern_input_grads(ds, live, {ARGS}):
    pass
'''
