"""`sparsec.compile`: source -> parse -> elaborate -> passes, and the compiled pattern users hold."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import sympy
import torch

from . import cpu, passes, routing, selections, tuning
from . import runtime as R
from .autograd import attend
from .cache import cache_dir
from .codegen import Generated, TileConfig, emit_kernels
from .documents import DocumentLayouts, static_part
from .elaborate import elaborate, pattern_names
from .errors import Source
from .ir import expr as E
from .ir.limits import EXACT, check_lengths
from .ir.program import Binding, Definition
from .ir.tiles import Grid, TableSpace
from .layout import BlockLayout, build_layout
from .shares import Share, active_heads, offset_bounds
from .shares import split as split_shares
from .syntax import Module, parse

N = sympy.Symbol("n", positive=True, integer=True)


def read_source(path_or_source: str | os.PathLike) -> Source:
    """A path (a Path, or a string ending in .sa with no newline) or the program text itself."""
    if isinstance(path_or_source, os.PathLike) or (
            isinstance(path_or_source, str) and "\n" not in path_or_source and path_or_source.endswith(".sa")):
        path = Path(path_or_source)
        if not path.is_file():
            raise FileNotFoundError(f"path_or_source: no such .sa file: {path}")
        return Source(path.read_text(), str(path))
    if not isinstance(path_or_source, str):
        raise TypeError(f"path_or_source must be a path or the program text, got {type(path_or_source).__name__}")
    return Source(path_or_source, "<string>")


def bind_params(d: Definition, module: Module, params: dict[str, Any]) -> Definition:
    """The definition with the given parameter values in place of the defaults."""
    declared = [s.name for s in module.statements if s.kind == "param"]
    for name, v in params.items():
        if name not in declared:
            lets = [s.name for s in module.statements if s.kind == "let"]
            why = " (it is a let, not a param)" if name in lets else ""
            raise ValueError(f"{name}=: no such param{why}; the program declares: {', '.join(declared) or 'none'}")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}= must be an int, got {type(v).__name__}")
        if abs(v) >= EXACT:
            raise ValueError(f"{name}= must be below 2**256 in magnitude (as every constant of the language), got {v}")
    bindings = tuple(Binding(b.kind, b.name, E.Const(int(params[b.name])), b.span)
                     if b.kind == "param" and b.name in params else b for b in d.bindings)
    return Definition(d.name, bindings, d.body, d.span)


def _int_arg(name: str, v, lowest: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lowest:
        raise ValueError(f"{name} must be at least {lowest}, got {v}")
    return int(v)


def _numpy(name: str, x, ndim: int):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()   # numpy has no bfloat16
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _tidy(e: sympy.Expr) -> sympy.Expr:
    e = sympy.expand(e)
    return sympy.simplify(e) if sympy.count_ops(e) < 60 else e


class Kernel:
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
        module = parse(self.program.text, self.program.filename)
        self.patterns = pattern_names(module)
        self.source_ir = bind_params(elaborate(module, pattern), module, params)
        self.ir = passes.optimize(self.source_ir)
        self.name = self.ir.name
        self.needs = self.ir.body.runtime_needs()
        self._cache: dict = {}   # specializations, generated code, layouts, tables, CPU plans

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

    def mask(self, n_q: int, n_k: int | None = None, heads: int = 1, q_offset: int | None = None,
             q=None, k=None, segment_ids=None, centroids=None, rotations=None, share: int | None = None):
        """The dense reference mask, bool (B or 1, heads, n_q, n_k), as a torch tensor; with
        share=i, the mask of the pairs share i computes (see `shares`)."""
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        heads = _int_arg("heads", heads, 1)
        seg = self._segments(segment_ids, n_k)
        q, k = _numpy("q", q, 4), _numpy("k", k, 4)
        centroids, rotations = _numpy("centroids", centroids, 3), _numpy("rotations", rotations, 3)
        if {"q", "k"} & self.needs:
            if q is None or k is None:
                raise ValueError(f"pattern {self.name} is content-based: pass q= (B, H, n_q, D) and k= (B, Hkv, n_k, D)")
            if q.shape[1] != heads or q.shape[2] != n_q or k.shape[2] != n_k or q.shape[1] % k.shape[1] \
                    or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
                raise ValueError(f"q must be (B, heads={heads}, n_q={n_q}, D) and k (B, Hkv, n_k={n_k}, D) with "
                                 f"heads % Hkv == 0; got q {q.shape}, k {k.shape}")
        batch = seg.shape[0] if seg is not None else q.shape[0] if {"q", "k"} & self.needs else 1
        if share is not None and _int_arg("share", share, 0) >= len(self.shares):
            raise ValueError(f"share must be below {len(self.shares)} (pattern {self.name} runs as "
                             f"{len(self.shares)} shares), got {share}")
        body = passes.specialize(self.ir if share is None else self.shares[share].body, n_q, n_k, q_offset, heads)
        per_head = heads if body.varies_with_head() else 1
        out = np.zeros((batch, heads, n_q, n_k), bool)
        pos, keys = np.arange(n_q, dtype=np.int64) + q_offset, np.arange(n_k, dtype=np.int64)
        space = TableSpace(n_q, n_k, q_offset, heads, batch, inputs=dict(
            segment_ids=seg, q=q, k=k, centroids=centroids, rotations=rotations))
        for b in range(batch):
            for h in range(per_head):
                out[b, h] = body.mask(Grid(pos, keys, n_q, n_k, h, space.per_head(b, h)))
            if per_head == 1:
                out[b, 1:] = out[b, 0]
        return torch.from_numpy(out)

    def layout(self, n_q: int, n_k: int | None = None, block_m: int = 64, block_n: int = 64,
               heads: int = 1, q_offset: int | None = None, segment_ids=None) -> BlockLayout:
        """The block layout for these lengths and tile sizes (heads: layouts differ per head when
        the pattern does; otherwise one layout is shared, with a heads dimension of 1). A
        content-based pattern has none of its own (its tiles depend on q and k): an error that
        points at share_layouts(q, k), the layouts a call builds."""
        if {"q", "k"} & self.needs:
            raise ValueError(f"pattern {self.name} is content-based: its tiles depend on q and k, so it has no "
                             f"layout of its own; kern.share_layouts(q, k) gives the layouts a call builds")
        n_q, n_k, q_offset = self._lengths(n_q, n_k, q_offset)
        block_m, block_n = _int_arg("block_m", block_m, 1), _int_arg("block_n", block_n, 1)
        heads = _int_arg("heads", heads, 1)
        seg = self._segments(segment_ids, n_k)
        body = passes.specialize(self.ir, n_q, n_k, q_offset, heads)
        return build_layout(body, n_q, n_k, block_m, block_n, q_offset, heads, seg)

    # ---- kernels ----
    @property
    def shares(self) -> list[Share]:
        """The disjoint shares the body runs as, each in its own token order (shares.py): one
        positional share unless lsh or cluster terms ask for sorted orders."""
        return self._cached(("shares",), lambda: split_shares(self.ir.body))

    def generated(self, config: TileConfig | None = None, share: int = 0) -> Generated:
        """The generated kernels (forward and backward) of one share for a tile config (default:
        the GPU default)."""
        config = config or TileConfig()
        body = self.shares[share].body
        name = self.name if len(self.shares) == 1 else f"{self.name}_share{share}"
        return self._cached(("source", share, config), lambda: emit_kernels(Definition(name, (), body), config))

    @property
    def source(self) -> str:
        """The generated Triton source (default tile config), every share's module in turn."""
        return "\n\n".join(self.generated(share=i).source for i in range(len(self.shares)))

    def __call__(self, q, k, v, scale: float | None = None, q_offset: int | None = None,
                 return_lse: bool = False, backend: str | None = None, **runtime):
        """Attention of q (B, Hq, n_q, D) over k, v (B, Hkv, n_k, D) under the pattern: O, or
        (O, LSE) with return_lse=True. backend: 'triton' (CUDA), 'interpret' (the generated kernel
        in Triton's interpreter, CPU) or 'cpu' (the fast CPU path); default from SPARSEC_BACKEND,
        else by device."""
        call = R.check_call(self.name, self.needs, q, k, v, scale, q_offset, runtime)
        backend = R.choose_backend(backend, call.device)
        inputs, bodies = self._prepare(call, q, k, runtime)
        parts = []
        for i, body, order, c, args in self._share_calls(call, inputs, bodies, q, k, v):
            config = self._config(i, body, c, backend, inputs, order, args)
            out = attend(self._runner(i, body, c, backend, config, inputs, order), *args)
            parts.append(out if order is None else order.scatter(*out))
        o, lse = routing.merge_by_lse(parts, q.dtype)
        return (o, lse) if return_lse else o

    def _share_calls(self, call: R.Call, inputs: dict, bodies: list, q, k, v):
        """Per share: (index, body, order, call, (q, k, v)) as its kernels see them: a sorted
        share gets its gathered rows, each query head with its own K/V rows."""
        for i, (share, body) in enumerate(zip(self.shares, bodies)):
            if share.key is None:
                yield i, body, None, call, (q, k, v)
            else:
                order = self._order(share, call, inputs)
                yield i, body, order, replace(call, kv_heads=call.heads), order.gather(q, k, v, call)

    def _config(self, share: int, body, call: R.Call, backend: str, inputs: dict,
                order: routing.SortedOrder | None, args: tuple, retune: bool = False,
                must_save: bool = False) -> TileConfig:
        """Share `share`'s tiles for this call: the user's config=; else, on a GPU with autotune
        on, the tuned config for its key (from the tuning cache, or tuned now on this call's own
        layout and inputs); else the backend's default. Resolved once per kernel and shape."""
        if self.config is not None:
            return self.config
        if backend != "triton" or not self.autotune:
            return R.default_config(backend, call)
        dtype = str(args[0].dtype).removeprefix("torch.")
        training = torch.is_grad_enabled() and any(x.requires_grad for x in args)
        memo = ("config", share, call.n_q, call.n_k, call.dim, dtype, call.heads // call.kv_heads, call.device,
                training)
        if retune:
            self._cache.pop(memo, None)
        return self._cached(memo, lambda: self._tuned(share, body, call, backend, inputs, order, args, dtype,
                                                      training, retune, must_save))

    def _tuned(self, share: int, body, call: R.Call, backend: str, inputs: dict, order, args: tuple, dtype: str,
               training: bool, retune: bool, must_save: bool) -> TileConfig:
        """The tuning cache's config for this share and call, or the winner of tuning it now."""
        import triton   # only on the GPU path
        key = tuning.make_key(body.show(), call.n_q, call.n_k, call.dim, dtype, call.heads // call.kv_heads,
                              torch.cuda.get_device_name(call.device), triton.__version__,
                              "training" if training else "forward")
        props = torch.cuda.get_device_properties(call.device)
        configs = lambda: tuning.candidates(call.dim, args[0].element_size(), call.n_q, call.n_k,
                                            props.shared_memory_per_multiprocessor - 1024)
        timer = tuning.kernel_timer(lambda config: self._runner(share, body, call, backend, config, inputs, order),
                                    args, training)
        label = f"sparsec: tuning {self.name}" + (f" share {share}" if len(self.shares) > 1 else "")
        found = tuning.tuned(key, tuning.cache_at(cache_dir() / tuning.FILE), configs, timer,
                             tuning.Progress(label), retune, must_save)
        return found or R.default_config(backend, call)

    def tune(self, q, k, v, scale: float | None = None, q_offset: int | None = None, retune: bool = False,
             **runtime) -> list[TileConfig]:
        """Tune every share for this call's shapes now (a GPU call does so itself the first time a
        key is seen): the chosen config per share. retune=True times again even when cached."""
        call = R.check_call(self.name, self.needs, q, k, v, scale, q_offset, runtime)
        backend = R.choose_backend(None, call.device)
        if backend != "triton":
            default = self.config or R.default_config(backend, call)
            print(f"sparsec: no CUDA tensors ({call.device}): the autotuner is skipped; tiles stay "
                  f"{default.show()}", file=sys.stderr)
            return [default] * len(self.shares)
        inputs, bodies = self._prepare(call, q, k, runtime)
        return [self._config(i, body, c, backend, inputs, order, args, retune, must_save=True)
                for i, body, order, c, args in self._share_calls(call, inputs, bodies, q, k, v)]

    def _prepare(self, call: R.Call, q, k, runtime: dict) -> tuple[dict, list]:
        """The call's runtime inputs (with content ids and selections, computed once per call on
        q's device) and each share's body specialized for its lengths."""
        inputs = {name: x for name, x in runtime.items() if x is not None}
        if "segment_ids" in inputs:
            inputs["segment_ids"] = inputs["segment_ids"].to(torch.int64).contiguous()   # ids 0 and 2**32 differ
        bodies = [self._cached(("specialized", i, call.n_q, call.n_k, call.q_offset, call.heads),
                               lambda: passes.specialize(s.body, call.n_q, call.n_k, call.q_offset, call.heads))
                  for i, s in enumerate(self.shares)]
        if {"q", "k"} & self.needs:
            inputs.update(q=q, k=k, content=routing.content_values(
                [n for body in bodies for n in body.nodes()], q, k, call, inputs))
        return inputs, bodies

    def _order(self, share: Share, call: R.Call, inputs: dict) -> routing.SortedOrder:
        key = passes.specialize(share.key, call.n_q, call.n_k, call.q_offset, call.heads)
        return routing.SortedOrder.of(inputs["content"][key])

    def _sorted_layout(self, share: int, body, order: routing.SortedOrder, call: R.Call, block_m: int,
                       block_n: int) -> R.DeviceLayout:
        """A sorted share's layout: tiles whose bucket ranges meet, less those its bands, causal
        or heads(...) slots rule out (worked out once per share and shape)."""
        offsets, heads = self._cached(("sorted", share, call.n_q, call.n_k, call.heads),
                                      lambda: (offset_bounds(body), active_heads(body, call.heads)))
        return order.layout(block_m, block_n, self.shares[share].full, offsets, call.q_offset, heads)

    def share_layouts(self, q, k, block_m: int = 64, block_n: int = 64, q_offset: int | None = None,
                      **runtime) -> list[tuple[Share, BlockLayout, tuple | None]]:
        """The layouts a call on q, k builds, one per share: (share, layout, order), where order
        is None for the positional order, else (q rows, k rows), numpy (B, H, n): the original row
        of each sorted row, which is what the layout's tiles are made of."""
        call = R.check_call(self.name, self.needs, q, k, k, None, q_offset, runtime)
        block_m, block_n = _int_arg("block_m", block_m, 1), _int_arg("block_n", block_n, 1)
        inputs, bodies = self._prepare(call, q, k, runtime)
        out = []
        for i, (share, body) in enumerate(zip(self.shares, bodies)):
            order = None if share.key is None else self._order(share, call, inputs)
            lay = self._host_layout(i, body, call, block_m, block_n, inputs, order)
            out.append((share, lay, None if order is None else (order.q_pos.cpu().numpy(), order.k_pos.cpu().numpy())))
        return out

    def _runner(self, share: int, body, call: R.Call, backend: str, config: TileConfig, inputs: dict,
                order: routing.SortedOrder | None = None):
        """The backend bound to one share of one call: its layout, tables or CPU plan."""
        needs = body.runtime_needs()
        shape = (share, config, *call.shape_key())

        def per_shape(what, make):
            """Cached by shape when the share reads no runtime input; else made per call."""
            return make() if needs else self._cached((what, *shape), make)

        if backend == "cpu":   # masks read content ids once computed, never q and k themselves
            known = {name: x for name, x in inputs.items() if "content" not in inputs or name not in ("q", "k")}
            space = TableSpace(call.n_q, call.n_k, call.q_offset, call.heads, call.batch, 1, known)
            rows = None if order is None else (order.q_pos.numpy(), order.k_pos.numpy())
            p = per_shape("plan", lambda: cpu.plan(
                body, self._host_layout(share, body, call, config.block_m, config.block_n, inputs, order), space,
                call.kv_heads, per_batch=bool(needs), order=rows))
            return cpu.CpuAttention(p, call.scale)
        interpret = backend == "interpret"
        gen = self.generated(config, share)
        module = R.load_kernel(gen, self.name, interpret)
        tables = per_shape("tables", lambda: R.table_values(gen, body, call, inputs))
        lay = self._device_layout(share, body, call, config.block_m, config.block_n, inputs, order)
        return R.GeneratedAttention(module, lay, tables, call, interpret,
                                    None if order is None else (order.q_pos, order.k_pos))

    def _device_layout(self, share: int, body, call: R.Call, block_m: int, block_n: int, inputs: dict,
                       order: routing.SortedOrder | None) -> R.DeviceLayout:
        """One share's layout for one call, on the call's device: from bucket ranges (sorted
        shares), from the top-k selection, from segment ids (document & static), or from the host
        build (cached by shape when the share reads no runtime input)."""
        shape = (share, block_m, block_n, call.n_q, call.n_k, call.q_offset, call.heads, call.device)
        if order is not None:
            return self._sorted_layout(share, body, order, call, block_m, block_n)
        if selections.supported(body):
            static = self._cached(("selections", *shape), lambda: selections.SelectionLayouts.of(
                body, call.n_q, call.n_k, call.q_offset, block_m, block_n, call.heads, call.device))
            return static.build(inputs["content"], call.batch)
        needs = body.runtime_needs()
        static = static_part(body) if needs == {"segment_ids"} else None
        if static is None:   # everything else: built on the host, copied over
            host = lambda: R.DeviceLayout.of(
                self._host_layout(share, body, call, block_m, block_n, inputs, None), call.device)
            return host() if needs else self._cached(("layout", *shape), host)
        documents = self._cached(("documents", *shape), lambda: DocumentLayouts.of(
            None if static[0] is None else build_layout(static[0], call.n_q, call.n_k, block_m, block_n,
                                                        call.q_offset, call.heads),
            call.n_q, call.n_k, call.q_offset, block_m, block_n, call.device))
        return documents.build(inputs["segment_ids"])

    def _host_layout(self, share: int, body, call: R.Call, block_m: int, block_n: int, inputs: dict,
                     order: routing.SortedOrder | None) -> BlockLayout:
        """One share's layout as a host BlockLayout (the CPU path plans from it)."""
        if order is not None or selections.supported(body):   # built with torch (on the CPU here)
            lay = self._device_layout(share, body, call, block_m, block_n, inputs, order)
            return lay.to_host(call.n_q, call.n_k, call.q_offset)
        seg = inputs.get("segment_ids")
        if {"q", "k"} & body.runtime_needs():   # content beside a document: per batch row, on the host
            space = TableSpace(call.n_q, call.n_k, call.q_offset, call.heads, call.batch, 1,
                               {name: inputs[name] for name in ("segment_ids", "content") if name in inputs})
            return build_layout(body, call.n_q, call.n_k, block_m, block_n, call.q_offset, call.heads, space=space)
        return build_layout(body, call.n_q, call.n_k, block_m, block_n, call.q_offset, call.heads,
                            None if seg is None else seg.cpu().numpy())


CompiledPattern = Kernel  # the name of sparsec 0.1


def compile(path_or_source: str | os.PathLike, pattern: str | None = None, autotune: bool | None = None,
            config: TileConfig | None = None, **params) -> Kernel:
    """Compile a .sa program (a path or its text); `pattern` picks one by name (default: the last);
    keyword arguments override its params. On a GPU the tiles are autotuned per share and shape
    bucket (the first call of a new key times the candidates; the winner is cached on disk);
    autotune=False keeps the defaults (so does SPARSEC_AUTOTUNE=0 when autotune is not given),
    and config= fixes the tiles on every backend."""
    return Kernel(path_or_source, pattern, autotune, config, **params)
