"""Autotuning: candidate tile configs, timed on the call's own layout, the winner kept in a JSON cache."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..codegen import VERSION, TileConfig
from .cache import CacheError, write_atomically

BLOCKS = (16, 32, 64, 128)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)
FINALISTS = 3             # tile shapes whose warp counts are all timed
FORMAT = 1                # of the cache file
FILE = "tuning.json"      # in the cache directory (cache.py)


# ---- the candidates ------------------------------------------------------------------------------------

def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def shared_memory_bytes(c: TileConfig, dim: int, element_bytes: int) -> int:
    """What the forward keeps in shared memory: the Q tile, and K and V tiles `num_stages` deep
    (the software pipeline prefetches the next key tiles while the current ones are used)."""
    pad = max(16, _pow2_at_least(dim))
    return (c.block_m + 2 * c.block_n * c.num_stages) * pad * element_bytes


def runnable(c: TileConfig, dim: int, element_bytes: int, n_q: int, n_k: int, shared_memory: int) -> bool:
    """The named filter: the config fits the device's shared memory for this head dim and dtype;
    no tile is longer than its sequence (rounded up to a power of two, at least 16); and each warp
    gets between 512 and 4096 entries of the BLOCK_M x BLOCK_N score tile (fewer leaves threads
    idle, more spills registers)."""
    return (shared_memory_bytes(c, dim, element_bytes) <= shared_memory
            and c.block_m <= max(16, _pow2_at_least(n_q)) and c.block_n <= max(16, _pow2_at_least(n_k))
            and 512 * c.num_warps <= c.block_m * c.block_n <= 4096 * c.num_warps)


def candidates(dim: int, element_bytes: int, n_q: int, n_k: int, shared_memory: int) -> list[TileConfig]:
    """Every runnable config: BLOCK_M, BLOCK_N in 16..128, num_warps 1..8, num_stages 1..4."""
    space = [TileConfig(m, n, w, s) for m in BLOCKS for n in BLOCKS for w in WARPS for s in STAGES]
    return [c for c in space if runnable(c, dim, element_bytes, n_q, n_k, shared_memory)]


# ---- the user's choice -------------------------------------------------------------------------------

def check_config(config) -> TileConfig | None:
    """config= as given: None, a TileConfig, or a dict of its fields (TileConfig checks the values:
    power-of-two tiles 16..256, num_warps a power of two 1..16, num_stages 1..8)."""
    if config is None:
        return None
    if isinstance(config, dict):
        fields = {"block_m", "block_n", "num_warps", "num_stages"}
        if set(config) - fields:
            raise TypeError(f"config= has unknown keys {sorted(set(config) - fields)}; it takes {sorted(fields)}")
        config = TileConfig(**config)
    if not isinstance(config, TileConfig):
        raise TypeError(f"config must be a sparsec.TileConfig or a dict of its fields, got {type(config).__name__}")
    return config


# ---- the search ------------------------------------------------------------------------------------------

Timer = Callable[[TileConfig], "float | None"]   # median ms of one call with this config; None: it failed


@dataclass(frozen=True)
class Timing:
    config: TileConfig
    ms: float | None


def search(configs: list[TileConfig], timer: Timer, progress: "Progress | None" = None,
           budget_s: float | None = None) -> tuple[TileConfig | None, list[Timing]]:
    """The fastest config and every timing taken, by coordinate rounds: every tile shape
    (BLOCK_M, BLOCK_N) at the launch options nearest 4 warps and 3 stages; every warp count for
    the FINALISTS best shapes; every pipeline depth for the best (shape, warps). About 20
    timings where trying every config takes 110-160 (each one a compile), and the same winner
    whenever the options' effects roughly add up. Ties go to the earlier timing. budget_s: no
    timing starts after that many seconds once one has succeeded (the best so far wins)."""
    timings: list[Timing] = []
    deadline = None if budget_s is None else time.monotonic() + budget_s

    def spent() -> bool:
        return deadline is not None and time.monotonic() > deadline and any(t.ms is not None for t in timings)

    def time_all(batch: list[TileConfig]) -> None:
        batch = [c for c in batch if all(t.config != c for t in timings)]
        if progress:
            progress.extend(len(batch))
        for c in batch:
            if spent():
                return
            timings.append(Timing(c, timer(c)))
            if progress:
                progress.step(timings)

    def ranked(pool: list[TileConfig]) -> list[TileConfig]:
        done = {t.config: t.ms for t in timings if t.ms is not None}
        return sorted((c for c in pool if c in done), key=lambda c: done[c])   # stable: ties keep order

    nearest = lambda group: min(group, key=lambda c: (abs(c.num_warps.bit_length() - 3), abs(c.num_stages - 3)))
    tiles: dict[tuple, list[TileConfig]] = {}
    for c in configs:
        tiles.setdefault((c.block_m, c.block_n), []).append(c)
    first = [nearest(group) for group in tiles.values()]
    time_all(first)
    finalists = [(c.block_m, c.block_n) for c in ranked(first)[:FINALISTS]]
    second = [nearest([c for c in tiles[f] if c.num_warps == w]) for f in finalists
              for w in sorted({c.num_warps for c in tiles[f]})]
    time_all(second)
    best = ranked(first + second)[:1]
    if best:
        time_all([c for c in tiles[(best[0].block_m, best[0].block_n)] if c.num_warps == best[0].num_warps])
    if progress:
        progress.finish()
    done = ranked([t.config for t in timings])
    return (done[0] if done else None), timings


class Progress:
    """The tuner's progress bar (tqdm, on stderr): candidates timed of those known so far (each
    round adds its own), the latest and the best so far."""

    def __init__(self, label: str, stream=None):
        from tqdm import tqdm
        self.bar = tqdm(total=0, desc=label, file=stream or sys.stderr, unit="config", dynamic_ncols=True)

    def extend(self, more: int) -> None:
        self.bar.total += more
        self.bar.refresh()

    def step(self, timings: list[Timing]) -> None:
        last = timings[-1]
        best = min((t for t in timings if t.ms is not None), key=lambda t: t.ms, default=None)
        self.bar.set_postfix_str(f"{_short(last.config)} {'failed' if last.ms is None else f'{last.ms:.3f} ms'}"
                                 f"{'' if best is None else f'; best {_short(best.config)} {best.ms:.3f} ms'}",
                                 refresh=False)
        self.bar.update(1)

    def finish(self) -> None:
        self.bar.close()


def _short(c: TileConfig) -> str:
    return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"


# ---- the cache ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TuneKey:
    """What a tuned config is valid for. n_q and n_k are rounded up to powers of two (a shape
    bucket); mode is 'forward', or 'training' when the timing included the backward."""
    pattern: str
    n_q: int
    n_k: int
    head_dim: int
    dtype: str
    group: int
    device: str
    triton: str
    mode: str

    def text(self) -> str:
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())


def pattern_hash(canonical_ir: str) -> str:
    """The share's canonical IR and the generated code's version: a new codegen tunes afresh."""
    return hashlib.sha256(f"{VERSION}\n{canonical_ir}".encode()).hexdigest()[:16]


def make_key(canonical_ir: str, n_q: int, n_k: int, head_dim: int, dtype: str, group: int, device: str,
             triton: str, mode: str) -> TuneKey:
    return TuneKey(pattern_hash(canonical_ir), _pow2_at_least(n_q), _pow2_at_least(n_k), head_dim, dtype, group,
                   device, triton, mode)


class TuningCache:
    """Tuned configs by key, in memory and in a JSON file: read once per process, and on write
    merged with what other processes wrote meanwhile, then replaced atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] | None = None
        self.reported: set[str] = set()    # invalid entries already warned about

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def get(self, key: TuneKey) -> TileConfig | None:
        """The stored config for key, if its entry is a valid one. The file is not trusted (see
        cache.py): an entry whose config is not exactly TileConfig's four fields with values
        TileConfig accepts is ignored, reported once, and tuned again."""
        if self.entries is None:
            self.entries = self._read()
        found = self.entries.get(key.text())
        if found is None:
            return None
        config = _stored_config(found)
        if config is None and key.text() not in self.reported:
            self.reported.add(key.text())
            warnings.warn(f"sparsec: ignoring an invalid entry of the tuning cache {self.path} (it is tuned "
                          f"again): {json.dumps(found)[:200]}", RuntimeWarning, stacklevel=2)
        return config

    def put(self, key: TuneKey, config: TileConfig, ms: float, timings: Iterable[Timing],
            budget_s: float | None = None) -> None:
        entry = {"config": asdict(config), "ms": ms, "key": asdict(key), "budget_s": budget_s,
                 "timed": [[_short(t.config), t.ms] for t in timings],
                 "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        entries = self._read()
        entries[key.text()] = entry
        self.entries = entries
        write_atomically(self.path, json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True))


