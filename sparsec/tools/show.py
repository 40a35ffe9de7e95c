"""`sparsec show`: a pattern's token mask and block layout as a PNG, drawn from the layout, never from the n x n mask."""
from __future__ import annotations

import math

import numpy as np

from .. import passes
from ..ir.combinators import Heads
from ..ir.tiles import EMPTY, FULL, PARTIAL, Grid, TableSpace

EVALUATIONS = 1 << 25        # mask evaluations a picture may spend on its PARTIAL pixels
SAMPLES = 32                 # at most SAMPLES x SAMPLES points per PARTIAL pixel
CONTENT_LIMIT = 1 << 14      # content-based patterns: q and k (and the reference mask) are drawn up to here
TILES_DRAWN = 2048           # the layout panel's tiles per side, at most (coarser tiles beyond)
MAX_HEADS = 4                # heads drawn when --head is not given


def pixel_density(kern, n: int, cells: int, heads: int, head: int, inputs: dict) -> tuple[np.ndarray, str]:
    """Each pixel's allowed fraction of its cells x cells tokens, (P, P), and how it was found:
    exactly from the mask when a pixel is one token; else from the layout at cells x cells tiles,
    FULL 1 and EMPTY 0 exactly, PARTIAL by the IR's mask on an s x s grid of the pixel's rows and
    keys (memory O(pixels + s^2 x PARTIAL pixels of one row), never O(n^2))."""
    if cells == 1 or {"q", "k"} & kern.needs:
        mask = kern.mask(n, heads=heads, **inputs).numpy()[0, head]
        m = -(-n // cells) * cells
        padded = np.zeros((m, m), np.float32)
        padded[:n, :n] = mask
        return padded.reshape(m // cells, cells, m // cells, cells).mean(axis=(1, 3)), "exact"
    seg = inputs.get("segment_ids")
    lay = kern.layout(n, n, cells, cells, heads=heads, segment_ids=seg)
    classes = lay.classes()[0, min(head, lay.shape[1] - 1)]
    picture = (classes == FULL).astype(np.float32)
    partial = classes == PARTIAL
    s = int(np.clip(np.sqrt(EVALUATIONS / max(1, partial.sum())), 2, min(SAMPLES, cells)))
    body = passes.specialize(kern.ir, n, n, 0, heads)
    space = TableSpace(n, n, 0, heads, 1, inputs=dict(segment_ids=seg)).per_head(0, head)
    offsets = (np.arange(s) * cells) // s + cells // (2 * s)   # s points spread over a pixel's cells
    for t in np.flatnonzero(partial.any(1)):
        cols = np.flatnonzero(partial[t])
        rows = np.minimum(t * cells + offsets, n - 1)
        keys = np.minimum((cols[:, None] * cells + offsets).ravel(), n - 1)
        m = body.mask(Grid(rows.astype(np.int64), keys.astype(np.int64), n, n, head, space))
        picture[t, cols] = m.reshape(s, len(cols), s).mean(axis=(0, 2))
    return picture, f"FULL and EMPTY pixels exact, PARTIAL ones sampled {s}x{s}"


def check_drawable(kern, n: int) -> None:
    """Before any work: content-based patterns need q and k (and their dense mask) at n."""
    if {"q", "k"} & kern.needs and n > CONTENT_LIMIT:
        raise ValueError(f"--n {n}: content-based patterns are drawn up to n = {CONTENT_LIMIT} (their tiles need "
                         f"q and k, drawn here as synthetic inputs)")


def heads_to_draw(kern, wanted: list[int] | None) -> list[int]:
    """The heads a picture shows: those asked for, else the first head of each distinct pattern,
    up to MAX_HEADS. Two heads are alike when every heads(...) node picks the same part for both
    (a node of p parts repeats every p heads); content-based patterns differ on every head."""
    if wanted:
        return sorted(set(wanted))
    body = kern.ir.body
    if not body.varies_with_head():
        return [0]
    heads_nodes = [node for node in body.nodes() if type(node) is Heads]
    if {"q", "k"} & kern.needs or not heads_nodes:
        return list(range(MAX_HEADS))
    first: dict[tuple, int] = {}
    for h in range(min(1024, math.lcm(*(len(node.parts) for node in heads_nodes)))):
        first.setdefault(tuple(node.parts[h % len(node.parts)] for node in heads_nodes), h)
    return sorted(first.values())[:MAX_HEADS]


def draw(kern, layouts, n: int, block: tuple[int, int], heads: list[int], pixels: int, inputs: dict, output: str,
         synthetic: list[str], seed: int = 0) -> None:
    """One row per head: the token mask, then each share's block layout (a content-based call's
    shares, each in its own order)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, Normalize, PowerNorm
    from matplotlib.patches import Patch

    cells = max(1, -(-n // pixels))
    cols = 1 + len(layouts)
    fig, axes = plt.subplots(len(heads), cols, figsize=(6 * cols, 5.6 * len(heads) + 1.4), squeeze=False)
    density = 0.0
    for row, head in zip(axes, heads):
        picture, how = pixel_density(kern, n, cells, max(heads) + 1, head, inputs)
        # a pixel of many tokens holds a fraction; a square root scale keeps a 1-token global row visible
        norm = PowerNorm(0.5, vmin=0, vmax=1) if cells > 1 else Normalize(0, 1)
        shown = row[0].imshow(picture, cmap="Blues", norm=norm, interpolation="antialiased", extent=(0, n, n, 0))
        if cells > 1:
            fig.colorbar(shown, ax=row[0], fraction=0.046, pad=0.02, label="allowed fraction (square root scale)")
        label = f"head {head}: " if len(heads) > 1 or head else ""
        row[0].set_title(f"{label}token mask (n = {n}" + (f", {cells}x{cells} tokens per pixel" if cells > 1 else "")
                         + ")\n" + how, fontsize=9)
        row[0].set_xlabel("key j")
        row[0].set_ylabel("query i")
        side = np.minimum(cells, n - np.arange(len(picture)) * cells)
        density += float((picture * side[:, None] * side[None, :]).sum() / n / n) / len(heads)
        for ax, (title, lay) in zip(row[1:], layouts):
            classes = lay.classes()[0, min(head, lay.shape[1] - 1)]
            ax.imshow(classes, cmap=ListedColormap(["#f4f4f4", "#f5a623", "#1f5fa8"]), vmin=EMPTY, vmax=FULL,
                      interpolation="antialiased" if len(classes) > 512 else "nearest")
            ax.set_title(f"{label}block layout ({lay.block_m}x{lay.block_n} tiles, {lay.tile_density():.1%} visited)"
                         + (f"\n{block[0]}x{block[1]} tiles would be too many to draw" if lay.block_m > block[0]
                            else "") + (f"\n{title[:70]}" if title else ""), fontsize=9)
            ax.set_xlabel("key tile" + (" (sorted order)" if "sorted" in title else ""))
            ax.set_ylabel("query tile" + (" (sorted order)" if "sorted" in title else ""))
    fig.legend(handles=[Patch(color="#1f5fa8", label="FULL (no mask)"), Patch(color="#f5a623", label="PARTIAL (masked)"),
                        Patch(color="#f4f4f4", label="EMPTY (skipped)")], loc="lower center", ncol=3, fontsize=8)
    note = f"\non synthetic {', '.join(synthetic)} (seed {seed})" if synthetic else ""
    fig.suptitle(f"{kern.name}: {kern.ir.body.show()}\ndensity {density:.4f}"
                 + (" (mean over the heads drawn)" if len(heads) > 1 else "") + note, fontsize=11)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1 - 0.75 / height))   # room for the legend and the title
    fig.savefig(output, dpi=100)
    plt.close(fig)
    print(f"wrote {output}")


def layout_tiles(n: int, block: tuple[int, int]) -> tuple[int, int]:
    """The layout panel's tile size: block, or a multiple of it when block would give more than
    TILES_DRAWN tiles a side."""
    scale = max(1, -(-(-(-n // min(block))) // TILES_DRAWN))
    return block[0] * scale, block[1] * scale

