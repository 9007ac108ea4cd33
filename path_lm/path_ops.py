"""PaTH attention as a tensor operation.

Each key/value head carries, at every position s, a generalized Householder matrix
``H_s = I - beta_s w_s w_s^T`` (``||w_s|| = 1``, ``beta_s`` in (0, 2)). The attention logit between query i
and key j <= i is

    scale * (q_i^T H_i H_{i-1} ... H_{j+1} k_j + G_i - G_j)

where G is the inclusive cumulative sum of the log forget gate g (zero without a gate). Softmax runs over
the keys j <= i of the same segment, and the output is the weighted sum of the values.

This module holds the exact PyTorch implementation (blockwise, differentiable, any device), the
single-token decode step, and the dispatch point for fused kernels. It imports only torch so that it can
travel inside checkpoints beside ``modeling_path.py``.

Shapes used throughout (B batch, T time, HQ query heads, H key/value heads, D head dim, Dv value dim):
    q [B, T, HQ, D]; k, w [B, T, H, D]; v [B, T, H, Dv]; beta [B, T, H]; g [B, T, HQ]
Query head ``hq`` reads key/value head ``hq // (HQ // H)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 64
# fla accepts 16/32/64/128, but fla 0.6.0's backward hits illegal memory accesses at head dim 32 (seen on an
# H100); only the verified sizes are routed to it.
FLA_HEAD_DIMS = (64, 128)
# path-lm's kernel handles any power of two from 16; these are the sizes verified on a GPU.
TRITON_HEAD_DIMS = (64, 128)

logger = logging.getLogger(__name__)
_announced: set = set()


@dataclass
class PaTHState:
    """What a chunk of tokens leaves behind for a cache.

    keys: the chunk's keys carried forward through every later Householder transform of the chunk,
        ``H_end ... H_{j+1} k_j``, [B, T, H, D] in the compute dtype.
    transform: the product ``H_end ... H_start`` of the whole chunk, [B, H, D, D]; cached keys of earlier
        tokens are updated as ``keys @ transform^T``.
    """

    keys: torch.Tensor
    transform: torch.Tensor


@dataclass
class PaTHPast:
    """Cached context that new queries attend to (already transformed up to the last cached position).

    keys [B, L, H, D]; values [B, L, H, Dv]; gate [B, L, HQ] cumulative log gate of each cached position
    (None without a forget gate); key_mask [B, L] bool, False where a cached position is padding;
    gate_offset [B, HQ]: cumulative gate at the last cached position (new positions continue from it).
    """

    keys: torch.Tensor
    values: torch.Tensor
    gate: torch.Tensor | None
    key_mask: torch.Tensor | None
    gate_offset: torch.Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk(x: torch.Tensor, num_chunks: int, chunk_size: int) -> torch.Tensor:
    """[B, T, *rest] -> [B, n, C, *rest], zero padded at the end of time."""
    pad = num_chunks * chunk_size - x.shape[1]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:])


def _pad_blocks(x: torch.Tensor, s: int) -> torch.Tensor:
    """Prepend s blocks of zeros along dim 0: the contribution of diagonal s to query blocks s..n-1."""
    return torch.cat([x.new_zeros(s, *x.shape[1:]), x]) if s else x


def _block_transforms(qc, kc, wc, bc):
    """Everything one block of C positions needs, for all blocks at once (the WY / UT form).

    Args: qc [..., G, C, D] (the G query heads of a key/value head); kc, wc [..., C, D]; bc [..., C].
    Returns:
        p [..., D, D]: the block's product P = H_end ... H_start (u^T P = u^T H_end ... H_start);
        q_t [..., G, C, D]: rows q_i^T H_i ... H_start (queries carried to the block's start);
        k_t [..., C, D]: rows (H_end ... H_{j+1} k_j)^T (keys carried to the block's end);
        local [..., G, C, C]: scores q_i^T H_i ... H_{j+1} k_j inside the block (valid for j <= i).
    """
    # M, N: strictly lower / upper parts of W W^T, columns scaled by beta. U = (I + M)^-1 W.
    b_cols = bc[..., None, :]
    wt = wc.transpose(-1, -2)
    ww = wc @ wt
    m_low = ww.tril(-1) * b_cols
    u = torch.linalg.solve_triangular(m_low, wc, upper=False, unitriangular=True)
    n_up = ww.triu(1) * b_cols
    u_up = torch.linalg.solve_triangular(n_up, wc, upper=True, unitriangular=True)
    eye = torch.eye(wc.shape[-1], dtype=wc.dtype, device=wc.device)
    p = eye - wt @ (bc[..., None] * u)

    qw = (qc @ wt.unsqueeze(-3)).tril() * b_cols.unsqueeze(-3)  # [..., G, C, C]
    q_t = qc - qw @ u.unsqueeze(-3)
    k_t = kc - ((kc @ wt).triu(1) * b_cols) @ u_up
    wk = torch.linalg.solve_triangular(m_low, (wc @ kc.transpose(-1, -2)).tril(-1), upper=False, unitriangular=True)
    local = qc @ kc.transpose(-1, -2).unsqueeze(-3) - qw @ wk.unsqueeze(-3)
    return p, q_t, k_t, local


def _suffix_products(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Entry l along ``dim`` (the block axis of p [..., D, D]): P_{N-1} ... P_{l+1}, the identity for the last
    block. A key carried to the end of block l reaches the end of all N blocks as rows @ entry^T."""
    p = p.movedim(dim, 0)
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand(p.shape[1:])
    out = [eye]
    for b in range(p.shape[0] - 1, 0, -1):
        out.append(out[-1] @ p[b])
    return torch.stack(out[::-1]).movedim(0, dim)


def path_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    past: PaTHPast | None = None,
    output_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, PaTHState | None]:
    """Exact PaTH attention in PyTorch, blockwise (WY / UT-transform form of the Householder products).

    Args:
        q, k, v, w, beta, g: see the module docstring; w must be unit-norm along D, g is the per-step log
            forget gate (not cumulative) or None.
        scale: multiplies the whole logit (gate term included); defaults to D ** -0.5.
        segment_ids: [B, T] integers; a query attends only to earlier keys with the same id. Use it for
            packed documents and for padding. None means one segment per row.
        past: cached context attended to before the new keys (prefill continuation / decoding).
        output_state: also return the :class:`PaTHState` that a cache needs.
        chunk_size: block length of the blockwise algorithm (any positive value gives the same result).

    Returns:
        o [B, T, HQ, Dv] in q's dtype, and the state (or None).

    Cost: O(T^2 D) time and O(T^2) memory per head like eager attention; never a T x T x D tensor, and
    the only Python loop runs over blocks.
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    if HQ % H:
        raise ValueError(f"the number of query heads ({HQ}) must be a multiple of the key/value heads ({H})")
    G = HQ // H
    Dv = v.shape[-1]
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    C = max(1, min(chunk_size, T))
    n = math.ceil(T / C)

    # Blocks first, so that slicing a range of blocks stays contiguous and every product is a plain batched
    # matmul; the G query heads of a key/value head are stacked as rows.
    # q [n, B, H, G*C, D] (scaled); k, w, v [n, B, H, C, D]; beta [n, B, H, C].
    qc = _chunk(q.to(dt).reshape(B, T, H, G, D), n, C).permute(1, 0, 3, 4, 2, 5).reshape(n, B, H, G * C, D) * scale
    kc = _chunk(k.to(dt), n, C).permute(1, 0, 3, 2, 4)
    wc = _chunk(w.to(dt), n, C).permute(1, 0, 3, 2, 4)
    vc = _chunk(v.to(dt), n, C).permute(1, 0, 3, 2, 4)
    bc = _chunk(beta.to(dt), n, C).permute(1, 0, 3, 2)

    p, q_t, k_t, local = _block_transforms(qc.view(n, B, H, G, C, D), kc, wc, bc)
    q_t = q_t.view(n, B, H, G * C, D)
    diagonals = [local.view(n, B, H, G * C, C)]

    # Across blocks: the scores of query block a and key block b < a are Qt_a P_{a-1} ... P_{b+1} Kt_b^T.
    # Walk the offset s = a - b; every query block advances at once (a wavefront), one D x D product each.
    k_t_cols = k_t.transpose(-1, -2)
    q_start = [q_t[:1]] if past is not None else None
    running = q_t[1:]
    for s in range(1, n):
        diagonals.append(running @ k_t_cols[: n - s])
        if past is not None:
            q_start.append(running[:1] @ p[:1])
        if s < n - 1:
            running = running[1:] @ p[1 : n - s]

    # Logits [n - s, B, H, G, C, C]: gate difference (scaled like the scores), causal and segment masks.
    gate = None
    if g is not None:
        g_cum = g.to(dt).cumsum(1)
        if past is not None and past.gate_offset is not None:
            g_cum = g_cum + past.gate_offset.to(dt)[:, None, :]
        gate = _chunk(g_cum.reshape(B, T, H, G), n, C).permute(1, 0, 3, 4, 2) * scale  # [n, B, H, G, C]
    seg = None
    if segment_ids is not None:
        seg = _chunk(segment_ids.unsqueeze(-1), n, C).squeeze(-1).transpose(0, 1)  # [n, B, C]; tail pad is id 0
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    for s, logits in enumerate(diagonals):
        logits = logits.view(n - s, B, H, G, C, C)
        if gate is not None:
            logits = (logits + gate[s:, ..., None]).sub_(gate[: n - s, ..., None, :])
        mask = None
        if seg is not None:
            mask = (seg[s:, :, :, None] == seg[: n - s, :, None, :])[:, :, None, None]
        if s == 0:
            mask = causal if mask is None else mask & causal
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        diagonals[s] = logits

    past_logits = None
    if past is not None:
        # Queries carried to the start of the new tokens meet the cached keys, which are already
        # transformed up to the last cached position.
        qs = torch.cat(q_start).permute(1, 2, 0, 3, 4).reshape(B, H, n * G * C, D)
        pk = past.keys.to(dt).permute(0, 2, 3, 1)  # [B, H, D, L]
        past_logits = (qs @ pk).view(B, H, n, G, C, -1).permute(2, 0, 1, 3, 4, 5)  # [n, B, H, G, C, L]
        if gate is not None and past.gate is not None:
            pg = past.gate.to(dt).reshape(B, -1, H, G).permute(0, 2, 3, 1) * scale  # [B, H, G, L]
            past_logits = (past_logits + gate[..., None]).sub_(pg[:, :, :, None, :])
        if past.key_mask is not None:
            past_logits = past_logits.masked_fill(~past.key_mask[:, None, None, None, :], float("-inf"))

    # Softmax across the diagonals: a shared row maximum (detached: any constant gives the same softmax),
    # then each diagonal's contribution to its query blocks.
    row_max = torch.full((n, B, H, G, C), float("-inf"), dtype=dt, device=q.device)
    for s, logits in enumerate(diagonals):
        row_max[s:] = torch.maximum(row_max[s:], logits.detach().amax(-1))
    if past_logits is not None:
        row_max = torch.maximum(row_max, past_logits.detach().amax(-1))
    row_max = row_max.nan_to_num(neginf=0.0)  # rows with every key masked (cache padding) stay finite

    denom = 0
    out = 0
    for s, logits in enumerate(diagonals):
        probs = (logits - row_max[s:, ..., None]).exp_()
        denom = denom + _pad_blocks(probs.sum(-1), s)
        out = out + _pad_blocks(probs.view(n - s, B, H, G * C, C) @ vc[: n - s], s)
    if past_logits is not None:
        probs = (past_logits - row_max[..., None]).exp_()
        denom = denom + probs.sum(-1)
        pv = past.values.to(dt).transpose(1, 2)  # [B, H, L, Dv]
        probs = probs.permute(1, 2, 0, 3, 4, 5).reshape(B, H, n * G * C, -1)
        out = out + (probs @ pv).view(B, H, n, G * C, Dv).permute(2, 0, 1, 3, 4)
    out = out.view(n, B, H, G, C, Dv) / denom[..., None]
    o = out.permute(1, 0, 4, 2, 3, 5).reshape(B, n * C, HQ, Dv)[:, :T].to(out_dtype)

    if not output_state:
        return o, None
    # Suffix products: the keys of block b are carried through P_{b+1}, ..., P_{n-1}.
    suffix = _suffix_products(p, 0)  # [n, B, H, D, D]; entry b = P_{n-1} ... P_{b+1}
    keys = (k_t @ suffix.transpose(-1, -2)).permute(1, 0, 3, 2, 4).reshape(B, n * C, H, D)[:, :T]
    transform = suffix[0] @ p[0]
    return o, PaTHState(keys=keys, transform=transform)


def _householder_update_(keys: torch.Tensor, w: torch.Tensor, beta: torch.Tensor) -> None:
    """keys [B, H, L, D] <- keys - beta (keys . w) w^T in place, computed in w's dtype; w [B, H, D], beta
    [B, H]. keys . w is taken as the row product w^T K^T: a matrix-vector product with the keys on the left
    runs several times slower on CPUs (the whole update: 4x faster at 8 x 4 x 640 x 64)."""
    w_row = w.unsqueeze(-2)  # [B, H, 1, D]
    kw = (w_row @ keys.to(w.dtype).transpose(-1, -2)).transpose(-1, -2)  # [B, H, L, 1]
    keys.sub_((kw * (beta[..., None, None] * w_row)).to(keys.dtype))


def path_decode_step(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    use_kernel: bool = False,
    frames: torch.Tensor | None = None,
    window: int = 64,
) -> torch.Tensor:
    """Attention of one new token over a cache whose keys are updated in place.

    The new token's transform ``H_t`` is applied to every earlier cached key as a rank-one update
    ``k <- k - beta (k . w) w``; the token's own raw key sits in the last slot, untouched (its product
    is empty). The score is then the plain ``q . k`` plus the gate term.

    Args:
        q: [B, 1, HQ, D]; w: [B, 1, H, D] unit norm; beta: [B, 1, H].
        keys: [B, H, L + 1, D]: the transformed cache followed by the new raw key. Rows :L are updated
            in place (computed in float32 or better, rounded to the buffer's dtype).
        values: [B, H, L + 1, Dv].
        gate: [B, HQ, L + 1] cumulative log gates, the new token's last (None without a gate).
        key_mask: [B, L + 1] bool, False for padding.
        use_kernel: run path-lm's fused Triton decoding kernel (CUDA; see :func:`decode_kernel_usable`).
        frames, window: the kernel's lazily carried keys (``path_triton.decode_attention``); None: every
            key is rewritten.
    Returns:
        o [B, 1, HQ, Dv] in q's dtype.
    """
    B, _, HQ, D = q.shape
    H, L1 = keys.shape[1], keys.shape[2]
    G = HQ // H
    dt = compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    if use_kernel:
        from .path_triton import decode_attention

        o = decode_attention(
            q[:, 0], keys, values, w[:, 0].to(dt), beta[:, 0].to(dt), L1 - 1,
            gates=gate, key_mask=key_mask, frames=frames, window=window, scale=scale, out_dtype=q.dtype,
        )
        return o.unsqueeze(1)
    if L1 > 1:
        _householder_update_(keys[:, :, :-1], w[:, 0].to(dt), beta[:, 0].to(dt))

    qh = q[:, 0].to(dt).reshape(B, H, G, D)
    logits = qh @ keys.to(dt).transpose(-1, -2)  # [B, H, G, L + 1]
    if gate is not None:
        gate = gate.to(dt).reshape(B, H, G, L1)
        logits = logits + (gate[..., -1:] - gate)
    logits = logits * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    o = probs @ values.to(dt)  # [B, H, G, Dv]
    return o.reshape(B, 1, HQ, -1).to(q.dtype)


def path_decode_step_static(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    layer,
    *,
    token_mask: torch.Tensor | None = None,
    scale: float | None = None,
    use_kernel: bool = False,
) -> torch.Tensor:
    """One decoding step on a filled static cache layer (``cache_path.PaTHStaticCacheLayer``), with no host
    synchronization and no shape that depends on the cached length, so that it compiles into one graph.

    The new token goes to slot ``layer.position``: its gate continues the previous slot's, its value and raw
    key are written there, every earlier key gets the token's Householder update, and the query attends to
    slots up to the new one (and not to padding). ``use_kernel``: the fused Triton kernel, which touches only
    the filled slots; otherwise PyTorch ops over the whole buffer (slots past the end stay zero).

    q [B, 1, HQ, D]; k, w [B, 1, H, D]; v [B, 1, H, Dv]; beta [B, 1, H]; g [B, 1, HQ] or None (log gate of
    this step); token_mask [B, 1] bool (False: the new token is padding). Returns o [B, 1, HQ, Dv].
    """
    B, _, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    dt = compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    keys, values = layer.keys, layer.values
    if not torch.compiler.is_compiling() and layer.length >= layer.max_cache_len:
        raise ValueError(
            f"the static PaTH cache is full (max_cache_len={layer.max_cache_len}); create it with a larger "
            "max_cache_len (generate(): max_cache_len=...)"
        )
    w0, beta0 = w[:, 0].to(dt), beta[:, 0].to(dt)  # [B, H, D], [B, H]
    if use_kernel:  # the kernel writes the new slot and advances the position itself: no launches here
        from .path_triton import decode_attention

        new_token = (  # (the kernel casts the key and value to the buffers' dtypes)
            k[:, 0], v[:, 0], g[:, 0] if g is not None else None, token_mask.reshape(B) if token_mask is not None else None,
        )
        o = decode_attention(
            q[:, 0], keys, values, w0, beta0, layer.position, gates=layer.gates if g is not None else None,
            key_mask=layer.key_mask, frames=layer.decode_frames(), window=layer.frame_window, scale=scale,
            out_dtype=q.dtype, new_token=new_token, ring=layer.key_ring,
        )
        return o.unsqueeze(1)
    slot = layer.position.reshape(1)
    gates = None
    if g is not None:
        gates = layer.gates
        previous = gates.index_select(2, (slot - 1).clamp(min=0))  # [B, HQ, 1]
        gates.index_copy_(2, slot, previous + g.transpose(1, 2).to(gates.dtype))
    values.index_copy_(2, slot, v.transpose(1, 2).to(values.dtype))
    if token_mask is not None:
        layer.key_mask.index_copy_(1, slot, token_mask.reshape(B, 1).to(torch.bool))
    if layer.frames is not None and not torch.compiler.is_compiling():
        layer.carry_framed_keys()  # keys the kernel left framed (a backend switch between calls)
    # Slots past the new one hold zeros, which the update leaves at zero; the new slot is written after it.
    _householder_update_(keys, w0, beta0)
    keys.index_copy_(2, slot, k.transpose(1, 2).to(keys.dtype))
    logits = q[:, 0].to(dt).reshape(B, H, G, D) @ keys.to(dt).transpose(-1, -2)  # [B, H, G, L]
    if gates is not None:
        gate = gates.to(dt).reshape(B, H, G, -1)
        logits = logits + (gate.index_select(3, slot) - gate)
    logits = logits * scale
    allowed = (torch.arange(keys.shape[2], device=keys.device) <= layer.position) & layer.key_mask  # [B, L]
    allowed = allowed[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    o = (probs @ values.to(dt)).reshape(B, HQ, -1)
    layer.position.add_(1)
    if not torch.compiler.is_compiling():  # (a mixed-dtype cache: for a later kernel step)
        layer.fill_key_ring()
    return o.unsqueeze(1).to(q.dtype)


# Eager decoding steps are bound by the host's launches while the GPU's work stays below them. One program of
# the decoding kernel walks about 16 keys per microsecond (H100, 32k x 1: one program per head took 1.9 ms a
# layer), so each walks at most EAGER_KEYS_PER_SPLIT keys: caches up to that many keys per (row, head) take one
# launch for the whole step (inputs and attention, no merge); longer ones split the keys over more programs.
EAGER_KEYS_PER_SPLIT = 2048


def _decode_step_in_place(q, k, v, w, beta, g, cache, *, key_mask=None, scale=None, step_inputs=None) -> torch.Tensor:
    """A single-token step on a filled dynamic cache layer by path-lm's fused decoding kernel, which also
    writes the new token's slot (raw key, value, cumulative gate): no copies or gate sums around it, and for
    caches of up to EAGER_KEYS_PER_SPLIT keys one launch in all, the step's inputs included when they come
    as ``step_inputs`` (``path_triton.decode_attention``'s ``inputs``).
    Arguments as :func:`path_decode_step_static`'s (g: this step's log gate); key_mask [B, L + 1] or None."""
    from .path_triton import decode_attention

    n = cache.length
    cache.reserve(n + 1)
    new_token = (k[:, 0], v[:, 0], g[:, 0] if g is not None else None, None)
    filled = slice(0, n + 1)  # (views up to the new slot: the splits cover only filled slots)
    # q, k, v, w, beta and g go in as views, never converted here: with step_inputs they are not written yet
    # (the kernel reads w and beta in float32 whatever their dtype)
    o = decode_attention(
        q[:, 0], cache.keys[:, :, filled], cache.values[:, :, filled], w[:, 0], beta[:, 0], n,
        gates=cache.gates[:, :, filled] if g is not None else None, key_mask=key_mask, frames=cache.decode_frames(),
        window=cache.frame_window, scale=q.shape[-1] ** -0.5 if scale is None else scale, out_dtype=q.dtype,
        new_token=new_token, max_splits=math.ceil((n + 1) / EAGER_KEYS_PER_SPLIT), ring=cache.key_ring,
        inputs=step_inputs,
    )
    cache.length = n + 1
    return o.unsqueeze(1)


def decode_kernel_usable(device: torch.device, head_dims: tuple, backend: str) -> bool:
    """Whether decoding steps run path-lm's fused Triton kernels: on CUDA with triton installed, head dims
    that are powers of two from 16 to 256, unless ``backend='torch'`` asks for PyTorch ops."""
    dims_ok = all(16 <= d <= 256 and d & (d - 1) == 0 for d in head_dims)
    return backend != "torch" and device.type == "cuda" and dims_ok and _triton_import_error() is None


# Rows (batch x tokens) up to which compiled decoding steps run the gated MLP's two products, SiLU and
# product through path_triton's small_linear (one launch) instead of two matrix kernels and an elementwise
# one: 2.0x faster at one row of a 134M model, 1.26x at 1.3B; the single products were not faster
# (benchmarks/gpu_small_linear.py; docs/kernels.md, decoding run 10).
SMALL_LINEAR_ROWS = 1


def small_linear_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether products of x with these weights ([N, K], x's device and dtype: the caller checks) run through
    ``path_triton.small_linear``: inside a compiled step (torch.compile; an eager step would pay a Triton
    launch's host time, which costs more than the matrix kernel) with autograd off, on CUDA, for at most
    SMALL_LINEAR_ROWS rows, with x's last dimension and the weights contiguous."""
    return (
        torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.is_cuda
        and x.numel() <= SMALL_LINEAR_ROWS * x.shape[-1] and x.stride(-1) == 1
        and all(w.is_contiguous() for w in weights) and _triton_import_error() is None
    )


# The wrappers below import their kernel by name (``from .path_triton import name``) on first use: that is the
# relative import transformers follows to copy path_triton.py into a checkpoint (``from . import path_triton``
# is not), and compiled decoding steps trace it.
def small_linear(*args, **kwargs):
    """``path_triton.small_linear`` (imported on first use: triton is optional)."""
    from .path_triton import small_linear as kernel

    return kernel(*args, **kwargs)


def decode_inputs(*args, **kwargs):
    """``path_triton.decode_inputs`` (imported on first use: triton is optional)."""
    from .path_triton import decode_inputs as kernel

    return kernel(*args, **kwargs)


def short_conv_kernel_usable(x: torch.Tensor, head_dim: int, backend: str) -> bool:
    """Whether the layer's w takes ``path_triton.short_conv_normalize`` (one kernel each way instead of ~30
    PyTorch ops): where decoding's kernels run (:func:`decode_kernel_usable`), for bf16 / fp16 / float32 inputs,
    outside torch.compile."""
    return (
        x.dtype in (torch.bfloat16, torch.float16, torch.float32) and not torch.compiler.is_compiling()
        and decode_kernel_usable(x.device, (head_dim,), backend)
    )


def short_conv_normalize(*args, **kwargs):
    """``path_triton.short_conv_normalize`` (imported on first use: triton is optional)."""
    from .path_triton import short_conv_normalize as kernel

    return kernel(*args, **kwargs)


def gated_silu_usable(x: torch.Tensor, backend: str) -> bool:
    """Whether the gated MLP with input x takes ``path_triton.gated_silu`` (one kernel each way instead of
    three elementwise ops): on CUDA with triton installed, for bf16 / fp16 / float32 inputs (the product then
    comes out in x's dtype or autocast's), outside torch.compile (which fuses the PyTorch ops itself), unless
    ``backend='torch'`` asks for PyTorch ops."""
    return (
        backend != "torch" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and not torch.compiler.is_compiling() and _triton_import_error() is None
    )


def gated_silu(*args, **kwargs):
    """``path_triton.gated_silu`` (imported on first use: triton is optional)."""
    from .path_triton import gated_silu as kernel

    return kernel(*args, **kwargs)


def rms_norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a block's RMSNorm of x takes ``path_triton.rms_norm`` with the autocast dtype as its output: in
    training under CUDA autocast (float32 x and weight, the mixed-precision layout), outside torch.compile."""
    return (
        x.is_cuda and torch.is_autocast_enabled("cuda") and x.dtype == torch.float32 and weight.dtype == torch.float32
        and torch.is_grad_enabled() and weight.requires_grad and x.is_contiguous()
        and x.shape[-1] <= 65536  # (path_triton.RMS_NORM_MAX_WIDTH)
        and not torch.compiler.is_compiling() and _triton_import_error() is None
    )


def rms_norm(*args, **kwargs):
    """``path_triton.rms_norm`` (imported on first use: triton is optional)."""
    from .path_triton import rms_norm as kernel

    return kernel(*args, **kwargs)


def add_rms_norm(*args, **kwargs):
    """``path_triton.add_rms_norm`` (imported on first use: triton is optional)."""
    from .path_triton import add_rms_norm as kernel

    return kernel(*args, **kwargs)


def _segment_bounds(segment_ids: torch.Tensor | None, B: int, T: int, T_pad: int, device) -> tuple:
    """[B, T_pad] int32 first and one-past-last position of every position's segment (padding is one)."""
    if segment_ids is None:  # one segment per row, then the padding: a few elementwise ops, no scans
        pos = torch.arange(T_pad, dtype=torch.int32, device=device)
        real = pos < T
        seg_start = torch.where(real, 0, T).to(torch.int32).expand(B, T_pad).contiguous()
        seg_end = torch.where(real, T, T_pad).to(torch.int32).expand(B, T_pad).contiguous()
        return seg_start, seg_end
    starts = torch.zeros(B, T_pad, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if T < T_pad:
        starts[:, T] = True
    starts[:, 1:T] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    pos = torch.arange(T_pad, device=device).expand(B, T_pad)
    seg_start = torch.where(starts, pos, 0).cummax(1).values
    next_start = torch.where(starts, pos, T_pad)[:, 1:].flip(1).cummin(1).values.flip(1)
    seg_end = torch.cat([next_start, next_start.new_full((B, 1), T_pad)], 1)
    return seg_start.to(torch.int32).contiguous(), seg_end.to(torch.int32).contiguous()


def _pad_time(x: torch.Tensor, T_pad: int) -> torch.Tensor:
    """x [B, T, ...] zero padded to T_pad positions (x itself where T = T_pad: no copy)."""
    extra = T_pad - x.shape[1]
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra)) if extra else x


