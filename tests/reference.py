"""Independent float64 references written straight from the PaTH formula (no blockwise algebra)."""

import torch


def householder_products(w, beta):
    """prod[i][j] = H_i H_{i-1} ... H_{j+1} for j <= i, one head: w [T, D], beta [T] -> [T, T, D, D]."""
    T, D = w.shape
    eye = torch.eye(D, dtype=torch.float64)
    prod = torch.zeros(T, T, D, D, dtype=torch.float64)
    for j in range(T):
        acc = eye.clone()
        prod[j, j] = acc
        for i in range(j + 1, T):
            h = eye - beta[i] * torch.outer(w[i], w[i])
            acc = h @ acc
            prod[i, j] = acc
    return prod


def path_attention_reference(q, k, v, w, beta, g=None, scale=None, segment_ids=None, key_mask=None):
    """q [B,T,HQ,D], k/w [B,T,H,D], v [B,T,H,Dv], beta [B,T,H], g [B,T,HQ] -> o [B,T,HQ,Dv] float64.
    segment_ids [B,T]: attend within a segment only; key_mask [B,T]: keys with False are left out."""
    q, k, v, w, beta = (x.double() for x in (q, k, v, w, beta))
    B, T, HQ, D = q.shape
    H = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, T, HQ, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            prod = householder_products(w[b, :, h], beta[b, :, h])
            for hq in range(h * (HQ // H), (h + 1) * (HQ // H)):
                gcum = g[b, :, hq].double().cumsum(0) if g is not None else torch.zeros(T, dtype=torch.float64)
                for i in range(T):
                    logits = torch.full((T,), float("-inf"), dtype=torch.float64)
                    for j in range(i + 1):
                        if segment_ids is not None and segment_ids[b, i] != segment_ids[b, j]:
                            continue
                        if key_mask is not None and not key_mask[b, j]:
                            continue
                        logits[j] = scale * (q[b, i, hq] @ prod[i, j] @ k[b, j, h] + gcum[i] - gcum[j])
                    out[b, i, hq] = torch.softmax(logits, 0) @ v[b, :, h]
    return out


def transformed_keys_reference(k, w, beta):
    """Keys carried to the last position: H_{T-1} ... H_{j+1} k_j, [B, T, H, D] float64."""
    k, w, beta = (x.double() for x in (k, w, beta))
    B, T, H, D = k.shape
    out = torch.zeros_like(k)
    for b in range(B):
        for h in range(H):
            prod = householder_products(w[b, :, h], beta[b, :, h])
            for j in range(T):
                out[b, j, h] = prod[T - 1, j] @ k[b, j, h]
    return out
