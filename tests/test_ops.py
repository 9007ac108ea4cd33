"""Tests of path_lm.path_ops against the explicit float64 PaTH formula in tests/reference.py.

The reference is O(T^2 D^2) Python loops, so every case here keeps T and B * H small.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import path_attention_reference, transformed_keys_reference

from path_lm.path_ops import PaTHPast, path_attention_torch, path_decode_step

F64_TOL = dict(rtol=1e-10, atol=1e-10)


def make_inputs(B, T, HQ, H, D, Dv=None, gate=True, seed=0):
    """Random float64 inputs: w unit-norm, beta uniform in [0, 2), g = logsigmoid(randn + 4): a mostly open gate
    (about -0.03 a step, as after training), so that keys hundreds of positions back still weigh in and every
    chunk level of the kernels shows in the output; logsigmoid(randn) would decay ~e^-50 over 64 steps."""
    Dv = D if Dv is None else Dv
    gen = torch.Generator().manual_seed(seed)
    opts = dict(generator=gen, dtype=torch.float64)
    q = torch.randn(B, T, HQ, D, **opts)
    k = torch.randn(B, T, H, D, **opts)
    v = torch.randn(B, T, H, Dv, **opts)
    w = torch.randn(B, T, H, D, **opts)
    w = w / w.norm(dim=-1, keepdim=True)
    beta = 2 * torch.rand(B, T, H, **opts)
    g = F.logsigmoid(torch.randn(B, T, HQ, **opts) + 4) if gate else None
    return q, k, v, w, beta, g


def explicit_transform(w, beta):
    """H_{T-1} ... H_0 for every (batch, kv head): w [B, T, H, D], beta [B, T, H] -> [B, H, D, D] float64."""
    B, T, H, D = w.shape
    out = torch.empty(B, H, D, D, dtype=torch.float64)
    eye = torch.eye(D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            acc = eye.clone()
            for t in range(T):
                wt = w[b, t, h].double()
                acc = (eye - beta[b, t, h].double() * torch.outer(wt, wt)) @ acc
            out[b, h] = acc
    return out


def reference_with_key_mask(q, k, v, w, beta, g, keep, scale=None):
    """Explicit PaTH attention where keys j with keep[b, j] False are left out of every softmax."""
    return path_attention_reference(q, k, v, w, beta, g, scale=scale, key_mask=keep)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------------
# 1. forward == explicit formula
# ----------------------------------------------------------------------------------------------------------

# (B, T, HQ, H, D, Dv, chunk_size, scale)
FORWARD_CASES = [
    pytest.param(2, 19, 4, 2, 16, 16, 8, None, id="gqa4-2_D16_T19_C8"),
    pytest.param(1, 19, 3, 1, 32, 32, 8, None, id="gqa3-1_D32_T19_C8"),
    pytest.param(1, 12, 2, 2, 48, 48, 5, None, id="mha2_D48_T12_C5"),
    pytest.param(1, 10, 1, 1, 64, 64, 16, None, id="mha1_D64_T10_C16>T"),
    pytest.param(1, 11, 4, 2, 16, 24, 1, None, id="gqa4-2_D16_Dv24_C1"),
    pytest.param(2, 9, 2, 1, 16, 8, 4, 0.37, id="gqa2-1_D16_Dv8_scale0.37"),
    pytest.param(1, 8, 2, 2, 16, 16, 8, None, id="mha2_T8_C8_one_full_chunk"),
]


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("B,T,HQ,H,D,Dv,chunk_size,scale", FORWARD_CASES)
def test_forward_matches_reference(B, T, HQ, H, D, Dv, chunk_size, scale, gate):
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, Dv, gate=gate, seed=T * 100 + D + HQ)
    o, state = path_attention_torch(q, k, v, w, beta, g, scale=scale, chunk_size=chunk_size)
    assert state is None
    assert o.shape == (B, T, HQ, Dv) and o.dtype == torch.float64
    ref = path_attention_reference(q, k, v, w, beta, g, scale=scale)
    torch.testing.assert_close(o, ref, **F64_TOL)


def test_chunk_size_invariance():
    """Every chunk size gives the same output (and the default chunk size works)."""
    q, k, v, w, beta, g = make_inputs(1, 23, 2, 1, 8, gate=True, seed=3)
    base, _ = path_attention_torch(q, k, v, w, beta, g)
    for c in (1, 2, 3, 7, 11, 22, 23, 24, 100):
        o, _ = path_attention_torch(q, k, v, w, beta, g, chunk_size=c)
        torch.testing.assert_close(o, base, **F64_TOL)


def test_head_mismatch_raises():
    q, k, v, w, beta, _ = make_inputs(1, 4, 3, 2, 8, gate=False)
    with pytest.raises(ValueError):
        path_attention_torch(q, k, v, w, beta)


# ----------------------------------------------------------------------------------------------------------
# 2. segment_ids
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("chunk_size", [1, 4, 6, 32])
def test_packed_documents(gate, chunk_size):
    B, T, HQ, H, D, Dv = 2, 17, 4, 2, 16, 8
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, Dv, gate=gate, seed=11)
    lengths = [[3, 2, 7, 5], [1, 9, 1, 6]]
    segment_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths]
    )
    assert segment_ids.shape == (B, T)
    o, _ = path_attention_torch(q, k, v, w, beta, g, segment_ids=segment_ids, chunk_size=chunk_size)

    # Each document run alone through the op.
    for b in range(B):
        start = 0
        for n in lengths[b]:
            sl = slice(start, start + n)
            args = [x[b : b + 1, sl] for x in (q, k, v, w, beta)]
            gd = g[b : b + 1, sl] if g is not None else None
            alone, _ = path_attention_torch(*args, gd, chunk_size=chunk_size)
            torch.testing.assert_close(o[b : b + 1, sl], alone, **F64_TOL)
            start += n

    if chunk_size in (4, 32):
        ref = path_attention_reference(q, k, v, w, beta, g, segment_ids=segment_ids)
        torch.testing.assert_close(o, ref, **F64_TOL)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_left_padding(gate, chunk_size):
    B, T, HQ, H, D = 3, 14, 2, 1, 16
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=gate, seed=21)
    pads = [5, 0, 9]
    segment_ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        segment_ids[b, :p] = -1
    o, _ = path_attention_torch(q, k, v, w, beta, g, segment_ids=segment_ids, chunk_size=chunk_size)
    assert torch.isfinite(o).all()
    for b, p in enumerate(pads):
        args = [x[b : b + 1, p:] for x in (q, k, v, w, beta)]
        gb = g[b : b + 1, p:] if g is not None else None
        alone, _ = path_attention_torch(*args, gb, chunk_size=chunk_size)
        torch.testing.assert_close(o[b : b + 1, p:], alone, **F64_TOL)
        if chunk_size == 4:
            ref = path_attention_reference(*args, gb)
            torch.testing.assert_close(o[b : b + 1, p:], ref, **F64_TOL)


# ----------------------------------------------------------------------------------------------------------
# 3. output_state
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,chunk_size", [(13, 1), (13, 4), (13, 5), (13, 13), (13, 20), (1, 8), (16, 8)]
)
def test_output_state(T, chunk_size):
    B, HQ, H, D = 2, 4, 2, 8
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=True, seed=31 + T)
    o, state = path_attention_torch(q, k, v, w, beta, g, output_state=True, chunk_size=chunk_size)
    o_plain, _ = path_attention_torch(q, k, v, w, beta, g, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_plain, rtol=0, atol=0)
    assert state.keys.shape == (B, T, H, D)
    assert state.transform.shape == (B, H, D, D)
    torch.testing.assert_close(state.keys, transformed_keys_reference(k, w, beta), **F64_TOL)
    torch.testing.assert_close(state.transform, explicit_transform(w, beta), **F64_TOL)


# ----------------------------------------------------------------------------------------------------------
# 4. past= (prefill continuation)
# ----------------------------------------------------------------------------------------------------------


def _past_from_prefix(state, v, g, s, all_true_mask):
    B = v.shape[0]
    gcum = g[:, :s].cumsum(1) if g is not None else None
    return PaTHPast(
        keys=state.keys,
        values=v[:, :s],
        gate=gcum,
        key_mask=torch.ones(B, s, dtype=torch.bool) if all_true_mask else None,
        gate_offset=gcum[:, -1] if g is not None else None,
    )


@pytest.mark.parametrize("all_true_mask", [False, True], ids=["mask_none", "mask_all_true"])
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_past_split_matches_full(chunk_size, gate, all_true_mask):
    B, T, HQ, H, D, Dv = 2, 20, 4, 2, 8, 6
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, Dv, gate=gate, seed=41)
    full, _ = path_attention_torch(q, k, v, w, beta, g, chunk_size=chunk_size)
    for s in (1, 4, 7, 8, 13, 19):
        pre = [x[:, :s] for x in (q, k, v, w, beta)]
        suf = [x[:, s:] for x in (q, k, v, w, beta)]
        g_pre = g[:, :s] if g is not None else None
        g_suf = g[:, s:] if g is not None else None
        o1, state = path_attention_torch(*pre, g_pre, output_state=True, chunk_size=chunk_size)
        past = _past_from_prefix(state, v, g, s, all_true_mask)
        o2, _ = path_attention_torch(*suf, g_suf, past=past, chunk_size=chunk_size)
        torch.testing.assert_close(torch.cat([o1, o2], 1), full, **F64_TOL, msg=lambda m: f"split at {s}: {m}")


def test_past_full_matches_reference():
    B, T, HQ, H, D = 1, 15, 3, 1, 16
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=True, seed=42)
    ref = path_attention_reference(q, k, v, w, beta, g)
    s = 6
    o1, state = path_attention_torch(*(x[:, :s] for x in (q, k, v, w, beta)), g[:, :s], output_state=True, chunk_size=4)
    past = _past_from_prefix(state, v, g, s, all_true_mask=False)
    o2, _ = path_attention_torch(*(x[:, s:] for x in (q, k, v, w, beta)), g[:, s:], past=past, chunk_size=4)
    torch.testing.assert_close(torch.cat([o1, o2], 1), ref, **F64_TOL)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_chained_prefill_three_pieces(gate, chunk_size):
    """prefix -> middle (with past, output_state) -> suffix; the cache is advanced with state.transform."""
    B, T, HQ, H, D = 2, 19, 2, 2, 8
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=gate, seed=43)
    full, _ = path_attention_torch(q, k, v, w, beta, g, chunk_size=chunk_size)
    a, b = 5, 12
    sl1, sl2, sl3 = slice(0, a), slice(a, b), slice(b, T)
    part = lambda sl: ([x[:, sl] for x in (q, k, v, w, beta)], g[:, sl] if g is not None else None)  # noqa: E731
    gcum = g.cumsum(1) if g is not None else None

    args, gp = part(sl1)
    o1, st1 = path_attention_torch(*args, gp, output_state=True, chunk_size=chunk_size)
    past = PaTHPast(st1.keys, v[:, sl1], gcum[:, sl1] if gate else None, None, gcum[:, a - 1] if gate else None)
    args, gp = part(sl2)
    o2, st2 = path_attention_torch(*args, gp, past=past, output_state=True, chunk_size=chunk_size)
    # Advance the old cache through the middle piece's transform and append the middle piece's keys.
    old = torch.einsum("blhd,bhed->blhe", st1.keys, st2.transform)
    keys = torch.cat([old, st2.keys], 1)
    torch.testing.assert_close(keys, transformed_keys_reference(k[:, :b], w[:, :b], beta[:, :b]), **F64_TOL)
    past = PaTHPast(keys, v[:, :b], gcum[:, :b] if gate else None, None, gcum[:, b - 1] if gate else None)
    args, gp = part(sl3)
    o3, _ = path_attention_torch(*args, gp, past=past, chunk_size=chunk_size)
    torch.testing.assert_close(torch.cat([o1, o2, o3], 1), full, **F64_TOL)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_past_key_mask(gate, chunk_size):
    B, T, HQ, H, D = 3, 13, 2, 1, 8
    s = 7
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=gate, seed=51)
    key_mask = torch.ones(B, s, dtype=torch.bool)
    key_mask[0, :3] = False  # left-padding style
    key_mask[1, [1, 4, 6]] = False  # scattered holes, including the last cached position
    key_mask[2, :] = False  # nothing cached is visible
    keep = torch.cat([key_mask, torch.ones(B, T - s, dtype=torch.bool)], 1)

    o1, state = path_attention_torch(*(x[:, :s] for x in (q, k, v, w, beta)), g[:, :s] if gate else None,
                                     output_state=True, chunk_size=chunk_size)
    past = _past_from_prefix(state, v, g, s, all_true_mask=True)
    past.key_mask = key_mask
    o2, _ = path_attention_torch(*(x[:, s:] for x in (q, k, v, w, beta)), g[:, s:] if gate else None,
                                 past=past, chunk_size=chunk_size)
    ref = reference_with_key_mask(q, k, v, w, beta, g, keep)
    torch.testing.assert_close(o2, ref[:, s:], **F64_TOL)
    # Row 2 sees no cached key: it is the suffix run on its own.
    alone, _ = path_attention_torch(*(x[2:3, s:] for x in (q, k, v, w, beta)), g[2:3, s:] if gate else None,
                                    chunk_size=chunk_size)
    torch.testing.assert_close(o2[2:3], alone, **F64_TOL)


def test_reference_with_key_mask_all_true_is_reference():
    """Sanity of the test's own masked reference."""
    q, k, v, w, beta, g = make_inputs(1, 9, 2, 1, 8, gate=True, seed=52)
    keep = torch.ones(1, 9, dtype=torch.bool)
    torch.testing.assert_close(reference_with_key_mask(q, k, v, w, beta, g, keep),
                               path_attention_reference(q, k, v, w, beta, g), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# 5. path_decode_step
# ----------------------------------------------------------------------------------------------------------


def _prefill_cache(q, k, v, w, beta, g, P, chunk_size=4):
    o, state = path_attention_torch(q[:, :P], k[:, :P], v[:, :P], w[:, :P], beta[:, :P],
                                    g[:, :P] if g is not None else None, output_state=True, chunk_size=chunk_size)
    return o, state.keys.transpose(1, 2)  # [B, H, P, D]


@pytest.mark.parametrize("mode", ["cat", "buffer"])
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 1), (2, 2)])
def test_decode_matches_reference(HQ, H, gate, mode):
    B, T, D, Dv, P = 2, 13, 8, 6, 4
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, Dv, gate=gate, seed=61 + HQ)
    ref = path_attention_reference(q, k, v, w, beta, g)
    gcum = g.cumsum(1).transpose(1, 2) if gate else None  # [B, HQ, T]
    o_pre, cache_k = _prefill_cache(q, k, v, w, beta, g, P)
    torch.testing.assert_close(o_pre, ref[:, :P], **F64_TOL)
    vt = v.transpose(1, 2)  # [B, H, T, Dv]

    if mode == "buffer":
        kbuf = torch.zeros(B, H, T, D, dtype=torch.float64)
        kbuf[:, :, :P] = cache_k
    for t in range(P, T):
        if mode == "cat":
            keys = torch.cat([cache_k, k[:, t, :, None]], 2)
        else:
            kbuf[:, :, t] = k[:, t]
            keys = kbuf[:, :, : t + 1]
        before = keys.clone()
        o = path_decode_step(q[:, t : t + 1], keys, vt[:, :, : t + 1], w[:, t : t + 1], beta[:, t : t + 1],
                             gate=gcum[..., : t + 1] if gate else None)
        assert o.shape == (B, 1, HQ, Dv) and o.dtype == torch.float64
        torch.testing.assert_close(o[:, 0], ref[:, t], **F64_TOL, msg=lambda m: f"step {t}: {m}")
        # In place: rows :t got the rank-one update of H_t, the new raw key is untouched.
        wt, bt = w[:, t, :, None, :], beta[:, t, :, None, None]  # [B, H, 1, D], [B, H, 1, 1]
        old = before[:, :, :-1]
        expected = old - bt * (old * wt).sum(-1, keepdim=True) * wt
        torch.testing.assert_close(keys[:, :, :-1], expected, **F64_TOL)
        assert torch.equal(keys[:, :, -1], k[:, t])
        cache_k = keys
    final = kbuf if mode == "buffer" else cache_k
    torch.testing.assert_close(final.transpose(1, 2), transformed_keys_reference(k, w, beta), **F64_TOL)


