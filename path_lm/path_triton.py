"""Triton kernels for PaTH attention (CUDA), forward and backward.

The score of query i and key j < i is ``q_i^T H_i ... H_{j+1} k_j``. Cut time into frame blocks of X
positions. Carry every query down to the bottom of its own block (``q_bot``) and every key up to the top of
its own block (``k_top``); then for a query in block s and a key in an earlier block t the score is

    q_bot_i  @  F[s, t]  @  k_top_j^T,        F[s, t] = P_{s-1} P_{s-2} ... P_{t+1}

with P_b the D x D product of block b's Householder matrices (F[s, s-1] = I). The frame change F is
precomputed for every block pair, so each (query tile, key block) pair costs one D x D product on top of
ordinary flash attention, and the backward needs no reverse walk along the chain: the gradient of F comes
out of the dq kernel as ``q_bot^T @ (dS @ k_top)`` and flows to the P's through :func:`frames_backward`.

:func:`framed_forward` / :func:`framed_backward` run those pairs for blocks of one window (pairs in different windows are
skipped); the forward continues the softmax another level started, so that the levels (the query's own
chunk, chunks inside a superblock, superblocks across the sequence) chain into one softmax.
:func:`prepare_forward` computes what the forward reads; :func:`edge_grads`, :func:`frames_backward` and
:func:`prepare_backward` take its products' gradients back to the inputs. ``path_attention_triton`` assembles
the levels.

triton is imported here at module level; import this module lazily and only on CUDA.
"""

from __future__ import annotations

import functools
import math

import torch

