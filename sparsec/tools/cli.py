"""The `sparsec` command: emit each stage, check a layout against the dense reference, draw a pattern,
tune tiles, time against the peers."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .. import __version__, pipeline, testing
from . import bench
from . import check as checking
from . import show as picture
from ..compiled import CompiledPattern, read_source
from ..errors import SparsecError
from ..grammar import library
from ..grammar.elaborate import pattern_names
from ..grammar.syntax import dump, parse


def _param(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    try:
        return name.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=INTEGER, got {text!r}") from None


def _compile(args) -> CompiledPattern:
    return CompiledPattern(args.file, args.pattern, **dict(args.param))


def synthetic_inputs(kern: CompiledPattern, n: int, heads: int, seed: int = 0) -> dict:
    """Synthetic call-time inputs for patterns that need them: documents of random lengths,
    standard normal q and k (D = 64), and the declared inputs (testing.draw_inputs). The CLI
    says when it used these."""
    rng = np.random.default_rng(seed)
    out = {}
    if "segment_ids" in kern.needs:
        out["segment_ids"] = bench.documents(1, n, rng).numpy()
    if {"q", "k"} & kern.needs:
        out["q"] = rng.standard_normal((1, heads, n, 64))
        out["k"] = rng.standard_normal((1, heads, n, 64))
    lengths = {"n": n, "n_q": n, "n_k": n}
    out.update({name: x.numpy() for name, x in
                testing.draw_inputs(kern, 1, heads, lengths, torch.Generator().manual_seed(seed)).items()})
    return out


def emit(args) -> None:
    if args.stage == "ast":
        source = read_source(args.file)
        print(dump(parse(source.text, source.filename)))
        return
    kern = _compile(args)
    if args.stage == "triton":   # one module per share (content-based patterns may have several)
        print(kern.source, end="")
        return
    if args.stage == "ir":
        stages = ["elaborate", "passes"] + (["shares"] if len(kern.shares) > 1 or kern.shares[0].key is not None
                                             else [])
        with pipeline.watching(stages, lambda stage, text: print(text)):   # the stages as they run
            kern = _compile(args)
            kern.shares
        print(f"# cost (allowed pairs at n_q = n_k = n): {kern.symbolic_cost()}")
        if kern.source_ir.bindings:
            print(f"#   with the params and lets folded: {kern.cost}")
        return
    for title, lay in layouts(kern, args.n, args.n_k, args.block, args.heads):
        if title:
            print(f"# {title}")
        print_layout(lay, args.rows)


def layouts(kern: CompiledPattern, n: int, n_k: int | None, block, heads: int, seed: int = 0) -> list[tuple[str, object]]:
    """(title, layout) to show: the pattern's layout, or for a content-based pattern the layouts a
    call on seeded q and k builds, one per share (a sorted share's tiles are in bucket order)."""
    inputs = synthetic_inputs(kern, n_k or n, heads, seed)
    if "q" not in inputs:
        return [("", kern.layout(n, n_k, block[0], block[1], heads=heads, segment_ids=inputs.get("segment_ids")))]
    print(f"using synthetic inputs: {', '.join(inputs)} (seed {seed})")
    q = torch.as_tensor(synthetic_inputs(kern, n, heads, seed)["q"], dtype=torch.float32)
    k = torch.as_tensor(inputs["k"], dtype=torch.float32)
    seg = {"segment_ids": torch.as_tensor(inputs["segment_ids"])} if "segment_ids" in inputs else {}
    return [(f"share {i}, {'positional order' if order is None else 'rows sorted by ' + share.key.show()}: "
             f"{share.body.show()}", lay)
            for i, (share, lay, order) in enumerate(kern.share_layouts(q, k, *block, **seg))]


def print_layout(lay, rows: int) -> None:
    print(lay)
    b, h, tq, tk = lay.shape
    print(f"# visited tiles: {lay.tiles_visited()} of {b * h * tq * tk} ({lay.tile_density():.2%}), "
          f"layout {lay.nbytes()} bytes")
    for head in range(h):
        print(f"# head {head}: query tile -> FULL key tiles | PARTIAL key tiles")
        for t in range(min(tq, rows)):
            full, part = lay.full.row(0, head, t), lay.partial.row(0, head, t)
            print(f"{t:5d}: {' '.join(map(str, full)) or '-'} | {' '.join(map(str, part)) or '-'}")
        if tq > rows:
            print(f"  ... {tq - rows} more query tiles (--rows)")


def check(args) -> int:
    kern = _compile(args)
    if args.examples:
        return checking.examples(kern, args.examples, args.backend)
    inputs = synthetic_inputs(kern, args.n, args.heads, args.seed)
    if inputs:
        print(f"using synthetic inputs: {', '.join(inputs)} (seed {args.seed})")
    return checking.run(kern, args.n, args.heads, args.block, inputs, args.backend, args.seed)


def show(args) -> None:
    """Draw the mask and the layout a call uses (tools/show.py): for any n the layout supports."""
    kern = _compile(args)
    picture.check_drawable(kern, args.n)
    heads = picture.heads_to_draw(kern, args.head)
    inputs = synthetic_inputs(kern, args.n, max(heads) + 1, args.seed)
    lays = layouts(kern, args.n, args.n, picture.layout_tiles(args.n, args.block), max(heads) + 1, args.seed)
    picture.draw(kern, lays, args.n, args.block, heads, args.pixels, inputs, args.output, list(inputs), args.seed)


def _shapes(args, n: int):
    """q, k, v of the command's shape, dtype and device, drawn fresh."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = bench.DTYPES[args.dtype]
    n_k = args.n_k or n
    draw = lambda h, m: torch.randn(args.batch, h, m, args.dim, device=device, dtype=dtype)
    return draw(args.heads, n), draw(args.kv_heads or args.heads, n_k), draw(args.kv_heads or args.heads, n_k)


def tune(args) -> None:
    kern = _compile(args)
    if not (args.device or "cuda").startswith("cuda") or not torch.cuda.is_available():
        print("sparsec tune: no CUDA device here: the autotuner is skipped (calls use the default tiles)")
        return
    for n in args.n:
        q, k, v = _shapes(args, n)
        call_inputs = {}
        if "segment_ids" in kern.needs:
            call_inputs["segment_ids"] = bench.documents(args.batch, k.shape[2], np.random.default_rng()).to(q.device)
        if args.backward:
            q.requires_grad_(True)
        configs = kern.tune(q, k, v, retune=args.retune, budget_s=args.budget, **call_inputs)
        for i, c in enumerate(configs):
            share = f" share {i}" if len(configs) > 1 else ""
            print(f"{kern.name}{share} n={n} {args.dtype} D={args.dim}: {c.show()}")


def bench_command(args) -> None:
    vs = tuple(x for x in args.vs.split(",") if x and x != "none")
    unknown = [x for x in vs if x not in bench.PEERS]
    if unknown:
        raise ValueError(f"--vs takes a comma list of {', '.join(bench.PEERS)} (or none), got {', '.join(unknown)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: there is no CUDA device here (use --device cpu)")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device}")
    kern = _compile(args)
    results = []
    for n in args.n:
        case = bench.Case(n, args.n_k or n, args.batch, args.heads, args.kv_heads, args.dim, args.dtype, device,
                          args.backward, vs, args.repeats, args.warmup, seed=args.seed, compiled=not args.no_compile)
        results.append(bench.run(kern, case))
        print(bench.table(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bench.machine(device), "command": sys.argv, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


def list_command(args) -> None:
    """The library: name, system, the default pattern's density as its header states it (checked
    by tests/test_library.py), the file's patterns and its paper's title."""
    print(f"{'name':<20}{'system':<24}{'density':>9}{'at n':>6}  patterns (default last); paper")
    for e in library.entries():
        n, _, density, approx, inputs = e.density
        title = re.search(r'"([A-Z][^"]{11,})"', e.paper)
        print(f"{e.name:<20}{e.system[:23]:<24}{'~' if approx else ' '}{density:>7.2%}{'*' if inputs else ' '}"
              f"{n:>6}  {', '.join(pattern_names(parse(Path(e.path).read_text(), e.path)))}; "
              f"{title.group(1) if title else e.paper[:60] or '-'}")
    print("~ approximate (random or content-based); * on the inputs its header names (documents, or "
          "standard normal q and k)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsec", description="Compile sparse-attention patterns (.sa files).")
    p.add_argument("--version", action="version", version=f"sparsec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the pattern library: name, system, density, paper")

    def common(sp, n_default, many=False):
        sp.add_argument("file", help="a .sa file, or a library name (sparsec list)")
        sp.add_argument("--pattern", help="which pattern of the file (default: the last)")
        sp.add_argument("-p", "--param", type=_param, action="append", default=[], metavar="NAME=INT",
                        help="override a param (repeatable)")
        if many:
            sp.add_argument("--n", type=int, nargs="+", default=[n_default], help="query lengths, one case each")
            sp.add_argument("--n-k", type=int, default=None, help="key length (default: n)")
            sp.add_argument("--batch", type=int, default=1)
            sp.add_argument("--heads", type=int, default=8)
            sp.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA; default: --heads)")
            sp.add_argument("--dim", type=int, default=64, help="head dim")
            sp.add_argument("--dtype", choices=sorted(bench.DTYPES), default="float32")
            sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
            sp.add_argument("--backward", action="store_true", help="forward + backward (training)")
            return
        sp.add_argument("--n", type=int, default=n_default, help="sequence length (n_q = n_k)")
        sp.add_argument("--block", type=int, nargs=2, default=(64, 64), metavar=("M", "N"), help="tile size")

    e = sub.add_parser("emit", help="print a stage: ast, ir (each pass, and the cost), layout or triton")
    e.add_argument("stage", choices=["ast", "ir", "layout", "triton"])
    common(e, 1024)
    e.add_argument("--n-k", type=int, default=None, help="key length (default: --n)")
    e.add_argument("--heads", type=int, default=1)
    e.add_argument("--rows", type=int, default=32, help="query tiles to list")
    c = sub.add_parser("check", help="verify the layout and run the kernels against dense attention")
    common(c, 2048)
    c.add_argument("--heads", type=int, default=2)
    c.add_argument("--backend", choices=["triton", "interpret", "cpu"], action="append",
                   help="kernel(s) to run (repeatable; default: triton with a GPU, else interpret and cpu, "
                        "or cpu alone at large n)")
    c.add_argument("--examples", type=int, default=0, metavar="N",
                   help="instead of one shape, N drawn calls (sparsec.testing.attention_inputs) per backend")
    c.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs and the sampled rows")
    s = sub.add_parser("show", help="draw the mask and its block layout to a PNG")
    common(s, 2048)
    s.add_argument("-o", "--output", required=True, help="PNG path")
    s.add_argument("--head", type=int, action="append", help="a head to draw (repeatable; default: every "
                   "distinct head, up to 4)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (documents, q and k)")
    s.add_argument("--pixels", type=int, default=1024, help="largest picture side in cells")
    t = sub.add_parser("tune", help="autotune the tiles on this GPU and store them in the tuning cache")
    common(t, 16384, many=True)
    t.add_argument("--retune", action="store_true", help="time again even when the cache has the key")
    t.add_argument("--budget", type=float, help="seconds per share's search: no candidate is timed after "
                   "that, the best so far wins (default: SPARSEC_TUNE_BUDGET_S, else none)")
    b = sub.add_parser("bench", help="time against FlexAttention, masked SDPA and dense SDPA in one run")
    common(b, 4096, many=True)
    b.add_argument("--vs", default=",".join(bench.PEERS), help="peers, a comma list (default: %(default)s)")
    b.add_argument("--no-compile", action="store_true",
                   help="do not also time the call under torch.compile(fullgraph=True)")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds (medians over them)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    b.add_argument("--seed", type=int, default=None, help="inputs' seed (default: fresh)")
    b.add_argument("--json", help="write the results, with the machine's description, here")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for name in ("n", "n_k", "heads", "head", "pixels", "rows", "batch", "kv_heads", "dim", "repeats"):
        value = getattr(args, name, None)
        for v in [] if value is None else np.atleast_1d(value):
            if v < (0 if name == "head" else 1):
                parser().error(f"--{name.replace('_', '-')} must be at least {0 if name == 'head' else 1}, got {v}")
    try:
        if args.command == "emit":
            emit(args)
        elif args.command == "check":
            return check(args)
        elif args.command == "tune":
            tune(args)
        elif args.command == "bench":
            bench_command(args)
        elif args.command == "list":
            list_command(args)
        else:
            show(args)
    except SparsecError as e:
        print(e, file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"sparsec: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
