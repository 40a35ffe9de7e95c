"""sparsec: a compiler for sparse attention patterns written in the .sa language."""
from .codegen import TileConfig
from .compiled import CompiledPattern, compile
from .errors import SparsecError
from .layout import BlockLayout
from .module import SparseSelfAttention

__all__ = ["BlockLayout", "CompiledPattern", "SparseSelfAttention", "SparsecError", "TileConfig", "compile"]
__version__ = "0.1.0"
