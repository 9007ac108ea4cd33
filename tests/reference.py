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


def path_attention_recurrent(q, k, v, w, beta, g=None, scale=None, segment_ids=None):
    """The same attention as path_attention_reference, by the decoding recurrence: before key i joins,
    every earlier key is multiplied by H_i, so at step i the keys are H_i ... H_{j+1} k_j. Vectorized over
    batch and heads, so autograd through it is cheap enough for gradient references. float64."""
    q, k, v, w, beta = (x.double() for x in (q, k, v, w, beta))
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    scale = D**-0.5 if scale is None else scale
    gcum = g.double().cumsum(1) if g is not None else q.new_zeros(B, T, HQ)
    carried = q.new_zeros(B, H, 0, D)
    outs = []
    for i in range(T):
        wi = w[:, i, :, None, :]  # [B, H, 1, D]
        carried = carried - beta[:, i, :, None, None] * (carried * wi).sum(-1, keepdim=True) * wi
        carried = torch.cat([carried, k[:, i, :, None, :]], 2)  # [B, H, i + 1, D]
        logits = q[:, i].reshape(B, H, G, 1, D) @ carried[:, :, None].transpose(-1, -2)  # [B, H, G, 1, i + 1]
        gate = gcum[:, i, :, None] - gcum[:, : i + 1].transpose(1, 2)  # [B, HQ, i + 1]
        logits = scale * (logits.reshape(B, HQ, i + 1) + gate)
        if segment_ids is not None:
            same = segment_ids[:, : i + 1] == segment_ids[:, i : i + 1]
            logits = logits.masked_fill(~same[:, None], float("-inf"))
        probs = torch.softmax(logits, -1).reshape(B, H, G, i + 1)
        outs.append((probs @ v[:, : i + 1].transpose(1, 2)).reshape(B, HQ, -1))
    return torch.stack(outs, 1)
