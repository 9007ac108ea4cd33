"""The linear layers of a decoding step at a few rows: path-lm's small_linear kernel against the matrix kernel
that F.linear runs (cuBLAS), both replayed from CUDA graphs (GPU time only, as in a compiled decoding step).

Per model shape (hidden, intermediate, kv width, rank of w, heads) and rows M (batch x 1 token), the step's
products: the joint input projection (q, k, v, w's first factor, beta, gate: one product with bias), o_proj,
the gated MLP (F.linear twice, then silu * up, against one small_linear launch) and down_proj. "sum" adds a
step's four items; the last column is cuBLAS's time over small_linear's. Bandwidth: the weights' bytes over
small_linear's time.

    python benchmarks/gpu_small_linear.py [--rows 1 2 4 8 16 32] [--shapes 768x2048 2048x5632]
"""

from __future__ import annotations

import argparse
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
    print(f"# {env['device']}; torch {env['torch']}; {dtype}; CUDA graphs of 10 calls, median", flush=True)
    records, table = [], []
    for hidden, intermediate in shapes:
        heads = hidden // 64 or 1
        joint = 3 * hidden + 32 + heads + heads  # q, k, v, w's first factor, beta, gate
        gen = torch.Generator(device=device).manual_seed(0)

        def weight(n, k):
            return torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k**0.5

        w_joint, b_joint = weight(joint, hidden), torch.randn(joint, device=device, dtype=dtype, generator=gen)
        w_o, w_gate, w_up, w_down = weight(hidden, hidden), weight(intermediate, hidden), weight(intermediate, hidden), \
            weight(hidden, intermediate)
        for M in rows_list:
            x = torch.randn(M, hidden, device=device, dtype=dtype, generator=gen)
            h = torch.randn(M, intermediate, device=device, dtype=dtype, generator=gen)
            items = {
                "inputs": (w_joint.numel(), lambda: F.linear(x, w_joint, b_joint), lambda: small_linear(x, w_joint, b_joint)),
                "o_proj": (w_o.numel(), lambda: F.linear(x, w_o), lambda: small_linear(x, w_o)),
                "gated MLP": (2 * w_gate.numel(), lambda: F.silu(F.linear(x, w_gate)) * F.linear(x, w_up),
                              lambda: small_linear(x, w_gate, up=w_up)),
                "down_proj": (w_down.numel(), lambda: F.linear(h, w_down), lambda: small_linear(h, w_down)),
            }
            totals = [0.0, 0.0]
            for name, (numel, reference, ours) in items.items():
                torch.testing.assert_close(ours().float(), reference().float(), atol=3e-2, rtol=3e-2)
                ref_ms, our_ms = C.graph_ms(reference, device), C.graph_ms(ours, device)
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
