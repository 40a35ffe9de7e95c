"""A learned span moves: Expire-Span's per-head spans are trained through sparsec's backward.

The task: every PERIOD tokens the sequence holds a key token key_x (one of 16 values); every
other token must output the x of the most recent key, 1 to PERIOD - 1 tokens back. The model has
no positions: attention finds keys by content alone, so it needs a span of at least PERIOD - 1
tokens to see the latest key, and an older key (PERIOD or more back) in its span competes with
it. Each head's span is a parameter, span_h = MAX_SPAN sigmoid(p_h), started at 4 tokens, and
reaches the model only as the call-time input `span` of the library's `expire_span` (with a ramp
of RAMP = 8 tokens):

    causal & where(i - j < span[b, h, j] + ramp) with score + log(clamp(1 + (span - (i - j)) / ramp, 0, 1))

Its gradient comes from the with expression (the soft ramp), computed by sparsec's backward
(the CPU path here, the generated kernels with backend="interpret" or on a GPU). The spans
grow from 4 until span + ramp covers the farthest key needed (PERIOD - 1 tokens back) in at least
one head, and the loss falls from ln 16 = 2.77 to near 0 (docs/learn_span.png, .json).

    .venv/bin/python examples/learn_span.py            # 300 steps, about a minute on 2 CPU cores
    .venv/bin/python examples/learn_span.py --help     # --n --steps --period --backend --out

It prints the loss and spans and writes a plot (PNG) and the curves (JSON)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's sparsec, installed or not
import sparsec  # noqa: E402

VALUES, NOISE = 16, 8
KEY = NOISE                    # key_x = KEY + x
VOCAB = NOISE + VALUES
MAX_SPAN = 96.0
RAMP = 8    # the soft mask's ramp (the library's default is 32): short, so that a span must grow to reach far


def batch(size: int, n: int, period: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (size, n): noise, with a key every `period` tokens (at a random phase); targets
    (size, n): the value of the most recent key, -1 (ignored) before the first one and at keys."""
    tokens = torch.randint(0, NOISE, (size, n), generator=gen)
    phase = torch.randint(0, period, (size, 1), generator=gen)
    pos = torch.arange(n)[None, :]
    is_key = (pos - phase) % period == 0
    values = torch.randint(0, VALUES, (size, n), generator=gen)
    tokens = torch.where(is_key, KEY + values, tokens)
    last = torch.where(is_key, pos, -1).cummax(1).values         # the latest key at or before each token
    target = torch.where((last >= 0) & ~is_key, values.gather(1, last.clamp(min=0)), -1)
    return tokens, target


class Model(nn.Module):
    """Embeddings (no positions), one attention layer whose heads each have a learned span, a
    readout. The attention is sparsec's expire_span with span_h broadcast over the keys."""
    def __init__(self, dim: int = 32, heads: int = 2, start: float = 4.0):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.embed = nn.Embedding(VOCAB, dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, VALUES))
        self.span_logit = nn.Parameter(torch.full((heads,), math.log(start / (MAX_SPAN - start))))
        self.kern = sparsec.compile("expire_span", ramp=RAMP)

    def spans(self) -> torch.Tensor:
        return MAX_SPAN * torch.sigmoid(self.span_logit)

    def forward(self, tokens, backend: str):
        B, n = tokens.shape
        x = self.embed(tokens)
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        span = self.spans().view(1, self.heads, 1).expand(1, self.heads, n)   # span[b, h, j] = span_h
        o = self.kern(q.contiguous(), k.contiguous(), v.contiguous(), span=span, backend=backend)
        return self.head(x + self.out(o.transpose(1, 2).reshape(B, n, self.dim)))


def train(n: int, steps: int, period: int, backend: str = "cpu", batch_size: int = 16, lr: float = 3e-3,
          span_lr: float = 2e-2, seed: int = 0, log_every: int = 10, quiet: bool = False) -> dict:
    """Train from scratch: the mean loss of each `log_every` steps, and each head's span then.
    The span logits get their own, larger step (span_lr): one logit per head moves slowly at lr."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = Model()
    rest = [p for name, p in model.named_parameters() if name != "span_logit"]
    opt = torch.optim.Adam([{"params": rest}, {"params": [model.span_logit], "lr": span_lr}], lr=lr)
    loss_curve, span_curve, window, start = [], [], [], time.perf_counter()
    for step in range(1, steps + 1):
        tokens, target = batch(batch_size, n, period, gen)
        logits = model(tokens, backend)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % log_every == 0:
            loss_curve.append(sum(window) / len(window))
            span_curve.append([round(s, 3) for s in model.spans().tolist()])
            window = []
            if not quiet:
                spans = ", ".join(f"{s:.1f}" for s in span_curve[-1])
                print(f"  step {step:4d}  loss {loss_curve[-1]:.3f}  spans {spans}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"loss": loss_curve, "spans": span_curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="sequence length")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--period", type=int, default=24, help="tokens between keys")
    ap.add_argument("--backend", default="cpu", help="cpu, interpret (the generated kernels) or triton")
    ap.add_argument("--out", default=str(ROOT / "docs/learn_span.png"))
    args = ap.parse_args()

    print(f"expire_span: n={args.n}, a key every {args.period} tokens, {args.steps} steps, "
          f"backend={args.backend}", flush=True)
    curves = train(args.n, args.steps, args.period, args.backend)
    chance = math.log(VALUES)
    print(f"final loss {curves['loss'][-1]:.3f} (chance ln {VALUES} = {chance:.2f}); "
          f"spans {curves['spans'][0]} -> {curves['spans'][-1]} (keys {args.period - 1} tokens back at most)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [10 * (i + 1) for i in range(len(curves["loss"]))]
    ax.plot(steps, curves["loss"], label="loss")
    ax.axhline(chance, color="gray", linestyle=":", label=f"chance (ln {VALUES})")
    ax.set(xlabel="step", ylabel="loss (mean of 10 steps)", title="copy the latest key")
    ax.legend()
    for h, line in enumerate(zip(*curves["spans"])):
        bx.plot(steps, line, label=f"head {h}")
    bx.axhline(args.period - 1 - RAMP, color="gray", linestyle=":", label="span + ramp reach the farthest key")
    bx.set(xlabel="step", ylabel="span (tokens)", title="learned spans (Expire-Span)")
    bx.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "chance": chance, **curves}, indent=1))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
