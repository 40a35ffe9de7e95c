"""Generated modules executed from the text generated in this process (never from disk)."""
from __future__ import annotations

import importlib.util
import linecache
import os
import sys
import types
from contextlib import contextmanager

from ..codegen import Generated


@contextmanager
def interpreting(on: bool):
    """triton.jit reads TRITON_INTERPRET when it decorates and when it launches."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _import_triton_for_the_interpreter() -> None:
    """Triton's interpreter runs a kernel's calls of triton.language's own jit functions (tl.max,
    tl.sum, tl.zeros) only if those were made while TRITON_INTERPRET=1, that is, if triton was
    first imported so. torch._dynamo imports triton (plainly) on the first custom-op call, which
    is every sparsec call. So on a machine without CUDA, where the interpreter is the only way to
    run a generated kernel, triton is imported now, in interpreter mode; a TRITON_INTERPRET the
    user set, or a triton already imported, is left alone (docs/design.md, "torch.compile")."""
    import torch
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None \
            or torch.cuda.is_available():
        return
    with interpreting(True):
        import triton.language  # noqa: F401


def _check_interpreter_ready() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError("backend='interpret' needs Triton imported in interpreter mode, but this process "
                           "imported triton for the compiler first (torch.compile and torch._dynamo import it); "
                           "set TRITON_INTERPRET=1 before the first import, or import sparsec first on a "
                           "machine without CUDA")


_import_triton_for_the_interpreter()
_MODULES: dict[tuple[str, bool], object] = {}


class _GeneratedSource:
    """The loader of a generated module: it hands out the text generated in this process, so
    that Triton (which reads a kernel's source through inspect and linecache) and tracebacks see
    exactly what runs, and nothing on disk is ever consulted."""

    def __init__(self, text: str):
        self.text = text

    def get_source(self, name: str) -> str:
        return self.text


def load_kernel(gen: Generated, name: str, interpret: bool):
    """The generated module, executed from gen.source itself (the text codegen returned, never a
    file read back, no bytecode), once per digest and mode. Its functions report the filename
    <sparsec:NAME_DIGEST>, registered in linecache for inspect and tracebacks."""
    key = (gen.digest, interpret)
    if interpret and key not in _MODULES:
        _check_interpreter_ready()
    if key not in _MODULES:
        module_name = f"sparsec_generated_{gen.digest}_{'interpret' if interpret else 'jit'}"
        filename = f"<sparsec:{name[:40]}_{gen.digest}>"
        module = types.ModuleType(module_name)
        module.__file__, module.__loader__ = filename, _GeneratedSource(gen.source)
        linecache.cache[filename] = (len(gen.source), None, gen.source.splitlines(True), filename)
        code = compile(gen.source, filename, "exec", dont_inherit=True)
        with interpreting(interpret):
            sys.modules[module_name] = module
            exec(code, module.__dict__)
            if interpret:   # the interpreter reads each function's source on first use: do it now
                from triton.runtime.interpreter import InterpretedFunction
                for fn in list(vars(module).values()):
                    if isinstance(fn, InterpretedFunction):
                        fn.rewrite()
        _MODULES[key] = module
    return _MODULES[key]
