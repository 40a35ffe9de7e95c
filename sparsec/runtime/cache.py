"""The cache directory: where tuned tile configs persist, what is trusted there, and its one error.

Trust model (docs/design.md, "The cache"): nothing read from the cache decides what code runs.
Generated kernels are executed from the source text this process generated (runtime.load_kernel),
never imported from a file, and no bytecode is read or written. The one file kept here,
tuning.json, holds tile choices; every entry is checked against TileConfig's rules before use
(tuning.TuningCache), so a planted entry can at worst pick a slower valid tiling, which never
changes a result. The directory is made 0700 and files 0600, so other users cannot even do that.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import SparsecError

ENV = "SPARSEC_CACHE_DIR"


class CacheError(SparsecError, OSError):
    """The cache directory cannot be used (read-only, a file in its place, a full disk, ...)."""


def cache_dir() -> Path:
    """$SPARSEC_CACHE_DIR, else $XDG_CACHE_HOME/sparsec, else ~/.cache/sparsec."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsec"


def _fault(path: Path, what: str, error: OSError) -> CacheError:
    reason = error.strerror or type(error).__name__
    return CacheError(f"cannot {what} the sparsec cache {path.parent} ({reason}); make it a writable "
                      f"directory, or point {ENV} at one")


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file (0600) and a rename, so that concurrent processes never read
    half a file; the directory is created 0700. Any OS failure removes the temporary file and
    raises one CacheError that names the directory and the remedy."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise _fault(path, "create", e) from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _fault(path, "write to", e) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
