"""CPU time of the exact PaTH attention op against causal scaled_dot_product_attention.

Forward and forward+backward, float32, batch 1, 8 heads x 64, T = 512 / 1024 / 2048 (forget gate on),
median of several runs, in one process. Prints a table and writes JSON (--json).

    python benchmarks/cpu_attention.py [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from path_lm.path_ops import path_attention_torch


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(T: int, heads: int, dim: int, requires_grad: bool):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, heads, dim, requires_grad=requires_grad) for _ in range(3))
    w = F.normalize(torch.randn(1, T, heads, dim), dim=-1).requires_grad_(requires_grad)
    beta = (2 * torch.rand(1, T, heads)).requires_grad_(requires_grad)
    g = F.logsigmoid(torch.randn(1, T, heads)).requires_grad_(requires_grad)
    return q, k, v, w, beta, g


def run(lengths, heads, dim, repeats, chunk_size):
    rows = []
    for T in lengths:
        q, k, v, w, beta, g = make_inputs(T, heads, dim, requires_grad=True)
        qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

        def path_fwd():
            with torch.no_grad():
                path_attention_torch(q, k, v, w, beta, g, chunk_size=chunk_size)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        def path_fwd_bwd():
            o, _ = path_attention_torch(q, k, v, w, beta, g, chunk_size=chunk_size)
            o.sum().backward()

        def sdpa_fwd_bwd():
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).sum().backward()

        row = {"T": T}
        for name, fn in [("path_fwd", path_fwd), ("sdpa_fwd", sdpa_fwd), ("path_fwd_bwd", path_fwd_bwd), ("sdpa_fwd_bwd", sdpa_fwd_bwd)]:
            row[name + "_ms"] = 1e3 * median_time(fn, repeats)
        row["fwd_ratio"] = row["path_fwd_ms"] / row["sdpa_fwd_ms"]
        row["fwd_bwd_ratio"] = row["path_fwd_bwd_ms"] / row["sdpa_fwd_bwd_ms"]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.lengths, args.heads, args.dim, args.repeats, args.chunk_size)
    meta = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch": 1, "heads": args.heads, "dim": args.dim, "dtype": "float32", "forget_gate": True,
        "chunk_size": args.chunk_size,
    }
    print(f"# {meta['device']}, torch {meta['torch']}, B=1, {args.heads} heads x {args.dim}, float32, gate on")
    print(f"{'T':>6} | {'PaTH fwd ms':>11} {'SDPA fwd ms':>11} {'ratio':>6} | {'PaTH f+b ms':>11} {'SDPA f+b ms':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['T']:>6} | {r['path_fwd_ms']:>11.2f} {r['sdpa_fwd_ms']:>11.2f} {r['fwd_ratio']:>5.2f}x | "
              f"{r['path_fwd_bwd_ms']:>11.2f} {r['sdpa_fwd_bwd_ms']:>11.2f} {r['fwd_bwd_ratio']:>5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