def _kernel_values(v: torch.Tensor, T_pad: int, kdt: torch.dtype) -> torch.Tensor:
    """v [B, T_pad, H, DV] as the Triton kernels read it: in the kernel dtype, zero padded in time."""
    return _pad_time(v, T_pad).to(kdt).contiguous()


def _kernel_inputs(v: torch.Tensor, g: torch.Tensor | None, T_pad: int, kdt: torch.dtype) -> tuple:
    """What the Triton kernels' forward reads besides q, k, w, beta: the cumulative log gate [B, T_pad, HQ]
    float32 (None without a gate; the backward keeps the forward's) and the values (:func:`_kernel_values`)."""
    from .path_triton import gate_scan

    gate = gate_scan([g], T_pad, reverse=False) if g is not None else None
    return gate, _kernel_values(v, T_pad, kdt)


@contextlib.contextmanager
def _matmul_precision(kdt):
    """TF32 for the float32 products around the kernels when the kernels themselves read half precision
    (their inputs are rounded to 8-11 bits anyway); full float32 otherwise."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kdt != torch.float32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# What the backward reads of the forward's preparation (path_triton.prepare_forward(..., for_backward=True)),
# kept between the passes with keep_preparation, plus the superblock level's frame changes ("mid_sb", "mid_sb32").
_KEPT = ("q_t", "k_t", "mid", "p_sb", "q_bot", "k_top", "p", "q_t32", "k_t32", "t_inv", "b_mat", "a_mat", "mid32",
         "mid_sb", "mid_sb32")


class _PaTHTriton(torch.autograd.Function):
    """Forward: the preparation kernels, the attention kernels, one merged softmax. Backward: the preparation
    kernels again (or, with ``keep``, what the forward kept of them), the attention kernels' backward against
    the final softmax statistics, then the preparation's backward kernels (the D x D chains of frame changes
    and carries, the per-chunk transforms, the own chunk) down to the inputs. No autograd graph inside."""

    @staticmethod
    def forward(ctx, q, k, v, w, beta, g, segment_ids, scale, C, NB, output_keys, keep):
        from .path_triton import _precision, frame_changes, framed_forward, prepare_forward  # lazy: triton is optional

        B, T, HQ, _ = q.shape
        H = k.shape[2]
        kdt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
        T_pad = math.ceil(T / (C * NB)) * C * NB
        seg_start, seg_end = _segment_bounds(segment_ids, B, T, T_pad, q.device)
        keep = keep and any(ctx.needs_input_grad[:6])
        with torch.no_grad(), _matmul_precision(kdt):
            gate, v_kernel = _kernel_inputs(v, g, T_pad, kdt)
            prep = prepare_forward(
                q.to(kdt), k.to(kdt), v_kernel, w, beta, gate, seg_start,
                chunk=C, chunks_per_superblock=NB, scale=scale, keys32=output_keys, for_backward=keep,
                local_attention=True,
            )
            n_sb = T_pad // (C * NB)
            levels = []
            prep["mid_sb"] = prep["mid_sb32"] = None
            if n_sb > 1:  # (the float32 copy only for a kept preparation)
                changes = frame_changes(prep["p_sb"], out_dtype=kdt, precision=_precision(kdt), float32_copy=keep)
                prep["mid_sb"], prep["mid_sb32"] = changes if keep else (changes, None)
                levels.append((prep["q_bot"], prep["k_top"], prep["mid_sb"], C * NB, n_sb))
            if NB > 1:
                levels.append((prep["q_t"], prep["k_t"], prep["mid"], C, NB))
            o, lse = prep["o_local"], prep["lse_local"]  # the own chunk, then each level continues the softmax
            for i, (qx, kx, mid, X, nb) in enumerate(levels):
                o, lse = framed_forward(
                    qx, kx, v_kernel, gate, mid, seg_start, (o, lse), block=X, blocks_per_window=nb, scale=scale,
                    out_dtype=q.dtype if i == len(levels) - 1 else torch.float32, segmented=segment_ids is not None,
                )
            o = o[:, :T].to(q.dtype)
            keys = None
            if output_keys:  # keys carried to the end of the row: through every later superblock
                suffix = _suffix_products(prep["p_sb"], 2)  # [B, H, n_sb, D, D]
                k_top = prep["k_top32"].view(B, n_sb, C * NB, H, -1).permute(0, 3, 1, 2, 4)
                keys = k_top @ suffix.transpose(-1, -2)  # [B, H, n_sb, C * NB, D]
                keys = keys.reshape(B, H, T_pad, -1)[:, :, :T].transpose(1, 2)
        # Kept for the backward besides the inputs and the cumulative gate: the whole preparation with ``keep``,
        # else the chunks' triangular inverses (C floats per token and kv head), which the rerun then reads
        # instead of solving.
        kept = [prep[name] for name in _KEPT] if keep else [prep["t_inv"]]
        ctx.save_for_backward(q, k, v, w, beta, g, gate, o, lse, seg_start, seg_end, *kept)
        ctx.args = (scale, C, NB, kdt, keep, segment_ids is not None)
        if keys is not None:
            ctx.mark_non_differentiable(keys)
        return o, keys

    @staticmethod
    def backward(ctx, do, _dkeys):
        from .path_triton import (
            _precision, edge_grads, frame_changes, framed_backward, frames_backward, gate_scan, output_delta,
            prepare_backward, prepare_forward,
        )

        q, k, v, w, beta, g, gate, o, lse, seg_start, seg_end, *kept = ctx.saved_tensors
        scale, C, NB, kdt, keep, segmented = ctx.args
        B, T, HQ, D = q.shape
        H = k.shape[2]
        T_pad = seg_start.shape[1]
        n_sb = T_pad // (C * NB)
        with torch.no_grad(), _matmul_precision(kdt):
            v_kernel = _kernel_values(v, T_pad, kdt)
            q_k, k_k = q.to(kdt), k.to(kdt)
            if keep:
                prep = dict(zip(_KEPT, kept))
            else:
                prep = prepare_forward(
                    q_k, k_k, v_kernel, w, beta, gate, seg_start,
                    chunk=C, chunks_per_superblock=NB, scale=scale, keys32=False, for_backward=True, t_inv=kept[0],
                )
                if n_sb > 1:
                    prep["mid_sb"], prep["mid_sb32"] = frame_changes(
                        prep["p_sb"], out_dtype=kdt, precision=_precision(kdt), float32_copy=True
                    )
            do_k = _pad_time(do, T_pad).to(kdt).contiguous()
            delta = output_delta(do, o, T_pad)  # [B, HQ, T_pad]
            dv_levels, dgates = None, []  # the levels add their dv into one float32 tensor
            kernel_args = dict(seg_start=seg_start, seg_end=seg_end, do=do_k, lse=lse, delta=delta, scale=scale,
                               segmented=segmented)
            if NB > 1:
                dq_t, dk_t, dv_levels, dg_c, dmid = framed_backward(
                    prep["q_t"], prep["k_t"], v_kernel, gate, prep["mid"], block=C, blocks_per_window=NB, **kernel_args
                )
                dgates.append(dg_c)
            else:
                dq_t = torch.zeros(B, T_pad, HQ, D, dtype=torch.float32, device=q.device)
                dk_t = torch.zeros(B, T_pad, H, D, dtype=torch.float32, device=q.device)
                dmid = torch.zeros_like(prep["mid32"])
            edges = None
            if n_sb > 1:
                mid_sb_k, mid_sb = prep["mid_sb"], prep["mid_sb32"]
                dq_bot, dk_top, dv_levels, dg_sb, dmid_sb = framed_backward(
                    prep["q_bot"], prep["k_top"], v_kernel, gate, mid_sb_k,
                    block=C * NB, blocks_per_window=n_sb, dv=dv_levels, **kernel_args,
                )
                dgates.append(dg_sb)
                d_below, d_above = edge_grads(
                    prep["q_t32"], dq_bot, prep["k_t32"], dk_top, prep["b_mat"], prep["a_mat"], dq_t, dk_t,
                    chunk=C, precision=_precision(kdt),
                )
                dp_sb = frames_backward(prep["p_sb"], mid_sb, dmid_sb, precision=_precision(kdt))
                edges = (prep["b_mat"], d_below, d_above, dp_sb)
            dp = frames_backward(prep["p"], prep["mid32"], dmid, edges=edges, precision=_precision(kdt))
            dq, dk, dw, dbeta, dv, dg_local = prepare_backward(
                q_k, k_k, v_kernel, w, beta, gate, seg_start, prep["t_inv"], dq_t, dk_t, dp, do_k, lse,
                delta, chunk=C, scale=scale, dv_levels=dv_levels,
            )
            dg = None
            if g is not None:  # the gate is cumulative: each step's log gate reaches every later position
                dg = gate_scan([dg_local, *dgates], T, reverse=True, dtype=g.dtype)
        grads = (dq[:, :T].to(q.dtype), dk[:, :T].to(k.dtype), dv[:, :T].to(v.dtype), dw[:, :T].to(w.dtype),
                 dbeta[:, :T].to(beta.dtype), dg)
        return (*grads, None, None, None, None, None, None)


# The largest chunk the Triton kernels run on a GPU: at 128 the per-chunk programs need 224-384 KiB of shared
# memory (the chunk kernel at head dim 64-128, sm_90), more than an H100's 227 KiB per program. Triton's
# interpreter on a CPU runs any size.
GPU_MAX_CHUNK_SIZE = 64


# Forward passes without gradients run path_attention_triton on slices of rows of at most this many
# (token x query head) pairs (at least one row): about 7 GiB of temporaries at head dim 64.
FORWARD_SLICE_TOKEN_HEADS = 2**21


# Whether path_attention_triton keeps the forward's preparation for the backward by default (see its
# keep_preparation). Off by default: on an H100 it saves 5-10 % of forward+backward (the backward's rerun of
# two kernels) for ~3 KiB per token and query head held between the passes; a ~376M model's training step at
# 2 x 4096 ran 6 % faster with a 50 % higher peak (docs/kernels.md, v8). A model sets it per layer through
# config.attn_keep_preparation.
KEEP_PREPARATION = False


def path_attention_triton(
    q, k, v, w, beta, g=None, *, scale=None, segment_ids=None, output_keys=False,
    chunk_size: int = DEFAULT_CHUNK_SIZE, chunks_per_superblock: int = 8, keep_preparation: bool | None = None,
):
    """PaTH attention with path-lm's Triton kernels (CUDA), differentiable.

    Three levels share one softmax: key superblocks (``chunk_size * chunks_per_superblock`` positions)
    before the query's superblock, key chunks before the query's chunk inside its superblock (both through
    the kernels of :mod:`path_triton`), and the query's own chunk. In the forward pass the per-chunk
    transforms, the query's own chunk, the carries to superblock edges and the frame changes are two Triton
    kernels (:func:`path_triton.prepare_forward`); the backward reruns them (reading the chunks' triangular
    inverses that the forward solved, 4 * chunk_size bytes per token and kv head) and walks their products back
    with the kernels of :func:`path_triton.edge_grads`, :func:`path_triton.frames_backward` and
    :func:`path_triton.prepare_backward` (float32 accumulation, TF32 products for half-precision inputs).
    Nothing else but the inputs, the output, its log-sum-exp and the cumulative gate (4 bytes per token and
    query head) is kept between the passes, unless
    ``keep_preparation`` (default :data:`KEEP_PREPARATION`): then the forward also writes the backward's
    tables of the preparation (the float32 carries, each chunk's product, inverse and edge matrices, the frame
    changes in float32) and keeps them, and the backward does not rerun it: about 3 KiB more per token and
    query head at head dim 64 (6 at 128) held from the forward to the backward, for two kernels fewer.
    ``chunk_size`` must be a power of two of at least 16, and at most :data:`GPU_MAX_CHUNK_SIZE` on a GPU.

    Returns o [B, T, HQ, Dv] in q's dtype and, with output_keys, the keys carried to the end of each row
    [B, T, H, D] float32 (not differentiable).
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two of at least 16 for the Triton kernels, got {chunk_size}")
    if q.is_cuda and chunk_size > GPU_MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size={chunk_size} is too large for the Triton kernels on a GPU: their per-chunk programs would "
            f"need more shared memory than a GPU has. Use at most {GPU_MAX_CHUNK_SIZE} "
            f"(the default is {DEFAULT_CHUNK_SIZE})."
        )
    problem = _offsets_problem(q, v, chunk_size * chunks_per_superblock)
    if problem:
        raise ValueError(problem)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = KEEP_PREPARATION if keep_preparation is None else keep_preparation
    args = (scale, chunk_size, chunks_per_superblock, output_keys, keep)
    B, T, HQ = q.shape[:3]
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, w, beta, g))
    rows = max(1, FORWARD_SLICE_TOKEN_HEADS // (T * HQ))
    if needs_grad or B <= rows:
        return _PaTHTriton.apply(q, k, v, w, beta, g, segment_ids, *args)
    # Without gradients (prefill, evaluation) rows are independent: slices of rows bound the forward's
    # temporaries (a few KiB per token and head) by the slice, not by the batch.
    pieces = [
        _PaTHTriton.apply(*(x[i : i + rows] if x is not None else None for x in (q, k, v, w, beta, g, segment_ids)), *args)
        for i in range(0, B, rows)
    ]
    o = torch.cat([o for o, _ in pieces])
    return o, torch.cat([keys for _, keys in pieces]) if output_keys else None


def _kernel_input_problem(q: torch.Tensor, v: torch.Tensor, head_dims: tuple) -> str | None:
    if not q.is_cuda:
        return "the inputs are not on a CUDA device"
    if q.shape[-1] not in head_dims or v.shape[-1] not in head_dims:
        return f"the kernel supports head dims {head_dims}, not {q.shape[-1]} / {v.shape[-1]}"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"the kernel takes bfloat16/float16 inputs, not {q.dtype}"
    return None


def fla_unavailable_reason(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why fla's Triton kernel cannot run on these inputs, or None if it can (its float32 backward exceeds
    shared memory, so float32 inputs are refused)."""
    return _kernel_input_problem(q, v, FLA_HEAD_DIMS) or _fla_import_error()


def triton_unavailable_reason(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why path-lm's Triton kernel cannot run on these inputs, or None if it can."""
    return _kernel_input_problem(q, v, TRITON_HEAD_DIMS) or _offsets_problem(q, v) or _triton_import_error()


def _offsets_problem(q: torch.Tensor, v: torch.Tensor, padded_to: int = DEFAULT_CHUNK_SIZE * 8) -> str | None:
    """path-lm's Triton kernels index [B, T, heads, D] tensors with 32-bit offsets."""
    B, T, HQ, D = q.shape
    T_pad = math.ceil(T / padded_to) * padded_to
    size = B * T_pad * HQ * max(D, v.shape[-1])
    if size > 2**31 - 1:
        return (
            f"{B} x {T_pad} x {HQ} x {max(D, v.shape[-1])} elements per tensor (time padded to {padded_to}) exceed "
            "the kernels' 32-bit offsets; split the batch"
        )
    return None


# Each import is tried once per process (a failed one is not retried on every layer's call). A dict, not
# functools.lru_cache: torch.compile warns about every lru_cache-wrapped call it meets in a compiled step.
_IMPORT_ERRORS: dict[str, str | None] = {}


@torch.compiler.assume_constant_result  # compiled steps take the answer, not a trace of the import
def _fla_import_error() -> str | None:
    if "fla" not in _IMPORT_ERRORS:
        _IMPORT_ERRORS["fla"] = None
        try:  # inside try: transformers' remote-code import check must not require fla
            import fla.ops.path_attn.parallel  # noqa: F401
        except Exception as err:  # ImportError, or triton failing to find a driver
            _IMPORT_ERRORS["fla"] = f"fla is not importable ({type(err).__name__}: {err}); install path-lm[cuda]"
    return _IMPORT_ERRORS["fla"]


@torch.compiler.assume_constant_result
def _triton_import_error() -> str | None:
    if "triton" not in _IMPORT_ERRORS:
        _IMPORT_ERRORS["triton"] = None
        try:  # inside try: transformers' remote-code import check must not require triton
            from .path_triton import framed_forward  # noqa: F401
        except Exception as err:
            _IMPORT_ERRORS["triton"] = f"triton is not importable ({type(err).__name__}: {err}); install path-lm[cuda]"
    return _IMPORT_ERRORS["triton"]


def kernel_import_error(backend: str) -> str | None:
    """Why a kernel backend ("fla" or "triton") cannot be imported in this process, or None if it can."""
    return {"fla": _fla_import_error, "triton": _triton_import_error}[backend]()


# Kernel backends in the order 'auto' prefers them by default (docs/kernels.md): fla's where installed,
# path-lm's own otherwise; _auto_order puts path-lm's first where it measured faster.
KERNELS = {"fla": fla_unavailable_reason, "triton": triton_unavailable_reason}
BACKENDS = ("auto", "torch", *KERNELS)
_DESCRIPTIONS = {"triton": "path-lm Triton kernel", "fla": "fla Triton kernel", "torch": "exact PyTorch"}


AUTO_TRITON_MIN_LENGTH = 1024  # without gradients (inference, prefill)
AUTO_TRITON_MIN_TRAINING_LENGTH = 4096  # with gradients


def _auto_order(q: torch.Tensor) -> list:
    """The kernels 'auto' tries, fastest first (measured on an H100, docs/benchmarks.md): at head dim 64
    path-lm's kernel from AUTO_TRITON_MIN_TRAINING_LENGTH tokens on when q needs a gradient, from
    AUTO_TRITON_MIN_LENGTH without. With gradients: the ~376M model's training step at 2 x 4096 took 188 ms
    on path-lm's kernel and 241 ms on fla's in one run (docs/kernels.md, v14); as an op, forward+backward is
    1.15x faster than fla's at 8 x 2048 and 2.1x at 2 x 8192 (v15), but its host time per call is up to
    about 1.5x fla's (2.6-3.6 ms), which small batches of short sequences do not hide: at 2048 tokens (v19)
    the same model's step was 1.05x faster on path-lm's kernel at batch 4 and 0.94x at batch 1. Without gradients a
    whole ~125M model's prefill was faster on path-lm's kernel from 1k tokens on (v15: 1.1x at 1k,
    1.5x at 4k, 2.0x at 8k at batch 1; 2.4x and 3.4x at 4k and 8k at batch 16) and slower below (0.62-0.88x
    at 128-512 tokens, where both are bound by host time). fla's kernel is faster at head dim 128."""
    training = torch.is_grad_enabled() and q.requires_grad
    min_length = AUTO_TRITON_MIN_TRAINING_LENGTH if training else AUTO_TRITON_MIN_LENGTH
    if q.shape[-1] == 64 and q.shape[1] >= min_length:
        return ["triton", "fla"]
    return list(KERNELS)


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """'auto' -> the fastest kernel that can run on these inputs (:func:`_auto_order`), else 'torch' (logged
    once); an explicit kernel that cannot run raises."""
    if backend == "torch":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
    chosen, reasons = "torch", {}
    for name in _auto_order(q) if backend == "auto" else [backend]:  # stop at the first kernel that can run
        reasons[name] = KERNELS[name](q, v)
        if reasons[name] is None:
            chosen = name
            break
    if backend != "auto" and chosen == "torch":
        raise RuntimeError(
            f"attn_backend={backend!r} cannot run: {reasons[backend]}. Use attn_backend='auto' or 'torch' "
            f"(for a saved model: from_pretrained(..., attn_backend='auto'))."
        )
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items() if reason is not None)
    if (chosen, why) not in _announced:
        _announced.add((chosen, why))
        logger.info("PaTH attention backend: %s%s", _DESCRIPTIONS[chosen], f" ({why})" if why else "")
    return chosen