try:  # inside try: loading a checkpoint's remote code must not require triton
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError(f"the PaTH Triton kernels need triton (pip install path-lm[cuda]): {err}") from err

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["NB", "NP"])  # NB varies with the length at the superblock level
def _fwd_kernel(
    Q, K, V, GATE, MID, SEG, O_IN, LSE_IN, O, LSE,
    scale_log2, T,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    X: tl.constexpr, NB, NP, BM: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, SEGMENTED: tl.constexpr, PREC: tl.constexpr,
):
    """See :func:`framed_forward`. Without SEGMENTED (one segment per row) no key of an earlier block is
    hidden from a query of the row, and the tiles go unmasked. The query's own gate term g_i, the same for all
    its scores, is left out of them (the softmax does not change) and added to the log-sum-exp at the end."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query tiles (the most keys) start first
    i_bh = tl.program_id(1)
    b = i_bh // HQ
    hq = i_bh % HQ
    h = hq // (HQ // H)
    rows = i_m * BM + tl.arange(0, BM)
    od = tl.arange(0, D)
    ov = tl.arange(0, DV)
    window = (i_m * BM) // (X * NB)
    s_loc = ((i_m * BM) // X) % NB

    q = tl.load(Q + ((b * T + rows)[:, None] * HQ + hq) * D + od[None, :])
    seg_q = tl.load(SEG + b * T + rows)
    first = tl.min(seg_q, axis=0)
    t_lo = tl.maximum(first // X - window * NB, 0)
    mid_base = MID + (((b * H + h) * (T // (X * NB)) + window) * NP).to(tl.int64) * D * D

    # Continue the softmax of the keys already done (another level): normalized output, log-sum-exp.
    m_i = tl.load(LSE_IN + (b * HQ + hq) * T + rows) * 1.4426950408889634
    l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    if HAS_GATE:  # the row's own gate term, in the scores' base-2 scale
        g_q = tl.load(GATE + (b * T + rows) * HQ + hq) * scale_log2
        m_i -= g_q
    acc = tl.load(O_IN + ((b * T + rows)[:, None] * HQ + hq) * DV + ov[None, :]) * l_i[:, None]
    for t_loc in range(t_lo, s_loc):
        f = tl.load(mid_base + (s_loc * (s_loc - 1) // 2 + t_loc) * D * D + od[:, None] * D + od[None, :])
        u = tl.dot(q, f, input_precision=PREC).to(q.dtype)
        k_start = (window * NB + t_loc) * X
        j_lo = tl.maximum(k_start, (first // BN) * BN)
        for j0 in range(j_lo, k_start + X, BN):
            cols = j0 + tl.arange(0, BN)
            k = tl.load(K + ((b * T + cols)[:, None] * H + h) * D + od[None, :])
            v = tl.load(V + ((b * T + cols)[:, None] * H + h) * DV + ov[None, :])
            s = tl.dot(u, tl.trans(k), input_precision=PREC) * scale_log2
            if HAS_GATE:
                s -= tl.load(GATE + (b * T + cols) * HQ + hq)[None, :] * scale_log2
            if SEGMENTED:
                s = tl.where(cols[None, :] >= seg_q[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if HAS_GATE:
        m_i += g_q
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + ((b * T + rows)[:, None] * HQ + hq) * DV + ov[None, :], o.to(O.dtype.element_ty))
    tl.store(LSE + (b * HQ + hq) * T + rows, lse)


@triton.jit(do_not_specialize=["NB", "NP"])  # NB varies with the length at the superblock level
def _bwd_dq_kernel(
    Q, K, V, GATE, MID, SEG, DO, LSE, DELTA, DQ, DG, DMID,
    scale, scale_log2, T,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    X: tl.constexpr, NB, NP, BM: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, SEGMENTED: tl.constexpr, PREC: tl.constexpr, SOLE: tl.constexpr,
):
    """dq and the frame changes' gradients dF[s, t] += q_s^T (dS k) (see :func:`framed_backward`). With SOLE
    (one query head per kv head, query tiles of a whole block) this program is the only writer of its block's
    pairs: it stores dF, zeros for the pairs before its first segment, instead of adding atomically into a
    zeroed tensor."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query tiles (the most keys) start first
    i_bh = tl.program_id(1)
    b = i_bh // HQ
    hq = i_bh % HQ
    h = hq // (HQ // H)
    rows = i_m * BM + tl.arange(0, BM)
    od = tl.arange(0, D)
    ov = tl.arange(0, DV)
    window = (i_m * BM) // (X * NB)
    s_loc = ((i_m * BM) // X) % NB
    pair_base = (((b * H + h) * (T // (X * NB)) + window) * NP).to(tl.int64) * D * D

    q = tl.load(Q + ((b * T + rows)[:, None] * HQ + hq) * D + od[None, :])
    do = tl.load(DO + ((b * T + rows)[:, None] * HQ + hq) * DV + ov[None, :])
    seg_q = tl.load(SEG + b * T + rows)
    lse = tl.load(LSE + (b * HQ + hq) * T + rows) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + (b * HQ + hq) * T + rows)
    if HAS_GATE:  # the row's own gate term moves from the scores to the log-sum-exp (one subtraction per row)
        lse -= tl.load(GATE + (b * T + rows) * HQ + hq) * scale_log2
    first = tl.min(seg_q, axis=0)
    t_lo = tl.maximum(first // X - window * NB, 0)

    dq = tl.zeros([BM, D], tl.float32)
    dg = tl.zeros([BM], tl.float32)
    if SOLE:
        for t_loc in range(0, tl.minimum(t_lo, s_loc)):
            f_off = pair_base + (s_loc * (s_loc - 1) // 2 + t_loc) * D * D + od[:, None] * D + od[None, :]
            tl.store(DMID + f_off, tl.zeros([D, D], tl.float32))
    for t_loc in range(t_lo, s_loc):
        f_off = pair_base + (s_loc * (s_loc - 1) // 2 + t_loc) * D * D + od[:, None] * D + od[None, :]
        f = tl.load(MID + f_off)
        u = tl.dot(q, f, input_precision=PREC).to(q.dtype)
        du = tl.zeros([BM, D], tl.float32)
        k_start = (window * NB + t_loc) * X
        j_lo = tl.maximum(k_start, (first // BN) * BN)
        for j0 in range(j_lo, k_start + X, BN):
            cols = j0 + tl.arange(0, BN)
            k = tl.load(K + ((b * T + cols)[:, None] * H + h) * D + od[None, :])
            v = tl.load(V + ((b * T + cols)[:, None] * H + h) * DV + ov[None, :])
            s = tl.dot(u, tl.trans(k), input_precision=PREC) * scale_log2
            if HAS_GATE:
                s -= tl.load(GATE + (b * T + cols) * HQ + hq)[None, :] * scale_log2
            if SEGMENTED:
                s = tl.where(cols[None, :] >= seg_q[:, None], s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            du += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            if HAS_GATE:
                dg += tl.sum(ds, axis=1)
        du_c = du.to(q.dtype)
        dq += tl.dot(du_c, tl.trans(f), input_precision=PREC)
        d_f = tl.dot(tl.trans(q), du_c, input_precision=PREC) * scale
        if SOLE:
            tl.store(DMID + f_off, d_f)
        else:
            tl.atomic_add(DMID + f_off, d_f, sem="relaxed")

    tl.store(DQ + ((b * T + rows)[:, None] * HQ + hq) * D + od[None, :], dq * scale)
    if HAS_GATE:
        tl.store(DG + (b * T + rows) * HQ + hq, dg * scale)


@triton.jit(do_not_specialize=["NB", "NP"])  # NB varies with the length at the superblock level
def _bwd_dkv_kernel(
    Q, K, V, GATE, MID, SEG, SEG_END, DO, LSE, DELTA, DK, DV_, DG,
    scale, scale_log2, T,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    X: tl.constexpr, NB, NP, BM: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, SEGMENTED: tl.constexpr, PREC: tl.constexpr, ADD_DV: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = i_bh // H
    h = i_bh % H
    G: tl.constexpr = HQ // H
    cols = i_n * BN + tl.arange(0, BN)
    od = tl.arange(0, D)
    ov = tl.arange(0, DV)
    window = (i_n * BN) // (X * NB)
    t_loc = ((i_n * BN) // X) % NB
    pair_base = (((b * H + h) * (T // (X * NB)) + window) * NP).to(tl.int64) * D * D

    k = tl.load(K + ((b * T + cols)[:, None] * H + h) * D + od[None, :])
    v = tl.load(V + ((b * T + cols)[:, None] * H + h) * DV + ov[None, :])
    last = tl.max(tl.load(SEG_END + b * T + cols), axis=0)  # queries at or after `last` cannot see these keys
    s_hi = tl.minimum((last - 1) // X - window * NB + 1, NB)

    # Keys as rows (s^T = k u^T, [BN, BM]): no transposes of computed tiles, fewer registers (v6).
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    for hq in range(h * G, h * G + G):
        dg = tl.zeros([BN], tl.float32)
        if HAS_GATE:
            g_k = tl.load(GATE + (b * T + cols) * HQ + hq) * scale_log2
        for s_loc in range(t_loc + 1, s_hi):
            f = tl.load(MID + pair_base + (s_loc * (s_loc - 1) // 2 + t_loc) * D * D + od[:, None] * D + od[None, :])
            q_start = (window * NB + s_loc) * X
            i_hi = tl.minimum(q_start + X, last)
            for i0 in range(q_start, i_hi, BM):
                rows = i0 + tl.arange(0, BM)
                q = tl.load(Q + ((b * T + rows)[:, None] * HQ + hq) * D + od[None, :])
                do = tl.load(DO + ((b * T + rows)[:, None] * HQ + hq) * DV + ov[None, :])
                lse = tl.load(LSE + (b * HQ + hq) * T + rows) * 1.4426950408889634
                lse = tl.where(lse == float("-inf"), 0.0, lse)
                delta = tl.load(DELTA + (b * HQ + hq) * T + rows)
                u = tl.dot(q, f, input_precision=PREC).to(q.dtype)
                s_t = tl.dot(k, tl.trans(u), input_precision=PREC) * scale_log2
                if HAS_GATE:  # the query's gate term in its log-sum-exp (per row, not per score)
                    s_t -= g_k[:, None]
                    lse -= tl.load(GATE + (b * T + rows) * HQ + hq) * scale_log2
                if SEGMENTED:
                    s_t = tl.where(cols[:, None] >= tl.load(SEG + b * T + rows)[None, :], s_t, float("-inf"))
                p_t = tl.exp2(s_t - lse[None, :])
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(u.dtype), u, input_precision=PREC)
                if HAS_GATE:
                    dg -= tl.sum(ds_t, axis=1)
        if HAS_GATE:
            tl.store(DG + (b * T + cols) * HQ + hq, dg * scale)

    tl.store(DK + ((b * T + cols)[:, None] * H + h) * D + od[None, :], dk * scale)
    dv_ptr = DV_ + ((b * T + cols)[:, None] * H + h) * DV + ov[None, :]
    if ADD_DV:  # the previous level's share of these keys (its launch ran before this one)
        dv += tl.load(dv_ptr)
    tl.store(dv_ptr, dv)


# Tiles and launch of the attention kernels by (kernel, head dim, level): BM query rows, BN keys per tile,
# both at most the frame block X ("chunk": X <= 64, the chunks inside a superblock; "superblock": larger).
# From a sweep on an H100 (docs/kernels.md, v6); smaller head dims (CPU interpreter tests) take 64's.
ATTENTION_LAUNCH = {
    ("fwd", 64, "chunk"): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("fwd", 64, "superblock"): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("dq", 64, "chunk"): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("dq", 64, "superblock"): dict(BM=64, BN=128, num_warps=4, num_stages=2),
    ("dkv", 64, "chunk"): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("dkv", 64, "superblock"): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("fwd", 128, "chunk"): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("fwd", 128, "superblock"): dict(BM=64, BN=64, num_warps=4, num_stages=3),
    ("dq", 128, "chunk"): dict(BM=64, BN=32, num_warps=4, num_stages=3),
    ("dq", 128, "superblock"): dict(BM=128, BN=64, num_warps=8, num_stages=3),
    ("dkv", 128, "chunk"): dict(BM=64, BN=64, num_warps=4, num_stages=2),
    ("dkv", 128, "superblock"): dict(BM=64, BN=128, num_warps=8, num_stages=2),
}


def _attention_launch(kernel: str, X: int, D: int, launch: dict | None) -> tuple[int, int, dict]:
    """(BM, BN, launch keywords) of one attention kernel for frame blocks of X; ``launch`` ({kernel: {BM, BN,
    num_warps, num_stages}}) overrides the table (tuning)."""
    level = "chunk" if X <= 64 else "superblock"
    config = dict(ATTENTION_LAUNCH[(kernel, 64 if D <= 64 else 128, level)])
    config.update((launch or {}).get(kernel, {}))
    BM, BN = min(config.pop("BM"), X), min(config.pop("BN"), X)
    return BM, BN, config


def framed_forward(q, k, v, gate, mid, seg_start, partial, *, block: int, blocks_per_window: int, scale: float,
                   out_dtype=torch.float32, segmented: bool = True, launch: dict | None = None):
    """Attention of every query to the keys of earlier frame blocks in its window, continuing the softmax of
    the keys another level already covered.

    Args:
        q: [B, T, HQ, D] queries carried to the bottom of their block; k: [B, T, H, D] keys carried to the top
            of theirs; v: [B, T, H, DV]. Same dtype (bfloat16, float16 or float32); D, DV powers of two >= 16.
        gate: [B, T, HQ] float32 cumulative log gate, or None.
        mid: [B, H, W, NB * (NB - 1) // 2, D, D] frame changes F[s, t] of each window's block pairs s > t,
            packed row by row, q's dtype.
        seg_start: [B, T] int32, the first position of each position's segment; ``segmented=False`` says that
            every position before T' (the unpadded length) is in one segment, and the kernels skip the mask
            (the padding's queries past T' then see earlier keys, which changes none of the first T' rows).
        partial: (o [B, T, HQ, DV] float32, lse [B, HQ, T] float32) over disjoint keys (-inf: none).
        block: X, the frame block length; blocks_per_window: NB. T must be a multiple of X * NB.
    Returns:
        o [B, T, HQ, DV] in out_dtype and lse [B, HQ, T] float32 (natural log) over the keys of both.
    ``launch`` overrides the tiles and launch (see :func:`_attention_launch`).
    """
    B, T, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    NB = blocks_per_window
    BM, BN, config = _attention_launch("fwd", block, D, launch)
    o_in, lse_in = partial
    o = torch.empty(B, T, HQ, DV, dtype=out_dtype, device=q.device)
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)
    _fwd_kernel[(T // BM, B * HQ)](
        q, k, v, gate, mid, seg_start, o_in, lse_in, o, lse, scale * LOG2E, T,
        HQ=HQ, H=H, D=D, DV=DV, X=block, NB=NB, NP=NB * (NB - 1) // 2, BM=BM, BN=BN,
        HAS_GATE=gate is not None, SEGMENTED=segmented, PREC=_precision(q), **config,
    )
    return o, lse


def framed_backward(q, k, v, gate, mid, seg_start, seg_end, do, lse, delta, *, block, blocks_per_window, scale,
                    dv=None, segmented: bool = True, launch: dict | None = None):
    """Gradients of the loss through the pairs of :func:`framed_forward`, given the FULL softmax's
    statistics: lse [B, HQ, T] (natural log, over every key of every level) and delta [B, HQ, T] =
    rowsum(do * o) of the final output. do [B, T, HQ, DV] in q's dtype; seg_end [B, T] int32 one past the
    last position of each position's segment (``segmented`` as in :func:`framed_forward`; the padding's rows
    must have zero do). Returns float32 dq, dk, dv, dgate (None without a gate), dmid; with ``dv`` ([B, T, H,
    DV] float32, another level's) its share is added to that tensor in place."""
    B, T, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    NB = blocks_per_window
    has_gate = gate is not None
    dq = torch.empty(B, T, HQ, D, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, T, H, D, dtype=torch.float32, device=q.device)
    add_dv = dv is not None
    if not add_dv:
        dv = torch.empty(B, T, H, DV, dtype=torch.float32, device=q.device)
    BM, BN, config = _attention_launch("dq", block, D, launch)
    sole = HQ == H and BM == block  # each pair's dF has one writer (_bwd_dq_kernel's SOLE)
    dmid = (torch.empty if sole else torch.zeros)(mid.shape, dtype=torch.float32, device=q.device)
    dg_q = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device) if has_gate else None
    dg_k = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device) if has_gate else None
    common = dict(HQ=HQ, H=H, D=D, DV=DV, X=block, NB=NB, NP=NB * (NB - 1) // 2, HAS_GATE=has_gate,
                  SEGMENTED=segmented, PREC=_precision(q))
    _bwd_dq_kernel[(T // BM, B * HQ)](
        q, k, v, gate, mid, seg_start, do, lse, delta, dq, dg_q, dmid, scale, scale * LOG2E, T,
        BM=BM, BN=BN, SOLE=sole, **common, **config,
    )
    BM, BN, config = _attention_launch("dkv", block, D, launch)
    _bwd_dkv_kernel[(T // BN, B * H)](
        q, k, v, gate, mid, seg_start, seg_end, do, lse, delta, dk, dv, dg_k, scale, scale * LOG2E, T,
        BM=BM, BN=BN, ADD_DV=add_dv, **common, **config,
    )
    return dq, dk, dv, (dg_q + dg_k if has_gate else None), dmid


@triton.jit
def _delta_kernel(DO, O, DELTA, T, T_pad, HQ: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr):
    """One program per (BT positions, batch x query head): delta = rowsum(do * o) in float32, zero past T."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = i_bh // HQ
    hq = i_bh % HQ
    t = i_t * BT + tl.arange(0, BT)
    real = t < T
    off = ((b * T + t)[:, None] * HQ + hq) * DV + tl.arange(0, DV)[None, :]
    do = tl.load(DO + off, mask=real[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=real[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + (b * HQ + hq) * T_pad + t, tl.sum(do * o, axis=1), mask=t < T_pad)


def output_delta(do, o, T_pad: int):
    """delta [B, HQ, T_pad] float32 = rowsum(do * o) of the output o and its gradient do [B, T, HQ, DV] (any
    float dtypes), zero at positions from T: what the attention kernels' backward reads beside the
    log-sum-exp. One pass, where casts, a product and a sum in PyTorch took five."""
    B, T, HQ, DV = o.shape
    delta = torch.empty(B, HQ, T_pad, dtype=torch.float32, device=o.device)
    BT = 64
    _delta_kernel[(_cdiv(T_pad, BT), B * HQ)](do.contiguous(), o.contiguous(), delta, T, T_pad, HQ=HQ, DV=DV, BT=BT,
                                              num_warps=4)
    return delta


@triton.jit(do_not_specialize=["T_in", "T_out", "N"])
def _gate_scan_kernel(X0, X1, X2, OUT, T_in, T_out, N, HQ: tl.constexpr, PARTS: tl.constexpr, REVERSE: tl.constexpr,
                      BT: tl.constexpr):
    """One program per (batch, query head): the (reverse) cumulative sum over N positions of the sum of PARTS
    inputs [B, T_in, HQ] (zero from T_in), written to OUT [B, T_out, HQ] in its dtype (positions up to T_out)."""
    b = tl.program_id(0) // HQ
    hq = tl.program_id(0) % HQ
    n_blocks = tl.cdiv(N, BT)
    carry = tl.zeros([1], tl.float32)
    for i in range(n_blocks):
        t = (n_blocks - 1 - i if REVERSE else i) * BT + tl.arange(0, BT)
        x = tl.load(X0 + (b * T_in + t) * HQ + hq, mask=t < T_in, other=0.0).to(tl.float32)
        if PARTS > 1:
            x += tl.load(X1 + (b * T_in + t) * HQ + hq, mask=t < T_in, other=0.0).to(tl.float32)
        if PARTS > 2:
            x += tl.load(X2 + (b * T_in + t) * HQ + hq, mask=t < T_in, other=0.0).to(tl.float32)
        y = tl.cumsum(x, axis=0, reverse=REVERSE) + carry
        carry += tl.sum(x, axis=0)
        tl.store(OUT + (b * T_out + t) * HQ + hq, y.to(OUT.dtype.element_ty), mask=t < T_out)


def gate_scan(parts, T_out: int, *, reverse: bool, dtype=torch.float32):
    """The cumulative sum over time of the sum of ``parts`` (one to three [B, T_in, HQ] tensors, any float dtype;
    zero past T_in), [B, T_out, HQ] in ``dtype``: running from the start (the forget gate's cumulative log) or,
    with ``reverse``, from the end (its gradient, which every later position's score passes back). Sums run
    over max(T_in, T_out) positions in float32, one program per batch row and head."""
    B, T_in, HQ = parts[0].shape
    parts = [x.contiguous() for x in parts]
    out = torch.empty(B, T_out, HQ, dtype=dtype, device=parts[0].device)
    x0, x1, x2 = parts + parts[:1] * (3 - len(parts))  # unused slots repeat the first part (PARTS says how many)
    _gate_scan_kernel[(B * HQ,)](x0, x1, x2, out, T_in, T_out, max(T_in, T_out), HQ=HQ, PARTS=len(parts),
                                 REVERSE=reverse, BT=1024, num_warps=4)
    return out


def _precision(q_or_dtype):
    """The products' input precision for kernels that read this tensor (or dtype): IEEE float32 for float32
    inputs, TF32 for half precision (whose inputs are rounded to 8-11 bits anyway)."""
    dtype = q_or_dtype if isinstance(q_or_dtype, torch.dtype) else q_or_dtype.dtype
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------------
# Decoding: one new token against the cache, in one pass over the cached keys
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _group_scores(q, k, USE_DOT: tl.constexpr):
    """q [GP, D] . k [BN, D] -> [GP, BN] in float32: a tensor-core-shaped product for GP >= 16 rows, else
    elementwise multiply-and-sum (GP = 1 would waste 15 of 16 products on padding rows)."""
    if USE_DOT:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        return tl.sum(q[:, None, :] * k[None, :, :], axis=2)


@triton.jit
def _decode_program(N, n_value, H: tl.constexpr, N_ON_DEVICE: tl.constexpr):
    """(split, b * H + h, b, h, n) of a decoding program; n (the new token's slot) from the device or an int."""
    i_bh = tl.program_id(1)
    if N_ON_DEVICE:
        n = tl.load(N)
    else:
        n = n_value
    return tl.program_id(0), i_bh, i_bh // H, i_bh % H, n


@triton.jit
def _decode_ranges(h, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr):
    """Offsets along the key dim, the value dim, the query rows of kv head h (GP, G of them real) and a tile of
    BN keys; which rows are real; the query heads of the rows."""
    og = tl.arange(0, GP)
    return tl.arange(0, D), tl.arange(0, DV), og, tl.arange(0, BN), og < G, h * G + og


@triton.jit
def _store_partial(OP, MP, LP, part, og, ov, acc, m_i, l_i, GP: tl.constexpr, DV: tl.constexpr):
    """A split's unnormalized output, running max and sum of exponentials, for the merge kernel."""
    tl.store(OP + (part * GP + og)[:, None] * DV + ov[None, :], acc)
    tl.store(MP + part * GP + og, m_i)
    tl.store(LP + part * GP + og, l_i)


@triton.jit
def _frame_carry_rows(FR_CUR, W, i_bh, beta, u, ob, od, D: tl.constexpr):
    """Rows ob of M' = H_n M = M - beta w (w^T M), from M (frames at FR_CUR) and u = w^T M."""
    m_blk = tl.load(FR_CUR + ob[:, None] * D + od[None, :])
    return m_blk - (beta * tl.load(W + i_bh * D + ob).to(tl.float32))[:, None] * u[None, :]


# integers that change from step to step are not specialized on (no new compile as the cache grows)
@triton.jit(do_not_specialize=["split_len", "n_value"])
def _decode_fold_kernel(
    K, W, BETA, N, FR, sk_b, sk_h, split_len, n_value,
    H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, EB: tl.constexpr, N_ON_DEVICE: tl.constexpr,
    WINDOW: tl.constexpr, PREC: tl.constexpr,
):
    """Program (split, b * H + h). On a step whose slot n is a multiple of WINDOW (n > 0): rewrite the framed
    keys [0, n - WINDOW) as M' k (M' = H_n M, M = frames[b, n % 2, h]), carried to position n. Other
    steps do nothing (the kernel stays in the step, so that a compiled step has a fixed set of launches)."""
    i_s, i_bh, b, h, n = _decode_program(N, n_value, H, N_ON_DEVICE)
    if (n % WINDOW == 0) & (n > WINDOW):
        od = tl.arange(0, D)
        on = tl.arange(0, BN)
        beta = tl.load(BETA + i_bh).to(tl.float32)
        m_cur = FR + (b.to(tl.int64) * 2 * H + h) * (D * D) + (n % 2) * (H * D * D)
        u = tl.zeros([D], tl.float32)
        for d0 in tl.static_range(0, D, EB):
            ob = d0 + tl.arange(0, EB)
            u += tl.sum(tl.load(W + i_bh * D + ob).to(tl.float32)[:, None] * tl.load(m_cur + ob[:, None] * D + od[None, :]), axis=0)
        k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        start = i_s * split_len
        for off in range(start, tl.minimum(start + split_len, n - WINDOW), BN):
            rows = k_base + (off + on).to(tl.int64)[:, None] * D
            k = tl.load(rows + od[None, :]).to(tl.float32)
            for e0 in tl.static_range(0, D, EB):
                oe = e0 + tl.arange(0, EB)
                m_blk = _frame_carry_rows(m_cur, W, i_bh, beta, u, oe, od, D)
                k_blk = tl.dot(k, tl.trans(m_blk), input_precision=PREC)  # [BN, EB]
                tl.store(rows + oe[None, :], k_blk.to(K.dtype.element_ty))


@triton.jit
def _decode_tile(s, v, cols, valid, m_i, l_i, acc, g_rows, g_q, g_ok, MASK, b, sm_b, scale, HAS_GATE: tl.constexpr,
                 HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr):
    """One tile of cached keys into the online softmax: scores s [GP, BN] (before the gate and the scale),
    values v [BN, DV]; returns the new (max, sum of exponentials, unnormalized output)."""
    if HAS_GATE:
        s = s + (g_q[:, None] - tl.load(g_rows[:, None] + cols[None, :], mask=g_ok[:, None] & valid[None, :], other=0.0))
    s = (s * scale).to(tl.float32)  # torch.compile passes Python floats as float64
    ok = valid
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b.to(tl.int64) * sm_b + cols, mask=valid, other=0) != 0)
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if USE_DOT:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _decode_body(
    i_s, i_bh, b, h, n, Q, K, V, W, BETA, GATE, MASK, FR, RING, OP, MP, LP, KN, VN, GN, MN, QO,
    sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sm_b, scale, split_len, L, parts,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, N_ON_DEVICE: tl.constexpr, USE_DOT: tl.constexpr,
    HAS_FRAMES: tl.constexpr, WINDOW: tl.constexpr, EB: tl.constexpr, WRITE_NEW: tl.constexpr,
    NEW_MASK: tl.constexpr, FINAL: tl.constexpr, HAS_RING: tl.constexpr, FRAMED_ELSEWHERE: tl.constexpr,
):
    """Program (split i_s, row b, kv head h; i_bh = b * H + h) of :func:`_decode_kernel`, n the new slot."""
    od, ov, og, on, g_ok, hq = _decode_ranges(h, G, GP, D, DV, BN)
    q_rows = Q + (b * (H * G) + hq)[:, None] * D
    q = tl.load(q_rows + od[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    w = tl.load(W + i_bh * D + od).to(tl.float32)
    beta = tl.load(BETA + i_bh).to(tl.float32)
    k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    g_rows = GATE + b.to(tl.int64) * sg_b + hq.to(tl.int64) * sg_h
    g_q = tl.zeros([GP], tl.float32)
    if HAS_GATE:
        if WRITE_NEW:
            g_q = tl.load(g_rows + tl.maximum(n - 1, 0), mask=g_ok, other=0.0)
            g_q += tl.load(GN + b * (H * G) + hq, mask=g_ok, other=0.0)
        else:
            g_q = tl.load(g_rows + n, mask=g_ok, other=0.0)
    if WRITE_NEW:
        k_new = tl.load(KN + i_bh * D + od).to(tl.float32)
        v_new = tl.load(VN + i_bh * DV + ov).to(V.dtype.element_ty)  # as stored in the cache
        if NEW_MASK:
            mask_new = tl.load(MN + b) != 0

    s_old = n * 0
    q_old = q
    if HAS_FRAMES:
        s_old = tl.maximum(n - 1, 0) // WINDOW * WINDOW
        fold = n % WINDOW == 0
        m_cur = FR + (b.to(tl.int64) * 2 * H + h) * (D * D) + (n % 2) * (H * D * D)
        # u = w^T M and q M, over row blocks of M (a D x D tile at once would not fit in registers at D = 128)
        u = tl.zeros([D], tl.float32)
        qm = tl.zeros([GP, D], tl.float32)
        for d0 in tl.static_range(0, D, EB):
            ob = d0 + tl.arange(0, EB)
            m_blk = tl.load(m_cur + ob[:, None] * D + od[None, :])  # [EB, D]
            u += tl.sum(tl.load(W + i_bh * D + ob).to(tl.float32)[:, None] * m_blk, axis=0)
            q_blk = tl.load(q_rows + ob[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)  # [GP, EB]
            if USE_DOT:
                qm += tl.dot(q_blk, m_blk, input_precision="ieee")
            else:
                qm += tl.sum(q_blk[:, :, None] * m_blk[None, :, :], axis=1)
        q_old = tl.where(fold, q, qm - beta * tl.sum(q * w[None, :], axis=1)[:, None] * u[None, :])  # M'^T q
        if FRAMED_ELSEWHERE:
            tl.store(QO + (b * (H * G) + hq)[:, None] * D + od[None, :], q_old, mask=g_ok[:, None])
        if i_s == 0:
            m_next = FR + (b.to(tl.int64) * 2 * H + h) * (D * D) + ((n + 1) % 2) * (H * D * D)
            for d0 in tl.static_range(0, D, EB):
                ob = d0 + tl.arange(0, EB)
                eye = (ob[:, None] == od[None, :]).to(tl.float32)
                m_blk = _frame_carry_rows(m_cur, W, i_bh, beta, u, ob, od, D)
                tl.store(m_next + ob[:, None] * D + od[None, :], tl.where(fold, eye, m_blk))

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DV], tl.float32)
    start = i_s * split_len
    stop = tl.minimum(start + split_len, L)
    cached = tl.minimum(stop, n)  # this split's cached slots end here (n can be L: a full static cache)
    # Framed keys: whole tiles (s_old is a multiple of the tile and below n), only read.
    for off in range(start, tl.minimum(cached, s_old) if not FRAMED_ELSEWHERE else start, BN):
        cols = off + on
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * D + od[None, :]).to(tl.float32)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * DV + ov[None, :])
        m_i, l_i, acc = _decode_tile(_group_scores(q_old, k, USE_DOT), v, cols, cols < cached, m_i, l_i, acc, g_rows,
                                     g_q, g_ok, MASK, b, sm_b, scale, HAS_GATE, HAS_MASK, USE_DOT)
    # The window: each key gets the new token's update and is written back (to the ring and, rounded, to K).
    for off in range(tl.maximum(start, s_old), cached, BN):
        cols = off + on
        valid = cols < cached
        k_ptr = k_base + cols.to(tl.int64)[:, None] * D + od[None, :]
        if HAS_RING:  # the exact keys of the window (the slots in K hold their rounded copies)
            r_ptr = RING + (i_bh.to(tl.int64) * (2 * WINDOW) + cols % (2 * WINDOW))[:, None] * D + od[None, :]
            k = tl.load(r_ptr, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr, mask=valid[:, None], other=0.0).to(tl.float32)
        k = k - (beta * tl.sum(k * w[None, :], axis=1))[:, None] * w[None, :]
        tl.store(k_ptr, k.to(K.dtype.element_ty), mask=valid[:, None])
        if HAS_RING:
            tl.store(r_ptr, k, mask=valid[:, None])
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * DV + ov[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _decode_tile(_group_scores(q, k, USE_DOT), v, cols, valid, m_i, l_i, acc, g_rows, g_q, g_ok,
                                     MASK, b, sm_b, scale, HAS_GATE, HAS_MASK, USE_DOT)
    # The new token (slot n, raw key, gate difference 0), if this split holds it.
    if (start <= n) & (n < stop):
        k_slot = k_base + n.to(tl.int64) * D + od
        v_slot = v_base + n.to(tl.int64) * DV + ov
        if WRITE_NEW:
            tl.store(k_slot, k_new.to(K.dtype.element_ty))
            tl.store(v_slot, v_new)
            if HAS_RING:
                tl.store(RING + (i_bh.to(tl.int64) * (2 * WINDOW) + n % (2 * WINDOW)) * D + od, k_new)
            if HAS_GATE:
                tl.store(g_rows + n, g_q, mask=g_ok)
            if NEW_MASK:
                tl.store(MASK + b.to(tl.int64) * sm_b + n, mask_new.to(MASK.dtype.element_ty))
        else:
            k_new = tl.load(k_slot).to(tl.float32)
            v_new = tl.load(v_slot)
        s_new = (tl.sum(q * k_new[None, :], axis=1) * scale).to(tl.float32)
        if NEW_MASK:
            s_new = tl.where(mask_new, s_new, float("-inf"))
        elif HAS_MASK:
            s_new = tl.where(tl.load(MASK + b.to(tl.int64) * sm_b + n) != 0, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s_new - m_safe)
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    if FINAL:
        o = acc / l_i[:, None]  # (every key masked: 0 / 0, as the merge)
        tl.store(OP + (i_bh * G + og)[:, None] * DV + ov[None, :], o.to(OP.dtype.element_ty), mask=g_ok[:, None])
    else:
        if WRITE_NEW and N_ON_DEVICE:  # a slot past the buffer (a full static cache): NaN through the merge
            acc = tl.where(n >= L, float("nan"), acc)
        _store_partial(OP, MP, LP, i_bh * parts + (parts - 1 if FRAMED_ELSEWHERE else i_s), og, ov, acc, m_i, l_i, GP, DV)




@triton.jit(do_not_specialize=["sm_b", "split_len", "n_value", "L", "parts"])
def _decode_kernel(
    Q, K, V, W, BETA, GATE, MASK, N, FR, RING, OP, MP, LP, KN, VN, GN, MN, QO,
    sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sm_b, scale, split_len, n_value, L, parts,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, N_ON_DEVICE: tl.constexpr, USE_DOT: tl.constexpr,
    HAS_FRAMES: tl.constexpr, WINDOW: tl.constexpr, EB: tl.constexpr, WRITE_NEW: tl.constexpr,
    NEW_MASK: tl.constexpr, FINAL: tl.constexpr, HAS_RING: tl.constexpr, FRAMED_ELSEWHERE: tl.constexpr,
):
    """Program (split, b * H + h): slots [split * split_len, ...) of kv head h, for its G query heads.
    Writes the split's unnormalized output, running max and sum of exponentials.

    Slot n holds the new token's raw key (scored, not updated). Slots below n are cached keys, carried to
    the previous position. Without frames each gets the new token's update k <- k - beta (k . w) w, is
    written back, and is scored. With frames (see :func:`decode_attention`) only the window
    [s, n), s = WINDOW * floor((n - 1) / WINDOW), is updated in place; the keys below s are in an older
    frame that M = frames[b, n % 2, h] carries to position n - 1: they are only read, and scored against
    M'^T q with M' = H_n M. On a step where n is a multiple of WINDOW, :func:`_decode_fold_kernel` has
    already carried them to position n, so they are scored against q and M restarts from the identity.
    Split 0 writes the next step's M into frames[b, (n + 1) % 2, h].

    WRITE_NEW: slot n is written here instead of by the caller: the key from KN [B, H, D], the value from
    VN [B, H, DV], the cumulative gate gates[n - 1] + GN [B, HQ] and (NEW_MASK) the padding flag MN [B];
    the program whose split holds slot n stores them, and every program takes them from the inputs.

    FINAL (one split): the program writes the normalized output to OP ([B, HQ, DV], OP's dtype) instead of
    partials, and no merge runs.

    HAS_RING (with frames and WRITE_NEW): the window's exact keys live in RING [B, H, 2 * WINDOW, D] float32
    at slot % (2 * WINDOW); the window tiles read and update them there and store a rounded copy in K, whose
    dtype may then be half precision (framed keys are rounded once per fold instead of once per step).

    FRAMED_ELSEWHERE (with frames, one program per (row, head)): skip the framed keys, which
    :func:`_decode_framed_kernel` scores in the next launch, and write the query carried by the frame,
    M'^T q, to QO [B, HQ, D] float32 for it. Partials go to split index parts - 1 of parts per (row, head)."""
    i_s, i_bh, b, h, n = _decode_program(N, n_value, H, N_ON_DEVICE)
    _decode_body(i_s, i_bh, b, h, n, Q, K, V, W, BETA, GATE, MASK, FR, RING, OP, MP, LP, KN, VN, GN, MN, QO,
                 sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sm_b, scale, split_len, L, parts, H, G, GP, D, DV, BN, HAS_GATE, HAS_MASK, N_ON_DEVICE, USE_DOT, HAS_FRAMES, WINDOW, EB, WRITE_NEW, NEW_MASK, FINAL, HAS_RING, FRAMED_ELSEWHERE)


# (the inputs' arguments first, then _decode_kernel's, less those of frames elsewhere and the slot on the device)
@triton.jit(do_not_specialize=["sm_b", "split_len", "n_value", "L", "parts"])
def _decode_step_kernel(
    X, WU, CS, CW, CB, QNW, KNW, TM, sx, cs_b, cs_t, qk_eps, beta_max, CS_OUT,
    Q, K, V, W, BETA, GATE, MASK, FR, RING, OP, MP, LP, KN, VN, GN, MN,
    sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sm_b, scale, split_len, n_value, L, parts,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr, HAS_FRAMES: tl.constexpr,
    WINDOW: tl.constexpr, EB: tl.constexpr, NEW_MASK: tl.constexpr, FINAL: tl.constexpr, HAS_RING: tl.constexpr,
    R: tl.constexpr, RP: tl.constexpr, TAPS: tl.constexpr, LOW_RANK: tl.constexpr, HAS_CONV: tl.constexpr,
    HAS_CBIAS: tl.constexpr, QK_NORM: tl.constexpr, HAS_TM: tl.constexpr, CLAMP: tl.constexpr,
):
    """Program (split, b * H + h): a whole eager decoding step of row b, kv head h in one launch (with its
    merge, two beyond one split). First the step's inputs (:func:`_step_inputs`: q of the G query heads, k,
    v, w, beta and gate from the projections X), written to Q, KN, VN, W, BETA, GN; every split of the head
    computes and writes the same values, and the next convolution state goes to CS_OUT (CS itself with one
    split: no other program reads this head's channels). Then, after a barrier that makes those writes
    visible to the program's other threads, :func:`_decode_kernel`'s work for the split (FINAL, one split:
    the output itself, no merge) with the slot n_value from the host and the new token written here
    (WRITE_NEW)."""
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = i_bh // H
    h = i_bh % H
    _step_inputs(b, h, X, WU, CS, CS_OUT, CW, CB, QNW, KNW, TM, Q, KN, VN, W, BETA, GN, sx, cs_b, cs_t, qk_eps,
                 beta_max, H, G, D, R, RP, TAPS, LOW_RANK, HAS_CONV, HAS_CBIAS, QK_NORM, HAS_GATE, HAS_TM, CLAMP)
    tl.debug_barrier()
    _decode_body(i_s, i_bh, b, h, n_value, Q, K, V, W, BETA, GATE, MASK, FR, RING, OP, MP, LP, KN, VN, GN, MN, Q,
                 sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sm_b, scale, split_len, L, parts, H, G, GP, D, DV, BN, HAS_GATE,
                 HAS_MASK, False, USE_DOT, HAS_FRAMES, WINDOW, EB, True, NEW_MASK, FINAL, HAS_RING, False)


@triton.jit(do_not_specialize=["sm_b", "split_len", "n_value", "parts", "L"])
def _decode_framed_kernel(
    QO, K, V, GATE, MASK, N, OP, MP, LP, sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sm_b, scale, split_len, n_value, parts, L,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, N_ON_DEVICE: tl.constexpr, USE_DOT: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Program (split, b * H + h): the framed keys [0, s) (s = WINDOW * floor((n - 1) / WINDOW)) of the split,
    only read, scored against M'^T q from QO, which :func:`_decode_kernel` (FRAMED_ELSEWHERE) wrote a launch
    before together with the new token's gate at slot n. Nothing else: few registers per program, so that
    more programs keep loads in flight. Partials at split index i of parts per (row, head)."""
    i_s, i_bh, b, h, n = _decode_program(N, n_value, H, N_ON_DEVICE)
    od, ov, og, on, g_ok, hq = _decode_ranges(h, G, GP, D, DV, BN)
    q_old = tl.load(QO + (b * (H * G) + hq)[:, None] * D + od[None, :], mask=g_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    g_rows = GATE + b.to(tl.int64) * sg_b + hq.to(tl.int64) * sg_h
    g_q = tl.zeros([GP], tl.float32)
    if HAS_GATE:
        g_q = tl.load(g_rows + tl.minimum(n, L - 1), mask=g_ok, other=0.0)  # (n = L: a full cache, NaN anyway)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DV], tl.float32)
    start = i_s * split_len
    s_old = tl.maximum(n - 1, 0) // WINDOW * WINDOW
    for off in range(start, tl.minimum(start + split_len, s_old), BN):
        cols = off + on
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * D + od[None, :]).to(tl.float32)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * DV + ov[None, :])
        m_i, l_i, acc = _decode_tile(_group_scores(q_old, k, USE_DOT), v, cols, cols < s_old, m_i, l_i, acc, g_rows,
                                     g_q, g_ok, MASK, b, sm_b, scale, HAS_GATE, HAS_MASK, USE_DOT)
    _store_partial(OP, MP, LP, i_bh * parts + i_s, og, ov, acc, m_i, l_i, GP, DV)


@triton.jit(do_not_specialize=["n_split", "L"])
def _decode_merge_kernel(
    OP, MP, LP, O, N, n_split, L, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr,
    ADVANCE: tl.constexpr,
):
    """Program b * H + h: merge the splits' partial softmaxes (empty splits: max -inf, sum 0) into
    O [B, HQ, DV] (in O's dtype), rows h * G ... h * G + G - 1. CH splits per load, so that the loads of a
    chunk are independent (a loop of one split at a time waits on each load in turn).

    ADVANCE (slot n on the device): program 0 moves it to n + 1 (the decoding kernel, a launch before, has
    read it), and only program 0 reads it here: another program could see it advanced. A slot past the
    buffer (n >= L: a full static cache in a compiled step, where the host cannot check) reaches here as
    NaN partials from the decoding kernel, so the outputs are NaN rather than an attention that silently
    misses the token."""
    i_bh = tl.program_id(0)
    if ADVANCE:
        if i_bh == 0:
            tl.store(N, tl.minimum(tl.load(N) + 1, L))
    og = tl.arange(0, GP)
    ov = tl.arange(0, DV)
    oc = tl.arange(0, CH)
    first = i_bh * n_split
    m_all = tl.full([GP], float("-inf"), tl.float32)
    for s0 in range(0, n_split, CH):
        rows = first + s0 + oc
        m = tl.load(MP + rows[:, None] * GP + og[None, :], mask=(s0 + oc < n_split)[:, None], other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(m, 0))
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    num = tl.zeros([GP, DV], tl.float32)
    den = tl.zeros([GP], tl.float32)
    for s0 in range(0, n_split, CH):
        rows = first + s0 + oc
        valid = (s0 + oc < n_split)[:, None]
        m = tl.load(MP + rows[:, None] * GP + og[None, :], mask=valid, other=float("-inf"))
        weight = tl.exp(m - m_all[None, :])  # [CH, GP]
        den += tl.sum(weight * tl.load(LP + rows[:, None] * GP + og[None, :], mask=valid, other=0.0), 0)
        part = tl.load(OP + (rows[:, None, None] * GP + og[None, :, None]) * DV + ov[None, None, :],
                       mask=valid[:, :, None], other=0.0)  # [CH, GP, DV]
        num += tl.sum(weight[:, :, None] * part, 0)
    o = num / den[:, None]
    tl.store(O + (i_bh * G + og)[:, None] * DV + ov[None, :], o.to(O.dtype.element_ty), mask=(og < G)[:, None])


_SM_COUNT: dict = {}


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (``triton.cdiv`` costs a few microseconds per call in eager decoding steps)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host code (as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _decode_launch(D: int, DV: int, G: int, keys: int) -> tuple[int, int, int]:
    """(keys per tile, warps, programs per SM) of the decoding kernel for a cache of `keys` keys (batch x kv
    heads x slots), from sweeps in CUDA graphs on an H100 (docs/kernels.md, decoding runs 8 and 9): one warp
    per program and many programs keep the most loads in flight. Head dim 64: 32-key tiles, one warp and 16
    programs per SM at every size (the framed keys' kernel then takes 126 registers per thread, which lets
    16 programs share an SM). Head dim 128: 32-key tiles, 4 warps and 8 programs per SM, or 1 warp and 16
    past 2^17 keys (measured before run 8)."""
    if max(D, DV) <= 64:
        return (32, 1, 16)
    return (32, 1, 16) if keys > 2**17 else (32, 4, 8)


def decode_attention(
    q, keys, values, w, beta, n, *, gates=None, key_mask=None, frames=None, window: int = 64, scale: float,
    out_dtype=torch.float32, launch=None, new_token=None, max_splits: int | None = None, ring=None, inputs=None,
):
    """One decoding step of PaTH attention, fused: the new token's Householder update of the cached keys,
    the scores and the weighted values, split over the sequence (flash-decoding) and merged.

    Args:
        q [B, HQ, D]; w [B, H, D] unit norm; beta [B, H].
        keys [B, H, L, D]: slots below n are the cache, carried to the previous position (see frames);
            slot n is the new token's raw key; slots above n are ignored. Rows must be contiguous.
        values [B, H, L, DV], rows contiguous; gates [B, HQ, L] cumulative log gates (slot n: the new
            token's), float32; key_mask [B, L] bool, False at padding.
        n: the new token's slot: an int, or an int64 tensor with one element (read on the device, so a
            compiled step needs no host sync).
        frames: None: every cached key is updated in place (read and written each step). Else a float32
            [B, 2, H, D, D] buffer, both [:, 0] and [:, 1] the identity when the cache holds keys carried
            to its last position: keys below ``window * floor((n - 1) / window)`` are then only read, and
            carried by a D x D matrix kept in frames (and written back once every ``window`` steps), so a
            step reads those keys once instead of reading and writing them. Keep frames with the cache and
            call :func:`carry_framed_keys` before reading the keys with anything else.
        window: the in-place window of ``frames`` (a power of two, at least the tile of keys).
        out_dtype: the output's dtype (the merge kernel rounds to it).
        launch: (keys per tile, warps, programs per SM), overriding :func:`_decode_launch` (for tuning); a
            fourth element caps the decoding kernel's registers per thread (Triton's ``maxnreg``).
        new_token: (key [B, H, D], value [B, H, DV], log gate [B, HQ] float32 or None, padding flag [B]
            bool or None): the kernel writes slot n itself (raw key, value, gates[n - 1] + log gate, flag;
            key and value cast to the buffers' dtypes) instead of reading it, and, with n a device tensor,
            advances n by one after the step (a compiled step then needs no write launches of its own).
            n >= L then gives NaN outputs.
        max_splits: at most this many programs per (row, kv head) along the sequence. With one (and n an
            int) the kernel writes the output itself and no merge runs: one launch fewer, for steps whose
            cost is the host's launches rather than the GPU's work (eager decoding of short caches).
        ring: with frames and new_token, a float32 [B, H, 2 * window, D] buffer holding the exact keys of
            the window (slots ``window * floor((n - 1) / window)`` to n - 1) at slot % (2 * window): the step
            updates them there and writes rounded copies into keys, which may then be half precision (the
            framed keys are rounded once per fold). The caller fills it whenever keys were written otherwise.
        inputs: a :class:`StepInputs` held back by ``decode_inputs(..., launch=False)``, whose outputs are
            this step's q, w, beta and new_token's key, value and gate (those tensors, or views of them). On
            a step with new_token, n an int and no fold due, the decoding kernel computes them itself
            (:func:`_decode_step_kernel`: one launch for one split, with the merge two for several; with
            several, the next convolution state is a new tensor, ``inputs.conv_state``, which the caller
            keeps); otherwise, or if any of them is not the held output, the inputs kernel runs first.
    Returns:
        o [B, HQ, DV] in out_dtype.
    """
    B, HQ, D = q.shape
    H, L, DV = keys.shape[1], keys.shape[2], values.shape[-1]
    G = HQ // H
    if keys.stride(-1) != 1 or keys.stride(-2) != D or values.stride(-1) != 1 or values.stride(-2) != DV:
        raise ValueError("decode_attention needs key and value rows contiguous along the head dimension")
    use_dot = G > 1
    GP = max(16, _next_pow2(G)) if use_dot else 1
    BN, warps, per_sm, *cap = launch if launch is not None else _decode_launch(D, DV, G, B * H * L)
    registers = {"maxnreg": cap[0]} if cap and cap[0] else {}
    has_frames = frames is not None
    if has_frames:
        if frames.shape != (B, 2, H, D, D) or frames.dtype != torch.float32 or not frames.is_contiguous():
            raise ValueError(f"frames must be a contiguous float32 [B, 2, H, D, D] buffer, got {tuple(frames.shape)}")
        if window % BN or window & (window - 1):
            raise ValueError(f"window ({window}) must be a power of two and a multiple of the key tile ({BN})")
    has_ring = ring is not None
    if has_ring:
        if not has_frames or new_token is None:
            raise ValueError("a ring of window keys needs frames and new_token (the kernel writes the new slot)")
        if ring.shape != (B, H, 2 * window, D) or ring.dtype != torch.float32 or not ring.is_contiguous():
            raise ValueError(f"ring must be a contiguous float32 [B, H, 2 * window, D] buffer, got {tuple(ring.shape)}")
    tiles = _cdiv(L, BN)
    # enough programs to fill the GPU several times over (each walks its split serially)
    n_split = max(1, min(tiles, _cdiv(per_sm * _sm_count(q.device), B * H), max_splits or tiles))
    split_len = _cdiv(tiles, n_split) * BN
    n_split = _cdiv(L, split_len)
    has_gate, has_mask, on_device = gates is not None, key_mask is not None, isinstance(n, torch.Tensor)
    final = n_split == 1 and not on_device
    # With frames and the slot on the device (compiled steps, CUDA graphs), two launches: one program per
    # (row, head) for the window, the new token and the frame, then the framed keys' splits in a kernel that
    # does nothing else (docs/kernels.md, decoding run 9). Eager steps, bound by the host's launches, keep one.
    framed_elsewhere = has_frames and on_device
    parts = n_split + 1 if framed_elsewhere else n_split
    o = torch.empty(B, HQ, DV, dtype=out_dtype, device=q.device)
    if final:
        o_part = m_part = l_part = o
    else:
        o_part = torch.empty(B * H, parts, GP, DV, dtype=torch.float32, device=q.device)
        m_part = torch.empty(B * H, parts, GP, dtype=torch.float32, device=q.device)
        l_part = torch.empty(B * H, parts, GP, dtype=torch.float32, device=q.device)
    q_old = torch.empty(B, HQ, D, dtype=torch.float32, device=q.device) if framed_elsewhere else q
    if has_mask and key_mask.stride(-1) != 1:
        key_mask = key_mask.contiguous()
    q, w, beta = q.contiguous(), w.contiguous(), beta.contiguous()
    write_new = new_token is not None
    if write_new:
        if not on_device and n >= L:
            raise ValueError(f"slot n={n} is past the key buffer ({L} slots); make the cache longer")
        k_new, v_new, g_new, mask_new = new_token
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
        if (g_new is None) != (gates is None):
            raise ValueError("new_token's log gate must be given exactly when gates are")
        if mask_new is not None and key_mask is None:
            raise ValueError("new_token's padding flag needs key_mask")
        g_new = g_new.to(torch.float32).contiguous() if g_new is not None else q
        new_mask = mask_new is not None
        mask_new = mask_new.reshape(B).contiguous() if new_mask else q
    else:
        k_new = v_new = g_new = mask_new = q
        new_mask = False
    # The fold works only on steps whose slot is a multiple of the window; an eager step (slot known here)
    # launches it only then, a compiled step (slot on the device) always, for a fixed set of launches.
    fold = has_frames and (on_device or (n % window == 0 and n > window))
    strides = (keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
               gates.stride(0) if has_gate else 0, gates.stride(1) if has_gate else 0, key_mask.stride(0) if has_mask else 0)
    fuse = (  # the held inputs computed inside the step's kernel (the fold, which reads w and beta, comes first)
        inputs is not None and write_new and not on_device and not fold
        and _holds(inputs, q, k_new, v_new, w, beta, g_new if has_gate else None)
    )
    if inputs is not None and not fuse:
        inputs.launch()
    if fold:
        _decode_fold_kernel[(n_split, B * H)](
            keys, w, beta, n if on_device else q, frames,
            keys.stride(0), keys.stride(1), split_len, 0 if on_device else n,
            H=H, D=D, BN=BN, EB=min(D, 32), N_ON_DEVICE=on_device, WINDOW=window, num_warps=4,
            # three TF32 products: float32 accuracy on tensor cores (the interpreter multiplies in float32)
            PREC="tf32x3" if keys.is_cuda else "ieee",
        )
    if fuse:
        state = inputs.conv_state
        if state is not None and n_split > 1:  # splits of one head all read the old state: the next one apart
            inputs.conv_state = torch.empty_strided(state.shape, state.stride(), dtype=state.dtype, device=state.device)
        _decode_step_kernel[(n_split, B * H)](
            *inputs.args[:8], *inputs.args[14:], inputs.conv_state if state is not None else q, q, keys, values, w,
            beta, gates if has_gate else q, key_mask if has_mask else q, frames if has_frames else q,
            ring if has_ring else q, o_part, m_part, l_part, k_new, v_new, g_new, mask_new, *strides, scale,
            split_len, n, L, parts,
            GP=GP, DV=DV, BN=BN, HAS_MASK=has_mask, USE_DOT=use_dot, HAS_FRAMES=has_frames, WINDOW=window,
            EB=min(D, 32), NEW_MASK=new_mask, FINAL=final, HAS_RING=has_ring,
            **inputs.constants, num_warps=warps, **registers,  # (H, G, D, HAS_GATE: the held outputs' shapes)
        )
        inputs.pending = False
    else:
        _decode_kernel[(1, B * H) if framed_elsewhere else (n_split, B * H)](
            q, keys, values, w, beta, gates if has_gate else q, key_mask if has_mask else q, n if on_device else q,
            frames if has_frames else q, ring if has_ring else q, o_part, m_part, l_part, k_new, v_new, g_new,
            mask_new, q_old, *strides, scale, _cdiv(L, BN) * BN if framed_elsewhere else split_len,
            0 if on_device else n, L, parts,
            H=H, G=G, GP=GP, D=D, DV=DV, BN=BN, HAS_GATE=has_gate, HAS_MASK=has_mask, N_ON_DEVICE=on_device,
            USE_DOT=use_dot, HAS_FRAMES=has_frames, WINDOW=window, EB=min(D, 32), WRITE_NEW=write_new,
            NEW_MASK=new_mask, FINAL=final, HAS_RING=has_ring, FRAMED_ELSEWHERE=framed_elsewhere,
            **(dict(num_warps=4) if framed_elsewhere else dict(num_warps=warps, **registers)),
        )
    if framed_elsewhere:
        _decode_framed_kernel[(n_split, B * H)](
            q_old, keys, values, gates if has_gate else q, key_mask if has_mask else q, n if on_device else q,
            o_part, m_part, l_part, *strides, scale, split_len, 0 if on_device else n, parts, L,
            H=H, G=G, GP=GP, D=D, DV=DV, BN=BN, HAS_GATE=has_gate, HAS_MASK=has_mask, N_ON_DEVICE=on_device,
            USE_DOT=use_dot, WINDOW=window, num_warps=warps, **registers,
        )
    if final:
        return o
    chunk = max(1, min(_next_pow2(parts), 4096 // (GP * DV)))  # splits per load, <= 4096 values
    advance = write_new and on_device
    _decode_merge_kernel[(B * H,)](
        o_part, m_part, l_part, o, n if advance else q, parts, L, G=G, GP=GP, DV=DV, CH=chunk, ADVANCE=advance,
        num_warps=4,
    )
    return o


def _holds(inputs, *tensors) -> bool:
    """Whether q, k, v, w, beta and the gate (None without one) are the memory of inputs' outputs, in order."""
    return all(
        (t is None) == (out is None) and (t is None or t.data_ptr() == out.data_ptr())
        for t, out in zip(tensors, inputs.outputs)
    )


@triton.jit
def _round(x, DT: tl.constexpr):
    """x (float32) rounded to the model dtype and back: one elementwise op of torch in that dtype."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _step_inputs(
    b, h, X, WU, CS, CS_OUT, CW, CB, QNW, KNW, TM, QO, KO, VO, WO, BO, GO,
    sx, cs_b, cs_t, qk_eps, beta_max,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TAPS: tl.constexpr,
    LOW_RANK: tl.constexpr, HAS_CONV: tl.constexpr, HAS_CBIAS: tl.constexpr, QK_NORM: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_TM: tl.constexpr, CLAMP: tl.constexpr,
):
    """Row b, kv head h of a decoding step's inputs (see :func:`decode_inputs`): reads X's columns q (H*G*D),
    k (H*D), v (H*D), w (H*D, or R with LOW_RANK), beta logits (H), gate logits (H*G); writes kv head h's
    q rows (its G query heads), k, v, w, beta, gate and its channels of the convolution state: read from CS,
    the next state written to CS_OUT (CS itself, or a buffer of the same strides where several programs
    compute the same head's inputs and must all read the state as it was)."""
    DT = QO.dtype.element_ty  # the model dtype
    k_col = H * G * D
    v_col = k_col + H * D
    w_col = v_col + H * D
    beta_col = w_col + (R if LOW_RANK else H * D)
    gate_col = beta_col + H
    row = X + b.to(tl.int64) * sx
    od = tl.arange(0, D)
    ch = h * D + od  # channels of this key head
    keep = 1.0
    if HAS_TM:
        keep = tl.load(TM + b).to(tl.float32)
    # w: the low-rank projection's second factor (one product rounded to the model dtype, as nn.Linear's)
    if LOW_RANK:
        r = tl.arange(0, RP)
        low = tl.load(row + w_col + r, mask=r < R, other=0.0).to(tl.float32)
        up = tl.load(WU + ch[:, None] * R + r[None, :], mask=(r < R)[None, :], other=0.0).to(tl.float32)
        x = _round(tl.sum(up * low[None, :], axis=1), DT)
    else:
        x = tl.load(row + w_col + ch).to(tl.float32)
    # padding zeroes the convolution's input; causal depthwise convolution with the cached inputs, SiLU
    x = x * keep
    y = x
    if HAS_CONV:
        y = _round(x * _round(tl.load(CW + ch * TAPS + TAPS - 1).to(tl.float32), DT), DT)
        for shift in tl.static_range(1, TAPS):
            earlier = tl.load(CS + b * cs_b + (TAPS - 1 - shift) * cs_t + ch).to(tl.float32)
            tap = _round(earlier * _round(tl.load(CW + ch * TAPS + TAPS - 1 - shift).to(tl.float32), DT), DT)
            y = _round(y + tap, DT)
        if HAS_CBIAS:
            y = _round(y + _round(tl.load(CB + ch).to(tl.float32), DT), DT)
        y = _round(y / (1.0 + tl.exp(-y)), DT)
        if TAPS > 1:  # the state keeps the last TAPS - 1 inputs: shift it by one and append x
            for j in tl.static_range(0, TAPS - 2):
                later = tl.load(CS + b * cs_b + (j + 1) * cs_t + ch)
                tl.store(CS_OUT + b * cs_b + j * cs_t + ch, later)
            tl.store(CS_OUT + b * cs_b + (TAPS - 2) * cs_t + ch, x.to(CS_OUT.dtype.element_ty))
    tl.store(WO + (b * H + h) * D + od, y * tl.rsqrt(tl.sum(y * y, axis=0) + 1e-6))
    beta = 2.0 * tl.sigmoid(tl.load(row + beta_col + h).to(tl.float32))
    if CLAMP:
        beta = tl.minimum(beta, beta_max)
    tl.store(BO + b * H + h, beta * keep)
    tl.store(VO + (b * H + h) * D + od, tl.load(row + v_col + ch))
    k = tl.load(row + k_col + ch).to(tl.float32)
    if QK_NORM:
        k = k * tl.rsqrt(tl.sum(k * k, axis=0) / D + qk_eps) * tl.load(KNW + od).to(tl.float32)
    tl.store(KO + (b * H + h) * D + od, k.to(KO.dtype.element_ty))
    for i in tl.static_range(G):
        hq = h * G + i
        q = tl.load(row + hq * D + od).to(tl.float32)
        if QK_NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) / D + qk_eps) * tl.load(QNW + od).to(tl.float32)
        tl.store(QO + (b * H * G + hq) * D + od, q.to(QO.dtype.element_ty))
        if HAS_GATE:
            z = tl.load(row + gate_col + hq).to(tl.float32)
            e = tl.exp(-tl.abs(z))  # log sigmoid(z) = min(z, 0) - log(1 + e)
            tl.store(GO + b * H * G + hq, (tl.minimum(z, 0.0) - tl.where(e < 1e-4, e, tl.log(1.0 + e))) * keep)


@triton.jit
def _decode_inputs_kernel(
    X, WU, CS, CW, CB, QNW, KNW, TM, QO, KO, VO, WO, BO, GO,
    sx, cs_b, cs_t, qk_eps, beta_max,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TAPS: tl.constexpr,
    LOW_RANK: tl.constexpr, HAS_CONV: tl.constexpr, HAS_CBIAS: tl.constexpr, QK_NORM: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_TM: tl.constexpr, CLAMP: tl.constexpr,
):
    """Program (row b, kv head h): :func:`_step_inputs`, the convolution state updated in place."""
    _step_inputs(tl.program_id(0), tl.program_id(1), X, WU, CS, CS, CW, CB, QNW, KNW, TM, QO, KO, VO, WO, BO, GO,
                 sx, cs_b, cs_t, qk_eps, beta_max, H, G, D, R, RP, TAPS, LOW_RANK, HAS_CONV, HAS_CBIAS, QK_NORM,
                 HAS_GATE, HAS_TM, CLAMP)


class StepInputs:
    """A launch of :func:`decode_inputs` held back (``launch=False``): its outputs exist but are not written
    yet. :func:`decode_attention` computes them in its own kernel where it can (``inputs=``), else calls
    :meth:`launch` first; a caller that hands them elsewhere calls :meth:`launch` itself."""

    __slots__ = ("outputs", "args", "constants", "grid", "conv_state", "pending")

    def __init__(self, outputs: tuple, args: tuple, constants: dict, grid: tuple, conv_state):
        self.outputs, self.args, self.constants, self.grid, self.pending = outputs, args, constants, grid, True
        # the convolution state after the step (None without one): the tensor given, updated in place, unless
        # decode_attention computed the inputs in several programs per head and wrote it to a new one
        self.conv_state = conv_state

    def launch(self) -> None:
        """Write the outputs (once; later calls do nothing)."""
        if self.pending:
            _decode_inputs_kernel[self.grid](*self.args, **self.constants, num_warps=1)
            self.pending = False


def decode_inputs(x, *, heads: int, kv_heads: int, head_dim: int, has_gate: bool, w_up=None, conv_state=None,
                  conv_weight=None, conv_bias=None, q_norm=None, k_norm=None, qk_eps=1e-5, token_mask=None,
                  beta_max=None, launch: bool = True):
    """The single-token inputs of a decoding step in one launch, computed as PaTHAttention's PyTorch ops do
    (same roundings to the model dtype), from the input projections of one token.

    Args:
        x [B, N]: one token's input projections side by side along the columns, in the model dtype, rows
            contiguous: q (heads * D, D = head_dim), k, v (kv_heads * D each), w (kv_heads * D, before the short
            convolution; with ``w_up``, the R columns of its low-rank bottleneck), the beta logits (kv_heads)
            and, with ``has_gate``, the gate logits (heads). One tensor (the output of one product), so that
            a compiled step passes it to the kernel as it is, with no copies of column slices.
        w_up [kv_heads * D, R] contiguous: the low-rank w's second factor (no bias), applied here.
        conv_state [B, K-1, kv_heads * D] (model dtype, columns contiguous): the convolution's earlier
            inputs, **updated in place** (shifted by one, w appended). conv_weight [kv_heads * D, K]
            contiguous; conv_bias [kv_heads * D]. None: no convolution.
        q_norm, k_norm: RMSNorm weights [D] (both or neither), eps qk_eps.
        token_mask [B] bool: False where the new token is padding (identity transform, no gate mass).
        launch: False holds the launch back: the outputs are allocated but not written, and a
            :class:`StepInputs` comes back as a seventh value, for :func:`decode_attention`'s ``inputs``
            (which computes them inside its own kernel where it can, one launch fewer).
    Returns:
        q [B, heads, D], k and v [B, kv_heads, D] in the model dtype; w [B, kv_heads, D] unit norm, beta
        [B, kv_heads] and the log gate [B, heads] (None without a gate) in float32.
    """
    B, N = x.shape
    D = head_dim
    R = w_up.shape[1] if w_up is not None else 0
    width = (heads + 2 * kv_heads) * D + (R if w_up is not None else kv_heads * D) + kv_heads + heads * has_gate
    if N != width:
        raise ValueError(f"decode_inputs: x has {N} columns where the projections need {width}")
    if w_up is not None and (w_up.shape[0] != kv_heads * D or not w_up.is_contiguous()):
        raise ValueError(f"decode_inputs: w_up must be a contiguous [{kv_heads * D}, R] matrix")
    if x.stride(-1) != 1 or (conv_state is not None and conv_state.stride(-1) != 1):
        raise ValueError("decode_inputs needs x's and conv_state's last dimension contiguous")
    G = heads // kv_heads
    dt = x.dtype
    f32 = dict(dtype=torch.float32, device=x.device)
    q_out = torch.empty(B, heads, D, dtype=dt, device=x.device)
    k_out = torch.empty(B, kv_heads, D, dtype=dt, device=x.device)
    v_out = torch.empty(B, kv_heads, D, dtype=dt, device=x.device)
    w_out = torch.empty(B, kv_heads, D, **f32)
    beta_out = torch.empty(B, kv_heads, **f32)
    has_conv, qk_norm = conv_state is not None, q_norm is not None
    g_out = torch.empty(B, heads, **f32) if has_gate else None
    taps = conv_weight.shape[-1] if has_conv else 2
    args = (
        x, w_up if w_up is not None else x, conv_state if has_conv else x, conv_weight if has_conv else x,
        conv_bias if conv_bias is not None else x, q_norm if qk_norm else x, k_norm if qk_norm else x,
        token_mask if token_mask is not None else x, q_out, k_out, v_out, w_out, beta_out, g_out if has_gate else x,
        x.stride(0), conv_state.stride(0) if has_conv else 0, conv_state.stride(1) if has_conv else 0,
        qk_eps, beta_max if beta_max is not None else 0.0,
    )
    constants = dict(
        H=kv_heads, G=G, D=D, R=R, RP=_next_pow2(max(R, 1)), TAPS=taps, LOW_RANK=w_up is not None,
        HAS_CONV=has_conv, HAS_CBIAS=conv_bias is not None, QK_NORM=qk_norm, HAS_GATE=has_gate,
        HAS_TM=token_mask is not None, CLAMP=beta_max is not None,
    )
    outputs = q_out, k_out, v_out, w_out, beta_out, g_out
    held = StepInputs(outputs, args, constants, (B, kv_heads), conv_state)
    if launch:
        held.launch()
        return outputs
    return (*outputs, held)


@triton.jit
def _small_linear_kernel(X, W, U, BIAS, Y, N, K, sx, sy, M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GATED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (block of BN output columns): Y[m, cols] for the M rows, with every product in float32 and
    rounded to Y's dtype as a matrix kernel's epilogue does (bias added before the rounding). GATED:
    Y = silu(X W^T) * (X U^T), each product rounded, then the SiLU, then the product (PyTorch's roundings)."""
    DT = Y.dtype.element_ty
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    col_ok = cols < N
    for m in tl.static_range(M):
        acc = tl.zeros([BN], tl.float32)
        acc_u = tl.zeros([BN], tl.float32)
        for k0 in range(0, K, BK):
            k_ok = k0 + ks < K
            x = tl.load(X + m * sx + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            offsets = cols.to(tl.int64)[:, None] * K + (k0 + ks)[None, :]
            tile_ok = col_ok[:, None] & k_ok[None, :]
            acc += tl.sum(tl.load(W + offsets, mask=tile_ok, other=0.0).to(tl.float32) * x[None, :], axis=1)
            if GATED:
                acc_u += tl.sum(tl.load(U + offsets, mask=tile_ok, other=0.0).to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = _round(acc, DT)
        if GATED:
            y = _round(_round(y / (1.0 + tl.exp(-y)), DT) * _round(acc_u, DT), DT)
        tl.store(Y + m * sy + cols, y.to(DT), mask=col_ok)


def small_linear(x, weight, bias=None, *, up=None):
    """``F.linear(x, weight, bias)`` for a few rows (a decoding step's), or with ``up`` the gated MLP's
    ``silu(F.linear(x, weight, bias)) * F.linear(x, up)``, in one launch that spreads the weights' columns
    over the whole GPU, where a matrix kernel gives one row a handful of programs (one per 64 output
    columns). Measured on an H100 with weights read from memory (benchmarks/gpu_small_linear.py): the gated
    MLP of one row in 0.5x the time of its three kernels; single products no faster than cuBLAS.

    x [..., K], last dimension contiguous; few rows: the kernel unrolls its loop over them and reads the
    weights once per row (from the L2 cache after the first). weight and up [N, K] contiguous; bias [N] or
    None. Returns [..., N] in x's dtype."""
    K = x.shape[-1]
    N = weight.shape[0]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if rows.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != K:
        raise ValueError(f"small_linear needs x's last dimension and a [N, {K}] weight contiguous; got weight "
                         f"{tuple(weight.shape)} with strides {weight.stride()}")
    if up is not None and (up.shape != weight.shape or not up.is_contiguous()):
        raise ValueError(f"small_linear: up must be contiguous and shaped like weight {tuple(weight.shape)}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BK = min(_next_pow2(K), 2048)
    BN = max(1, min(16, 8192 // BK))  # ~64 weights per thread and tile, all in flight at once
    _small_linear_kernel[(_cdiv(N, BN),)](
        rows, weight, up if up is not None else weight, bias if bias is not None else weight, y, N, K,
        rows.stride(0), y.stride(0), M=M, BN=BN, BK=BK, GATED=up is not None, HAS_BIAS=bias is not None,
        num_warps=4,
    )
    return y.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------------------
# The layer's w before attention: short convolution over time, SiLU, unit norm per head (training, prefill)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _conv_input(X, SEG, b, t, seg, ch, shift, T, C, SEGMENTED: tl.constexpr):
    """X [B, T, C] at rows t - shift of batch row b and channels ch, in float32: zero where row t is outside
    [0, T), row t - shift before the sequence, or (SEGMENTED) in another segment than row t's (seg)."""
    ok = (t >= shift) & (t < T)
    if SEGMENTED:
        ok = ok & (tl.load(SEG + b * T + t - shift, mask=ok, other=-2) == seg)
    rows = b.to(tl.int64) * T + t - shift
    return tl.load(X + rows[:, None] * C + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _conv_weight(CW, ch, tap, TAPS: tl.constexpr, DT: tl.constexpr):
    """Tap ``tap`` of the convolution's weight CW [C, TAPS] at channels ch, rounded to DT (as ``.to(x.dtype)``)."""
    return _round(tl.load(CW + ch * TAPS + tap).to(tl.float32), DT)


@triton.jit
def _segment_of(SEG, b, t, T, SEGMENTED: tl.constexpr):
    """The segment ids of rows t (SEG [B, T]; zeros without segments)."""
    if SEGMENTED:
        return tl.load(SEG + b * T + t, mask=(t >= 0) & (t < T), other=-1)
    return tl.zeros_like(t)


@triton.jit
def _conv_rows(X, CW, CB, SEG, b, t, ch, T, C, TAPS: tl.constexpr, HAS_CBIAS: tl.constexpr, SEGMENTED: tl.constexpr,
               DT: tl.constexpr):
    """The causal depthwise convolution at rows t (any, [BT]) and channels ch ([D]) of batch row b of X [B, T,
    C], before its SiLU, with PyTorch's roundings to the model dtype DT (each product, each sum, the bias);
    zero at rows outside [0, T). Taps from other segments (SEG [B, T]) or before the sequence count zero."""
    seg = _segment_of(SEG, b, t, T, SEGMENTED)
    y = _round(_conv_input(X, SEG, b, t, seg, ch, 0, T, C, SEGMENTED) * _conv_weight(CW, ch, TAPS - 1, TAPS, DT)[None, :],
               DT)
    for shift in tl.static_range(1, TAPS):
        earlier = _conv_input(X, SEG, b, t, seg, ch, shift, T, C, SEGMENTED)
        y = _round(y + _round(earlier * _conv_weight(CW, ch, TAPS - 1 - shift, TAPS, DT)[None, :], DT), DT)
    if HAS_CBIAS:
        y = _round(y + _round(tl.load(CB + ch).to(tl.float32), DT)[None, :], DT)
    return tl.where(((t >= 0) & (t < T))[:, None], y, 0.0)


@triton.jit
def _conv_output_grad(X, CW, CB, SEG, DN, b, t, ch, T, C, TAPS: tl.constexpr, HAS_CBIAS: tl.constexpr,
                      SEGMENTED: tl.constexpr, DT: tl.constexpr):
    """The gradient at the convolution's output (before the SiLU) of rows t: from dN, that of the unit-norm
    rows N = A / sqrt(|A|^2 + eps), A = silu(Y) rounded to DT; zero outside [0, T)."""
    y = _conv_rows(X, CW, CB, SEG, b, t, ch, T, C, TAPS, HAS_CBIAS, SEGMENTED, DT)
    sig = tl.sigmoid(y)
    a = _round(y / (1.0 + tl.exp(-y)), DT)
    r = tl.rsqrt(tl.sum(a * a, axis=1) + 1e-6)
    inside = (t >= 0) & (t < T)
    dn = tl.load(DN + (b.to(tl.int64) * T + t)[:, None] * C + ch[None, :], mask=inside[:, None], other=0.0)
    n = a * r[:, None]
    da = (dn - n * tl.sum(dn * n, axis=1)[:, None]) * r[:, None]
    return da * sig * (1.0 + y * (1.0 - sig))


@triton.jit
def _short_conv_norm_fwd_kernel(X, CW, CB, SEG, OUT, T, C, D: tl.constexpr, TAPS: tl.constexpr, BT: tl.constexpr,
                                HAS_CBIAS: tl.constexpr, SEGMENTED: tl.constexpr):
    """Program (block of BT rows, batch row x head): OUT = silu(conv(X)) / sqrt(|.|^2 + 1e-6) over the head's
    D channels, float32 ([B, T, C])."""
    DT = X.dtype.element_ty
    b = tl.program_id(1) // (C // D)
    ch = (tl.program_id(1) % (C // D)) * D + tl.arange(0, D)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    y = _conv_rows(X, CW, CB, SEG, b, t, ch, T, C, TAPS, HAS_CBIAS, SEGMENTED, DT)
    a = _round(y / (1.0 + tl.exp(-y)), DT)
    n = a * tl.rsqrt(tl.sum(a * a, axis=1) + 1e-6)[:, None]
    tl.store(OUT + (b.to(tl.int64) * T + t)[:, None] * C + ch[None, :], n, mask=(t < T)[:, None])


@triton.jit
def _short_conv_norm_bwd_kernel(X, CW, CB, SEG, DN, DX, DCW, DCB, T, C, D: tl.constexpr, TAPS: tl.constexpr,
                                BT: tl.constexpr, HAS_CBIAS: tl.constexpr, SEGMENTED: tl.constexpr):
    """Program (block of BT rows, batch row x head) of :func:`_short_conv_norm_fwd_kernel`'s backward: dX of
    its rows (from the output gradients of the TAPS - 1 rows after them too, recomputed here), and its rows'
    shares of the convolution weight's and bias's gradients at its channels (DCW [row blocks x B, C, TAPS],
    DCB [row blocks x B, C]: the heads' programs of one row block fill one row; summed by the caller)."""
    DT = X.dtype.element_ty
    b = tl.program_id(1) // (C // D)
    ch = (tl.program_id(1) % (C // D)) * D + tl.arange(0, D)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    inside = t < T
    part = (b * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
    dy = _conv_output_grad(X, CW, CB, SEG, DN, b, t, ch, T, C, TAPS, HAS_CBIAS, SEGMENTED, DT)
    if HAS_CBIAS:
        tl.store(DCB + part * C + ch, tl.sum(dy, axis=0))
    seg = _segment_of(SEG, b, t, T, SEGMENTED)
    x = _conv_input(X, SEG, b, t, seg, ch, 0, T, C, SEGMENTED)
    tl.store(DCW + (part * C + ch) * TAPS + TAPS - 1, tl.sum(dy * x, axis=0))
    dx = dy * _conv_weight(CW, ch, TAPS - 1, TAPS, DT)[None, :]
    for shift in tl.static_range(1, TAPS):
        # tap (TAPS - 1 - shift): row t - shift's input in row t's output; row t's input in row t + shift's
        earlier = _conv_input(X, SEG, b, t, seg, ch, shift, T, C, SEGMENTED)
        tl.store(DCW + (part * C + ch) * TAPS + TAPS - 1 - shift, tl.sum(dy * earlier, axis=0))
        later = t + shift
        dy_later = _conv_output_grad(X, CW, CB, SEG, DN, b, later, ch, T, C, TAPS, HAS_CBIAS, SEGMENTED, DT)
        ok = later < T
        if SEGMENTED:
            ok = ok & (_segment_of(SEG, b, later, T, SEGMENTED) == seg)
        dx += tl.where(ok[:, None], dy_later, 0.0) * _conv_weight(CW, ch, TAPS - 1 - shift, TAPS, DT)[None, :]
    tl.store(DX + (b.to(tl.int64) * T + t)[:, None] * C + ch[None, :], dx.to(DX.dtype.element_ty),
             mask=inside[:, None])


SHORT_CONV_ELEMENTS = 4096  # rows x head dim per program of the short convolution's kernels (64 rows at 64)


def _short_conv_launch(x, head_dim: int) -> tuple:
    """(grid, launch options) of the short convolution's kernels. Without floating-point fusion: with it the
    compiler contracts a product and the sum after its rounding (``_round(a * b) + c``) into one fma that skips
    the rounding, and 30 % of the sums differ from PyTorch's by a rounding step (measured on an H100)."""
    B, T, C = x.shape
    rows = max(16, SHORT_CONV_ELEMENTS // head_dim)
    return (_cdiv(T, rows), B * (C // head_dim)), dict(D=head_dim, BT=rows, num_warps=4, enable_fp_fusion=False)


class _ShortConvNorm(torch.autograd.Function):
    """:func:`short_conv_normalize` with its backward (no graph of PyTorch ops in between)."""

    @staticmethod
    def forward(ctx, x, weight, bias, segment_ids, head_dim):
        B, T, C = x.shape
        taps = weight.shape[-1]
        cw = weight.reshape(C, taps).contiguous()
        seg = segment_ids.to(torch.int32).contiguous() if segment_ids is not None else None
        out = torch.empty(B, T, C, dtype=torch.float32, device=x.device)
        grid, launch = _short_conv_launch(x, head_dim)
        _short_conv_norm_fwd_kernel[grid](
            x, cw, bias if bias is not None else cw, seg if seg is not None else cw, out, T, C, TAPS=taps,
            HAS_CBIAS=bias is not None, SEGMENTED=seg is not None, **launch,
        )
        ctx.save_for_backward(x, cw, bias, seg)
        ctx.weight_shape, ctx.head_dim = weight.shape, head_dim
        return out

    @staticmethod
    def backward(ctx, dn):
        x, cw, bias, seg = ctx.saved_tensors
        B, T, C = x.shape
        taps = cw.shape[1]
        grid, launch = _short_conv_launch(x, ctx.head_dim)
        parts = grid[0] * B  # one row of shares per row block and batch row, written by its heads' programs
        dx = torch.empty_like(x)
        dcw = torch.empty(parts, C, taps, dtype=torch.float32, device=x.device)
        dcb = torch.empty(parts, C, dtype=torch.float32, device=x.device) if bias is not None else None
        _short_conv_norm_bwd_kernel[grid](
            x, cw, bias if bias is not None else cw, seg if seg is not None else cw, dn.contiguous(), dx, dcw,
            dcb if dcb is not None else dcw, T, C, TAPS=taps, HAS_CBIAS=bias is not None, SEGMENTED=seg is not None,
            **launch,
        )
        dweight = dcw.sum(0).to(cw.dtype).reshape(ctx.weight_shape)
        dbias = dcb.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dweight, dbias, None, None


def short_conv_normalize(x, weight, bias=None, segment_ids=None, *, head_dim: int):
    """``PaTHShortConvolution`` (causal depthwise convolution over time, SiLU) without a cached state, then
    each head's D channels scaled to unit norm (``w * rsqrt(|w|^2 + 1e-6)`` in float32): the layer's w
    before attention, in one kernel and its backward in another, instead of ~30 elementwise PyTorch ops.
    Every product and sum of the convolution is rounded to x's dtype, as PyTorch's ops in that dtype do.

    x [B, T, C] contiguous (bf16, fp16 or float32); weight [C, 1, taps]; bias [C] or None; segment_ids
    [B, T] or None (taps do not cross segments); C a multiple of head_dim, a power of two. Returns [B, T, C]
    float32, differentiable in x, weight and bias."""
    B, T, C = x.shape
    if C % head_dim or head_dim & (head_dim - 1) or not x.is_contiguous():
        raise ValueError(f"short_conv_normalize needs x [B, T, C] contiguous with C ({C}) a multiple of a "
                         f"power-of-two head_dim ({head_dim}); got strides {x.stride()}")
    return _ShortConvNorm.apply(x, weight, bias, segment_ids, head_dim)


# ---------------------------------------------------------------------------------------------------------
# The gated MLP's activation: silu(gate) * up from one product of both projections, one kernel each way
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _gated_silu_operands(Y, row, cols, I, valid):
    """The gate and up entries ``cols`` of one row of Y [N, 2 I] (gate first), in float32."""
    base = Y + row.to(tl.int64) * (2 * I)
    g = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
    return g, tl.load(base + I + cols, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _gated_silu_fwd_kernel(Y, OUT, I, BLOCK: tl.constexpr):
    """Program (row, BLOCK columns): out = silu(g) * u, rounded to DT after the SiLU and after the product
    (PyTorch's two ops in Y's dtype)."""
    DT = Y.dtype.element_ty
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < I
    g, u = _gated_silu_operands(Y, row, cols, I, valid)
    s = _round(g / (1.0 + tl.exp(-g)), DT)
    tl.store(OUT + row.to(tl.int64) * I + cols, (s * u).to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _gated_silu_bwd_kernel(Y, DOUT, DY, I, BLOCK: tl.constexpr):
    """Program (row, BLOCK columns): the gradients of g and u, written into DY [N, 2 I] in Y's layout, with
    PyTorch's roundings (the product's backward in Y's dtype, then SiLU's)."""
    DT = Y.dtype.element_ty
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < I
    g, u = _gated_silu_operands(Y, row, cols, I, valid)
    dout = tl.load(DOUT + row.to(tl.int64) * I + cols, mask=valid, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = _round(g * sig, DT)
    ds = _round(dout * u, DT)
    base = DY + row.to(tl.int64) * (2 * I)
    tl.store(base + cols, (ds * sig * (1.0 + g * (1.0 - sig))).to(DY.dtype.element_ty), mask=valid)
    tl.store(base + I + cols, (dout * s).to(DY.dtype.element_ty), mask=valid)


GATED_SILU_BLOCK = 1024  # columns per program


class _GatedSiLU(torch.autograd.Function):
    """:func:`gated_silu` with its backward; keeps only the product's output for the backward."""

    @staticmethod
    def forward(ctx, y):
        I = y.shape[-1] // 2
        rows = math.prod(y.shape[:-1])
        out = torch.empty(*y.shape[:-1], I, dtype=y.dtype, device=y.device)
        if rows and I:
            grid = (rows, _cdiv(I, GATED_SILU_BLOCK))
            _gated_silu_fwd_kernel[grid](y, out, I, BLOCK=GATED_SILU_BLOCK)
        ctx.save_for_backward(y)
        return out

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        I = y.shape[-1] // 2
        rows = math.prod(y.shape[:-1])
        dy = torch.empty_like(y)
        if rows and I:
            grid = (rows, _cdiv(I, GATED_SILU_BLOCK))
            _gated_silu_bwd_kernel[grid](y, dout.contiguous(), dy, I, BLOCK=GATED_SILU_BLOCK)
        return dy


def gated_silu(y):
    """``silu(y[..., :I]) * y[..., I:]`` for y [..., 2 I] (the gate's and the up projection's outputs of one
    product, gate first), in y's dtype with PyTorch's roundings, differentiable: one kernel each way instead
    of three elementwise ops in the forward and three in the backward, and only y kept for the backward (not
    the SiLU's output too). y contiguous, bf16, fp16 or float32."""
    if y.shape[-1] % 2 or not y.is_contiguous() or y.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gated_silu needs y [..., 2 * I] contiguous in bf16, fp16 or float32; got shape "
                         f"{tuple(y.shape)}, strides {y.stride()}, {y.dtype}")
    return _GatedSiLU.apply(y)


# ---------------------------------------------------------------------------------------------------------
# The blocks' RMSNorm under autocast: float32 in, the products' half precision out, one kernel each way
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(X, A, H, W, Y, RSTD, N, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
    """Program (row): y = x * rsqrt(mean(x^2) + eps) * w in float32, stored in Y's dtype; 1 / rms kept. With ADD
    the row normalized is h = x + a (float32 sum, stored in H's dtype)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    x = tl.load(X + row * N + cols, mask=valid, other=0.0).to(tl.float32)
    if ADD:
        x += tl.load(A + row * N + cols, mask=valid, other=0.0).to(tl.float32)
        tl.store(H + row * N + cols, x.to(H.dtype.element_ty), mask=valid)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=valid)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(X, W, DY, RSTD, DH, DX, DA, DW_PART, M, N, ROWS, BLOCK: tl.constexpr, ADD: tl.constexpr,
                         HAS_DH: tl.constexpr):
    """Program (ROWS consecutive rows): dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w and xhat = x *
    rstd, and the program's share of dw = sum over rows of dy * xhat (float32, summed over programs after).
    With ADD (X holds h = x + a): dx gains h's own gradient DH (HAS_DH), and is written to DX in x's dtype and
    to DA in a's."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        live = valid & (cols * 0 + row < M)  # (the last program's rows may end early: zeros then add nothing to dw)
        off = row.to(tl.int64) * N + cols
        x = tl.load(X + off, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, M - 1))
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        if HAS_DH:
            dx += tl.load(DH + off, mask=live, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=live)
        if ADD:
            tl.store(DA + off, dx.to(DA.dtype.element_ty), mask=live)
        dw += dy * xhat
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=valid)


RMS_NORM_MAX_WIDTH = 65536  # features a row program holds in registers


class _RMSNorm(torch.autograd.Function):
    """:func:`rms_norm` and :func:`add_rms_norm` with their backward (dx and dw in one pass over the rows). ``a``
    None: the norm of x alone (returns y); else of h = x + a (returns h and y)."""

    @staticmethod
    def forward(ctx, x, a, weight, eps, out_dtype):
        N = x.shape[-1]
        M = x.numel() // N if N else 0
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        h = torch.empty_like(x) if a is not None else None
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        if M and N:
            _rms_norm_fwd_kernel[(M,)](x, a, h, weight, y, rstd, N, eps, BLOCK=_next_pow2(N), ADD=a is not None,
                                       num_warps=_norm_warps(N))
        ctx.save_for_backward(x if a is None else h, weight, rstd)
        ctx.a_dtype = None if a is None else a.dtype
        return y if a is None else (h, y)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, rstd = ctx.saved_tensors
        dh, dy = grads if ctx.a_dtype is not None else (None, grads[0])
        N = x.shape[-1]
        M = rstd.shape[0]
        dx = torch.empty_like(x)
        da = torch.empty(x.shape, dtype=ctx.a_dtype, device=x.device) if ctx.a_dtype is not None else None
        if dy is None:
            dy = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        if M and N:
            programs = min(M, 4 * _sm_count(x.device))
            rows = _cdiv(M, programs)
            programs = _cdiv(M, rows)
            dw = torch.empty(programs, N, dtype=torch.float32, device=x.device)
            _rms_norm_bwd_kernel[(programs,)](
                x, weight, dy.contiguous(), rstd, None if dh is None else dh.contiguous(), dx, da, dw, M, N, rows,
                BLOCK=_next_pow2(N), ADD=da is not None, HAS_DH=dh is not None, num_warps=_norm_warps(N),
            )
            dw = dw.sum(0).to(weight.dtype)
        else:
            dw = torch.zeros_like(weight)
        return dx, da, dw, None, None


def _norm_warps(N: int) -> int:
    return 4 if N <= 2048 else 8 if N <= 8192 else 16


def _check_norm_inputs(x, weight, out_dtype, *others):
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if (
        not all(t.is_contiguous() and t.dtype in floats and t.shape == x.shape for t in (x, *others))
        or out_dtype not in floats or weight.dtype not in floats or weight.shape != x.shape[-1:]
        or x.shape[-1] > RMS_NORM_MAX_WIDTH
    ):
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} (strides {t.stride()})" for t in (x, *others))
        raise ValueError(
            f"rms_norm needs x [..., N] (and add_rms_norm's a of x's shape) contiguous in bf16, fp16 or float32 with "
            f"N <= {RMS_NORM_MAX_WIDTH} and a weight [N] in one of those; got {shapes}, weight {tuple(weight.shape)} "
            f"{weight.dtype}, out_dtype {out_dtype}"
        )


def rms_norm(x, weight, eps: float, out_dtype=None):
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` computed in float32 and stored in ``out_dtype`` (x's by
    default), differentiable: under autocast the blocks' norms write the half-precision input of the products
    that read them, so neither the cast to it nor its gradient's cast back is a kernel of its own, and the
    backward is one kernel (dx and the weight's partial sums) instead of two. x contiguous in float32, bf16 or
    fp16, at most :data:`RMS_NORM_MAX_WIDTH` features; weight [features]."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_norm_inputs(x, weight, out_dtype)
    return _RMSNorm.apply(x, None, weight.contiguous(), float(eps), out_dtype)


def add_rms_norm(x, a, weight, eps: float, out_dtype=None):
    """(h, :func:`rms_norm` of h) for h = x + a (the residual stream and a sublayer's output: the float32 sum that
    ``x + a`` computes, in x's dtype), differentiable: the sum is no kernel of its own, and in the backward h's
    gradient from later layers joins the norm's in its kernel instead of an add of autograd's. a of x's shape,
    both contiguous; a's gradient comes back in a's dtype, as that add's would."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_norm_inputs(x, weight, out_dtype, a)
    return _RMSNorm.apply(x, a, weight.contiguous(), float(eps), out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Preparation of the forward pass: per-chunk transforms, carries to superblock edges, chunk frame changes
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _unit_lower_inverse(W, row0, h, real, beta, OUT, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                        PREC: tl.constexpr):
    """Writes (I + M)^-1 ([C, C] float32, row-major; only blocks of 16 x 16 on or below the diagonal) to OUT,
    M = tril(w w^T, -1) diag(beta) over the chunk's rows row0.. (``real`` inside the sequence) of head h of
    W [B, T, H, D], beta [C] float32.

    The diagonal blocks D_a = (I + M_aa)^-1, all C / 16 at once, by forward substitution in float32 (exact
    arithmetic order, no tensor cores); then block substitution: with L the part of M below the diagonal
    blocks and N = D^-1 L (strictly block-lower), T = (I + N)^-1 D^-1 is the fixed point of T = D^-1 - N T,
    which C / 16 - 1 steps from T = D^-1 reach exactly (each step finalizes one more block row; the same sums
    as substituting block row by block row)."""
    NBK: tl.constexpr = C // 16
    oc = tl.arange(0, C)
    o16 = tl.arange(0, 16)
    ob = tl.arange(0, NBK)
    w = tl.load(W + ((row0 + oc)[:, None] * H + h) * D + tl.arange(0, D)[None, :], mask=real[:, None], other=0.0)
    w = w.to(tl.float32)
    m = tl.where(oc[:, None] > oc[None, :], tl.dot(w, tl.trans(w), input_precision=PREC) * beta[None, :], 0.0)
    same = ob[:, None, None, None] == ob[None, None, :, None]  # [NBK, 1, NBK, 1]: block row == block column
    m_d = tl.sum(tl.where(same, tl.reshape(m, [NBK, 16, NBK, 16]), 0.0), axis=2)  # [NBK, 16, 16]
    row = o16[None, :, None]
    inv = tl.where(row == o16[None, None, :], 1.0, 0.0) + tl.zeros([NBK, 16, 16], tl.float32)
    for r in range(1, 16):
        m_row = tl.sum(tl.where(row == r, m_d, 0.0), axis=1)  # [NBK, 16]: M_aa[r, :]
        new_row = tl.sum(m_row[:, :, None] * inv, axis=1)  # sum_j M_aa[r, j] D_a[j, :], rows j < r final
        inv = tl.where(row == r, inv - new_row[:, None, :], inv)
    t = tl.reshape(tl.where(same, inv[:, :, None, :], 0.0), [C, C])  # D^-1, block diagonal
    if NBK > 1:
        d_inv = t
        low = tl.where((oc[:, None] // 16) > (oc[None, :] // 16), m, 0.0)
        for _ in tl.static_range(NBK - 1):
            t = d_inv - tl.dot(d_inv, tl.dot(low, t, input_precision=PREC), input_precision=PREC)
    tl.store(OUT + oc[:, None] * C + oc[None, :], t, mask=(oc[:, None] // 16) >= (oc[None, :] // 16))


@triton.jit
def _chunk_program(T, T_pad, H: tl.constexpr, C: tl.constexpr):
    """Program (chunk, batch x kv head) of the preparation's backward kernels: (batch b, kv head h, the
    chunk's positions, which of them are inside the sequence, the chunk's first row in the [B * T] layout of
    the inputs, its index in per-chunk buffers [B * H * n, ...])."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = i_bh // H
    h = i_bh % H
    pos = i_c * C + tl.arange(0, C)
    return b, h, pos, pos < T, b * T + i_c * C, (i_bh * (T_pad // C) + i_c).to(tl.int64)


@triton.jit
def _chunk_w_k(W, K, row0, h, real, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr):
    """The chunk's rows [C, D] of head h of inputs w and k ([B, T, H, D]), in float32 (zero past the sequence)."""
    off = ((row0 + tl.arange(0, C))[:, None] * H + h) * D + tl.arange(0, D)[None, :]
    w = tl.load(W + off, mask=real[:, None], other=0.0).to(tl.float32)
    return w, tl.load(K + off, mask=real[:, None], other=0.0).to(tl.float32)


@triton.jit
def _chunk_beta(BETA, row0, h, real, H: tl.constexpr, C: tl.constexpr):
    """The chunk's beta [C] of head h (input [B, T, H]), in float32 (zero past the sequence)."""
    return tl.load(BETA + (row0 + tl.arange(0, C)) * H + h, mask=real, other=0.0).to(tl.float32)


@triton.jit
def _chunk_inverse(TINV, chunk, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The chunk's unit lower triangular inverse Ti = (I + M)^-1 [C, C] (or Ti^T); only blocks of 16 on or
    below the diagonal were written, the rest is zero."""
    oc = tl.arange(0, C)
    if TRANSPOSED:
        return tl.load(TINV + chunk * (C * C) + oc[:, None] + oc[None, :] * C,
                       mask=(oc[:, None] // 16) <= (oc[None, :] // 16), other=0.0)
    return tl.load(TINV + chunk * (C * C) + oc[:, None] * C + oc[None, :],
                   mask=(oc[:, None] // 16) >= (oc[None, :] // 16), other=0.0)


@triton.jit
def _chunk_solve_kernel(W, BETA, TINV, T, T_pad, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                        PREC: tl.constexpr):
    """One program per (chunk, batch x kv head): the chunk's triangular inverse (:func:`_unit_lower_inverse`),
    in a kernel of its own so that the chunk kernel's registers are not shared with it."""
    b, h, pos, real, row0, chunk = _chunk_program(T, T_pad, H, C)
    beta = _chunk_beta(BETA, row0, h, real, H, C)
    _unit_lower_inverse(W, row0, h, real, beta, TINV + chunk * (C * C), H, D, C, PREC)


@triton.jit
def _rows_block(X, rows, cols, real):
    """X[rows, cols] in float32 ([len(rows), len(cols)]; ``rows`` the flat offsets of the rows), zero in rows
    past the sequence (``real`` false)."""
    return tl.load(X + rows[:, None] + cols[None, :], mask=real[:, None], other=0.0).to(tl.float32)


@triton.jit
def _prep_chunk_kernel(
    Q, K, V, W, BETA, GATE, SEG, TINV, P_OUT, QT, QT_K, KT, KT_K, O_LOC, LSE_LOC,
    scale, T, T_pad,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    HAS_GATE: tl.constexpr, LOCAL_ATTENTION: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (chunk, batch x kv head): from the chunk's inverse (TINV, :func:`_chunk_solve_kernel`'s)
    its product and carries; with LOCAL_ATTENTION also the attention inside the chunk (the backward's rerun
    needs only the rest)."""
    b, h, pos, real, row0, chunk = _chunk_program(T, T_pad, H, C)
    G: tl.constexpr = HQ // H
    oc = tl.arange(0, C)
    od = tl.arange(0, D)
    ov = tl.arange(0, DV)
    beta = _chunk_beta(BETA, row0, h, real, H, C)
    w, k = _chunk_w_k(W, K, row0, h, real, H, D, C)
    t_low = _chunk_inverse(TINV, chunk, C, False)
    # P = I - W^T diag(beta) U with U = (I + M)^-1 W: the chunk's Householder product.
    u = tl.dot(t_low, w, input_precision=PREC)
    eye = tl.where(od[:, None] == od[None, :], 1.0, 0.0)
    p = eye - tl.dot(tl.trans(w), u * beta[:, None], input_precision=PREC)
    tl.store(P_OUT + chunk * D * D + od[:, None] * D + od[None, :], p)

    # Keys carried to the chunk's end: k_j - (triu(K W^T, 1) diag(beta)) (I + N)^-1 W, N = triu(W W^T, 1)
    # diag(beta). N^T = diag(beta) M diag(beta)^-1, so diag(beta) (I + N)^-1 = ((I + M)^-1)^T diag(beta): the
    # same inverse serves both carries (and beta = 0 needs no special case).
    kw = tl.where(oc[:, None] < oc[None, :], tl.dot(k, tl.trans(w), input_precision=PREC), 0.0)
    k_t = k - tl.dot(kw, tl.dot(tl.trans(t_low), w * beta[:, None], input_precision=PREC), input_precision=PREC)
    k_off = ((b * T_pad + pos)[:, None] * H + h) * D + od[None, :]
    tl.store(KT + k_off, k_t)
    tl.store(KT_K + k_off, k_t.to(KT_K.dtype.element_ty))

    # Scores inside the chunk: q_i^T k_j - (tril(Q W^T) diag(beta)) (I + M)^-1 tril(W K^T, -1).
    if LOCAL_ATTENTION:
        wk = tl.dot(t_low, tl.where(oc[:, None] > oc[None, :], tl.dot(w, tl.trans(k), input_precision=PREC), 0.0),
                    input_precision=PREC)
        v = tl.load(V + ((b * T_pad + pos)[:, None] * H + h) * DV + ov[None, :]).to(tl.float32)
        seg = tl.load(SEG + b * T_pad + pos)
        visible = (oc[None, :] <= oc[:, None]) & (pos[None, :] >= seg[:, None])
    for hq in range(h * G, h * G + G):
        q = tl.load(Q + ((row0 + oc)[:, None] * HQ + hq) * D + od[None, :], mask=real[:, None], other=0.0)
        q = q.to(tl.float32)
        qw = tl.where(oc[:, None] >= oc[None, :], tl.dot(q, tl.trans(w), input_precision=PREC) * beta[None, :], 0.0)
        q_t = q - tl.dot(qw, u, input_precision=PREC)
        q_off = ((b * T_pad + pos)[:, None] * HQ + hq) * D + od[None, :]
        tl.store(QT + q_off, q_t)
        tl.store(QT_K + q_off, q_t.to(QT_K.dtype.element_ty))
        if LOCAL_ATTENTION:
            s = (tl.dot(q, tl.trans(k), input_precision=PREC) - tl.dot(qw, wk, input_precision=PREC)) * scale
            if HAS_GATE:
                g_q = tl.load(GATE + (b * T_pad + pos) * HQ + hq) * scale
                s += g_q[:, None] - g_q[None, :]
            s = tl.where(visible, s, float("-inf"))  # every query sees itself
            m = tl.max(s, axis=1)
            e = tl.exp(s - m[:, None])
            l = tl.sum(e, axis=1)
            o = tl.dot(e, v, input_precision=PREC) / l[:, None]
            tl.store(O_LOC + ((b * T_pad + pos)[:, None] * HQ + hq) * DV + ov[None, :], o)
            tl.store(LSE_LOC + (b * HQ + hq) * T_pad + pos, m + tl.log(l))


@triton.jit
def _frame_chain(P, p_base, MID, MID32, mid_base, t, NB, eye_cols, full, cols, D: tl.constexpr,
                 WRITE32: tl.constexpr, PREC: tl.constexpr):
    """The frame changes F[s, t] = P_{s-1} ... P_{t+1} of one window's chain from block t (s = t + 1 ... NB - 1,
    F[t + 1, t] = I), these columns (``cols`` of a D x D matrix, ``eye_cols`` the identity's): the blocks'
    products at P + p_base, the changes packed row by row at MID + mid_base + (s (s - 1) / 2 + t) D^2 in MID's
    dtype, and in float32 at MID32 with WRITE32."""
    f = eye_cols
    tl.store(MID + mid_base + ((t + 1) * t // 2 + t) * D * D + cols, f.to(MID.dtype.element_ty))
    if WRITE32:
        tl.store(MID32 + mid_base + ((t + 1) * t // 2 + t) * D * D + cols, f)
    for s in range(t + 2, NB):
        f = tl.dot(tl.load(P + p_base + (s - 1) * D * D + full), f, input_precision=PREC)
        tl.store(MID + mid_base + (s * (s - 1) // 2 + t) * D * D + cols, f.to(MID.dtype.element_ty))
        if WRITE32:
            tl.store(MID32 + mid_base + (s * (s - 1) // 2 + t) * D * D + cols, f)


@triton.jit
def _prep_superblock_kernel(
    P, QT, KT, Q_BOT, K_TOP, K_TOP32, MID, P_SB, B_MAT, A_MAT, MID32, T_pad,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, C: tl.constexpr, NB: tl.constexpr,
    KEYS32: tl.constexpr, FOR_BACKWARD: tl.constexpr, TASKS_FIRST: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (superblock, batch x kv head, task, DB columns); tasks: the queries' carry, the keys'
    carry, and the frame changes from each chunk t. Every product below is separable by columns of its result
    (queries, P_{l-1} ... P_0, frame changes) or by rows of the chained matrix (keys). FOR_BACKWARD also
    writes each chunk's carry matrices B_l = P_{l-1} ... P_0, A_l = P_{NB-1} ... P_{l+1} and the frame
    changes in float32. With TASKS_FIRST the grid is (task and columns, superblock, batch x kv head): the
    tasks of one superblock run at the same time and read its chunks' products P from L2 rather than each
    from memory (SUPERBLOCK_TASKS_FIRST)."""
    if TASKS_FIRST:
        i_task, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    else:
        i_s, i_bh, i_task = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    task = i_task // (D // DB)
    i_d = i_task % (D // DB)
    b = i_bh // H
    h = i_bh % H
    G: tl.constexpr = HQ // H
    NP: tl.constexpr = NB * (NB - 1) // 2
    n_sb = T_pad // (C * NB)
    oc = tl.arange(0, C)
    od = tl.arange(0, D)
    ob = i_d * DB + tl.arange(0, DB)
    full = od[:, None] * D + od[None, :]
    cols = od[:, None] * D + ob[None, :]  # [D, DB]: these columns of a D x D matrix
    p_base = ((i_bh * n_sb + i_s) * NB).to(tl.int64) * D * D  # the superblock's chunks in [B, H, n, D, D]
    eye_cols = tl.where(od[:, None] == ob[None, :], 1.0, 0.0)

    if task == 0:  # queries down to the superblock's bottom: q_t @ (P_{l-1} ... P_0); then P of the superblock
        below = eye_cols
        for l in range(NB):
            if FOR_BACKWARD:
                tl.store(B_MAT + p_base + l * D * D + cols, below)
            pos = (i_s * NB + l) * C + oc
            for hq in range(h * G, h * G + G):
                q_t = tl.load(QT + ((b * T_pad + pos)[:, None] * HQ + hq) * D + od[None, :])
                q_bot = tl.dot(q_t, below, input_precision=PREC)
                q_off = ((b * T_pad + pos)[:, None] * HQ + hq) * D + ob[None, :]
                tl.store(Q_BOT + q_off, q_bot.to(Q_BOT.dtype.element_ty))
            below = tl.dot(tl.load(P + p_base + l * D * D + full), below, input_precision=PREC)
        tl.store(P_SB + (i_bh * n_sb + i_s).to(tl.int64) * D * D + cols, below)
    elif task == 1:  # keys up to the superblock's top: k_t @ (P_{NB-1} ... P_{l+1})^T; DB columns = DB rows
        above = tl.trans(eye_cols)
        for step in range(NB):
            l = NB - 1 - step
            pos = (i_s * NB + l) * C + oc
            k_t = tl.load(KT + ((b * T_pad + pos)[:, None] * H + h) * D + od[None, :])
            k_top = tl.dot(k_t, tl.trans(above), input_precision=PREC)
            off = ((b * T_pad + pos)[:, None] * H + h) * D + ob[None, :]
            tl.store(K_TOP + off, k_top.to(K_TOP.dtype.element_ty))
            if KEYS32:
                tl.store(K_TOP32 + off, k_top)
            if FOR_BACKWARD:
                tl.store(A_MAT + p_base + l * D * D + ob[:, None] * D + od[None, :], above)
            above = tl.dot(above, tl.load(P + p_base + l * D * D + full), input_precision=PREC)
    else:  # frame changes from chunk t
        mid_base = ((i_bh * n_sb + i_s) * NP).to(tl.int64) * D * D
        _frame_chain(P, p_base, MID, MID32, mid_base, task - 2, NB, eye_cols, full, cols, D, FOR_BACKWARD, PREC)


_PREP_LAUNCH = {"num_warps": 4, "num_stages": 1}  # measured on an H100 (docs/kernels.md, v4)
# num_warps / num_stages of the per-chunk kernels by (kernel, head dim), where a sweep on an H100 found them
# faster than _PREP_LAUNCH (benchmarks/gpu_prep_launch.py, docs/kernels.md v9, v13-v15; kernels: "solve",
# "chunk", "edges", "queries", "key_side", "keys", "inverse"). The query side, the key side and the
# inverse ran at 8 warps at head dim 128 (the query side at 64 too) until they took the head dim in blocks of 64
# columns (v13, v14): with 40-80 KiB of shared memory instead of 112-224, two 4-warp programs fit an SM, and 4
# warps are faster. The chunk kernel at head dim 128 is faster at 8 warps since the inverses left it (v15).
_EIGHT_WARPS = {"num_warps": 8, "num_stages": 1}
PREP_LAUNCH: dict[tuple[str, int], dict] = {(name, 128): _EIGHT_WARPS for name in ("chunk", "edges")}


def _prep_launch(kernel: str, D: int, launch: dict | None = None) -> dict:
    """The launch of one per-chunk kernel: ``launch[kernel]`` if given (tuning), else the table's."""
    return (launch or {}).get(kernel) or PREP_LAUNCH.get((kernel, D), _PREP_LAUNCH)


# Launch of the kernels that walk chains of D x D products (the superblock kernel, the chains' backward), by
# head dim: ``columns`` of the result per program (D x D float32 operands bound shared memory), warps, stages.
CHAIN_LAUNCH = {64: dict(columns=64, num_warps=4, num_stages=1), 128: dict(columns=128, num_warps=8, num_stages=1)}


# The superblock kernel's grid, by head dim: the tasks of one superblock first (they share its chunks' products
# in L2) or the superblocks first. Measured on an H100 (docs/kernels.md, v16): at head dim 128 tasks first took
# the kernel from 1450 to 1258 us per forward+backward at 4 x 4096 x 8 heads (its P, 128 MB there, does not fit
# L2); at 64 it was slower (262 -> 287 us at 2 x 4096 x 16: P fits L2 either way, and superblocks first runs
# the long tasks of every superblock in the first wave).
SUPERBLOCK_TASKS_FIRST = {64: False, 128: True}


# The key side of the per-chunk backward (the scores' and the keys' carry, then the triangular inverse) in one
# kernel, by head dim: its program then holds the chunk's [C, D] tiles whole, which pays where they are small.
# Elsewhere three launches take the head dim in blocks of 64 columns (v14).
KEY_SIDE_ONE_KERNEL = {16: True, 32: True, 64: True}


def _chain_key(D: int) -> int:
    """The row of CHAIN_LAUNCH / SUPERBLOCK_TASKS_FIRST for head dim D."""
    return 64 if D <= 64 else 128


def _chain_launch(D: int) -> dict:
    return dict(CHAIN_LAUNCH[_chain_key(D)])


@triton.jit(do_not_specialize=["NB"])
def _frame_changes_kernel(P, MID, MID32, NB, D: tl.constexpr, DB: tl.constexpr, WRITE32: tl.constexpr,
                          PREC: tl.constexpr):
    """Program (chain start t, batch x head, DB columns): the frame changes F[s, t] = P_{s-1} ... P_{t+1}
    (s = t + 1 ... NB - 1; F[t + 1, t] = I) of one window of NB blocks, packed row by row at
    s (s - 1) / 2 + t, in MID's dtype (and float32 in MID32 with WRITE32)."""
    t = tl.program_id(0)
    i_bh = tl.program_id(1)
    od = tl.arange(0, D)
    ob = tl.program_id(2) * DB + tl.arange(0, DB)
    full = od[:, None] * D + od[None, :]
    cols = od[:, None] * D + ob[None, :]
    p_base = (i_bh * NB).to(tl.int64) * D * D
    mid_base = (i_bh * (NB * (NB - 1) // 2)).to(tl.int64) * D * D
    eye_cols = tl.where(od[:, None] == ob[None, :], 1.0, 0.0)
    _frame_chain(P, p_base, MID, MID32, mid_base, t, NB, eye_cols, full, cols, D, WRITE32, PREC)


def frame_changes(p, *, out_dtype, precision: str, float32_copy: bool = False, launch: dict | None = None):
    """Frame changes F[s, t] = P_{s-1} ... P_{t+1} of every block pair s > t of one window, in one launch.

    p [B, H, NB, D, D] float32 (the blocks' products) -> [B, H, 1, NB (NB - 1) / 2, D, D] in out_dtype, pairs
    packed row by row ((1, 0), (2, 0), (2, 1), ...), the layout :func:`framed_forward` reads; with
    ``float32_copy`` a (that, float32 copy) pair. precision: the products' (:func:`_precision`). ``launch``
    overrides :func:`_chain_launch` (tuning)."""
    B, H, NB, D, _ = p.shape
    p = p.contiguous()
    mid = torch.empty(B, H, 1, NB * (NB - 1) // 2, D, D, dtype=out_dtype, device=p.device)
    mid32 = torch.empty(mid.shape, dtype=torch.float32, device=p.device) if float32_copy else None
    config = dict(_chain_launch(D), **(launch or {}))
    DB = min(D, config.pop("columns"))
    if NB > 1:
        _frame_changes_kernel[(NB - 1, B * H, D // DB)](
            p, mid, mid32 if float32_copy else mid, NB, D=D, DB=DB, WRITE32=float32_copy, PREC=precision, **config,
        )
    return (mid, mid32) if float32_copy else mid


def prepare_forward(q, k, v, w, beta, gate, seg_start, *, chunk: int, chunks_per_superblock: int, scale: float,
                    keys32: bool, for_backward: bool = False, local_attention: bool | None = None,
                    t_inv=None, launch: dict | None = None):
    """The forward pass's preparation in three kernels (two with ``t_inv``; not differentiable: the backward
    reruns it with ``for_backward``, or takes what a forward with ``for_backward`` kept, and runs its own
    kernels).

    Args: q [B, T, HQ, D], k, w [B, T, H, D], beta [B, T, H] as given, v [B, T_pad, H, DV] zero padded (w, beta any float
        dtype); gate [B, T_pad, HQ] float32 cumulative or None; seg_start [B, T_pad] int32. The kernels read
        q's dtype (products in TF32 for half precision, IEEE float32 for float32 inputs).
    Returns a dict: q_t, k_t [B, T_pad, heads, D] (queries and keys carried to their chunk's start / end, kernel
        dtype), q_bot, k_top (carried to their superblock's edges, kernel dtype; k_top32 float32 when keys32),
        mid [B, H, n_sb, NB(NB-1)/2, D, D] chunk frame changes (kernel dtype), p_sb [B, H, n_sb, D, D] float32
        superblock products, o_local [B, T_pad, HQ, DV] float32 and lse_local [B, HQ, T_pad]: attention inside
        each query's own chunk (with ``local_attention``, by default not ``for_backward``; else None), t_inv
        [B * H * n, C, C] float32 each chunk's triangular inverse (only blocks on or below the diagonal of 16 x 16
        blocks written). With ``for_backward`` also what :func:`prepare_backward` and
        :func:`edge_grads` read: p [B, H, n, D, D] each chunk's product, q_t32 / k_t32 the carries in float32,
        b_mat / a_mat [B, H, n, D, D] each chunk's
        carry matrices to its superblock's bottom / top (B_l = P_{l-1} ... P_0, A_l = P_{NB-1} ... P_{l+1}),
        mid32 the chunk frame changes, all float32.
    ``t_inv``: the inverses an earlier call with these w, beta returned, read instead of computed (the
    backward's rerun). ``launch`` ({"chunk": {...}, "superblock": {...}}) overrides the kernels' num_warps /
    num_stages and the superblock kernel's ``columns`` (:func:`_chain_launch`; tuning).
    """
    B, T, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    T_pad = seg_start.shape[1]
    C, NB = chunk, chunks_per_superblock
    n, n_sb = T_pad // C, T_pad // (C * NB)
    kdt, f32 = q.dtype, torch.float32
    prec = _precision(q)
    local_attention = not for_backward if local_attention is None else local_attention
    q, k, v, w, beta = (x.contiguous() for x in (q, k, v, w, beta))
    empty = functools.partial(torch.empty, device=q.device)
    p = empty(B, H, n, D, D, dtype=f32)  # each chunk's product, read by the superblock kernel
    q_t32, k_t32 = empty(B, T_pad, HQ, D, dtype=f32), empty(B, T_pad, H, D, dtype=f32)
    out = dict(
        q_t=empty(B, T_pad, HQ, D, dtype=kdt), k_t=empty(B, T_pad, H, D, dtype=kdt),
        o_local=empty(B, T_pad, HQ, DV, dtype=f32) if local_attention else None,
        lse_local=empty(B, HQ, T_pad, dtype=f32) if local_attention else None,
        q_bot=empty(B, T_pad, HQ, D, dtype=kdt), k_top=empty(B, T_pad, H, D, dtype=kdt),
        k_top32=empty(B, T_pad, H, D, dtype=f32) if keys32 else None,
        mid=empty(B, H, n_sb, max(NB * (NB - 1) // 2, 1), D, D, dtype=kdt), p_sb=empty(B, H, n_sb, D, D, dtype=f32),
    )
    if t_inv is None:  # each chunk's triangular inverse
        t_inv = empty(B * H * n, C, C, dtype=f32)
        _chunk_solve_kernel[(n, B * H)](w, beta, t_inv, T, T_pad, H=H, D=D, C=C, PREC=prec,
                                        **_prep_launch("solve", D, launch))
    b_mat = a_mat = mid32 = None
    if for_backward:
        b_mat, a_mat, mid32 = empty(B, H, n, D, D, dtype=f32), empty(B, H, n, D, D, dtype=f32), empty(out["mid"].shape, dtype=f32)
    _prep_chunk_kernel[(n, B * H)](
        q, k, v, w, beta, gate, seg_start, t_inv, p, q_t32, out["q_t"], k_t32, out["k_t"],
        out["o_local"], out["lse_local"], scale, T, T_pad,
        HQ=HQ, H=H, D=D, DV=DV, C=C, HAS_GATE=gate is not None, LOCAL_ATTENTION=local_attention,
        PREC=prec, **_prep_launch("chunk", D, launch),
    )
    sb_launch = dict(_chain_launch(D), **(launch or {}).get("superblock", {}))
    DB = min(D, sb_launch.pop("columns"))
    tasks_first = SUPERBLOCK_TASKS_FIRST[_chain_key(D)]
    grid = ((NB + 1) * (D // DB), n_sb, B * H) if tasks_first else (n_sb, B * H, (NB + 1) * (D // DB))
    _prep_superblock_kernel[grid](
        p, q_t32, k_t32, out["q_bot"], out["k_top"], out["k_top32"], out["mid"], out["p_sb"], b_mat, a_mat, mid32, T_pad,
        HQ=HQ, H=H, D=D, DB=DB, C=C, NB=NB, KEYS32=keys32, FOR_BACKWARD=for_backward, TASKS_FIRST=tasks_first,
        PREC=prec, **sb_launch,
    )
    out["t_inv"] = t_inv
    if for_backward:
        out.update(p=p, q_t32=q_t32, k_t32=k_t32, b_mat=b_mat, a_mat=a_mat, mid32=mid32)
    return out


# ---------------------------------------------------------------------------------------------------------
# Backward of the preparation: carries to superblock edges, per-chunk transforms, the query's own chunk
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _edge_grads_kernel(QT, DQ_BOT, KT, DK_TOP, B_MAT, A_MAT, DQT, DKT, DB, DA, T_pad,
                       HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """The carries to superblock edges, per (chunk l, batch x kv head): q_bot = q_t B_l and k_top = k_t A_l^T.
    Writes dB_l = sum over the chunk's queries (every query head of the group) of q_t^T dq_bot and
    dA_l = dk_top^T k_t, and adds dq_bot B_l^T to dq_t and dk_top A_l to dk_t (in place)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = i_bh // H
    h = i_bh % H
    G: tl.constexpr = HQ // H
    pos = i_c * C + tl.arange(0, C)
    od = tl.arange(0, D)
    mat = (i_bh * (T_pad // C) + i_c).to(tl.int64) * D * D
    dd = od[:, None] * D + od[None, :]
    acc = tl.zeros([D, D], tl.float32)
    for hq in range(h * G, h * G + G):
        off = ((b * T_pad + pos)[:, None] * HQ + hq) * D + od[None, :]
        dq_bot = tl.load(DQ_BOT + off)
        acc += tl.dot(tl.trans(tl.load(QT + off)), dq_bot, input_precision=PREC)
        b_t = tl.load(B_MAT + mat + od[:, None] + od[None, :] * D)  # B_l^T
        tl.store(DQT + off, tl.load(DQT + off) + tl.dot(dq_bot, b_t, input_precision=PREC))
    tl.store(DB + mat + dd, acc)
    off = ((b * T_pad + pos)[:, None] * H + h) * D + od[None, :]
    dk_top = tl.load(DK_TOP + off)
    tl.store(DA + mat + dd, tl.dot(tl.trans(dk_top), tl.load(KT + off), input_precision=PREC))
    tl.store(DKT + off, tl.load(DKT + off) + tl.dot(dk_top, tl.load(A_MAT + mat + dd), input_precision=PREC))


@triton.jit
def _chunk_bwd_query_head(
    Q, K, V, W, GATE, TINV, DQT, DO, LSE, DELTA, DQ, DK, DW, DBETA, DV_, DV_LEVELS, DG, DU, DWK, DV_ACC,
    hq, i_c, b, beta, seg, scale, T, T_pad, ADD, LAST,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    HAS_GATE: tl.constexpr, PREC: tl.constexpr, ADD_DV: tl.constexpr,
):
    """Query head hq's share of :func:`_chunk_bwd_queries_kernel`'s program (chunk i_c, batch b x its kv head):
    writes its dq and gate gradient and its shares of dk, dw, dbeta, dU, d(Ti L) and the own chunk's dv, with
    ADD added to those the group's earlier heads stored. dv (plus, with ADD_DV,
    the levels' share) goes to DV_ with LAST (the group's last head), else to DV_ACC in float32.

    Each share is stored as soon as it is computed, and the [C, D] and [C, DV] tiles are taken in blocks of
    (at most) 64 columns, loaded right before their products: at any time the head holds a few [C, C] tiles
    and [C, 64] blocks (a loop over blocks rather than unrolled, which spills less at head dim 128). Offsets
    are computed here, per head, rather than held across the kernel's loop over heads."""
    BD: tl.constexpr = min(D, 64)
    BV: tl.constexpr = min(DV, 64)
    h = hq // (HQ // H)
    oc = tl.arange(0, C)
    pos = i_c * C + oc
    real = pos < T
    row0 = b * T + i_c * C
    chunk = ((b * H + h) * (T_pad // C) + i_c).to(tl.int64)
    lower = oc[:, None] >= oc[None, :]
    cc = chunk * (C * C) + oc[:, None] * C + oc[None, :]
    q_rows = ((row0 + oc) * HQ + hq) * D  # the inputs q, k, w ([B * T, heads, D])
    kw_rows = ((row0 + oc) * H + h) * D
    dq_rows = ((b * T_pad + pos) * HQ + hq) * D  # padded in time ([B, T_pad, heads, D])
    dk_rows = ((b * T_pad + pos) * H + h) * D
    du_rows = chunk * (C * D) + oc * D  # per chunk ([B * H * n, C, D])
    # R = Q W^T, Q K^T and L = W K^T
    r = tl.zeros([C, C], tl.float32)
    s = tl.zeros([C, C], tl.float32)
    wk = tl.zeros([C, C], tl.float32)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        q = _rows_block(Q, q_rows, od, real)
        w = _rows_block(W, kw_rows, od, real)
        r += tl.dot(q, tl.trans(w), input_precision=PREC)
        k = _rows_block(K, kw_rows, od, real)
        s += tl.dot(q, tl.trans(k), input_precision=PREC)
        wk += tl.dot(w, tl.trans(k), input_precision=PREC)
    wk = tl.dot(_chunk_inverse(TINV, chunk, C, False), tl.where(oc[:, None] > oc[None, :], wk, 0.0),
                input_precision=PREC)  # Ti L, L = tril(W K^T, -1)
    # The scores S = Q K^T - QW Ti L with QW = tril(R) diag(beta), kept as tril(R) (one [C, C] tile, not two)
    # with beta applied to the other factor: QW X = tril(R) (beta X), QW^T X = beta tril(R)^T X
    r = tl.where(lower, r, 0.0)
    s = (s - tl.dot(r, beta[:, None] * wk, input_precision=PREC)) * scale
    if HAS_GATE:
        g_q = tl.load(GATE + (b * T_pad + pos) * HQ + hq) * scale
        s += g_q[:, None] - g_q[None, :]
    s = tl.where((oc[None, :] <= oc[:, None]) & (pos[None, :] >= seg[:, None]), s, float("-inf"))
    # The own chunk's attention against the final statistics: dv = P^T dO, dS = P (dO V^T - delta)
    p = tl.exp(s - tl.load(LSE + (b * HQ + hq) * T_pad + pos)[:, None])
    ds = tl.zeros([C, C], tl.float32)
    for i_v in range(DV // BV):
        ov = i_v * BV + tl.arange(0, BV)
        do = tl.load(DO + (((b * T_pad + pos) * HQ + hq) * DV)[:, None] + ov[None, :]).to(tl.float32)
        v_off = (((b * T_pad + pos) * H + h) * DV)[:, None] + ov[None, :]
        dv = tl.dot(tl.trans(p), do, input_precision=PREC)
        if ADD:
            dv += tl.load(DV_ACC + v_off)
        elif ADD_DV:  # the levels' share (float32), summed here rather than in a pass of its own
            dv += tl.load(DV_LEVELS + v_off)
        if LAST:
            tl.store(DV_ + v_off, dv)
        else:
            tl.store(DV_ACC + v_off, dv)
        ds += tl.dot(do, tl.trans(tl.load(V + v_off).to(tl.float32)), input_precision=PREC)
    ds = p * (ds - tl.load(DELTA + (b * HQ + hq) * T_pad + pos)[:, None])
    if HAS_GATE:
        tl.store(DG + (b * T_pad + pos) * HQ + hq, (tl.sum(ds, axis=1) - tl.sum(ds, axis=0)) * scale)
    ds = ds * scale
    # Back through the scores and the queries' carry Q - QW U (U = Ti W): d(Ti L) = -QW^T dS, dU = -QW^T dqt,
    # dk = dS^T q, dQW = -dqt U^T - dS (Ti L)^T = -dqt W^T Ti^T - dS (Ti L)^T
    r_t = tl.trans(r)
    dwk = -beta[:, None] * tl.dot(r_t, ds, input_precision=PREC)
    if ADD:
        dwk += tl.load(DWK + cc)
    tl.store(DWK + cc, dwk)
    dqw = tl.zeros([C, C], tl.float32)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        dqt = tl.load(DQT + dq_rows[:, None] + od[None, :])
        du_off = du_rows[:, None] + od[None, :]
        du = -beta[:, None] * tl.dot(r_t, dqt, input_precision=PREC)
        if ADD:
            du += tl.load(DU + du_off)
        tl.store(DU + du_off, du)
        dqw -= tl.dot(dqt, tl.trans(_rows_block(W, kw_rows, od, real)), input_precision=PREC)
        q = _rows_block(Q, q_rows, od, real)
        dk = tl.dot(tl.trans(ds), q, input_precision=PREC)
        if ADD:
            dk += tl.load(DK + dk_rows[:, None] + od[None, :])
        tl.store(DK + dk_rows[:, None] + od[None, :], dk)
    dqw = tl.dot(dqw, _chunk_inverse(TINV, chunk, C, True), input_precision=PREC)
    dqw -= tl.dot(ds, tl.trans(wk), input_precision=PREC)
    # QW = tril(R) diag(beta): to beta, then dR = tril(dQW) diag(beta) to q and w
    dqw = tl.where(lower, dqw, 0.0)
    dbeta = tl.sum(dqw * r, axis=0)
    if ADD:
        dbeta += tl.load(DBETA + (b * T_pad + pos) * H + h)
    tl.store(DBETA + (b * T_pad + pos) * H + h, dbeta)
    dr = dqw * beta[None, :]
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        k = _rows_block(K, kw_rows, od, real)
        dq = tl.load(DQT + dq_rows[:, None] + od[None, :]) + tl.dot(ds, k, input_precision=PREC)
        w = _rows_block(W, kw_rows, od, real)
        dq += tl.dot(dr, w, input_precision=PREC)
        tl.store(DQ + dq_rows[:, None] + od[None, :], dq)
        q = _rows_block(Q, q_rows, od, real)
        dw = tl.dot(tl.trans(dr), q, input_precision=PREC)
        if ADD:
            dw += tl.load(DW + dk_rows[:, None] + od[None, :])
        tl.store(DW + dk_rows[:, None] + od[None, :], dw)


@triton.jit
def _chunk_bwd_queries_kernel(
    Q, K, V, W, BETA, GATE, SEG, TINV, DQT, DO, LSE, DELTA, DQ, DK, DW, DBETA, DV_, DV_LEVELS, DG, DU, DWK, DV_ACC,
    scale, T, T_pad,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    HAS_GATE: tl.constexpr, PREC: tl.constexpr, ADD_DV: tl.constexpr,
):
    """Backward of the chunk kernel's query side, one program per (chunk, batch x kv head), over the group's
    query heads (:func:`_chunk_bwd_query_head`): the own-chunk attention against the final softmax statistics
    (as flash attention's backward), then the scores S = Q K^T - QW Ti L and the queries' carry Q - QW U
    (QW = tril(Q W^T) diag(beta), U = Ti W) back to q, k, w, beta. Writes dq, the own chunk's dv, the cumulative
    gate's gradient, and the query side's dk, dw, dbeta, dU and d(Ti L), which the key side completes; dv is
    the own chunk's share plus, with ADD_DV, the other levels' (DV_LEVELS), written in DV_'s dtype.

    The heads of a group (HQ // H > 1) sum their shares in memory, each adding to what the earlier ones stored
    (dv in DV_ACC, float32, [B, T_pad, H, DV]): held in registers across the loop, these five float32
    accumulators made the kernel spill."""
    i_c = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    G: tl.constexpr = HQ // H
    pos = i_c * C + tl.arange(0, C)
    beta = _chunk_beta(BETA, b * T + i_c * C, h, pos < T, H, C)
    seg = tl.load(SEG + b * T_pad + pos)
    args = (Q, K, V, W, GATE, TINV, DQT, DO, LSE, DELTA, DQ, DK, DW, DBETA, DV_, DV_LEVELS, DG, DU, DWK, DV_ACC)
    if G == 1:  # the group's only head: hq = h
        _chunk_bwd_query_head(*args, h, i_c, b, beta, seg, scale, T, T_pad, False, True, HQ, H, D, DV, C,
                              HAS_GATE, PREC, ADD_DV)
    else:
        for hq in range(h * G, h * G + G):
            if hq > h * G:
                tl.debug_barrier()  # the earlier head's stores (by other threads) are read back
            _chunk_bwd_query_head(*args, hq, i_c, b, beta, seg, scale, T, T_pad, hq > h * G, hq == h * G + G - 1,
                                  HQ, H, D, DV, C, HAS_GATE, PREC, ADD_DV)


@triton.jit
def _chunk_bwd_keys_kernel(
    K, W, BETA, TINV, DKT, DP, DBW, DWK, DK, DW, T, T_pad,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, SCORES: tl.constexpr, PREC: tl.constexpr,
):
    """Adds to :func:`_chunk_bwd_queries_kernel`'s dk, dw (in place) the keys' side of the chunk, in two
    launches (one kernel would need more shared memory than an H100 has at head dim 128): with SCORES the
    scores' Ti L (L = tril(W K^T, -1)), leaving dTi in DWK (over d(Ti L)); then the keys' carry
    K - KW Ti^T Bw (KW = triu(K W^T, 1), Bw = diag(beta) W), adding to dTi, and Bw's gradient (with the
    chunk product's share from dP) in DBW, for :func:`_chunk_bwd_inverse_kernel`.

    The [C, D] tiles are taken in blocks of (at most) 64 columns, loaded right before their products, and
    each block's dk, dw, dBw stored once computed: the program holds [C, C] tiles and [C, 64] blocks, not
    the [C, D] operands and results together (which spilled and took 112 / 208 KiB of shared memory at head
    dim 64 / 128)."""
    BD: tl.constexpr = min(D, 64)
    b, h, pos, real, row0, chunk = _chunk_program(T, T_pad, H, C)
    oc = tl.arange(0, C)
    cc = chunk * (C * C) + oc[:, None] * C + oc[None, :]
    in_rows = ((row0 + oc) * H + h) * D  # the inputs k, w ([B * T, H, D])
    k_rows = ((b * T_pad + pos) * H + h) * D  # padded in time ([B, T_pad, H, D])
    cd_rows = chunk * (C * D) + oc * D  # per chunk ([B * H * n, C, D])
    if SCORES:
        # Ti L: dTi = d(Ti L) L^T, dL = Ti^T d(Ti L)
        l_wk = tl.zeros([C, C], tl.float32)
        for i_d in range(D // BD):
            od = i_d * BD + tl.arange(0, BD)
            w = _rows_block(W, in_rows, od, real)
            k = _rows_block(K, in_rows, od, real)
            l_wk += tl.dot(w, tl.trans(k), input_precision=PREC)
        l_wk = tl.where(oc[:, None] > oc[None, :], l_wk, 0.0)
        dwk = tl.load(DWK + cc)
        tl.store(DWK + cc, tl.dot(dwk, tl.trans(l_wk), input_precision=PREC))
        dl = tl.dot(_chunk_inverse(TINV, chunk, C, True), dwk, input_precision=PREC)
        dl = tl.where(oc[:, None] > oc[None, :], dl, 0.0)
        for i_d in range(D // BD):
            od = i_d * BD + tl.arange(0, BD)
            off = k_rows[:, None] + od[None, :]
            k = _rows_block(K, in_rows, od, real)
            tl.store(DW + off, tl.load(DW + off) + tl.dot(dl, k, input_precision=PREC))
            w = _rows_block(W, in_rows, od, real)
            tl.store(DK + off, tl.load(DK + off) + tl.dot(tl.trans(dl), w, input_precision=PREC))
        return
    # The keys' carry K - KW V2, V2 = Ti^T Bw: dKW = -triu(dK_t V2^T, 1) to k and w first, then KW to dV2 =
    # -KW^T dK_t, to Ti (dTi += Bw dV2^T) and Bw (dBw = Ti dV2 - U dP^T, the product P = I - Bw^T U's share
    # with U = Ti W): one [C, C] product held at a time, not both
    beta = _chunk_beta(BETA, row0, h, real, H, C)
    upper = oc[:, None] < oc[None, :]
    t_low_t = _chunk_inverse(TINV, chunk, C, True)
    dkw = tl.zeros([C, C], tl.float32)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        w = _rows_block(W, in_rows, od, real)
        v2 = tl.dot(t_low_t, w * beta[:, None], input_precision=PREC)
        dkw -= tl.dot(tl.load(DKT + k_rows[:, None] + od[None, :]), tl.trans(v2), input_precision=PREC)
    dkw = tl.where(upper, dkw, 0.0)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        off = k_rows[:, None] + od[None, :]
        w = _rows_block(W, in_rows, od, real)
        tl.store(DK + off, tl.load(DK + off) + tl.load(DKT + off) + tl.dot(dkw, w, input_precision=PREC))
        k = _rows_block(K, in_rows, od, real)
        tl.store(DW + off, tl.load(DW + off) + tl.dot(tl.trans(dkw), k, input_precision=PREC))
    kw = tl.zeros([C, C], tl.float32)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        w = _rows_block(W, in_rows, od, real)
        k = _rows_block(K, in_rows, od, real)
        kw += tl.dot(k, tl.trans(w), input_precision=PREC)
    kw = tl.where(upper, kw, 0.0)
    t_low = _chunk_inverse(TINV, chunk, C, False)
    dwk = tl.load(DWK + cc)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        dv2 = -tl.dot(tl.trans(kw), tl.load(DKT + k_rows[:, None] + od[None, :]), input_precision=PREC)
        w = _rows_block(W, in_rows, od, real)
        dwk += tl.dot(w * beta[:, None], tl.trans(dv2), input_precision=PREC)
        for j_d in range(D // BD):  # dv2 - (W dP^T)[:, od]
            oj = j_d * BD + tl.arange(0, BD)
            dp_t = tl.trans(tl.load(DP + chunk * D * D + od[:, None] * D + oj[None, :]))
            dv2 -= tl.dot(_rows_block(W, in_rows, oj, real), dp_t, input_precision=PREC)
        tl.store(DBW + cd_rows[:, None] + od[None, :], tl.dot(t_low, dv2, input_precision=PREC))
    tl.store(DWK + cc, dwk)


@triton.jit
def _chunk_bwd_inverse_kernel(
    W, BETA, TINV, DP, DU, DBW, DTI, DW, DBETA, T, T_pad,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
):
    """Completes dw and dbeta (in place): U = Ti W, Bw = diag(beta) W, and Ti = (I + M)^-1 through
    dM = -Ti^T dTi Ti^T with M = tril(W W^T, -1) diag(beta).

    The [C, D] tiles are taken in blocks of (at most) 64 columns: a first pass completes dU with the chunk
    product's share -Bw dP (stored back) and sums U's share of dTi, a second dbeta's share of W W^T, a third
    writes each block of dw."""
    BD: tl.constexpr = min(D, 64)
    b, h, pos, real, row0, chunk = _chunk_program(T, T_pad, H, C)
    oc = tl.arange(0, C)
    in_rows = ((row0 + oc) * H + h) * D  # the input w ([B * T, H, D])
    k_rows = ((b * T_pad + pos) * H + h) * D  # padded in time ([B, T_pad, H, D])
    cd_rows = chunk * (C * D) + oc * D  # per chunk ([B * H * n, C, D])
    beta = _chunk_beta(BETA, row0, h, real, H, C)
    dti = tl.load(DTI + chunk * (C * C) + oc[:, None] * C + oc[None, :])
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        cd = cd_rows[:, None] + od[None, :]
        du = tl.load(DU + cd)
        for j_d in range(D // BD):
            oj = j_d * BD + tl.arange(0, BD)
            dp = tl.load(DP + chunk * D * D + oj[:, None] * D + od[None, :])
            du -= tl.dot(_rows_block(W, in_rows, oj, real) * beta[:, None], dp, input_precision=PREC)
        tl.store(DU + cd, du)
        dti += tl.dot(du, tl.trans(_rows_block(W, in_rows, od, real)), input_precision=PREC)
    tl.debug_barrier()  # the completed dU is read back below (by other threads)
    t_low_t = _chunk_inverse(TINV, chunk, C, True)
    dm = -tl.dot(tl.dot(t_low_t, dti, input_precision=PREC), t_low_t, input_precision=PREC)
    dm = tl.where(oc[:, None] > oc[None, :], dm, 0.0)
    dbeta = tl.load(DBETA + (b * T_pad + pos) * H + h)
    for i_d in range(D // BD):  # dbeta = sum over rows of dM * (W W^T), by blocks of W W^T
        od = i_d * BD + tl.arange(0, BD)
        w = _rows_block(W, in_rows, od, real)
        dbeta += tl.sum(dm * tl.dot(w, tl.trans(w), input_precision=PREC), axis=0)
    da = dm * beta[None, :]
    da += tl.trans(da)
    for i_d in range(D // BD):
        od = i_d * BD + tl.arange(0, BD)
        off = k_rows[:, None] + od[None, :]
        cd = cd_rows[:, None] + od[None, :]
        w = _rows_block(W, in_rows, od, real)
        dw = tl.load(DW + off) + tl.dot(t_low_t, tl.load(DU + cd), input_precision=PREC)
        dw += tl.dot(da, w, input_precision=PREC)
        dbw = tl.load(DBW + cd)
        dw += dbw * beta[:, None]
        dbeta += tl.sum(dbw * w, axis=1)
        tl.store(DW + off, dw)
    tl.store(DBETA + (b * T_pad + pos) * H + h, dbeta)


@triton.jit
def _chunk_bwd_key_side_kernel(
    K, W, BETA, TINV, DKT, DP, DU, DTI, DK, DW, DBETA, T, T_pad,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
):
    """:func:`_chunk_bwd_keys_kernel`'s two launches and :func:`_chunk_bwd_inverse_kernel` in one program, for
    head dims whose [C, D] tiles the program holds whole (:data:`KEY_SIDE_ONE_KERNEL`): the scores' Ti L, the
    keys' carry K - KW Ti^T Bw and the inverse, with dTi, dk, dw and dBw kept in registers between them
    instead of stored and read back, and the chunk product's shares of dU and dBw (P = I - Bw^T U, U = Ti W:
    -Bw dP and -U dP^T) added here. DTI holds d(Ti L) from the query side; it is read, not written."""
    b, h, pos, real, row0, chunk = _chunk_program(T, T_pad, H, C)
    oc = tl.arange(0, C)
    od = tl.arange(0, D)
    in_rows = ((row0 + oc) * H + h) * D  # the inputs k, w ([B * T, H, D])
    off = (((b * T_pad + pos) * H + h) * D)[:, None] + od[None, :]  # padded in time ([B, T_pad, H, D])
    cd = (chunk * (C * D) + oc * D)[:, None] + od[None, :]  # per chunk ([B * H * n, C, D])
    lower = oc[:, None] > oc[None, :]
    w = _rows_block(W, in_rows, od, real)
    k = _rows_block(K, in_rows, od, real)
    beta = _chunk_beta(BETA, row0, h, real, H, C)
    bw = w * beta[:, None]
    t_low_t = _chunk_inverse(TINV, chunk, C, True)
    # L = tril(W K^T, -1) of the scores' Ti L; the keys' carry has KW = triu(K W^T, 1) = L^T
    l_wk = tl.where(lower, tl.dot(w, tl.trans(k), input_precision=PREC), 0.0)
    dkt = tl.load(DKT + off)
    # Ti L: dTi = d(Ti L) L^T, dL = Ti^T d(Ti L). The carry, V2 = Ti^T Bw: dKW = -triu(dK_t V2^T, 1) and
    # dV2 = -KW^T dK_t, to Ti (dTi += Bw dV2^T) and Bw (dBw += Ti dV2). dL and dKW^T (both strictly lower)
    # reach k and w as one matrix E: dk += E^T w, dw += E k.
    dwk = tl.load(DTI + chunk * (C * C) + oc[:, None] * C + oc[None, :])
    dti = tl.dot(dwk, tl.trans(l_wk), input_precision=PREC)
    e = tl.dot(t_low_t, dwk, input_precision=PREC)
    e -= tl.trans(tl.dot(dkt, tl.trans(tl.dot(t_low_t, bw, input_precision=PREC)), input_precision=PREC))
    e = tl.where(lower, e, 0.0)
    tl.store(DK + off, tl.load(DK + off) + dkt + tl.dot(tl.trans(e), w, input_precision=PREC))
    dw = tl.load(DW + off) + tl.dot(e, k, input_precision=PREC)
    dv2 = -tl.dot(l_wk, dkt, input_precision=PREC)
    dti += tl.dot(bw, tl.trans(dv2), input_precision=PREC)
    dp = tl.load(DP + chunk * D * D + od[:, None] * D + od[None, :])
    dbw = tl.dot(tl.trans(t_low_t), dv2 - tl.dot(w, tl.trans(dp), input_precision=PREC), input_precision=PREC)
    # The inverse: U = Ti W and Ti = (I + M)^-1 through dM = -Ti^T dTi Ti^T, M = tril(W W^T, -1) diag(beta)
    du = tl.load(DU + cd) - tl.dot(bw, dp, input_precision=PREC)
    dti += tl.dot(du, tl.trans(w), input_precision=PREC)
    dw += tl.dot(t_low_t, du, input_precision=PREC) + dbw * beta[:, None]
    dm = -tl.dot(tl.dot(t_low_t, dti, input_precision=PREC), t_low_t, input_precision=PREC)
    dm = tl.where(lower, dm, 0.0)
    dbeta = tl.load(DBETA + (b * T_pad + pos) * H + h) + tl.sum(dbw * w, axis=1)
    dbeta += tl.sum(dm * tl.dot(w, tl.trans(w), input_precision=PREC), axis=0)
    da = dm * beta[None, :]
    da += tl.trans(da)
    tl.store(DW + off, dw + tl.dot(da, w, input_precision=PREC))
    tl.store(DBETA + (b * T_pad + pos) * H + h, dbeta)


@triton.jit(do_not_specialize=["NB"])  # NB varies with the length at the superblock level
def _frames_bwd_kernel(P, F32, DF, B_MAT, DB, DA, DPW, DP, NB,
                       D: tl.constexpr, DC: tl.constexpr, HAS_EDGES: tl.constexpr, PREC: tl.constexpr):
    """Gradients of the blocks' products P_0 .. P_{NB-1} of one window (per batch x kv head) from those of
    the products built from them: the frame changes F[s, t] = P_{s-1} ... P_{t+1} (0 <= t < s < NB) and, with
    HAS_EDGES, the carries to the window's edges B_l = F[l, -1], A_l = F[NB, l] and the window's product
    F[NB, -1]. One program per (chain start t and DC columns, window, batch x kv head): for each t, F[s, t] =
    P_{s-1} F[s-1, t] backwards from the last s, with the adjoint G_s = dF[s, t] + P_s^T G_{s+1} and
    dP_{s-1} += G_s F[s-1, t]^T (atomic: the chains of every t meet in dP). The adjoint is separable by
    columns: a program may take a block of them (CHAIN_LAUNCH). The chains of one window run side by side
    (the grid's first axis), so that they read its P from L2."""
    i_w = tl.program_id(1)
    i_bh = tl.program_id(2)
    n_cols: tl.constexpr = D // DC
    if HAS_EDGES:
        t = tl.program_id(0) // n_cols - 1  # t = -1: the chains from the window's start (B_l, F[NB, -1])
    else:
        t = tl.program_id(0) // n_cols
    i_d = tl.program_id(0) % n_cols
    NP = NB * (NB - 1) // 2
    if HAS_EDGES:
        S_MAX = NB
    else:
        S_MAX = NB - 1
    n_w = tl.num_programs(1)
    od = tl.arange(0, D)
    ob = i_d * DC + tl.arange(0, DC)
    full = od[:, None] * D + od[None, :]
    cols = od[:, None] * D + ob[None, :]
    blocks = ((i_bh * n_w + i_w) * NB).to(tl.int64) * D * D
    pairs = ((i_bh * n_w + i_w) * NP).to(tl.int64) * D * D
    adj = tl.zeros([D, DC], tl.float32)
    for step in range(S_MAX - t - 1):
        s = S_MAX - step  # from the last s down to t + 2
        if HAS_EDGES:
            if s == NB:  # A_t = F[NB, t], or the window's product for t = -1
                if t < 0:
                    adj += tl.load(DPW + (i_bh * n_w + i_w).to(tl.int64) * D * D + cols)
                else:
                    adj += tl.load(DA + blocks + t * D * D + cols)
            elif t < 0:
                adj += tl.load(DB + blocks + s * D * D + cols)
            else:
                adj += tl.load(DF + pairs + (s * (s - 1) // 2 + t) * D * D + cols)
            if t < 0:
                f_prev = tl.load(B_MAT + blocks + (s - 1) * D * D + cols)
            else:
                f_prev = tl.load(F32 + pairs + ((s - 1) * (s - 2) // 2 + t) * D * D + cols)
        else:
            adj += tl.load(DF + pairs + (s * (s - 1) // 2 + t) * D * D + cols)
            f_prev = tl.load(F32 + pairs + ((s - 1) * (s - 2) // 2 + t) * D * D + cols)
        # F[s-1, t] = I when s - 1 = t + 1: the loads above read F[t+1, t] = I (B_0 = I) stored in the tables
        tl.atomic_add(DP + blocks + (s - 1) * D * D + full, tl.dot(adj, tl.trans(f_prev), input_precision=PREC),
                      sem="relaxed")
        p_t = tl.load(P + blocks + (s - 1) * D * D + od[:, None] + od[None, :] * D)  # P_{s-1}^T
        adj = tl.dot(p_t, adj, input_precision=PREC)


def frames_backward(p, f32, df, *, edges=None, precision: str, launch: dict | None = None):
    """dP [B, H, W * NB, D, D] float32 of the blocks' products p [B, H, W * NB, D, D] (W windows of NB
    blocks) from the gradients df [B, H, W, NB(NB-1)/2, D, D] of their frame changes (f32: the changes
    themselves, float32, same layout) and, with edges = (b_mat, db, da, dpw), of the carries to the windows'
    edges B_l (b_mat, [B, H, W * NB, D, D]), A_l and of each window's product ([B, H, W, D, D]).
    precision: the products' (:func:`_precision` of the kernel dtype). ``launch`` overrides
    :func:`_chain_launch` (tuning)."""
    B, H, n, D, _ = p.shape
    W = df.shape[2]
    NB = n // W
    dp = torch.zeros_like(p, dtype=torch.float32)
    b_mat, db, da, dpw = edges if edges is not None else (None,) * 4
    config = dict(_chain_launch(D), **(launch or {}))
    DC = min(D, config.pop("columns"))
    starts = NB if edges is not None else NB - 1
    if starts > 0:
        _frames_bwd_kernel[(starts * (D // DC), W, B * H)](
            p, f32, df, b_mat, db, da, dpw, dp, NB, D=D, DC=DC, HAS_EDGES=edges is not None, PREC=precision,
            **config,
        )
    return dp


def edge_grads(q_t, dq_bot, k_t, dk_top, b_mat, a_mat, dq_t, dk_t, *, chunk: int, precision: str,
               launch: dict | None = None):
    """The carries to superblock edges (:func:`_edge_grads_kernel`): from q_t, dq_bot [B, T_pad, HQ, D],
    k_t, dk_top [B, T_pad, H, D] and each chunk's B_l, A_l [B, H, n, D, D], all float32, returns dB, dA
    [B, H, n, D, D] float32 and adds the edges' share to dq_t, dk_t in place. precision: the products'
    (:func:`_precision` of the kernel dtype). ``launch`` ({"edges": {...}}) overrides num_warps / num_stages."""
    B, T_pad, HQ, D = q_t.shape
    H = k_t.shape[2]
    n = T_pad // chunk
    db = torch.empty(B, H, n, D, D, dtype=torch.float32, device=q_t.device)
    da = torch.empty_like(db)
    _edge_grads_kernel[(n, B * H)](
        q_t, dq_bot, k_t, dk_top, b_mat, a_mat, dq_t, dk_t, db, da, T_pad, HQ=HQ, H=H, D=D, C=chunk,
        PREC=precision, **_prep_launch("edges", D, launch),
    )
    return db, da


def prepare_backward(q, k, v, w, beta, gate, seg_start, t_inv, dq_t, dk_t, dp, do, lse, delta, *, chunk: int,
                     scale: float, dv_levels=None, launch: dict | None = None):
    """The backward of :func:`prepare_forward`'s chunk kernel: the query side, then the key side and the
    triangular inverse in one launch (head dims in :data:`KEY_SIDE_ONE_KERNEL`) or three.

    Args: q, k, v, w, beta, gate, seg_start as for :func:`prepare_forward` (q, k in the kernel dtype);
        t_inv its chunks' triangular inverses (``prepare_forward(..., for_backward=True)["t_inv"]``);
        dq_t [B, T_pad, HQ, D], dk_t [B, T_pad, H, D] float32 gradients of the chunk carries (every level's
        share); dp [B, H, n, D, D] float32 of the chunks' products; do [B, T_pad, HQ, DV] (kernel dtype), lse
        and delta [B, HQ, T_pad] of the final output; dv_levels [B, T_pad, H, DV] float32, the values'
        gradient through the other levels (or None).
    Returns dq [B, T_pad, HQ, D] in q's dtype, float32 dk, dw [B, T_pad, H, D] and dbeta [B, T_pad, H], dv
        [B, T_pad, H, DV] in v's dtype (the own chunk's share plus dv_levels) and the cumulative gate's
        gradient [B, T_pad, HQ] float32 (None without a gate).
    ``launch`` ({"queries"|"key_side"|"keys"|"inverse": {...}}) overrides num_warps / num_stages (tuning).
    """
    B, T, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    T_pad = seg_start.shape[1]
    C, n = chunk, T_pad // chunk
    empty = functools.partial(torch.empty, dtype=torch.float32, device=q.device)
    dq, dk, dw = empty(B, T_pad, HQ, D, dtype=q.dtype), empty(B, T_pad, H, D), empty(B, T_pad, H, D)
    dbeta, dv = empty(B, T_pad, H), empty(B, T_pad, H, DV, dtype=v.dtype)
    dg = empty(B, T_pad, HQ) if gate is not None else None
    dv_acc = empty(B, T_pad, H, DV) if HQ != H else dv  # a group's running dv (float32)
    du, dwk = empty(B * H * n, C, D), empty(B * H * n, C, C)
    q, k, w, beta = (x.contiguous() for x in (q, k, w, beta))
    prec, grid = _precision(q), (n, B * H)
    _chunk_bwd_queries_kernel[grid](
        q, k, v, w, beta, gate, seg_start, t_inv, dq_t, do, lse, delta, dq, dk, dw, dbeta, dv, dv_levels, dg, du,
        dwk, dv_acc, scale, T, T_pad, HQ=HQ, H=H, D=D, DV=DV, C=C, HAS_GATE=gate is not None, PREC=prec,
        ADD_DV=dv_levels is not None, **_prep_launch("queries", D, launch),
    )
    if KEY_SIDE_ONE_KERNEL.get(D, False):
        _chunk_bwd_key_side_kernel[grid](k, w, beta, t_inv, dk_t, dp, du, dwk, dk, dw, dbeta, T, T_pad, H=H, D=D,
                                         C=C, PREC=prec, **_prep_launch("key_side", D, launch))
        return dq, dk, dw, dbeta, dv, dg
    dbw = empty(B * H * n, C, D)
    for scores in (True, False):
        _chunk_bwd_keys_kernel[grid](k, w, beta, t_inv, dk_t, dp, dbw, dwk, dk, dw, T, T_pad, H=H, D=D, C=C,
                                     SCORES=scores, PREC=prec, **_prep_launch("keys", D, launch))
    _chunk_bwd_inverse_kernel[grid](w, beta, t_inv, dp, du, dbw, dwk, dw, dbeta, T, T_pad, H=H, D=D, C=C, PREC=prec,
                                    **_prep_launch("inverse", D, launch))
    return dq, dk, dw, dbeta, dv, dg
