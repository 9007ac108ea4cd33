"""Longest trainable sequence at batch 1: forward+backward of ONE attention op, PaTH (fla's kernel, path-lm's
Triton kernel) vs SDPA (flash).

The op alone (no projections, MLP or logits): bf16 q/k/v [1, T, 16, 64] (a 1024-wide layer), PaTH with
forget gate on (w, beta, g float32), gradients of every input. T doubles from 8k until the op runs out of
memory (torch.cuda.OutOfMemoryError, caught), up to --max-t (512k). The time is quadratic in T, so a
length whose predicted time (4x the previous one) exceeds --max-step-s is not tried: such a backend ends
with "time limit", not "OOM". Reported per T: peak memory (max_memory_allocated, inputs and gradients
included) and the time of one fwd+bwd call, input creation included (after warm-up calls at 1k and at the
first length).
`--impls fla triton sdpa torch`: path-lm's Triton kernel (`triton`) and the exact PyTorch path (`torch`,
O(T^2) memory) too.

    python benchmarks/gpu_max_seqlen.py [--impls fla triton sdpa] [--start-t 8192] [--max-t 524288] [--max-step-s 12] [--tiny]
"""

from __future__ import annotations

import argparse

import _common as C
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from path_lm.path_ops import path_attention_fla, path_attention_torch, path_attention_triton

OPS = {"fla": path_attention_fla, "triton": path_attention_triton, "torch": path_attention_torch}


def fwd_bwd(impl, T, H, D, device):
    """One forward+backward at length T; returns nothing (memory and time are read around it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, dtype=torch.float32: torch.randn(  # noqa: E731
        *shape, device=device, dtype=dtype, generator=gen
    )
    q, k, v = (rand(1, T, H, D, dtype=torch.bfloat16) for _ in range(3))  # [1, T, H, D]
    if impl == "sdpa":
        inputs = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]  # [1, H, T, D]
        del q, k, v
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(*inputs, is_causal=True)
    else:
        w = F.normalize(rand(1, T, H, D), dim=-1)
        beta = 2 * torch.sigmoid(rand(1, T, H))
        g = F.logsigmoid(rand(1, T, H) + 3)
        inputs = [x.requires_grad_() for x in (q, k, v, w, beta, g)]
        o = OPS[impl](*inputs)[0]
    torch.autograd.grad(o, inputs, torch.ones_like(o))


def sweep(impl, args, device):
    C.free(device)
    steps, stop, T, last_s = [], "max T reached", args.start_t, None
    try:  # compile / warm up (also at the first measured length, whose time predicts the next lengths')
        fwd_bwd(impl, min(1024, args.start_t), args.heads, args.dim, device)
        fwd_bwd(impl, args.start_t, args.heads, args.dim, device)
    except Exception as err:
        stop, T = f"{C.failure(err)} in the warm-up", 2 * args.max_t
    while T <= args.max_t:
        if last_s is not None and 4 * last_s > args.max_step_s:
            stop = f"time limit (next T={T} predicted {4 * last_s:.0f} s > {args.max_step_s} s)"
            break
        C.free(device)
        failed = None
        try:
            last_s = C.time_calls_ms(lambda: fwd_bwd(impl, T, args.heads, args.dim, device), device, 1)[0] / 1e3
        except Exception as err:
            failed = C.failure(err)
        peak = C.peak_gib(device)
        C.free(device)  # outside `except`, so the failed call's tensors are gone
        steps.append({"T": T, "ok": failed is None, "error": failed, "peak_gib": peak,
                      "seconds": None if failed else last_s})
        print(f"# {impl} T={T}: {failed or 'ok'}, peak {C.fmt(peak)} GiB, {C.fmt(last_s if not failed else None)} s",
              flush=True)
        if failed:
            stop = f"{failed} at T={T}"
            break
        T *= 2
    ok = [s["T"] for s in steps if s["ok"]]
    return {"impl": impl, "max_t": max(ok) if ok else None, "stopped_by": stop, "steps": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["fla", "triton", "sdpa"], choices=["fla", "triton", "sdpa", "torch"])
    parser.add_argument("--start-t", type=int, default=8192)
    parser.add_argument("--max-t", type=int, default=524288)
    parser.add_argument("--max-step-s", type=float, default=12.0)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    C.add_common_args(parser, "gpu_max_seqlen")
    args = parser.parse_args()
    device = C.pick_device(args)
    if args.tiny:
        args.impls = list(dict.fromkeys("torch" if i in ("fla", "triton") else i for i in args.impls))
        args.start_t, args.max_t, args.heads, args.dim = 128, 512, 2, 64
    if device.type != "cuda" and {"fla", "triton"} & set(args.impls):
        raise SystemExit("the fla and triton kernels need CUDA; use --tiny (torch path) or --impls sdpa torch on CPU")
    meta = {**C.environment(device), "what": "one attention op, fwd+bwd (grads of all inputs), batch 1",
            "heads": args.heads, "dim": args.dim, "dtype": "bfloat16", "forget_gate": True,
            "max_t": args.max_t, "max_step_s": args.max_step_s, "tiny": args.tiny}
    results = [sweep(impl, args, device) for impl in args.impls]
    path = C.write_json(args, "gpu_max_seqlen", {"meta": meta, "results": results})

    lengths = sorted({s["T"] for r in results for s in r["steps"]})
    names = {"fla": "PaTH fla", "triton": "PaTH path-lm", "sdpa": "SDPA flash", "torch": "PaTH torch"}
    table = []
    for r in results:
        by_t = {s["T"]: s for s in r["steps"]}
        cells = []
        for T in lengths:
            s = by_t.get(T)
            if s is None or s["error"]:
                cells.append("-" if s is None else "OOM" if s["error"] == "OOM" else "error")
            else:
                peak = f"{s['peak_gib']:.2f} GiB / " if s["peak_gib"] is not None else ""
                cells.append(f"{peak}{s['seconds']:.2f} s")
        table.append([names[r["impl"]], C.fmt(r["max_t"], "d"), r["stopped_by"], *cells])
    print(f"\n# wrote {path}")
    print(f"# {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}; {meta['date']}")
    print(f"# {meta['what']}, {args.heads} heads x {args.dim}, bf16, forget gate on; cells: peak memory / time of "
          f"one fwd+bwd\n")
    print(C.markdown_table(["op", "max T", "stopped by", *[f"T={T // 1024}k" if T >= 1024 else f"T={T}"
                                                          for T in lengths]], table))


if __name__ == "__main__":
    main()
