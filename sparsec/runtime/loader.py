"""Generated modules executed from the text generated in this process (never from disk)."""
from __future__ import annotations

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