def _cu_seqlens(segment_ids: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Sequence starts of the flattened [1, B*T] batch: each row, and each run of one segment id in a row."""
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if segment_ids is not None:
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = starts.flatten().nonzero().squeeze(-1)
    return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)


def path_attention_fla(q, k, v, w, beta, g=None, *, scale=None, segment_ids=None, output_keys=False):
    """fla's Triton kernel (CUDA). Padding and packed documents become variable-length sequences of one
    flattened row (`cu_seqlens`); runs of padding are computed as sequences of their own and ignored.
    Returns o [B, T, HQ, Dv] and, with output_keys, the keys carried to the end of each sequence."""
    try:  # inside try: transformers' remote-code import check must not require fla
        from fla.ops.path_attn.parallel import parallel_path_attn
    except ImportError as err:
        raise RuntimeError(f"the fla backend needs fla installed (pip install path-lm[cuda]): {err}") from err

    B, T = q.shape[:2]
    w, beta = w.float(), beta.float()
    g = g.float() if g is not None else None
    dtype = q.dtype
    k, v = k.to(dtype), v.to(dtype)
    if segment_ids is None:
        o, keys = parallel_path_attn(q, k, v, w, beta, g, scale=scale, use_cache=output_keys)
    else:
        cu = _cu_seqlens(segment_ids, B, T, q.device)
        flat = [x.reshape(1, B * T, *x.shape[2:]) if x is not None else None for x in (q, k, v, w, beta, g)]
        o, keys = parallel_path_attn(*flat, scale=scale, cu_seqlens=cu, use_cache=output_keys)
        o = o.reshape(B, T, *o.shape[2:])
        keys = keys.reshape(B, T, *keys.shape[2:]) if keys is not None else None
    return o, keys


def path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cache=None,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    step_inputs=None,
    keep_preparation: bool | None = None,
) -> torch.Tensor:
    """PaTH attention for every mode behind one signature.

    Without ``cache``: the whole sequence (training, evaluation). With a cache layer (see
    ``cache_path.PaTHCacheLayer``): an empty one is filled from the prompt (prefill), one token extends it
    by an in-place rank-one update of the cached keys (decoding), several tokens continue it blockwise.
    ``backend`` ('auto', 'torch', 'triton', 'fla') picks the kernel for whole sequences and prefill;
    single-token decoding runs path-lm's fused Triton step on CUDA (unless ``backend='torch'``), and
    multi-token continuation runs as PyTorch ops on the inputs' device. On a filled static cache
    (``cache_path.PaTHStaticCacheLayer``) a single token takes :func:`path_decode_step_static`.

    key_mask [B, L + T]: False at padded positions of the cached and new tokens (None: no padding).
    step_inputs: a decoding step's inputs kernel held back (``path_triton.StepInputs``), whose outputs are
    q, k, v, w, beta and g: the fused decoding step on a dynamic cache computes them in its own launch
    where it can; every other path runs the held launch first.
    keep_preparation: for path-lm's kernel on a whole sequence, see :func:`path_attention_triton`.
    Returns o [B, T, HQ, Dv] in q's dtype.
    """
    T = q.shape[1]
    # Only caches read this. Held step inputs come only from callers that found the decoding kernel usable.
    decoding_kernel = cache is not None and (
        step_inputs is not None or decode_kernel_usable(q.device, (q.shape[-1], v.shape[-1]), backend)
    )
    in_place = (  # a single-token step on a filled dynamic cache by the fused decoding kernel
        cache is not None and not cache.is_static and cache.length > 0 and T == 1 and segment_ids is None
        and decoding_kernel
    )
    if step_inputs is not None and not in_place:
        step_inputs.launch()
    if in_place:
        return _decode_step_in_place(q, k, v, w, beta, g, cache, key_mask=key_mask, scale=scale, step_inputs=step_inputs)
    if cache is not None and cache.is_static and cache.filled and T == 1:  # compiled decoding: no host sync
        return path_decode_step_static(
            q, k, v, w, beta, g, cache, token_mask=key_mask, scale=scale, use_kernel=decoding_kernel,
        )
    past_len = cache.length if cache is not None else 0
    kernel = resolve_backend(backend, q, v) if past_len == 0 else "torch"
    if cache is None:
        if kernel == "torch":
            return path_attention_torch(q, k, v, w, beta, g, scale=scale, segment_ids=segment_ids, chunk_size=chunk_size)[0]
        if kernel == "triton":
            return path_attention_triton(
                q, k, v, w, beta, g, scale=scale, segment_ids=segment_ids, keep_preparation=keep_preparation
            )[0]
        return _KERNEL_OPS[kernel](q, k, v, w, beta, g, scale=scale, segment_ids=segment_ids)[0]
    gate = cache.cumulative_gate(g) if g is not None else None  # [B, T, HQ] cumulative, continuing the cache
    if past_len == 0:
        if kernel == "torch":
            o, state = path_attention_torch(
                q, k, v, w, beta, g, scale=scale, segment_ids=segment_ids, output_state=True, chunk_size=chunk_size
            )
            keys = state.keys
        else:
            o, keys = _KERNEL_OPS[kernel](q, k, v, w, beta, g, scale=scale, segment_ids=segment_ids, output_keys=True)
        cache.append(keys, v, gate, key_mask, decoding_kernel=decoding_kernel)
        return o
    if T == 1 and segment_ids is None:
        cache.carry_framed_keys()
        keys, values, gates = cache.append(k, v, gate)  # raw new key; views over the whole cache, as stored
        o = path_decode_step(q, keys, values, w, beta, gate=gates, key_mask=key_mask, scale=scale)
        cache.fill_key_ring()  # (a mixed-dtype cache: the step rewrote the window's keys)
        return o
    past = PaTHPast(
        keys=cache.keys_view().transpose(1, 2),
        values=cache.values_view().transpose(1, 2),
        gate=cache.gates_view().transpose(1, 2) if gate is not None else None,
        key_mask=key_mask[:, :past_len] if key_mask is not None else None,
        gate_offset=cache.gate_offset() if gate is not None else None,
    )
    o, state = path_attention_torch(
        q, k, v, w, beta, g, scale=scale, segment_ids=segment_ids, past=past, output_state=True, chunk_size=chunk_size
    )
    cache.transform_keys(state.transform)
    cache.append(state.keys, v, gate, key_mask[:, past_len:] if key_mask is not None else None)
    return o


_KERNEL_OPS = {"triton": path_attention_triton, "fla": path_attention_fla}
