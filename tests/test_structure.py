"""The shape of the package: imports flow one way between stages, off-node views cover every node type."""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import sparsec
from sparsec.ir import nodes
from sparsec.ir.content import LshRound
from sparsec.ir.pattern import Pattern
from sparsec.ir.tiles import Tiling
from sparsec.layout import documents, selections
from sparsec.passes import canonical, shares
from sparsec.runtime import content

PACKAGE = Path(sparsec.__file__).parent
# Each stage may import its own and earlier stages only (the top level is the public face).
RANK = {"errors": 0, "ir": 1, "grammar": 2, "passes": 3, "layout": 4, "codegen": 5, "runtime": 6, "": 7, "tools": 8, "integrations": 8, "distributed": 8}
FORBIDDEN = {"ir": {"torch", "lark", "triton"}, "grammar": {"torch", "triton"}, "passes": {"torch", "lark", "triton"},
             "layout": {"lark", "triton"}, "codegen": {"torch", "lark"}}


def stage_of(module: str) -> str:
    """sparsec.layout.block -> layout; sparsec.compiled -> '' (the top level); sparsec.errors -> errors."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "__main__":   # python -m sparsec: the command line
        return "tools"
    return parts[0] if parts[0] in RANK else ""


def imports(path: Path):
    """(absolute module, line) of every import in the file, function-level ones included."""
    name = ".".join(("sparsec",) + path.relative_to(PACKAGE).with_suffix("").parts)
    package = name.split(".")[:-1]   # a module's package; for __init__, the package itself
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:   # from . import x: each x is a module
                for a in node.names:
                    yield f"{module}.{a.name}", node.lineno
            else:
                yield module, node.lineno


def test_imports_flow_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = ".".join(("sparsec",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for module, line in imports(path):
            where = f"{path.relative_to(PACKAGE)}:{line} imports {module}"
            if module.split(".")[0] in FORBIDDEN.get(stage_of(here), ()):
                wrong.append(where)
            if module.startswith("sparsec") and RANK[stage_of(module)] > RANK[stage_of(here)]:
                wrong.append(where)
    assert not wrong, "\n".join(wrong)


def test_the_import_check_can_fail(tmp_path):
    """A layout module importing the runtime is caught (the check reads real files)."""
    bad = PACKAGE / "layout" / "_probe_bad_import.py"
    bad.write_text("from ..runtime import call\n")
    try:
        with pytest.raises(AssertionError, match="_probe_bad_import"):
            test_imports_flow_one_way()
    finally:
        bad.unlink()


def node_types() -> set[type]:
    """Every node type a specialized share body can hold: what elaboration builds, and the rounds
    the shares split an lsh into. (The condition nodes of where(...) live inside its tiles only.)"""
    return {getattr(nodes, name) for name in nodes.__all__ if name != "Pattern"} | {LshRound}


def covered(node: type, table, declared: tuple) -> bool:
    assert Pattern not in declared, "declaring Pattern itself would cover everything"
    return node in table or any(issubclass(node, base) for base in declared)


# (view, the node types it has a rule for, the node types declared to have none)
VIEWS = [
    ("runtime.content.CONTENT_VALUES", content.CONTENT_VALUES, content.NO_CONTENT_VALUES),
    ("layout.selections.SELECTION_TILES", selections.SELECTION_TILES, selections.NO_SELECTION_TILES),
    ("layout.documents.STATIC_PART", documents.STATIC_PART, documents.NO_STATIC_PART),
    ("passes.canonical.SUBSUMES (smaller side)", {small for _, small in canonical.SUBSUMES}, canonical.NO_SUBSUMES),
    ("passes.shares.TERMS", shares.TERMS, shares.NO_TERMS),
    ("passes.shares.KEY_OF", shares.KEY_OF, shares.NO_KEY_OF + (LshRound, nodes.Lsh, nodes.Cluster)),
]


@pytest.mark.parametrize("name, table, declared", VIEWS, ids=[v[0] for v in VIEWS])
def test_every_node_type_is_in_each_view_or_declared_unsupported(name, table, declared):
    assert {LshRound, nodes.Band, nodes.Where} <= node_types()
    missing = sorted(t.__name__ for t in node_types() if not covered(t, table, declared))
    assert not missing, f"{name}: no rule and not declared unsupported: {missing}"


def test_a_new_node_type_must_be_placed_in_each_view():
    """The check can fail: a node type no view knows is reported by every view."""
    @dataclasses.dataclass(frozen=True, eq=False)
    class Novel(Pattern):
        keyword = "novel"
    for name, table, declared in VIEWS:
        assert not covered(Novel, table, declared), name


def test_a_node_without_tiles_or_classify_says_so():
    """Neither default recurses into the other forever."""
    @dataclasses.dataclass(frozen=True, eq=False)
    class Bare(Pattern):
        keyword = "bare"
    t = Tiling.regular(8, 8, 4, 4, 0)
    with pytest.raises(NotImplementedError, match="Bare defines neither tiles nor classify"):
        Bare().tiles(t)
    with pytest.raises(NotImplementedError, match="Bare defines neither"):
        Bare().classify(t, np.zeros(1, np.int64), np.zeros(1, np.int64))
