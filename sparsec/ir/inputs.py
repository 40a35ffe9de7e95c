"""Call-time inputs declared by a program (`input NAME(DIMS) TYPE`): their shape rule, read by Read expressions."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import Span, SparsecError
from .limits import POSITIONS, SATURATED

TYPES = ("bool", "int", "float")   # an int input holds int32 values (expr.INPUT_INT_RANGE), checked per call


@dataclass(frozen=True)
class InputDecl:
    """A tensor the caller passes by name: one axis per dim, a dim being "b" (batch), "h" (query
    head), both of which may be given as 1 (broadcast), or an integer expression of n, n_q, n_k
    and params. A read outside the extent is 0 / false."""
    name: str
    dims: tuple  # of "b", "h" or an E.Expr
    dtype: str   # bool | int | float
    span: Span | None = field(default=None, compare=False, repr=False)

    def show(self) -> str:
        from . import expr as E
        dims = ", ".join(d if isinstance(d, str) else E.show(d) for d in self.dims)
        return f"input {self.name}({dims}) {self.dtype}"

    def kind(self) -> str:
        return "bool" if self.dtype == "bool" else "num"

    def broadcast(self) -> tuple[bool, ...]:
        """Per axis: whether it is a b or h axis (size 1 allowed)."""
        return tuple(d in ("b", "h") for d in self.dims)


def read(array: np.ndarray, decl: InputDecl, index: list) -> np.ndarray:
    """array[index] elementwise with broadcasting, 0 / false outside the array's extent; a b or h
    axis of size 1 is read at 0 whatever the index."""
    index = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in index))
    ok = np.ones(index[0].shape, bool)
    at = []
    for x, size, wide in zip(index, array.shape, decl.broadcast()):
        if wide and size == 1:
            at.append(np.zeros_like(x))
            continue
        ok &= (x >= 0) & (x < size)
        at.append(np.clip(x, 0, max(size - 1, 0)))
    if array.size == 0:
        return np.zeros(index[0].shape, array.dtype)
    return np.where(ok, array[tuple(at)], np.zeros((), array.dtype))


_KINDS = {"bool": ("b",), "int": ("i", "u"), "float": ("f",)}


def expected_shape(decl: InputDecl, batch: int, heads: int, lengths: dict) -> tuple[int, ...]:
    """The full shape an array for decl must have (b and h axes may instead be 1)."""
    from . import expr as E
    sizes = {"b": batch, "h": heads}
    out = tuple(sizes[d] if isinstance(d, str) else E.integer(d, lengths) for d in decl.dims)
    for d, size in zip(decl.dims, out):
        if size < 0 or size > POSITIONS:   # reads index positions and blocks: no axis needs more
            raise SparsecError(f"input {decl.name}: this dim is {size} here; an input's dims must be within "
                               f"0..2**30", d.span or decl.span)
    return out


def check_arrays(pattern: str, decls: tuple[InputDecl, ...], given: dict, heads: int, lengths: dict
                 ) -> tuple[dict, int]:
    """The declared inputs as given (numpy arrays, by name), checked: every one present, no
    other, rank, sizes (a b or h axis of size 1 broadcasts), dtype kind, and int values within
    int32's range. Returns (arrays, batch): the batch is the largest b axis given (1 if none)."""
    names = [d.name for d in decls]
    for name in given:
        if name not in names:
            raise ValueError(f"{name}= given, but pattern {pattern} reads no input of that name"
                             + (f" (it reads {', '.join(names)})" if names else ""))
    for d in decls:
        if given.get(d.name) is None:
            raise ValueError(f"pattern {pattern} reads the input {d.name}: pass {d.name}= ({d.show()[6:]})")
    batch = max([given[d.name].shape[k] for d in decls if len(given[d.name].shape) == len(d.dims)
                 for k, dim in enumerate(d.dims) if dim == "b"], default=1)
    out = {}
    for d in decls:
        x = given[d.name]
        want = expected_shape(d, batch, heads, lengths)
        ok = x.ndim == len(want) and all(
            got == size or (wide and got == 1) for got, size, wide in zip(x.shape, want, d.broadcast()))
        if not ok:
            dims = ", ".join(f"{dim}={size}" if isinstance(dim, str) else str(size) for dim, size in zip(d.dims, want))
            raise ValueError(f"{d.name} must have shape ({dims}) (b and h may be 1), got {tuple(x.shape)}")
        if x.dtype.kind not in _KINDS[d.dtype]:
            raise TypeError(f"{d.name} is declared {d.dtype}, got an array of {x.dtype}")
        if d.dtype == "int" and x.size and (x.min() < -SATURATED or x.max() > SATURATED):   # expr.INPUT_INT_RANGE
            raise ValueError(f"{d.name}: int inputs hold values within +-(2**31 - 1), got {x.min()}..{x.max()}")
        out[d.name] = x
    return out, batch
