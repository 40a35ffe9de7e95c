"""Every pattern node of the IR under one roof, for the front end and the passes to import."""
from .content import Cluster, Lsh, TopK
from .pattern import Pattern
from .combinators import Blocks, Difference, Heads, Intersection, Union
from .positional import Band, Causal, Chunk, Dilated, Empty, Full, LogSparse, Stride
from .rows import Global, GlobalSet, Last, Sink
from .document import Document
from .random import Random
from .where import Where

__all__ = ["Band", "Blocks", "Causal", "Chunk", "Cluster", "Difference", "Dilated", "Document", "Empty",
           "Full", "Global", "GlobalSet", "Heads", "Intersection", "Last", "LogSparse", "Lsh", "Pattern",
           "Random", "Sink", "Stride", "TopK", "Union", "Where"]
