"""The pattern library shipped inside the package (sparsec.patterns): names, files and what their headers say."""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")   # a bare library name: never a program (which says `pattern`)


@dataclass(frozen=True)
class Entry:
    """One library file. name: its stem, what `sparsec.compile(name)` takes; system and summary:
    its header's first line, split at the colon; paper: its Paper:/References: paragraph; density:
    its header's `# density:` line, checked by tests/test_library.py (n, heads, the fraction of
    pairs allowed, whether approximate, and the inputs it was taken on)."""
    name: str
    path: str
    system: str
    summary: str
    paper: str
    density: tuple[int, int, float, bool, str] | None


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _entry(resource) -> Entry:
    header = _header(resource.read_text())
    system, _, summary = (header[0] if header else "").partition(": ")
    paper, taking = [], False
    for line in header[1:]:
        if re.match(r"(Paper|References?):", line):
            taking, line = True, line.split(":", 1)[1].strip()
        elif taking and (not line or re.match(r"[A-Z][a-z ]+$", line)):   # a blank line or the next heading
            break
        if taking:
            paper.append(line)
    return Entry(resource.name.removesuffix(".sa"), str(resource), system, summary, " ".join(paper), _density(header))


def _density(header: list[str]):
    stated = {k: v for line in header if line.startswith("density") for k, v in re.findall(r"([\w-]+)=(\S+)", line)}
    if "n" not in stated:
        return None
    value = stated.get("value", stated.get("approx"))
    inputs = " ".join(f"{k}={v}" for k, v in stated.items() if k in ("segment_len", "qk", "D", "B", "seed"))
    return int(stated["n"]), int(stated["heads"]), float(value), "approx" in stated, inputs


def _folder():
    """The installed package data; in a checkout put on PYTHONPATH without installing (the GPU
    machine's runs, scripts/gpu.sh), the checkout's patterns/ folder."""
    try:
        return files("sparsec.patterns")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "patterns"


def entries() -> list[Entry]:
    """The library, by name."""
    found = (r for r in _folder().iterdir() if r.name.endswith(".sa"))
    return sorted((_entry(r) for r in found), key=lambda e: e.name)


def names() -> list[str]:
    return [e.name for e in entries()]


def find(name: str) -> tuple[Entry, str | None]:
    """The library entry called `name`, or the one with a pattern of that name: (entry, the
    pattern to pick, or None for the file's default). An unknown name is an error listing the
    library."""
    every = entries()
    for e in every:
        if e.name == name:
            return e, None
    for e in every:
        if re.search(rf"^pattern\s+{re.escape(name)}\b", Path(e.path).read_text(), re.M):
            return e, name
    raise ValueError(f"no library pattern named {name!r}; the library has {', '.join(e.name for e in every)} "
                     f"and the patterns they define (sparsec list; a .sa path or program text also works)")
