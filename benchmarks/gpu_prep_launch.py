"""Launch sweep of the Triton op's per-chunk kernels, and the op's kernel profile.

The per-chunk kernels of `path_triton` (the chunk inverses and the chunk kernel of the preparation, the
carries' edge gradients, and the four kernels of the preparation's backward) take num_warps / num_stages from
`path_triton.PREP_LAUNCH` (per kernel and head dim; `_PREP_LAUNCH` where it has no entry). For each shape
this script

1. profiles one forward+backward of `path_attention_triton` (bf16, forget gate on, every input with a
   gradient) at the current table: every kernel's GPU time per call of the op (torch.profiler, mean of
   --iters calls), so the table shows where the op's time goes;
2. sets every per-chunk kernel to each (num_warps, num_stages) of --warps x --stages in turn and profiles
   again: each kernel's time under each launch, in one run per launch (a launch a kernel cannot compile
   with, such as too much shared memory, is retried kernel by kernel and marked "failed");
3. prints, per kernel, its time at the table's launch and at each swept one, the fastest, and the op's
   forward+backward time (do_bench median) at the table's launches and at each kernel's fastest.

Fill `PREP_LAUNCH` from the "fastest" column where it beats the table by more than the run's noise.

`--documents N` runs every shape on packed documents of N tokens (segment ids) rather than one per row.

    python benchmarks/gpu_prep_launch.py [--shapes 2x4096x16x64 4x4096x8x128] [--warps 2 4 8] [--stages 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re

import _common as C
import torch

KERNELS = {"solve": "_chunk_solve_kernel", "chunk": "_prep_chunk_kernel", "edges": "_edge_grads_kernel",
           "queries": "_chunk_bwd_queries_kernel", "keys": "_chunk_bwd_keys_kernel",
           "inverse": "_chunk_bwd_inverse_kernel", "key_side": "_chunk_bwd_key_side_kernel"}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    B, T, H, D = (int(x) for x in text.split("x"))
    return B, T, H, D


def short_name(kernel: str) -> str:
    """A PyTorch kernel's name without its template arguments: the kernel and its functor."""
    if len(kernel) <= 60:
        return kernel
    base = kernel.removeprefix("void ").split("<")[0].split("(")[0].split("::")[-1]
    functor = re.search(r"native::(?:\(anonymous namespace\)::)?(\w*(?:Functor|_kernel_cuda|_kernel_impl)\w*)", kernel)
    return f"{base} [{functor.group(1)}]" if functor else base


def kernel_us(step, device, iters: int) -> dict[str, float]:
    """Microseconds of GPU time per step() of every kernel name (on CPU: {"step": wall time})."""
    if device.type != "cuda":
        return {"step": 1e3 * C.bench_ms(step, device)}
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize(device)
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = event.cuda_time_total
        if total > 0:
            times[event.key] = times.get(event.key, 0.0) + total / iters
    return times


