"""Code generation: a share's optimized body -> lowered predicate -> the source of its Triton module."""
from .emit import VERSION, Generated, emit_kernels
from .lowering import Lowering, TableParam, lower
from .tile_config import TileConfig

__all__ = ["VERSION", "Generated", "Lowering", "TableParam", "TileConfig", "emit_kernels", "lower"]