def test_decode_from_empty_cache():
    """L = 0: the new token attends only to itself; the output is its value."""
    B, HQ, H, D, Dv = 2, 4, 2, 8, 5
    q, k, v, w, beta, g = make_inputs(B, 1, HQ, H, D, Dv, gate=True, seed=62)
    keys = k.transpose(1, 2).clone()
    o = path_decode_step(q, keys, v.transpose(1, 2), w, beta, gate=g.transpose(1, 2))
    torch.testing.assert_close(o, v.repeat_interleave(HQ // H, dim=2), **F64_TOL)
    assert torch.equal(keys, k.transpose(1, 2))


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
def test_decode_left_padded_prompt(gate):
    """Prefill with -1/0 segment ids, then decode with a key_mask: each row equals its unpadded sequence."""
    B, T, HQ, H, D, P = 2, 12, 2, 1, 8, 7
    pads = [3, 0]
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=gate, seed=63)
    seg = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(pads):
        seg[b, :p] = -1
    o_pre, state = path_attention_torch(*(x[:, :P] for x in (q, k, v, w, beta)), g[:, :P] if gate else None,
                                        segment_ids=seg, output_state=True, chunk_size=4)
    mask = torch.cat([seg >= 0, torch.ones(B, T - P, dtype=torch.bool)], 1)
    gcum = g.cumsum(1).transpose(1, 2) if gate else None
    cache_k = state.keys.transpose(1, 2)
    outs = []
    for t in range(P, T):
        keys = torch.cat([cache_k, k[:, t, :, None]], 2)
        o = path_decode_step(q[:, t : t + 1], keys, v.transpose(1, 2)[:, :, : t + 1], w[:, t : t + 1],
                             beta[:, t : t + 1], gate=gcum[..., : t + 1] if gate else None, key_mask=mask[:, : t + 1])
        outs.append(o)
        cache_k = keys
    o_all = torch.cat([o_pre] + outs, 1)
    for b, p in enumerate(pads):
        args = [x[b : b + 1, p:] for x in (q, k, v, w, beta)]
        ref = path_attention_reference(*args, g[b : b + 1, p:] if gate else None)
        torch.testing.assert_close(o_all[b : b + 1, p:], ref, **F64_TOL)
        torch.testing.assert_close(cache_k[b : b + 1, :, p:].transpose(1, 2),
                                   transformed_keys_reference(*(x[b : b + 1, p:] for x in (k, w, beta))), **F64_TOL)


@pytest.mark.parametrize("cache_dtype,out_tol,key_tol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)])
def test_decode_low_precision_cache(cache_dtype, out_tol, key_tol):
    B, T, HQ, H, D, P = 2, 16, 4, 2, 16, 3
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=True, seed=71)
    q32, k32, v32, w32, beta32, g32 = (x.float() for x in (q, k, v, w, beta, g))
    ref = path_attention_reference(q32, k32, v32, w32, beta32, g32)
    _, cache_k = _prefill_cache(q32, k32, v32, w32, beta32, g32, P)
    assert cache_k.dtype == torch.float32
    kbuf = torch.zeros(B, H, T, D, dtype=cache_dtype)
    kbuf[:, :, :P] = cache_k.to(cache_dtype)
    vbuf = v32.transpose(1, 2).to(cache_dtype)
    gcum = g32.cumsum(1).transpose(1, 2)
    for t in range(P, T):
        kbuf[:, :, t] = k32[:, t].to(cache_dtype)
        keys = kbuf[:, :, : t + 1]
        o = path_decode_step(q32[:, t : t + 1], keys, vbuf[:, :, : t + 1], w32[:, t : t + 1], beta32[:, t : t + 1],
                             gate=gcum[..., : t + 1])
        assert o.dtype == torch.float32 and keys.dtype == cache_dtype
        err = rel_err(o[:, 0], ref[:, t])
        assert err < out_tol, f"step {t}: relative error {err:.2e}"
    kerr = rel_err(kbuf.transpose(1, 2), transformed_keys_reference(k32, w32, beta32))
    assert kerr < key_tol, f"cached keys relative error {kerr:.2e}"


# ----------------------------------------------------------------------------------------------------------
# 6. gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate,use_seg", [(True, True), (False, False), (True, False)],
                         ids=["gate_seg", "nogate_noseg", "gate_noseg"])
