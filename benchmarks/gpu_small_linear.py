"""The linear layers of a decoding step at a few rows: path-lm's small_linear kernel against the matrix kernel
that F.linear runs (cuBLAS), both replayed from CUDA graphs (GPU time only, as in a compiled decoding step).

Per model shape (hidden, intermediate, kv width, rank of w, heads) and rows M (batch x 1 token), the step's
products: the joint input projection (q, k, v, w's first factor, beta, gate: one product with bias), o_proj,
the gated MLP (F.linear twice, then silu * up, against one small_linear launch), down_proj and the LM head
(vocabulary 32000). "sum" adds a layer's four items; the last column is cuBLAS's time over small_linear's.
Bandwidth: the weights' bytes over small_linear's time. Each call reads its weights from memory, not from
the L2 cache, as a model's step does: the graph cycles through copies of them larger than twice the L2.

    python benchmarks/gpu_small_linear.py [--rows 1 2 4 8 16 32] [--shapes 768x2048 2048x5632]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import _common as C
import torch
import torch.nn.functional as F


def parse_shape(text: str) -> tuple[int, int]:
    hidden, intermediate = text.lower().split("x")
    return int(hidden), int(intermediate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(768, 2048), (2048, 5632)],
                        help="hidden x intermediate (heads of 64, as many kv heads as heads, w of rank 32)")
    C.add_common_args(parser, "gpu_small_linear")
    args = parser.parse_args(argv)
    device = C.pick_device(args)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
    from path_lm.path_triton import small_linear

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(64, 128)] if args.tiny else args.shapes
    rows_list = [1, 2] if args.tiny else args.rows
    env = C.environment(device)
    print(f"# {env['device']}; torch {env['torch']}; {dtype}; CUDA graphs, weights read from memory, median",
          flush=True)
    records, table = [], []
    for hidden, intermediate in shapes:
        heads = hidden // 64 or 1
        joint = 3 * hidden + 32 + heads + heads  # q, k, v, w's first factor, beta, gate
        gen = torch.Generator(device=device).manual_seed(0)

        def weight(n, k):
            return torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k**0.5

        l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0

        def copies(*shapes):
            """Enough copies of weights of these shapes that cycling through them leaves the L2 cold."""
            numel = sum(n * k for n, k in shapes)
            count = max(1, math.ceil(2 * l2 / (numel * torch.finfo(dtype).bits // 8)))
            return [[weight(n, k) for n, k in shapes] for _ in range(count)], numel

        joint_w, joint_numel = copies((joint, hidden))
        b_joint = torch.randn(joint, device=device, dtype=dtype, generator=gen)
        o_w, o_numel = copies((hidden, hidden))
        mlp_w, mlp_numel = copies((intermediate, hidden), (intermediate, hidden))
        down_w, down_numel = copies((hidden, intermediate))
        head_w, head_numel = copies((512 if args.tiny else 32000, hidden))
        for M in rows_list:
            x = torch.randn(M, hidden, device=device, dtype=dtype, generator=gen)
            h = torch.randn(M, intermediate, device=device, dtype=dtype, generator=gen)
            items = {  # name: (weights per call, [(reference, ours) per copy of the weights])
                "inputs": (joint_numel, [(lambda w=w: F.linear(x, w, b_joint), lambda w=w: small_linear(x, w, b_joint))
                                         for w, in joint_w]),
                "o_proj": (o_numel, [(lambda w=w: F.linear(x, w), lambda w=w: small_linear(x, w)) for w, in o_w]),
                "gated MLP": (mlp_numel, [(lambda g=g, u=u: F.silu(F.linear(x, g)) * F.linear(x, u),
                                           lambda g=g, u=u: small_linear(x, g, up=u)) for g, u in mlp_w]),
                "down_proj": (down_numel, [(lambda w=w: F.linear(h, w), lambda w=w: small_linear(h, w)) for w, in down_w]),
                "LM head": (head_numel, [(lambda w=w: F.linear(x, w), lambda w=w: small_linear(x, w)) for w, in head_w]),
            }
            totals = [0.0, 0.0]
            for name, (numel, calls) in items.items():
                torch.testing.assert_close(calls[0][1]().float(), calls[0][0]().float(), atol=3e-2, rtol=3e-2)
                ref_ms, our_ms = (C.graph_ms(lambda i=i: [c[i]() for c in calls], device, calls=1) / len(calls)
                                  for i in (0, 1))
                if name != "LM head":
                    totals = [totals[0] + ref_ms, totals[1] + our_ms]
                records.append(dict(hidden=hidden, intermediate=intermediate, rows=M, item=name, cublas_ms=ref_ms,
                                    small_linear_ms=our_ms))
                gbs = numel * 2 / (our_ms * 1e-3) / 1e9
                table.append([f"{hidden}x{intermediate}", M, name, f"{ref_ms * 1e3:.2f}", f"{our_ms * 1e3:.2f}",
                              f"{gbs:.0f}", C.ratio(ref_ms / our_ms)])
            table.append([f"{hidden}x{intermediate}", M, "sum", f"{totals[0] * 1e3:.2f}", f"{totals[1] * 1e3:.2f}", "",
                          C.ratio(totals[0] / totals[1])])
    print(C.markdown_table(["shape", "rows", "item", "F.linear us", "small_linear us", "GB/s", "speed-up"], table))
    print(f"# wrote {C.write_json(args, 'gpu_small_linear', dict(environment=env, records=records))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