def sweep_shape(shape, args, device, path_triton, path_attention_triton, make_inputs):
    B, T, H, D = shape
    path, _ = make_inputs(B, T, H, D, device)
    grad_out = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    segment_ids = None
    if args.documents:  # packed documents of this many tokens, the first one half as long
        segment_ids = ((torch.arange(T, device=device) + args.documents // 2) // args.documents).expand(B, T)

    def step():
        torch.autograd.grad(path_attention_triton(*path, segment_ids=segment_ids)[0], path, grad_out)

    saved = dict(path_triton.PREP_LAUNCH)
    table = {name: path_triton._prep_launch(name, D) for name in KERNELS}
    profile = kernel_us(step, device, args.iters)
    swept = {}
    for warps, stages in itertools.product(args.warps, args.stages):
        launch = dict(num_warps=warps, num_stages=stages)
        try:
            path_triton.PREP_LAUNCH.update({(name, D): launch for name in KERNELS})
            times = kernel_us(step, device, args.iters)
            swept[(warps, stages)] = {name: times.get(kernel) for name, kernel in KERNELS.items()}
        except Exception:  # one kernel cannot take this launch: the others one at a time
            swept[(warps, stages)] = {}
            for name, kernel in KERNELS.items():
                path_triton.PREP_LAUNCH.clear()
                path_triton.PREP_LAUNCH.update(saved)
                path_triton.PREP_LAUNCH[(name, D)] = launch
                try:
                    swept[(warps, stages)][name] = kernel_us(step, device, args.iters).get(kernel)
                except Exception as err:
                    swept[(warps, stages)][name] = "failed: " + C.failure(err)[:60]
        finally:
            path_triton.PREP_LAUNCH.clear()
            path_triton.PREP_LAUNCH.update(saved)
        C.free(device)
        print(f"# {B}x{T}x{H}x{D} warps {warps} stages {stages}: "
              + ", ".join(f"{n} {C.fmt(t, '.1f')}" for n, t in swept[(warps, stages)].items()), flush=True)

    fastest = {}
    for name, kernel in KERNELS.items():
        timed = [(t[name], launch) for launch, t in swept.items() if isinstance(t.get(name), float)]
        if timed:
            best_us, (warps, stages) = min(timed)
            fastest[name] = dict(us=best_us, launch=dict(num_warps=warps, num_stages=stages))
    op_ms = C.bench_ms(step, device)
    path_triton.PREP_LAUNCH.update({(name, D): best["launch"] for name, best in fastest.items()})
    try:
        op_fastest_ms = C.bench_ms(step, device)
    finally:
        path_triton.PREP_LAUNCH.clear()
        path_triton.PREP_LAUNCH.update(saved)
    C.free(device)
    return dict(shape=list(shape), table={n: dict(launch) for n, launch in table.items()}, profile_us=profile,
                swept={f"{w}x{s}": t for (w, s), t in swept.items()}, fastest=fastest, op_ms=op_ms,
                op_fastest_ms=op_fastest_ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(2, 4096, 16, 64), (4, 4096, 8, 128)],
                        help="BxTxHxD")
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=3, help="profiled op calls per launch")
    parser.add_argument("--documents", type=int, default=0, metavar="TOKENS",
                        help="packed documents of this many tokens (segment ids) instead of one per row")
    C.add_common_args(parser, "gpu_prep_launch")
    args = parser.parse_args(argv)
    device = C.pick_device(args)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
    from gpu_attention import make_inputs

    from path_lm import path_triton
    from path_lm.path_ops import path_attention_triton

    if args.tiny:
        args.shapes, args.warps, args.stages, args.iters = [(1, 160, 2, 16)], [4], [1], 1
    results = [sweep_shape(shape, args, device, path_triton, path_attention_triton, make_inputs)
               for shape in args.shapes]
    meta = {**C.environment(device), "dtype": "bfloat16", "forget_gate": True, "iters": args.iters,
            "documents": args.documents or None}
    path = C.write_json(args, "gpu_prep_launch", {"meta": meta, "results": results})

    print(f"\n# wrote {path}")
    print(f"# {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}")
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        total = sum(r["profile_us"].values())
        print(f"\n# {shape}: kernels of one forward+backward at the table's launches (us per op call, "
              f"{total:.0f} in all)")
        rows = [[short_name(name), f"{us:.1f}", f"{100 * us / total:.1f}"]
                for name, us in sorted(r["profile_us"].items(), key=lambda kv: -kv[1])]
        print(C.markdown_table(["kernel", "us", "%"], rows))
        print(f"\n# {shape}: per-chunk kernels, us per op call, by launch (warps x stages)")
        launches = list(r["swept"])
        rows = []
        for name, kernel in KERNELS.items():
            launch = r["table"][name]
            best = r["fastest"].get(name)
            rows.append([name, f"{launch['num_warps']}x{launch['num_stages']}",
                         C.fmt(r["profile_us"].get(kernel), ".1f"),
                         *(C.fmt(r["swept"][x].get(name), ".1f") for x in launches),
                         f"{best['launch']['num_warps']}x{best['launch']['num_stages']}" if best else "-"])
        print(C.markdown_table(["kernel", "table launch", "us at table", *launches, "fastest"], rows))
        print(f"# {shape}: op forward+backward {r['op_ms']:.3f} ms at the table's launches, "
              f"{r['op_fastest_ms']:.3f} ms at each kernel's fastest")


if __name__ == "__main__":
    main()