def test_gradcheck(gate, use_seg):
    B, T, HQ, H, D = 1, 6, 2, 1, 4
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=gate, seed=81)
    seg = torch.tensor([[0, 0, 1, 1, 1, 1]]) if use_seg else None
    inputs = [x.clone().requires_grad_() for x in (q, k, v, w, beta) + ((g,) if gate else ())]

    def fn(*xs):
        gg = xs[5] if gate else None
        return path_attention_torch(*xs[:5], gg, segment_ids=seg, chunk_size=4)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_with_past():
    """Gradients flow to the new tokens' inputs and to the cached keys, values and gates."""
    B, T, HQ, H, D, s = 1, 7, 2, 1, 4, 3
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, gate=True, seed=82)
    _, state = path_attention_torch(*(x[:, :s] for x in (q, k, v, w, beta)), g[:, :s], output_state=True)
    gcum = g[:, :s].cumsum(1)
    inputs = [x.clone().requires_grad_() for x in
              (q[:, s:], k[:, s:], v[:, s:], w[:, s:], beta[:, s:], g[:, s:], state.keys, v[:, :s], gcum)]
    offset = gcum[:, -1].clone()

    def fn(qq, kk, vv, ww, bb, gg, pk, pv, pg):
        past = PaTHPast(pk, pv, pg, None, offset)
        return path_attention_torch(qq, kk, vv, ww, bb, gg, past=past, chunk_size=2)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("use_seg", [True, False], ids=["seg", "noseg"])