def _stored_config(entry) -> TileConfig | None:
    fields = {f.name for f in dataclasses.fields(TileConfig)}
    config = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(config, dict) or set(config) != fields or any(type(v) is not int for v in config.values()):
        return None
    try:
        return TileConfig(**config)
    except ValueError:
        return None


_CACHES: dict[Path, TuningCache] = {}


def cache_at(path: Path) -> TuningCache:
    """One TuningCache per file per process, so lookups after the first are dict hits."""
    path = Path(path)
    if path not in _CACHES:
        _CACHES[path] = TuningCache(path)
    return _CACHES[path]


def budget(given: float | None = None) -> float | None:
    """The search's time budget in seconds: as given, else SPARSEC_TUNE_BUDGET_S, else none."""
    if given is None:
        text = os.environ.get("SPARSEC_TUNE_BUDGET_S", "").strip()
        if not text:
            return None
        try:
            given = float(text)
        except ValueError:
            raise ValueError(f"SPARSEC_TUNE_BUDGET_S must be a number of seconds, got {text!r}") from None
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not given > 0:
        raise ValueError(f"the tuning budget must be a positive number of seconds, got {given!r}")
    return float(given)


def tuned(key: TuneKey, cache: TuningCache, configs: Callable[[], list[TileConfig]], timer: Timer,
          progress: Progress | None = None, retune: bool = False, must_save: bool = False,
          budget_s: float | None = None) -> TileConfig | None:
    """The cached config for key (unless retune), else the winner of a search (within budget_s
    seconds, see `budget`), stored with its budget; None when every candidate failed (the caller
    falls back to its default). When the cache cannot be written, the winner is still used (and
    kept for this process): a warning says why, unless must_save (`kern.tune`, `sparsec tune`:
    filling the cache is the point), which raises."""
    found = None if retune else cache.get(key)
    if found is not None:
        return found
    budget_s = budget(budget_s)
    winner, timings = search(configs(), timer, progress, budget_s)
    if winner is not None:
        try:
            cache.put(key, winner, min(t.ms for t in timings if t.ms is not None), timings, budget_s)
        except CacheError as e:
            if must_save:
                raise
            warnings.warn(f"sparsec: the tuned tiles are kept for this process only: {e.message}", RuntimeWarning,
                          stacklevel=2)
    return winner


def kernel_timer(runner_for, args: tuple, training: bool):
    """A tuning.Timer for one share of one call: the median ms (triton.testing.do_bench) of its
    forward, or forward + backward when training, with the runner runner_for(config) builds (its
    own layout for the config's tiles); None when the config does not compile or fit here."""
    import torch
    import triton
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    def timer(config: TileConfig) -> float | None:
        try:
            with torch.no_grad():
                runner = runner_for(config)
                if training:
                    do = torch.randn_like(args[0])
                    run = lambda: runner.backward(*args, *runner.forward(*args), do, None)
                else:
                    run = lambda: runner.forward(*args)
                return float(triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median"))
        except (CompilationError, OutOfResources):
            return None
    return timer
