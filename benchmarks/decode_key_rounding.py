"""How much the cached keys of PaTH decoding drift with the storage dtype and the frame scheme, against
float64 keys (CPU, PyTorch ops; no model, no kernel).

Every step n applies the new token's transform H_n = I - beta_n w_n w_n^T to all earlier keys, then stores
the new raw key. Schemes, with the products in float32 as the decoding kernel computes them:
- "float32, every step": the default cache (keys rewritten in float32 each step).
- "bf16, every step": cache_key_dtype="model" without frames (rounded to bf16 at every step).
- "bf16, frames": keys older than the last window stay in the frame of the last fold, carried by a float32
  D x D matrix; the window is rewritten (and rounded) per step; every WINDOW steps all keys are rewritten
  once (rounded once): the decoding kernel's frames, run 3, with a bf16 key buffer.
- "bf16 framed, float32 window": the same, but the window kept in float32, rounded once when it is folded.
Reports the mean relative key error after T steps (mean |k - k_exact| / mean |k_exact|) and the error of
the scores q . k for random unit queries, overall and for the oldest and newest tenth of the keys.

    python benchmarks/decode_key_rounding.py [--steps 4096] [--dim 64] [--window 64] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

SCHEMES = ["float32, every step", "bf16, every step", "bf16, frames", "bf16 framed, float32 window",
           "exact keys rounded once to bf16 (the floor of bf16 storage)"]


def run(steps: int, D: int, window: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    keys_in = torch.randn(steps, D, generator=gen, dtype=torch.float64)
    w = torch.nn.functional.normalize(torch.randn(steps, D, generator=gen, dtype=torch.float64), dim=-1)
    beta = 2 * torch.sigmoid(torch.randn(steps, generator=gen, dtype=torch.float64))
    exact = torch.zeros(steps, D, dtype=torch.float64)
    f32 = torch.zeros(steps, D)
    b16 = torch.zeros(steps, D, dtype=torch.bfloat16)
    framed = torch.zeros(steps, D, dtype=torch.bfloat16)  # frames scheme: one bf16 buffer
    framed_w = torch.zeros(steps, D, dtype=torch.bfloat16)  # framed part of the float32-window scheme
    win32 = torch.zeros(steps, D)  # its window, float32
    M = torch.eye(D)  # float32 frame matrix of both frame schemes (same transforms)
    start = 0  # first key of the current window (keys below it are framed)
    for n in range(steps):
        wn, bn = w[n], beta[n]
        w32, b32 = wn.float(), bn.float()
        if n:
            exact[:n] -= bn * (exact[:n] @ wn)[:, None] * wn
            f32[:n] -= b32 * (f32[:n] @ w32)[:, None] * w32
            old = b16[:n].float()
            b16[:n] = (old - b32 * (old @ w32)[:, None] * w32).bfloat16()
            win = framed[start:n].float()
            framed[start:n] = (win - b32 * (win @ w32)[:, None] * w32).bfloat16()
            win32[start:n] -= b32 * (win32[start:n] @ w32)[:, None] * w32
            M = M - b32 * w32[:, None] * (w32 @ M)[None, :]
        exact[n], f32[n], b16[n], framed[n], win32[n] = keys_in[n], keys_in[n].float(), keys_in[n], keys_in[n], keys_in[n].float()
        if (n + 1) % window == 0:  # fold: carry the framed keys to position n, start a new window after n
            framed[:start] = (framed[:start].float() @ M.T).bfloat16()
            framed_w[:start] = (framed_w[:start].float() @ M.T).bfloat16()
            framed_w[start : n + 1] = win32[start : n + 1].bfloat16()
            M = torch.eye(D)
            start = n + 1
    def carried(framed_part, window_part):  # framed keys carried to the last position (exactly), then the window
        return torch.cat([framed_part[:start].double() @ M.double().T, window_part[start:].double()])

    results = {
        SCHEMES[0]: f32.double(),
        SCHEMES[1]: b16.double(),
        SCHEMES[2]: carried(framed, framed),
        SCHEMES[3]: carried(framed_w, win32),
        SCHEMES[4]: exact.bfloat16().double(),
    }
    q = torch.nn.functional.normalize(torch.randn(D, 256, generator=gen, dtype=torch.float64), dim=0)
    scores = exact @ q
    tenth = steps // 10
    out = {}
    for name, keys in results.items():
        err = (keys - exact).abs()
        score_err = (keys @ q - scores).abs()
        out[name] = {
            "key": (err.mean() / exact.abs().mean()).item(),
            "score": (score_err.mean() / scores.abs().mean()).item(),
            "score_oldest": (score_err[:tenth].mean() / scores[:tenth].abs().mean()).item(),
            "score_newest": (score_err[-tenth:].mean() / scores[-tenth:].abs().mean()).item(),
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    res = run(args.steps, args.dim, args.window, args.seed)
    print(f"# {args.steps} decoding steps, head dim {args.dim}, window {args.window}, seed {args.seed}; torch "
          f"{torch.__version__}; errors relative to float64 keys (mean |error| / mean |value|)\n")
    print("| keys | key error | score error | score error, oldest 10% | score error, newest 10% |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['key']:.2e} | {r['score']:.2e} | {r['score_oldest']:.2e} | {r['score_newest']:.2e} |")


if __name__ == "__main__":
    main()
