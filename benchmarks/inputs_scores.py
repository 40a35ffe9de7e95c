"""Score modifications and call-time inputs: sparsec vs FlexAttention vs SDPA with a materialised bias, in one run.

Three cases, each at B=1, H=--heads, n=--n, D=64 (fp32 on CPU, bf16 on CUDA):
  - alibi:    `causal with score - slopes[h] * (i - j)` (patterns/alibi.sa)
  - softcap:  `causal & band(window - 1, 0) with cap * tanh(score / cap)` (patterns/softcap.sa, Gemma 2)
  - learned:  `blocks(64, where(keep[b, h, i, j]))` with keep true on 10% of the blocks (sparsebert.sa)
Per case it times, round-robin so that load from other processes hits them alike:
  - sparsec: `kern(q, k, v, **inputs)` (backend cpu on CPU, triton on CUDA), and the same mask
    without its with expression (the cost of the score expression is the ratio of the two);
  - FlexAttention, compiled, with the equivalent score_mod / mask_mod and its own BlockMask;
  - `scaled_dot_product_attention` with the bias (or mask) materialised as an (H, n, n) tensor;
forward, and forward + backward where the peer has one (Flex on CPU has no backward). Each output's
max abs difference from sparsec's is reported. Results: JSON with the machine, versions and commit.

    .venv/bin/python benchmarks/inputs_scores.py                # n=16384 -> benchmarks/results/inputs_scores_cpu.json
    .venv/bin/python benchmarks/inputs_scores.py --n 4096 --repeats 3
    .venv/bin/python benchmarks/inputs_scores.py --device cuda  # -> inputs_scores_<gpu>.json
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's sparsec, installed or not
import sparsec  # noqa: E402
from sparsec.tools.bench import machine, round_robin, timed  # noqa: E402

CAP, WINDOW, BLOCK, DENSITY = 50.0, 4096, 64, 0.1


def cases(n: int, heads: int, device) -> dict:
    """Per case: sparsec's pattern and its unscored twin, the inputs, Flex's mods, SDPA's bias."""
    gen = torch.Generator().manual_seed(0)
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], device=device)
    blocks = -(-n // BLOCK)
    keep = (torch.rand(1, heads, blocks, blocks, generator=gen) < DENSITY).to(device)
    i, j = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    causal = lambda b, h, q, k: q >= k
    window = lambda b, h, q, k: (q >= k) & (q - k < WINDOW)
    return {
        "alibi": dict(
            kern=sparsec.compile("alibi"), plain=sparsec.compile("pattern p = causal"), inputs={"slopes": slopes},
            mask_mod=causal, score_mod=lambda s, b, h, q, k: s - slopes[h] * (q - k),
            bias=lambda: torch.where(i >= j, -slopes[:, None, None] * (i - j), -math.inf)),
        "softcap": dict(
            kern=sparsec.compile("softcap"), plain=sparsec.compile(f"pattern p = causal & band({WINDOW - 1}, 0)"),
            inputs={}, mask_mod=window, score_mod=lambda s, b, h, q, k: CAP * torch.tanh(s / CAP),
            bias=None),   # soft-capping is not a bias: SDPA cannot express it
        "learned": dict(
            kern=sparsec.compile("sparsebert"), plain=None, inputs={"keep": keep},
            mask_mod=lambda b, h, q, k: keep[0, h, q // BLOCK, k // BLOCK], score_mod=None,
            bias=lambda: keep[0][:, i // BLOCK, j // BLOCK].expand(heads, n, n)),
    }


def run_case(name: str, c: dict, q, k, v, args) -> dict:
    device, backend = q.device, "triton" if q.device.type == "cuda" else "cpu"
    n, heads = q.shape[2], q.shape[1]
    fwd = {"sparsec": lambda: c["kern"](q, k, v, backend=backend, **c["inputs"])}
    if c["plain"] is not None:
        fwd["sparsec without with"] = lambda: c["plain"](q, k, v, backend=backend)
    block_mask, block_mask_s = timed(lambda: create_block_mask(c["mask_mod"], 1, heads, n, n, device=device), device)
    flex = torch.compile(flex_attention)
    fwd["flex"] = lambda: flex(q, k, v, score_mod=c["score_mod"], block_mask=block_mask)
    setup = {"flex block mask s": block_mask_s, "flex compile and first call s": timed(fwd["flex"], device)[1],
             "sparsec first call s": timed(fwd["sparsec"], device)[1]}
    if c["bias"] is not None:
        bias, setup["sdpa bias s"] = timed(c["bias"], device)
        bias = bias.to(q.dtype) if bias.dtype != torch.bool else bias
        fwd["sdpa bias"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = {name_: fn() for name_, fn in fwd.items()}
    ref = out["sparsec"].float()
    error = {name_: float((o.float() - ref).abs().max()) for name_, o in out.items()
             if name_ not in ("sparsec", "sparsec without with")}
    times, foreign = round_robin(fwd, device, args.warmup, args.repeats)
    result = {"setup": setup, "forward_ms": {k_: 1e3 * statistics.median(t) for k_, t in times.items()},
              "max_abs_diff_from_sparsec": error, "other_load_cores": statistics.median(foreign)}
    grads = [x.detach().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)

    def training(fn):
        def step():
            o = fn(*grads)
            torch.autograd.grad(o, grads, do)
        return step
    train = {"sparsec": training(lambda a, b_, c_: c["kern"](a, b_, c_, backend=backend, **c["inputs"]))}
    if c["plain"] is not None:
        train["sparsec without with"] = training(lambda a, b_, c_: c["plain"](a, b_, c_, backend=backend))
    if device.type == "cuda":   # Flex's backward runs on CUDA only
        train["flex"] = training(lambda a, b_, c_: flex(a, b_, c_, score_mod=c["score_mod"], block_mask=block_mask))
    if c["bias"] is not None:
        train["sdpa bias"] = training(lambda a, b_, c_: F.scaled_dot_product_attention(a, b_, c_, attn_mask=bias))
    times, _ = round_robin(train, device, args.warmup, args.repeats)
    result["forward_backward_ms"] = {k_: 1e3 * statistics.median(t) for k_, t in times.items()}
    for what in ("forward_ms", "forward_backward_ms"):
        ms = result[what]
        result[what.replace("_ms", "_ratio_vs_sparsec")] = {k_: v_ / ms["sparsec"] for k_, v_ in ms.items()
                                                             if k_ != "sparsec"}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="alibi,softcap,learned")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, args.heads, args.n, 64, generator=gen).to(device, dtype) for _ in range(3))
    results = {"machine": machine(device), "args": vars(args), "dtype": str(dtype), "cases": {}}
    table = cases(args.n, args.heads, device)
    for name in args.cases.split(","):
        print(f"{name} (n={args.n}, H={args.heads}) ...", flush=True)
        results["cases"][name] = r = run_case(name, table[name], q, k, v, args)
        for what in ("forward_ms", "forward_backward_ms"):
            print(f"  {what}: " + ", ".join(f"{k_} {v_:.1f}" for k_, v_ in r[what].items()))
        print(f"  max |O - O_sparsec|: {r['max_abs_diff_from_sparsec']}")
    gpu = re.sub(r"\W+", "_", results["machine"].get("gpu", "")).strip("_").lower()
    out = Path(args.out or ROOT / f"benchmarks/results/inputs_scores_{gpu or 'cpu'}.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
