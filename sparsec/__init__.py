"""sparsec: a compiler for sparse attention patterns written in the .sa language."""
from .compiled import CompiledPattern, compile
from .errors import SparsecError
from .layout import BlockLayout

__all__ = ["BlockLayout", "CompiledPattern", "SparsecError", "compile"]
__version__ = "0.1.0"
