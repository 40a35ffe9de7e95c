"""The Triton source of the backward kernels (delta, dQ, dK/dV) that emission fills in."""

# The backward follows FlashAttention-2: with P = exp(S - LSE) recomputed per tile from the saved
# LSE, dV = P^T dO, dP = dO V^T, dS = P * (dP - delta) with delta = rowsum(dO * O) - dLSE, and
# dQ = scale * dS K, dK = scale * dS^T Q. dQ walks the row layout (one program per query tile);
# dK/dV walk the transposed layout (one program per key tile, looping over the G query heads of
# its K/V head), so every gradient has one writer: deterministic, no atomics.
BACKWARD = '''
@triton.jit(do_not_specialize=["N_Q"])
def sparse_attention_backward_delta(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    N_Q, H,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE, in fp32: the softmax's part of dS for each query row."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    in_d = offs_d < HEAD_DIM
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, offs_d, in_d, N_Q,
                   stride_om, stride_od)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, offs_d, in_d, N_Q,
                    stride_dom, stride_dod)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, pos, k_base, v_base, IDX, start, end, offs_d, in_d, stride_kn, stride_kd,
              stride_vn, stride_vd, b, h, hk, H, G, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE, QK_SCALE, K_ORDER,{keep_params}
              {score_params} BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
              PERMUTED: tl.constexpr, SCORED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """dq += dS K over the key tiles IDX[start:end] (times the softmax scale at the end), the
    forward's walk (MASKED: PARTIAL tiles), with dS = P (dO V^T - delta) dS'/dscore."""
    for at in range(start, end):
        cols = tl.load(IDX + at) * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = _load_cols(k_base, cols, offs_d, in_d, N_K, stride_kn, stride_kd)
        vT = _load_cols(v_base, cols, offs_d, in_d, N_K, stride_vn, stride_vd)
        keys = cols
        if MASKED or SCORED:
            keys = _positions(K_ORDER, b * (H // G) + hk, cols, N_K, PERMUTED)
        s, raw = _scores(q, kT, pos, keys, h, b, LEN_Q, LEN_K, SM_SCALE, QK_SCALE,{score_args} SCORED, DOT_PRECISION,
                         DOT_IN_FP32)
        if MASKED:
            keep = pattern_keep(pos, keys, cols, h, b, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,{keep_args} BLOCK_M, BLOCK_N)
        elif EVEN_N:
            keep = None
        else:
            keep = (cols < N_K)[None, :]
        p = _probabilities(s, lse2, keep, SCORED)
        ds = p * (_dot(do, vT, DOT_PRECISION, DOT_IN_FP32) - delta[:, None])
        if SCORED:
            ds = _chain(ds, pattern_score_grad(raw, pos, keys, h, b, LEN_Q, LEN_K,{score_args}))
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_PRECISION, DOT_IN_FP32)
    return dq


@triton.jit(do_not_specialize=["N_Q", "N_K", "LEN_Q", "LEN_K", "Q_OFFSET"{scalars}])
def sparse_attention_backward_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, H, G, SM_SCALE, QK_SCALE,
    FULL_PTR, FULL_IDX, PARTIAL_PTR, PARTIAL_IDX, LAYOUT_B, LAYOUT_H, QUERY_TILES, SCHEDULE, Q_ORDER, K_ORDER,{params}
    {score_params} HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, PERMUTED: tl.constexpr,
    SCORED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """dQ of one query tile: the forward's walk over FULL and PARTIAL key tiles."""
    job = tl.load(SCHEDULE + tl.program_id(0))   # the forward's launch order
    bh = job // QUERY_TILES
    tile = job % QUERY_TILES
    b = bh // H
    h = bh % H
    hk = h // G

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    pos = _positions(Q_ORDER, bh, offs_m, N_Q, PERMUTED) + Q_OFFSET  # the predicate reads positions
    in_d = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d, in_d, N_Q,
                   stride_qm, stride_qd)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, offs_d, in_d, N_Q,
                    stride_dom, stride_dod)
    lse2, delta = _row_stats(LSE, DELTA, bh, offs_m, N_Q)
{rows_call}
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    row = ((b % LAYOUT_B) * LAYOUT_H + h % LAYOUT_H) * QUERY_TILES + tile
    dq = _dq_tiles(dq, q, do, lse2, delta, pos, k_base, v_base, FULL_IDX, tl.load(FULL_PTR + row),
                   tl.load(FULL_PTR + row + 1), offs_d, in_d, stride_kn, stride_kd, stride_vn, stride_vd, b, h, hk, H,
                   G, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE, QK_SCALE, K_ORDER,{keep_args} {score_args} BLOCK_M, BLOCK_N, False,
                   EVEN_N, PERMUTED, SCORED, DOT_PRECISION, DOT_IN_FP32)
    dq = _dq_tiles(dq, q, do, lse2, delta, pos, k_base, v_base, PARTIAL_IDX, tl.load(PARTIAL_PTR + row),
                   tl.load(PARTIAL_PTR + row + 1), offs_d, in_d, stride_kn, stride_kd, stride_vn, stride_vd, b, h, hk,
                   H, G, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE, QK_SCALE, K_ORDER,{keep_args} {score_args} BLOCK_M, BLOCK_N,
                   True, EVEN_N, PERMUTED, SCORED, DOT_PRECISION, DOT_IN_FP32)

    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * SM_SCALE).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & in_d[None, :])


@triton.jit
def _dkdv_tiles(dk, dv, kT, vT, cols, keys, q_base, do_base, LSE, DELTA, IDX, start, end, offs_d, in_d, stride_qm,
                stride_qd, stride_dom, stride_dod, b, h, bh, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE, QK_SCALE, Q_ORDER,{params}
                {score_params} {grad_params} BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                PERMUTED: tl.constexpr, SCORED: tl.constexpr, INPUT_GRADS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                DOT_IN_FP32: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q (times the softmax scale at the end) of one key tile over the
    query tiles IDX[start:end] of query head h (MASKED: PARTIAL tiles, whose row-only parts of
    the pattern change with every query tile here). Every pair is visited once here, so this is
    where the with expression's float inputs get their gradients (INPUT_GRADS)."""
    for at in range(start, end):
        offs_m = tl.load(IDX + at) * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, offs_d, in_d, N_Q, stride_qm, stride_qd)
        do = _load_rows(do_base, offs_m, offs_d, in_d, N_Q, stride_dom, stride_dod)
        lse2, delta = _row_stats(LSE, DELTA, bh, offs_m, N_Q)
        pos = offs_m
        if MASKED or SCORED:
            pos = _positions(Q_ORDER, bh, offs_m, N_Q, PERMUTED) + Q_OFFSET  # the pattern reads positions
        s, raw = _scores(q, kT, pos, keys, h, b, LEN_Q, LEN_K, SM_SCALE, QK_SCALE,{score_args} SCORED, DOT_PRECISION,
                         DOT_IN_FP32)
        if MASKED:
{rows_call_inner}            keep = pattern_keep(pos, keys, cols, h, b, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET,{keep_args} BLOCK_M, BLOCK_N)
        else:
            keep = None
        p = _probabilities(s, lse2, keep, SCORED)
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, DOT_IN_FP32)
        ds = p * (_dot(do, vT, DOT_PRECISION, DOT_IN_FP32) - delta[:, None])
        if SCORED:
            if INPUT_GRADS:
                live = (offs_m < N_Q)[:, None] & (cols < N_K)[None, :]
                pattern_input_grads(ds, live, raw, pos, keys, h, b, LEN_Q, LEN_K,{score_args}{grad_args})
            ds = _chain(ds, pattern_score_grad(raw, pos, keys, h, b, LEN_Q, LEN_K,{score_args}))
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, DOT_IN_FP32)
    return dk, dv


@triton.jit(do_not_specialize=["N_Q", "N_K", "LEN_Q", "LEN_K", "Q_OFFSET"{scalars}])
def sparse_attention_backward_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, H, G, SM_SCALE, QK_SCALE,
    FULL_PTR, FULL_IDX, PARTIAL_PTR, PARTIAL_IDX, LAYOUT_B, LAYOUT_H, KEY_TILES, SCHEDULE, Q_ORDER, K_ORDER,{params}
    {score_params} {grad_params} HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr, SCORED: tl.constexpr,
    INPUT_GRADS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """dK and dV of one key tile of one K/V head: the transposed layout's query tiles, summed
    over the G query heads that share the K/V head (rows past n_q have P = 0 through lse2)."""
    job = tl.load(SCHEDULE + tl.program_id(0))   # key tiles read by the most query tiles first
    bhk = job // KEY_TILES
    ktile = job % KEY_TILES
    b = bhk // (H // G)
    hk = bhk % (H // G)

    cols = ktile * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = _positions(K_ORDER, bhk, cols, N_K, PERMUTED)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    in_d = offs_d < HEAD_DIM
    kT = _load_cols(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, cols, offs_d, in_d, N_K,
                    stride_kn, stride_kd)
    vT = _load_cols(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh, cols, offs_d, in_d, N_K,
                    stride_vn, stride_vd)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row = ((b % LAYOUT_B) * LAYOUT_H + h % LAYOUT_H) * KEY_TILES + ktile
        dk, dv = _dkdv_tiles(dk, dv, kT, vT, cols, keys, q_base, do_base, LSE, DELTA, FULL_IDX,
                             tl.load(FULL_PTR + row), tl.load(FULL_PTR + row + 1), offs_d, in_d, stride_qm,
                             stride_qd, stride_dom, stride_dod, b, h, bh, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE,
                             QK_SCALE, Q_ORDER,{args} {score_args} {grad_args} BLOCK_M, BLOCK_N, False, PERMUTED,
                             SCORED, INPUT_GRADS, DOT_PRECISION, DOT_IN_FP32)
        dk, dv = _dkdv_tiles(dk, dv, kT, vT, cols, keys, q_base, do_base, LSE, DELTA, PARTIAL_IDX,
                             tl.load(PARTIAL_PTR + row), tl.load(PARTIAL_PTR + row + 1), offs_d, in_d, stride_qm,
                             stride_qd, stride_dom, stride_dod, b, h, bh, H, N_Q, N_K, LEN_Q, LEN_K, Q_OFFSET, SM_SCALE,
                             QK_SCALE, Q_ORDER,{args} {score_args} {grad_args} BLOCK_M, BLOCK_N, True, PERMUTED,
                             SCORED, INPUT_GRADS, DOT_PRECISION, DOT_IN_FP32)

    mask = (cols[:, None] < N_K) & in_d[None, :]
    dk_base = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    tl.store(dk_base + cols[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * SM_SCALE).to(DK.dtype.element_ty), mask=mask)
    dv_base = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    tl.store(dv_base + cols[:, None].to(tl.int64) * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask)
'''
