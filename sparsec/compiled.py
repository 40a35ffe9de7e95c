"""`sparsec.compile` and the `CompiledPattern` it returns: a thin facade over the pipeline's stages."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import sympy
import torch

from . import pipeline
from . import reference as ref
from .codegen import Generated, TileConfig
from .grammar import library
from .grammar.elaborate import pattern_names
from .grammar.syntax import read_source
from .ir.inputs import check_arrays
from .ir.limits import check_lengths
from .ir.tiles import TableSpace
from .layout import BlockLayout, LayoutRequest, SortedOrder, build_layout
from .passes import specialize
from .passes.shares import Share
from .ir import expr as E
from .ir import score as score_ir
from .runtime import content, flex, mask_mods, ops, scores, tuning
from .runtime.cache import cache_dir
from .runtime.call import (INPUTS, Call, TensorFacts, check_call, check_tensors, choose_backend, default_config,
                           op_options, wants_grad)

N = sympy.Symbol("n", positive=True, integer=True)


def _int_arg(name: str, v, lowest: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lowest:
        raise ValueError(f"{name} must be at least {lowest}, got {v}")
    return int(v)


def _numpy(name: str, x, ndim: int | None):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()   # numpy has no bfloat16
    x = np.asarray(x)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _tidy(e: sympy.Expr) -> sympy.Expr:
    e = sympy.expand(e)
    return sympy.simplify(e) if sympy.count_ops(e) < 60 else e


@dataclass(frozen=True)
class BoundShare:
    """One share of one call with its backend bound (pipeline.bind). args: q, k, v as its kernels
    see them (gathered when sorted); group: query heads per K/V head of the call."""
    share: int
    runner: object
    args: tuple
    order: SortedOrder | None
    group: int
    score: object = None   # the call's TorchScore (shared by its shares), or None

    def run(self):
        """(O, LSE) of the share in the original row order."""
        out = self.runner.forward(*self.args)
        return out if self.order is None else content.scatter(self.order, *out)

    def grad(self, o, lse, do, dlse):
        """The share's part of dQ, dK, dV, from the whole call's O and LSE: the shares are
        disjoint, so the pairs of each, with P from the merged LSE and delta = rowsum(dO * O) of
        the merged O, sum to the gradient of the union."""
        if self.order is None:
            return self.runner.backward(*self.args, o, lse, do, dlse)
        rows = content.gather_rows(self.order, o, lse, do, dlse)
        return content.ungather(self.order, *self.runner.backward(*self.args, *rows), self.group)


class CompiledPattern:
    """What `sparsec.compile` returns: callable attention for the pattern, with its IR, cost,
    dense reference mask, block layouts and generated source."""

    def __init__(self, path_or_source, pattern: str | None = None, autotune: bool | None = None,
                 config: TileConfig | None = None, **params):
        if autotune is None:   # the default: on, unless SPARSEC_AUTOTUNE=0 (CI jobs, test suites)
            autotune = os.environ.get("SPARSEC_AUTOTUNE", "1") != "0"
        if not isinstance(autotune, bool):
            raise TypeError(f"autotune must be True or False, got {autotune!r}")
        self.autotune, self.config = autotune, tuning.check_config(config)
        self.program = read_source(path_or_source)
        if pattern is None and isinstance(path_or_source, str) and library.NAME.fullmatch(path_or_source):
            pattern = library.find(path_or_source)[1]   # a library pattern's own name picks it in its file
        module = pipeline.parse(self.program)
        self.patterns = pattern_names(module)
        self.source_ir = pipeline.elaborate(module, pattern, params)
        self.ir = pipeline.optimize(self.source_ir)
        self.name = self.ir.name
        self.needs = self.ir.body.inputs_read()
        self.input_names = INPUTS + tuple(d.name for d in self.ir.inputs)   # what a call takes by keyword
        # the declared inputs the mask reads (layouts, kern.mask); the rest only the score reads
        self.mask_inputs = tuple(d for d in self.ir.inputs if d.name in self.needs)
        self.score_only = frozenset(d.name for d in self.ir.inputs) - self.needs
        self.score_inputs = () if self.ir.score is None else tuple(d.name for d in score_ir.float_reads(self.ir.score))
        self.key = ops.register(self, repr((self.ir, self.config, self.autotune)), self.name)
        self._cache: dict = {}   # shares, specializations, generated code, layouts, tables, CPU plans

    def _cached(self, key, make):
        if key not in self._cache:
            if len(self._cache) > 256:  # many shapes: start over rather than grow without bound
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def __repr__(self) -> str:
        return f"<sparsec pattern {self.name}: {self.ir.body.show()}>"

    @property
    def cost(self) -> sympy.Expr:
        """Allowed (query, key) pairs at n_q = n_k = n, as a sympy expression of n."""
        return _tidy(self.ir.body.cost({"n": N, "n_q": N, "n_k": N}))

    def symbolic_cost(self) -> sympy.Expr:
        """The same with params and lets left as symbols (before constant folding)."""
        return _tidy(self.source_ir.body.cost({"n": N, "n_q": N, "n_k": N}))

    # ---- the reference and the layouts ----
    def _lengths(self, n_q, n_k, q_offset):
        n_q = _int_arg("n_q", n_q, 1)
        n_k = n_q if n_k is None else _int_arg("n_k", n_k, 1)
        q_offset = n_k - n_q if q_offset is None else _int_arg("q_offset", q_offset, -(1 << 62))
        why = check_lengths(n_q, n_k, q_offset)
        if why:
            raise ValueError(why)
        return n_q, n_k, q_offset

    def _segments(self, segment_ids, n_k):
        seg = _numpy("segment_ids", segment_ids, 2)
        if "segment_ids" in self.needs and seg is None:
            raise ValueError(f"pattern {self.name} uses document: pass segment_ids= of shape (B, n_k)")
        if seg is not None and "segment_ids" not in self.needs:
            raise ValueError(f"segment_ids= given, but pattern {self.name} has no document part")
        if seg is not None and (seg.shape[1] != n_k or not np.issubdtype(seg.dtype, np.integer)):
            raise ValueError(f"segment_ids must be integers of shape (B, n_k={n_k}), got {seg.dtype} {seg.shape}")
        return seg

    def _check_declared(self, call: Call, inputs: dict) -> None:
        """A call of a pattern that reads declared inputs: the inputs checked as kern.mask checks
        them, on q's device, from their shapes and dtypes (and an int input's extremes: one small
        transfer), never copied whole to the host."""
        for d in self.ir.inputs:
            x = inputs.get(d.name)
            if isinstance(x, torch.Tensor) and x.device != call.device:
                raise ValueError(f"{d.name} must be on q's device {call.device}, got {x.device}")
        facts = {n: TensorFacts(x) if isinstance(x, torch.Tensor) else _numpy(n, x, None) for n, x in inputs.items()
                 if n in self.input_names[len(INPUTS):]}
        _, batch = check_arrays(self.name, self.ir.inputs, facts,
                                call.heads, {"n": call.n_k, "n_q": call.n_q, "n_k": call.n_k})
        if batch not in (1, call.batch):
            raise ValueError(f"the inputs' b axes have size {batch}, but q has batch {call.batch}")

    def _mask_given(self, inputs: dict) -> dict:
        """The given inputs the mask reads, as numpy (those only the score reads may be given too)."""
        return {n: _numpy(n, x, None) for n, x in inputs.items() if n not in self.score_only}

    def _score(self, n_q: int, n_k: int, q_offset: int, heads: int, inputs: dict):
        """The call's TorchScore (runtime/scores.py), or None for a pattern without `with`."""
        if self.ir.score is None:
            return None
        expr = self._cached(("score", n_q, n_k, q_offset, heads),
                            lambda: score_ir.specialize(self.ir.score, n_q, n_k, q_offset, heads))
        return scores.TorchScore(expr, {d.name: inputs[d.name] for d in E.reads(expr)}, n_q, n_k)

    def score_function(self, n_q: int, n_k: int | None = None, heads: int = 1, q_offset: int | None = None,
                       **inputs):
        """S' = EXPR over a dense score tensor (B, heads, n_q, n_k) -> the same shape, in torch ops,
        differentiable in the scores and the float inputs (the reference's; None without `with`)."""
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        score = self._score(n_q, n_k, q_offset, _int_arg("heads", heads, 1), inputs)
        if score is None:
            return None
        i = (torch.arange(n_q) + q_offset).view(1, 1, n_q, 1)
        j, h = torch.arange(n_k).view(1, 1, 1, n_k), torch.arange(heads).view(1, heads, 1, 1)
        return lambda s: score.apply(s, i.to(s.device), j.to(s.device), h.to(s.device),
                                     torch.arange(s.shape[0], device=s.device).view(-1, 1, 1, 1))

    def score_mod(self, n_q: int, n_k: int | None = None, heads: int = 1, q_offset: int | None = None,
                  device="cpu", **inputs):
        """Flex's score_mod(score, b, h, q_idx, kv_idx) of the pattern's with expression, lowered
        to torch ops for these lengths (None for a pattern without one). inputs: the declared
        inputs the expression reads, as tensors (read as given, on `device`)."""
        if self.ir.score is None:
            return None
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        heads, device = _int_arg("heads", heads, 1), torch.device(device)
        reads = E.reads(self.ir.score)
        names = {d.name for d in reads}
        check_arrays(self.name, reads, {n: _numpy(n, x, None) for n, x in inputs.items() if n in names}, heads,
                     {"n": n_k, "n_q": n_q, "n_k": n_k})
        score = self._score(n_q, n_k, q_offset, heads, {n: torch.as_tensor(x).to(device) for n, x in inputs.items()})
        return scores.score_mod(score.expr, q_offset, n_q, n_k, score.inputs)

    def mask(self, n_q: int, n_k: int | None = None, heads: int = 1, q_offset: int | None = None,
             q=None, k=None, segment_ids=None, centroids=None, rotations=None, share: int | None = None,
             **inputs):
        """The dense reference mask, bool (B or 1, heads, n_q, n_k), as a torch tensor; with
        share=i, the mask of the pairs share i computes (see `shares`). inputs: the program's
        declared call-time inputs, by name (numpy arrays or tensors)."""
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        heads = _int_arg("heads", heads, 1)
        seg = self._segments(segment_ids, n_k)
        declared, declared_batch = check_arrays(
            self.name, self.mask_inputs, self._mask_given(inputs), heads, {"n": n_k, "n_q": n_q, "n_k": n_k})
        q, k = _numpy("q", q, 4), _numpy("k", k, 4)
        centroids, rotations = _numpy("centroids", centroids, 3), _numpy("rotations", rotations, 3)
        if {"q", "k"} & self.needs:
            if q is None or k is None:
                raise ValueError(f"pattern {self.name} is content-based: pass q= (B, H, n_q, D) and k= (B, Hkv, n_k, D)")
            if q.shape[1] != heads or q.shape[2] != n_q or k.shape[2] != n_k or q.shape[1] % k.shape[1] \
                    or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
                raise ValueError(f"q must be (B, heads={heads}, n_q={n_q}, D) and k (B, Hkv, n_k={n_k}, D) with "
                                 f"heads % Hkv == 0; got q {q.shape}, k {k.shape}")
        batch = seg.shape[0] if seg is not None else q.shape[0] if {"q", "k"} & self.needs else declared_batch
        if share is not None and _int_arg("share", share, 0) >= len(self.shares):
            raise ValueError(f"share must be below {len(self.shares)} (pattern {self.name} runs as "
                             f"{len(self.shares)} shares), got {share}")
        body = specialize(self.ir if share is None else self.shares[share].body, n_q, n_k, q_offset, heads)
        return ref.dense_mask(body, n_q, n_k, q_offset, heads, batch, dict(
            segment_ids=seg, q=q, k=k, centroids=centroids, rotations=rotations, **declared))

    def layout(self, n_q: int, n_k: int | None = None, block_m: int = 64, block_n: int = 64,
               heads: int = 1, q_offset: int | None = None, segment_ids=None, **inputs) -> BlockLayout:
        """The block layout for these lengths and tile sizes (heads: layouts differ per head when
        the pattern does; otherwise one layout is shared, with a heads dimension of 1). A
        content-based pattern has none of its own (its tiles depend on q and k): an error that
        points at share_layouts(q, k), the layouts a call builds. inputs: the declared inputs of a
        pattern that reads them (then one layout per batch row)."""
        if {"q", "k"} & self.needs:
            raise ValueError(f"pattern {self.name} is content-based: its tiles depend on q and k, so it has no "
                             f"layout of its own; kern.share_layouts(q, k) gives the layouts a call builds")
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        block_m, block_n = _int_arg("block_m", block_m, 1), _int_arg("block_n", block_n, 1)
        heads = _int_arg("heads", heads, 1)
        seg = self._segments(segment_ids, n_k)
        return self._build(specialize(self.ir, n_q, n_k, q_offset, heads), n_q, n_k, block_m, block_n, q_offset,
                           heads, seg, inputs)[0]

    def _build(self, body, n_q, n_k, block_m, block_n, q_offset, heads, seg, inputs: dict):
        """(layout, its call inputs as numpy by name): with declared inputs, checked, one layout
        per batch row built from their values."""
        declared, batch = check_arrays(self.name, self.mask_inputs, self._mask_given(inputs), heads,
                                       {"n": n_k, "n_q": n_q, "n_k": n_k})
        if not self.mask_inputs:
            return build_layout(body, n_q, n_k, block_m, block_n, q_offset, heads, seg), {"segment_ids": seg}
        if seg is not None:
            if batch not in (1, seg.shape[0]):
                raise ValueError(f"the inputs' b axes have size {batch}, but segment_ids has {seg.shape[0]} rows")
            declared, batch = {**declared, "segment_ids": seg}, seg.shape[0]
        space = TableSpace(n_q, n_k, q_offset, heads, batch, 1, declared)
        return build_layout(body, n_q, n_k, block_m, block_n, q_offset, heads, space=space), declared

    def _flex_layout(self, n_q, n_k, heads, block, q_offset, segment_ids, inputs: dict):
        """(specialized body, layout at block x block tiles, its TableSpace) for Flex's masks."""
        if {"q", "k"} & self.needs:
            raise ValueError(f"pattern {self.name} is content-based: its tiles depend on q and k, so it has no "
                             f"block mask of its own (backend='flex' builds one per call)")
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        block, heads = _int_arg("block", block, 1), _int_arg("heads", heads, 1)
        seg = self._segments(segment_ids, n_k)
        body = specialize(self.ir, n_q, n_k, q_offset, heads)
        lay, given = self._build(body, n_q, n_k, block, block, q_offset, heads, seg, inputs)
        return body, lay, TableSpace(n_q, n_k, q_offset, lay.shape[1], lay.shape[0], inputs=given)

    def tile_masks(self, n_q: int, n_k: int | None = None, heads: int = 1, block: int = 128,
                   q_offset: int | None = None, segment_ids=None, **inputs):
        """The layout at block x block tiles and its PARTIAL tiles' masks (runtime/flex.py)."""
        return flex.tile_masks(*self._flex_layout(n_q, n_k, heads, block, q_offset, segment_ids, inputs))

    def block_mask(self, n_q: int, n_k: int | None = None, heads: int = 1, batch: int = 1, device="cpu",
                   block: int = 128, q_offset: int | None = None, segment_ids=None, **inputs):
        """The pattern as FlexAttention's BlockMask for (batch, heads, n_q, n_k): built from
        sparsec's layout at block x block tiles, FULL and PARTIAL tiles as it lists them (not
        from all pairs). Its mask_mod is `mask_mod`'s torch lowering. inputs: the declared ones."""
        batch = _int_arg("batch", batch, 1)
        body, lay, space = self._flex_layout(n_q, n_k, heads, block, q_offset, segment_ids, inputs)
        if lay.shape[0] not in (1, batch):
            given = "the inputs' b axes have" if self.mask_inputs else "segment_ids has"
            raise ValueError(f"batch={batch}, but {given} {lay.shape[0]} rows")
        return flex.share_block_mask(body, lay, space, None, batch, heads, torch.device(device))

    def mask_mod(self, n_q: int, n_k: int | None = None, heads: int = 1, q_offset: int | None = None,
                 segment_ids=None, device="cpu", **inputs):
        """Flex's mask_mod(b, h, q_idx, kv_idx) of the pattern, lowered from the IR to torch ops
        (runtime/mask_mods.py) for these lengths and heads (those Flex runs with: random draws per
        head): a pattern's arguments may depend on n, which Flex's mask_mod is never told.
        segment_ids: a (B, n_k) integer tensor for document patterns; inputs: the declared ones
        (read as given, on `device`); device: where its tensors go."""
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        self._segments(segment_ids, n_k)
        heads, device = _int_arg("heads", heads, 1), torch.device(device)
        check_arrays(self.name, self.mask_inputs, self._mask_given(inputs), heads, {"n": n_k, "n_q": n_q, "n_k": n_k})
        given = {name: torch.as_tensor(x).to(device) for name, x in inputs.items() if name not in self.score_only}
        if segment_ids is not None:
            given["segment_ids"] = torch.as_tensor(segment_ids).long().to(device)
        body = specialize(self.ir, n_q, n_k, q_offset, heads)
        return mask_mods.mask_mod(body, n_q, n_k, q_offset, heads, given, device)

    def share_layouts(self, q, k, block_m: int = 64, block_n: int = 64, q_offset: int | None = None,
                      **inputs) -> list[tuple[Share, BlockLayout, tuple | None]]:
        """The layouts a call on q, k builds, one per share: (share, layout, order), where order
        is None for the positional order, else (q rows, k rows), numpy (B, H, n): the original row
        of each sorted row, which is what the layout's tiles are made of."""
        call = check_call(self.name, self.needs, q, k, k, None, q_offset, inputs)
        block_m, block_n = _int_arg("block_m", block_m, 1), _int_arg("block_n", block_n, 1)
        values, bodies, orders = self._prepare(call, q, k, inputs)
        out = []
        for i, (share, body) in enumerate(zip(self.shares, bodies)):
            r = self._request(i, body, call, values, orders[i], block_m, block_n)
            lay = pipeline.build_layout(r, self._cached, "host")
            rows = None if r.order is None else (r.order.q_pos.cpu().numpy(), r.order.k_pos.cpu().numpy())
            out.append((share, lay, rows))
        return out

    # ---- kernels ----
    @property
    def shares(self) -> list[Share]:
        """The disjoint shares the body runs as, each in its own token order (passes/shares.py):
        one positional share unless lsh or cluster terms ask for sorted orders."""
        return self._cached(("shares",), lambda: pipeline.split_shares(self.ir))

    def generated(self, share: int = 0) -> Generated:
        """The generated module (forward and backward kernels) of one share; tile sizes, warps
        and stages are chosen at launch, so one source serves every config."""
        name = self.name if len(self.shares) == 1 else f"{self.name}_share{share}"
        return self._cached(("source", share), lambda: pipeline.emit(name, self.shares[share].body, self.ir.score))

    @property
    def source(self) -> str:
        """The generated Triton source, every share's module in turn."""
        return "\n\n".join(self.generated(i).source for i in range(len(self.shares)))

    def __call__(self, q, k, v, scale: float | None = None, q_offset: int | None = None,
                 return_lse: bool = False, backend: str | None = None, plan=None, **inputs):
        """Attention of q (B, Hq, n_q, D) over k, v (B, Hkv, n_k, D) under the pattern: O, or
        (O, LSE) with return_lse=True. backend: 'triton' (CUDA), 'interpret' (the generated kernel
        in Triton's interpreter, CPU), 'cpu' (the fast CPU path) or 'flex' (compiled FlexAttention
        under the layout's BlockMask; on CPU forward-only); default from SPARSEC_BACKEND, else by
        device. One call is one torch.ops.sparsec.attention (runtime/ops.py): what runs
        here, before it, is only what torch.compile can trace without a break. plan: a
        sparsec.distributed plan; q, k, v are then this rank's rows (spec section 9)."""
        check_tensors(q, k, v)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
        if plan is not None:
            if q_offset is not None:
                raise ValueError("q_offset= and plan= do not go together: the plan places every row")
            return plan.attend(self, q, k, v, scale, return_lse, backend, **inputs)
        given = ops.input_list(inputs, self.input_names)
        o, lse = ops.attention(q, k, v, given, ops.score_input_list(self.name, inputs, self.score_inputs), self.key,
                               *op_options(scale, q_offset, backend), wants_grad(q, k, v), return_lse)
        return (o, lse) if return_lse else o

    def forward_op(self, q, k, v, inputs: dict, scale, q_offset, backend, training: bool, return_lse: bool):
        """torch.ops.sparsec.attention: every share run, merged by LSE."""
        if choose_backend(backend, q.device) == "flex":
            flex.check_cpu_call(q.device, training or return_lse or len(self.shares) > 1)
        return content.merge_by_lse([b.run() for b in self.bind(q, k, v, scale, q_offset, backend, training,
                                                                **inputs)], q.dtype)

    def backward_op(self, q, k, v, o, lse, do, dlse, inputs: dict, scale, q_offset, backend, input_grads: bool):
        """torch.ops.sparsec.attention_backward: each share's part of the gradients, summed; with
        input_grads, the gradients of the float inputs the score expression reads (by name)."""
        bound = self.bind(q, k, v, scale, q_offset, backend, True, **inputs)
        score = bound[0].score
        if input_grads and score is not None:
            score.want_grads(inputs)
        parts = [b.grad(o, lse, do, dlse) for b in bound]
        grads = {} if score is None else {n: g.to(inputs[n].dtype) for n, g in score.grads.items()}
        if len(parts) == 1:
            return (*parts[0], grads)
        return (*(sum(p[i].float() for p in parts).to(x.dtype) for i, x in enumerate((q, k, v))), grads)

    def bind(self, q, k, v, scale: float | None = None, q_offset: int | None = None, backend: str | None = None,
             training: bool | None = None, **inputs) -> list[BoundShare]:
        """Every share of this call with its layout, tables and config resolved: what a call
        runs (`[b.run() for b in ...]`, merged by LSE), for timing the kernels alone. training:
        whether a backward follows (for the tiles; None: whether q, k or v need a gradient)."""
        call = check_call(self.name, self.needs | self.score_only, q, k, v, scale, q_offset, inputs)
        backend = choose_backend(backend, call.device)
        training = wants_grad(q, k, v) if training is None else training
        if self.ir.inputs:
            self._check_declared(call, inputs)
        score = self._score(call.n_q, call.n_k, call.q_offset, call.heads, inputs)
        masked = {n: x for n, x in inputs.items() if n not in self.score_only}   # what layouts read
        values, bodies, orders = self._prepare(call, q, k, masked)
        out = []
        for i, (body, order) in enumerate(zip(bodies, orders)):
            c, args = self._arguments(order, call, q, k, v)
            config = self._config(i, body, c, backend, values, order, args, training, score=score)
            out.append(BoundShare(i, self._bind(i, body, c, backend, config, values, order, score), args, order,
                                  call.heads // call.kv_heads, score))
        return out

    def _prepare(self, call: Call, q, k, inputs: dict) -> tuple[dict, list, list]:
        """The call's inputs (with content ids and selections, computed once per call on q's
        device), each share's body specialized for its lengths, and each share's sorted order
        (None for the positional order)."""
        values = {name: x for name, x in inputs.items() if x is not None}
        if "segment_ids" in values:
            values["segment_ids"] = values["segment_ids"].to(torch.int64).contiguous()   # ids 0 and 2**32 differ
        bodies = [self._cached(("specialized", i, call.n_q, call.n_k, call.q_offset, call.heads),
                               lambda: pipeline.specialize(s.body, call))
                  for i, s in enumerate(self.shares)]
        if {"q", "k"} & self.needs:
            values.update(q=q, k=k, content=content.content_values(
                [n for body in bodies for n in body.nodes()], q, k, call, values))
        orders = [None if s.key is None else SortedOrder.of(values["content"][pipeline.specialize(s.key, call)])
                  for s in self.shares]
        return values, bodies, orders

    @staticmethod
    def _arguments(order: SortedOrder | None, call: Call, q, k, v):
        """(call, (q, k, v)) as a share's kernels see them: a sorted share gets its gathered rows,
        each query head with its own K/V rows."""
        if order is None:
            return call, (q, k, v)
        return replace(call, kv_heads=call.heads), content.gather(order, q, k, v, call.heads // call.kv_heads)

    def _request(self, share: int, body, call: Call, values: dict, order, block_m: int, block_n: int):
        return LayoutRequest(share, body, self.shares[share].full, call.n_q, call.n_k, call.q_offset, call.heads,
                             call.batch, block_m, block_n, call.device, values, order)

    def _bind(self, share: int, body, call: Call, backend: str, config: TileConfig, values: dict, order, score=None):
        r = self._request(share, body, call, values, order, config.block_m, config.block_n)
        return pipeline.bind(backend, r, call, config, lambda: self.generated(share), self._cached, self.name, score)

    # ---- tiles ----
    def _config(self, share: int, body, call: Call, backend: str, values: dict, order, args: tuple,
                training: bool, retune: bool = False, must_save: bool = False,
                budget_s: float | None = None, score=None) -> TileConfig:
        """Share `share`'s tiles for this call: the user's config=; else, on a GPU with autotune
        on, the tuned config for its key (from the tuning cache, or tuned now on this call's own
        layout and inputs, with the call's score expression); else the backend's default.
        Resolved once per pattern and shape."""
        if self.config is not None:
            return self.config
        if backend != "triton" or not self.autotune:
            return default_config(backend, call)
        dtype = str(args[0].dtype).removeprefix("torch.")
        memo = ("config", share, call.n_q, call.n_k, call.dim, dtype, call.heads // call.kv_heads, call.device,
                training)
        if retune:
            self._cache.pop(memo, None)
        return self._cached(memo, lambda: self._tuned(share, body, call, backend, values, order, args, dtype,
                                                      training, retune, must_save, budget_s, score))

    def _tuned(self, share: int, body, call: Call, backend: str, values: dict, order, args: tuple, dtype: str,
               training: bool, retune: bool, must_save: bool, budget_s: float | None, score=None) -> TileConfig:
        """The tuning cache's config for this share and call, or the winner of tuning it now."""
        import triton   # only on the GPU path
        scored = "" if self.ir.score is None else f" with {E.show(self.ir.score)}"   # its own kernels
        key = tuning.make_key(body.show() + scored, call.n_q, call.n_k, call.dim, dtype, call.heads // call.kv_heads,
                              torch.cuda.get_device_name(call.device), triton.__version__,
                              "training" if training else "forward")
        props = torch.cuda.get_device_properties(call.device)
        configs = lambda: tuning.candidates(call.dim, args[0].element_size(), call.n_q, call.n_k,
                                            props.shared_memory_per_multiprocessor - 1024)
        timer = tuning.kernel_timer(lambda config: self._bind(share, body, call, backend, config, values, order, score),
                                    args, training)
        label = f"sparsec: tuning {self.name}" + (f" share {share}" if len(self.shares) > 1 else "")
        found = tuning.tuned(key, tuning.cache_at(cache_dir() / tuning.FILE), configs, timer,
                             tuning.Progress(label), retune, must_save, budget_s)
        return found or default_config(backend, call)

    def tune(self, q, k, v, scale: float | None = None, q_offset: int | None = None, retune: bool = False,
             budget_s: float | None = None, **inputs) -> list[TileConfig]:
        """Tune every share for this call's shapes now (a GPU call does so itself the first time a
        key is seen): the chosen config per share. retune=True times again even when cached;
        budget_s caps each share's search (default: SPARSEC_TUNE_BUDGET_S, else no cap)."""
        tuning.budget(budget_s)   # a bad budget is an error here, on any device
        call = check_call(self.name, self.needs | self.score_only, q, k, v, scale, q_offset, inputs)
        backend = choose_backend(None, call.device)
        if backend != "triton":
            default = self.config or default_config(backend, call)
            print(f"sparsec: no CUDA tensors ({call.device}): the autotuner is skipped; tiles stay "
                  f"{default.show()}", file=sys.stderr)
            return [default] * len(self.shares)
        score = self._score(call.n_q, call.n_k, call.q_offset, call.heads, inputs)
        values, bodies, orders = self._prepare(call, q, k, {n: x for n, x in inputs.items() if n not in self.score_only})
        out = []
        for i, (body, order) in enumerate(zip(bodies, orders)):
            c, args = self._arguments(order, call, q, k, v)
            out.append(self._config(i, body, c, backend, values, order, args, wants_grad(q, k, v), retune,
                                    must_save=True, budget_s=budget_s, score=score))
        return out


def compile(path_or_source: str | os.PathLike, pattern: str | None = None, autotune: bool | None = None,
            config: TileConfig | None = None, **params) -> CompiledPattern:
    """Compile a .sa program (a path or its text); `pattern` picks one by name (default: the last);
    keyword arguments override its params. On a GPU the tiles are autotuned per share and shape
    bucket (the first call of a new key times the candidates; the winner is cached on disk);
    autotune=False keeps the defaults (so does SPARSEC_AUTOTUNE=0 when autotune is not given),
    and config= fixes the tiles on every backend."""
    return CompiledPattern(path_or_source, pattern, autotune, config, **params)
