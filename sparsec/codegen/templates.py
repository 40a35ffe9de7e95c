"""The Triton source that emission fills in: shared helpers, the pattern's two helpers, the forward kernel."""

HELPERS = '''

# Triton's // and % truncate toward zero (and Python's, under the interpreter, may not):
# these give the floor semantics of the .sa language on either.
@triton.jit
def _mod(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _floordiv(a, b):
    return (a - _mod(a, b)) // b  # exact division: truncation no longer matters


@triton.jit
def _real(x):
    return x.to(tl.float64)


@triton.jit
def _real32(x):
    return tl.cast(x, tl.float32)   # a with expression's reals (and its literals): fp32, as the scores are


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))   # e^-|x| never overflows
    return tl.where(x >= 0, 1 / (1 + e), e / (1 + e))


@triton.jit
def _tanh(x):
    e = tl.exp(-2 * tl.abs(x))
    t = (1 - e) / (1 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0) + tl.log(1 + tl.exp(-tl.abs(x)))


@triton.jit
def _isqrt(x):
    r = tl.sqrt(_real(x)).to(tl.int64)
    r = tl.where(r * r > x, r - 1, r)  # the float root may land one off the exact one
    return tl.where((r + 1) * (r + 1) <= x, r + 1, r)


@triton.jit
def _ilog2(x):
    r = tl.floor(tl.log2(_real(x))).to(tl.int64)
    r = tl.where((r > 0) & ((1 << r) > x), r - 1, r)
    return tl.where((1 << (r + 1)) <= x, r + 1, r)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:  # Triton 3.9's interpreter misreads bfloat16 operands of tl.dot: widen them first
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_rows(base, rows, offs_d, in_d, N, stride_n, stride_d):
    """The tile (len(rows), HEAD_DIM_PAD) of a (N, HEAD_DIM) matrix, zero outside it. Offsets are
    int64: rows * stride passes 2^31 at n = 512K when the rows are (n, H, D) with H * D = 4096."""
    return tl.load(base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d,
                   mask=(rows < N)[:, None] & in_d[None, :], other=0.0)


@triton.jit
def _load_cols(base, cols, offs_d, in_d, N, stride_n, stride_d):
    """The same tile transposed, (HEAD_DIM_PAD, len(cols)): K^T and V^T for the dots."""
    return tl.load(base + cols[None, :].to(tl.int64) * stride_n + offs_d[:, None] * stride_d,
                   mask=(cols < N)[None, :] & in_d[:, None], other=0.0)


@triton.jit
def _positions(ORDER, base, idx, N, PERMUTED: tl.constexpr):
    """The original positions (0-based) of rows idx of the kernel's order: idx itself, or, when a
    share runs in a content-sorted order, the order's entries (its row `base` of length N)."""
    if PERMUTED:
        return tl.load(ORDER + base.to(tl.int64) * N + idx, mask=idx < N, other=0)
    return idx


@triton.jit
def _split_range(start, end, split, SPLITS):
    """Part `split` of SPLITS equal parts of the list [start, end) (split-K decoding)."""
    return start + (end - start) * split // SPLITS, start + (end - start) * (split + 1) // SPLITS


@triton.jit
def _attend(acc, m_i, l_i, s, V_tile, keep, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """One key tile of the online softmax (base 2) over its scores s. keep: the pairs allowed, or
    None for all.

    m_i is the running row max of the scaled scores, l_i the running sum of 2^(s - m_i), acc the
    running sum of 2^(s - m_i) v. A row whose pairs are all masked so far keeps m_i = -inf; using
    0 in its place keeps every exponent finite (2^-inf = 0) so such rows stay exactly zero."""
    if keep is not None:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(V_tile.dtype), V_tile, DOT_PRECISION, DOT_IN_FP32)
    return acc, m_new, l_i


@triton.jit
def _probabilities(s, lse2, keep, SCORED: tl.constexpr):
    """P of one (query tile, key tile) from its scores s (base 2) and the saved LSE (lse2: see
    _row_stats). Under a with expression, rows past n_q or with no key get P = 0 explicitly: their
    S' may be anything (a score of 0 divided by itself), and 2^(NaN - inf) is not 0."""
    p = tl.math.exp2(s - lse2[:, None])
    if keep is not None:
        p = tl.where(keep, p, 0.0)
    if SCORED:
        p = tl.where(lse2[:, None] == float("inf"), 0.0, p)
    return p


@triton.jit
def _chain(ds, slope):
    """dS = dS' dS'/dscore. A pair with dS' = 0 (masked, or S' = -inf) gives exactly 0, even where
    the slope is infinite (log at 0)."""
    return tl.where(ds == 0, 0.0, ds * slope)


@triton.jit
def _row_stats(LSE, DELTA, bh, offs_m, N_Q):
    """lse2 and delta of query rows offs_m of (batch x head) bh. lse2 is the LSE in base 2, and
    +inf on rows with no allowed key (LSE = -inf) or past n_q, which makes their P exactly 0."""
    at = bh.to(tl.int64) * N_Q + offs_m
    lse = tl.load(LSE + at, mask=offs_m < N_Q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # natural log -> base 2
    return lse2, tl.load(DELTA + at, mask=offs_m < N_Q, other=0.0)

'''

