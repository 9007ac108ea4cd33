"""The decoding kernel alone (`path_triton.decode_attention`), one step of a compiled decoding loop: slot on the
device, the new token written by the kernel, gates and padding mask on, frames where the model keeps them.
Times every launch configuration given (the default table's first), beside PyTorch SDPA on bf16 keys and values
with a mask (what Llama's static cache runs) and a bare Triton flash-decoding loop (scores and weighted values
only: no update, frames, gates or mask), and prints the fraction of the copy bandwidth each reaches.

Key layouts: "float32" (every key rewritten per step: the model's layout below `cache_path.FRAMES_MIN_KEYS`
keys), "float32+frames", "mixed" (bf16 framed keys and a float32 ring of the window: the model's default
above it); "auto" picks as the model does. `--graph` times 10 calls captured in a CUDA graph (GPU time only;
small caches are otherwise bound by the host's launches). `--compare PATH` loads another copy of
path_triton.py (an older version) and times its default launch too, after checking that both give the same
outputs and caches at a plain step and at a fold step.

    python benchmarks/gpu_decode_kernel.py --shapes 32x1096 8x8264 --graph [--layouts auto] [--compare old.py]
    python benchmarks/gpu_decode_kernel.py --tiny    # CPU: Triton's interpreter, logic only
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import _common as C
import torch
import torch.nn.functional as F

LAUNCHES = [(16, 1, 16), (32, 1, 16), (32, 1, 32), (32, 2, 8), (32, 2, 16), (64, 1, 16), (64, 2, 8), (64, 4, 8),
            (32, 2, 16, 128)]


def parse_shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, "gpu_decode_kernel")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(32, 1096), (8, 8264), (32, 8264)],
                        help="BATCHxSLOTS cases (static caches of context + 72 slots)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layouts", nargs="+", default=["auto"], choices=["auto", "float32", "float32+frames", "mixed"])
    parser.add_argument("--launches", nargs="*", default=None, help="e.g. 64,1,16 32,2,16,128 (default: a sweep)")
    parser.add_argument("--graph", action="store_true", help="time 10 calls captured in a CUDA graph")
    parser.add_argument("--compare", default=None, help="path of another path_triton.py to time against")
    args = parser.parse_args(argv)
    device = C.pick_device(args)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
    import triton
    import triton.language as tl

    from path_lm import cache_path
    from path_lm import path_triton as current

    if args.tiny:
        args.shapes, args.heads, args.head_dim = [(2, 200), (1, 150)], 2, 16
        args.layouts = ["float32", "float32+frames", "mixed"]
    launches = [tuple(int(x) for x in spec.split(",")) for spec in args.launches] if args.launches is not None else LAUNCHES
    if args.tiny:
        launches = [(16, 1, 16)]
    modules = [("path-lm", current)]
    if args.compare:
        spec = importlib.util.spec_from_file_location("path_triton_compared", args.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        modules.append(("compared", other))

    @triton.jit
    def bare_decode(Q, K, V, OP, L, split_len, D: tl.constexpr, BN: tl.constexpr):
        i_s, i_bh = tl.program_id(0), tl.program_id(1)
        od, on = tl.arange(0, D), tl.arange(0, BN)
        q = tl.load(Q + i_bh * D + od).to(tl.float32)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([1, D], tl.float32)
        k_base, v_base = K + i_bh.to(tl.int64) * L * D, V + i_bh.to(tl.int64) * L * D
        start = i_s * split_len
        for off in range(start, tl.minimum(start + split_len, L), BN):
            cols = off + on
            rows = cols.to(tl.int64)[:, None] * D + od[None, :]
            k = tl.load(k_base + rows, mask=(cols < L)[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_base + rows, mask=(cols < L)[:, None], other=0.0).to(tl.float32)
            s = tl.where((cols < L)[None, :], tl.sum(q[None, None, :] * k[None, :, :], axis=2), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        tl.store(OP + (i_bh * tl.num_programs(0) + i_s) * D + od[None, :], acc / l_i[:, None])

    def timed(fn) -> float:
        """ms per call."""
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        if args.graph:
            return C.graph_ms(fn, device)
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    bandwidth = C.copy_bandwidth(device) if device.type == "cuda" else None
    env = C.environment(device)
    print(f"# {env['device']}; torch {env['torch']}, triton {triton.__version__}; copy bandwidth "
          f"{(bandwidth or 0) / 1e9:.0f} GB/s; {'CUDA graphs' if args.graph else 'eager calls'}", flush=True)
    H, D = args.heads, args.head_dim
    rows, records = [], []
    for B, L in args.shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        randn = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
        q, values = randn(B, H, D).bfloat16(), randn(B, H, L, D).bfloat16()
        w, beta = F.normalize(randn(B, H, D), dim=-1).bfloat16(), torch.rand(B, H, device=device, generator=gen).bfloat16()
        gates = -torch.rand(B, H, L, device=device, generator=gen).cumsum(-1) * 1e-3
        key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        new_token = (q, q, torch.zeros(B, H, device=device), torch.ones(B, dtype=torch.bool, device=device))
        slot = L - 67  # a step that is not a fold step (72 slots past the prompt, 5 of them decoded)
        n = torch.tensor(slot, device=device)
        frames_pay = cache_path.frames_pay_off(B, H, L)
        for layout in args.layouts:
            if layout == "auto":
                layout = "mixed" if frames_pay else "float32"
            key_dtype = torch.bfloat16 if layout == "mixed" else torch.float32
            state = dict(keys=(0.3 * randn(B, H, L, D)).to(key_dtype), values=values, gates=gates, key_mask=key_mask,
                         frames=None if layout == "float32" else torch.linalg.qr(randn(B, 2, H, D, D))[0].contiguous(),
                         ring=None)
            if layout == "mixed":
                state["ring"] = 0.3 * randn(B, H, 2 * cache_path.FRAME_WINDOW, D)

            def step(module, launch, at=None, buffers=state):
                n.fill_(slot if at is None else at)
                return module.decode_attention(
                    q, buffers["keys"], buffers["values"], w, beta, n, gates=buffers["gates"], key_mask=buffers["key_mask"],
                    frames=buffers["frames"], ring=buffers["ring"], window=cache_path.FRAME_WINDOW, scale=D**-0.5,
                    out_dtype=torch.bfloat16, launch=launch, new_token=new_token)

            agree = "-"
            if len(modules) > 1:  # same outputs and caches from both versions, plain step and fold step
                worst = 0.0
                for at in (slot, slot // cache_path.FRAME_WINDOW * cache_path.FRAME_WINDOW):
                    results = []
                    for _, module in modules:
                        copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                        results.append([step(module, None, at, copy)] + [v for v in copy.values() if v is not None])
                    worst = max([worst] + [(a.float() - b.float()).abs().max().item() for a, b in zip(*results)])
                agree = f"{worst:.1e}"
            default = current._decode_launch(D, D, 1, B * H * L)
            cases = [(name, module, None) for name, module in modules]
            cases += [("path-lm", current, launch) for launch in launches if launch != default]
            floor_bytes = B * H * L * (D * key_dtype.itemsize * (1 if state["frames"] is not None else 2) + D * 2 + 4)
            for name, module, launch in cases:
                try:
                    ms = timed(lambda: step(module, launch))
                except Exception as err:  # a launch the kernel refuses (window and tile) or runs out of
                    print(f"# {name} {launch}: {C.failure(err)}", flush=True)
                    continue
                label = f"{name} {launch or ('default ' + str(default) if module is current else 'default')}"
                records.append(dict(batch=B, slots=L, layout=layout, kernel=label, ms=ms))
                rows.append([f"{B} x {L}", layout, label, f"{ms * 1e3:.1f}", C.fmt(bandwidth and 100 * floor_bytes / bandwidth / (ms * 1e-3), ".0f"), agree])
        keys_bf16 = randn(B, H, L, D).bfloat16()
        mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
        ms = timed(lambda: F.scaled_dot_product_attention(q[:, :, None], keys_bf16, values, attn_mask=mask))
        sdpa_bytes = B * H * L * D * 4
        rows.append([f"{B} x {L}", "bf16", "SDPA (mask)", f"{ms * 1e3:.1f}", C.fmt(bandwidth and 100 * sdpa_bytes / bandwidth / (ms * 1e-3), ".0f"), "-"])
        records.append(dict(batch=B, slots=L, layout="bf16", kernel="SDPA", ms=ms))
        for BN, warps, per_sm in [(64, 2, 8), (32, 2, 16), (32, 1, 16)]:
            BN = min(BN, triton.next_power_of_2(L))
            tiles = triton.cdiv(L, BN)
            splits = max(1, min(tiles, triton.cdiv(per_sm * current._sm_count(device), B * H)))
            split_len = triton.cdiv(tiles, splits) * BN
            splits = triton.cdiv(L, split_len)
            partial = torch.empty(B * H * splits, D, device=device)
            ms = timed(lambda: bare_decode[(splits, B * H)](q, keys_bf16, values, partial, L, split_len, D=D, BN=BN, num_warps=warps))
            rows.append([f"{B} x {L}", "bf16", f"bare loop ({BN}, {warps}, {per_sm})", f"{ms * 1e3:.1f}",
                         C.fmt(bandwidth and 100 * sdpa_bytes / bandwidth / (ms * 1e-3), ".0f"), "-"])
            records.append(dict(batch=B, slots=L, layout="bf16", kernel=f"bare ({BN}, {warps}, {per_sm})", ms=ms))
        keys_bf16 = values = state = None  # freed before the next shape
        C.free(device)
    print(C.markdown_table(["B x slots", "keys", "kernel (tile, warps, programs per SM[, registers])", "us per call",
                            "% of copy bandwidth", "max diff vs --compare"], rows))
    print(f"# wrote {C.write_json(args, 'gpu_decode_kernel', dict(environment=env, graph=args.graph, records=records))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