def test_gradients_match_reference(use_seg):
    B, T, HQ, H, D, Dv = 2, 9, 4, 2, 8, 6
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, Dv, gate=True, seed=83)
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 2, 2]]) if use_seg else None
    gen = torch.Generator().manual_seed(84)
    grad_out = torch.randn(B, T, HQ, Dv, generator=gen, dtype=torch.float64)

    a = [x.clone().requires_grad_() for x in (q, k, v, w, beta, g)]
    o, _ = path_attention_torch(*a, segment_ids=seg, chunk_size=4)
    o.backward(grad_out)
    b = [x.clone().requires_grad_() for x in (q, k, v, w, beta, g)]
    ref = path_attention_reference(*b, segment_ids=seg)
    ref.backward(grad_out)
    torch.testing.assert_close(o, ref, **F64_TOL)
    for name, x, y in zip(("q", "k", "v", "w", "beta", "g"), a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# 7. low-precision inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize(
    "dtype,tol,chunk_size",
    [(torch.bfloat16, 1e-2, 4), (torch.bfloat16, 1e-2, 64), (torch.float32, 1e-5, 4), (torch.float32, 1e-5, 64)],
)
def test_low_precision_inputs(dtype, tol, chunk_size, gate):
    B, T, HQ, H, D, Dv = 2, 18, 4, 2, 32, 16
    xs = make_inputs(B, T, HQ, H, D, Dv, gate=gate, seed=91)
    q, k, v, w, beta, g = (x.to(dtype) if x is not None else None for x in xs)
    o, state = path_attention_torch(q, k, v, w, beta, g, output_state=True, chunk_size=chunk_size)
    assert o.dtype == dtype
    assert state.keys.dtype == torch.float32 and state.transform.dtype == torch.float32
    ref = path_attention_reference(q, k, v, w, beta, g)  # float64 on the same (rounded) inputs
    err = rel_err(o, ref)
    assert err < tol, f"relative error {err:.2e}"
    # The state is kept in float32 whatever the input dtype: float32-level accuracy.
    kerr = rel_err(state.keys, transformed_keys_reference(k, w, beta))
    assert kerr < 1e-5, f"state keys relative error {kerr:.2e}"


def test_kernel_availability_checks_compile_without_warnings():
    """generate(cache_implementation="static") compiles the decoding step, which asks whether the kernels
    are importable: the answer is a constant to torch.compile, with no warning per compile (an
    lru_cache-wrapped check made dynamo warn on every compiled generate())."""
    import warnings

    from path_lm import path_ops

    def step(x):
        usable = path_ops.decode_kernel_usable(torch.device("cuda"), (64,), "auto")
        return x + int(usable) + int(path_ops._fla_import_error() is None)

    expected = step(torch.ones(3))
    torch.compiler.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(step, backend="eager", fullgraph=True)(torch.ones(3))
    assert torch.equal(out, expected)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