# The pattern, said once: its parts of the query rows alone (once per query tile) and its predicate.
# Lengths: N_Q, N_K are the rows of Q and K (loads, stores, the key bound); LEN_Q, LEN_K the
# lengths the pattern is specialized for, which its code reads (n in where(...), document ids).
# They differ only for context parallelism's compact buffers, whose rows sit at positions of a
# longer sequence (read through Q_ORDER / K_ORDER).
PATTERN = '''
@triton.jit
def pattern_rows(pos, h, b, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,{params} BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The parts of the pattern that depend on the query rows alone: computed once per query tile."""
{hoisted}
    return {rows}


@triton.jit
def pattern_keep(pos, keys, cols, h, b, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,{keep_params}
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pattern's predicate over one (query tile, key tile), (BLOCK_M, BLOCK_N) bool: which
    pairs are allowed (pos: query positions, keys: key positions, cols: key rows)."""
{body}    return {pred} & (cols < N_K)[None, :]
'''

FORWARD = '''
@triton.jit
def _scores(q, kT, pos, keys, h, b, LEN_Q, LEN_K, SM_SCALE, QK_SCALE,{score_params}
            SCORED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """(s, raw) of one tile: s the scores in base 2, which the softmax takes (exp2), and raw =
    qk * scale, which the with expression reads. Without one, s = qk * (scale * log2(e)) in one
    product; with one, s = S'(raw) * log2(e)."""
    dot = _dot(q, kT, DOT_PRECISION, DOT_IN_FP32)
    if SCORED:
        raw = dot * SM_SCALE
        return pattern_score(raw, pos, keys, h, b, LEN_Q, LEN_K,{score_args}) * 1.4426950408889634, raw
    return dot * QK_SCALE, dot


@triton.jit
def _forward_tiles(acc, m_i, l_i, q, pos, k_base, v_base, IDX, start, end, offs_d, in_d, stride_kn, stride_kd,
                   stride_vn, stride_vd, b, h, hk, H, G, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE, QK_SCALE, K_ORDER,{keep_params}
                   {score_params} BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   EVEN_N: tl.constexpr, PERMUTED: tl.constexpr, SCORED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr):
    """The online softmax over the key tiles IDX[start:end]. PARTIAL tiles (MASKED) evaluate the
    pattern's predicate per pair; FULL tiles evaluate none, only the key bound when n_k is not a
    multiple of BLOCK_N (only the last key tile can cross it). A with expression (SCORED) runs on
    every pair of both."""
    for at in range(start, end):
        cols = tl.load(IDX + at) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_cols(k_base, cols, offs_d, in_d, N_K, stride_kn, stride_kd)
        v = _load_rows(v_base, cols, offs_d, in_d, N_K, stride_vn, stride_vd)
        keys = cols
        if MASKED or SCORED:
            keys = _positions(K_ORDER, b * (H // G) + hk, cols, N_K, PERMUTED)
        s, raw = _scores(q, k, pos, keys, h, b, LEN_Q, LEN_K, SM_SCALE, QK_SCALE,{score_args} SCORED, DOT_PRECISION,
                         DOT_IN_FP32)
        if MASKED:
            keep = pattern_keep(pos, keys, cols, h, b, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,{keep_args} BLOCK_M, BLOCK_N)
        elif EVEN_N:
            keep = None
        else:
            keep = (cols < N_K)[None, :]
        acc, m_i, l_i = _attend(acc, m_i, l_i, s, v, keep, DOT_PRECISION, DOT_IN_FP32)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["N_Q", "N_K", "LEN_Q", "LEN_K", "Q_OFFSET", "SPLITS"{scalars}])
def sparse_attention_forward(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od, stride_os, stride_ls,
    N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, H, G, SM_SCALE, QK_SCALE, SPLITS,
    FULL_PTR, FULL_IDX, PARTIAL_PTR, PARTIAL_IDX, LAYOUT_B, LAYOUT_H, QUERY_TILES, SCHEDULE, Q_ORDER, K_ORDER,{params}
    {score_params} HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, PERMUTED: tl.constexpr,
    SCORED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """O and LSE of one query tile. With SPLITS > 1 (decoding: few query rows, long rows of key
    tiles) each of SPLITS programs takes an equal part of the tile's key tiles and writes its own
    partial O and LSE (strides stride_os, stride_ls); the runtime merges them by their LSE."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PAD, "the head dim is padded up to a power of two")
    # the launch order (schedule.py): job bh * QUERY_TILES + tile, heaviest rows first
    job = tl.load(SCHEDULE + tl.program_id(0) // SPLITS)
    split = tl.program_id(0) % SPLITS
    bh = job // QUERY_TILES
    tile = job % QUERY_TILES
    b = bh // H
    h = bh % H
    hk = h // G  # grouped-query attention: G query heads share one K/V head

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    pos = _positions(Q_ORDER, bh, offs_m, N_Q, PERMUTED) + Q_OFFSET  # the predicate reads positions
    in_d = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = _load_rows(q_base, offs_m, offs_d, in_d, N_Q, stride_qm, stride_qd)
{rows_call}
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # this program's row of the layout (its leading dims broadcast when they have size 1)
    row = ((b % LAYOUT_B) * LAYOUT_H + h % LAYOUT_H) * QUERY_TILES + tile
    start, end = _split_range(tl.load(FULL_PTR + row), tl.load(FULL_PTR + row + 1), split, SPLITS)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, pos, k_base, v_base, FULL_IDX, start, end, offs_d, in_d,
                                   stride_kn, stride_kd, stride_vn, stride_vd, b, h, hk, H, G, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,
                                   SM_SCALE, QK_SCALE, K_ORDER,{keep_args} {score_args} BLOCK_M, BLOCK_N, False,
                                   EVEN_N, PERMUTED, SCORED, DOT_PRECISION, DOT_IN_FP32)
    start, end = _split_range(tl.load(PARTIAL_PTR + row), tl.load(PARTIAL_PTR + row + 1), split, SPLITS)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, pos, k_base, v_base, PARTIAL_IDX, start, end, offs_d, in_d,
                                   stride_kn, stride_kd, stride_vn, stride_vd, b, h, hk, H, G, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,
                                   SM_SCALE, QK_SCALE, K_ORDER,{keep_args} {score_args} BLOCK_M, BLOCK_N, True,
                                   EVEN_N, PERMUTED, SCORED, DOT_PRECISION, DOT_IN_FP32)

    # rows with no allowed key: O = 0 and LSE = -inf (l_i = 0 there), never NaN
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453  # base 2 -> natural log
    lse = tl.where(l_i == 0.0, float("-inf"), lse)
    o_base = O + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < N_Q) & in_d[None, :])
    tl.store(LSE + split.to(tl.int64) * stride_ls + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)
'''
