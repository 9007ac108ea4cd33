"""GPU time of the PaTH attention op against FlashAttention (SDPA), forward and forward+backward.

PaTH: path-lm's Triton kernel (`path_attention_triton`; `--blocks 64:4 64:16` adds rows for other chunk and
superblock sizes), fla's (`path_attention_fla`) and, at T <= --torch-max-t, the exact PyTorch path
(`path_attention_torch`). Baseline: `scaled_dot_product_attention(is_causal=True)` restricted to the
flash backend, layout [B, H, T, D]. bf16 q/k/v, forget gate on (w, beta, g in float32 as the model feeds
them), B * T = 16k tokens, T = 2k/4k/8k/16k, 16 heads x 64 and 8 heads x 128. Backward takes gradients of
every input. Median of triton.testing.do_bench. "host ms": median time until the call returns with the GPU
idle at the call (Python and launches; the GPU runs on after it): where it exceeds the GPU time, the call
is bound by the host.

TFLOP/s use the causal attention count for BOTH ops (so they compare): fwd = 4 * B * H * T^2 * D / 2,
fwd+bwd = 3.5 x fwd. PaTH does more arithmetic than that (about 2x); its TFLOP/s are attention-equivalent.

    python benchmarks/gpu_attention.py [--out-dir DIR] [--json PATH] [--tiny]
"""

from __future__ import annotations

import argparse

import _common as C
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from path_lm.path_ops import path_attention_fla, path_attention_torch, path_attention_triton

FLOP_NOTE = "causal attention FLOPs for all ops: fwd 4*B*H*T^2*D/2, fwd+bwd 3.5x fwd"


def make_inputs(B, T, H, D, device, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
    q, k, v = (rand(B, T, H, D).to(dtype) for _ in range(3))  # [B, T, H, D]
    w = F.normalize(rand(B, T, H, D), dim=-1)
    beta = 2 * torch.sigmoid(rand(B, T, H))
    g = F.logsigmoid(rand(B, T, H) + 3)  # mostly-open gate, as after training
    path = [x.requires_grad_() for x in (q, k, v, w, beta, g)]
    sdpa = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]  # [B, H, T, D]
    return path, sdpa


def measure(fwd, inputs, device, args):
    """(fwd ms, fwd+bwd ms, fwd host ms, fwd+bwd host ms); 'OOM' (or the error) where a call failed."""
    out = fwd()
    grad_out = torch.randn_like(out)
    del out

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, grad_out)

    results, host = [], []
    for fn in (fwd_only, fwd_bwd):
        try:
            results.append(C.bench_ms(fn, device, args.warmup_ms, args.rep_ms))
            host.append(C.host_ms(fn, device))
        except Exception as err:
            results.append(C.failure(err))
            host.append(None)
        C.free(device)  # outside `except`: the traceback would keep the failed call's tensors alive
    return results + host


def run(args, device):
    rows = []
    for H, D in args.heads_dims:
        for T in args.lengths:
            B = max(1, args.tokens // T)
            flops = 4 * B * H * T * T * D / 2
            path, sdpa = make_inputs(B, T, H, D, device)
            impls = [("SDPA flash", lambda sdpa=sdpa: _sdpa(*sdpa), sdpa)]
            if device.type == "cuda":
                impls.append(("PaTH path-lm", lambda path=path: path_attention_triton(*path)[0], path))
                for chunk, per_sb in args.blocks:
                    impls.append((f"PaTH path-lm, chunks {chunk} x {per_sb}", lambda path=path, c=chunk, n=per_sb:
                                  path_attention_triton(*path, chunk_size=c, chunks_per_superblock=n)[0], path))
                if args.keep_preparation:
                    impls.append(("PaTH path-lm, kept preparation",
                                  lambda path=path: path_attention_triton(*path, keep_preparation=True)[0], path))
                impls.append(("PaTH fla", lambda path=path: path_attention_fla(*path)[0], path))
            if T <= args.torch_max_t:
                impls.append(("PaTH torch", lambda path=path: path_attention_torch(*path)[0], path))
            base = None
            for name, fwd, inputs in impls:
                try:
                    fwd_ms, fb_ms, fwd_host, fb_host = measure(fwd, inputs, device, args)
                except Exception as err:  # the first call failed
                    fwd_ms = fb_ms = C.failure(err)
                    fwd_host = fb_host = None
                C.free(device)
                row = {"heads": H, "dim": D, "B": B, "T": T, "impl": name, "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms,
                       "fwd_host_ms": fwd_host, "fwd_bwd_host_ms": fb_host}
                for key, count in (("fwd", flops), ("fwd_bwd", 3.5 * flops)):
                    ms = row[f"{key}_ms"]
                    row[f"{key}_tflops"] = count / (ms * 1e-3) / 1e12 if isinstance(ms, float) else None
                    ok = base is not None and isinstance(ms, float) and isinstance(base[f"{key}_ms"], float)
                    row[f"{key}_vs_sdpa"] = ms / base[f"{key}_ms"] if ok else None
                base = base or row
                rows.append(row)
                if name == "PaTH fla":  # how much faster path-lm's kernel is than fla's, same shapes
                    ours = next(r for r in rows[::-1] if r["impl"] == "PaTH path-lm")
                    for key in ("fwd", "fwd_bwd"):
                        both = isinstance(ours[f"{key}_ms"], float) and isinstance(row[f"{key}_ms"], float)
                        ours[f"{key}_fla_speedup"] = row[f"{key}_ms"] / ours[f"{key}_ms"] if both else None
                print(f"# {name} H{H}xD{D} B{B} T{T}: fwd {C.fmt(fwd_ms)} ms, fwd+bwd {C.fmt(fb_ms)} ms (host "
                      f"{C.fmt(fwd_host)} / {C.fmt(fb_host)} ms)", flush=True)
            del path, sdpa, impls, fwd, inputs
            C.free(device)
    return rows


def _sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="B * T")
    parser.add_argument("--heads-dims", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                        default=[(16, 64), (8, 128)], help="e.g. 16x64 8x128")
    parser.add_argument("--torch-max-t", type=int, default=2048, help="exact torch path only at T <= this")
    parser.add_argument("--keep-preparation", action="store_true",
                        help="also time path-lm's kernel with keep_preparation=True (no rerun in the backward)")
    parser.add_argument("--blocks", nargs="+", default=[], metavar="C:NB",
                        type=lambda s: tuple(map(int, s.split(":"))),
                        help="also time path-lm's kernel with these chunk_size:chunks_per_superblock (default 64:8)")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    C.add_common_args(parser, "gpu_attention")
    args = parser.parse_args()
    if args.tiny:
        args.lengths, args.tokens, args.heads_dims, args.torch_max_t = [64, 128], 256, [(2, 64), (1, 128)], 128
    device = C.pick_device(args)
    meta = {**C.environment(device), "dtype": "bfloat16", "forget_gate": True, "flops": FLOP_NOTE,
            "timing": f"triton do_bench median (warmup {args.warmup_ms} ms, rep {args.rep_ms} ms)"
            if device.type == "cuda" else "perf_counter median of 3", "tiny": args.tiny}
    rows = run(args, device)
    path = C.write_json(args, "gpu_attention", {"meta": meta, "rows": rows})

    print(f"\n# wrote {path}")
    print(f"# {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}; {meta['date']}")
    print(f"# bf16, forget gate on, B*T = {args.tokens}; TFLOP/s: {FLOP_NOTE}; ratios: time / SDPA time\n")
    table = [[f"{r['heads']}x{r['dim']}", f"{r['B']}x{r['T']}", r["impl"],
              C.fmt(r["fwd_ms"], ".3f"), C.fmt(r["fwd_tflops"], ".0f"), C.ratio(r["fwd_vs_sdpa"], ".1f"),
              C.fmt(r["fwd_bwd_ms"], ".3f"), C.fmt(r["fwd_bwd_tflops"], ".0f"), C.ratio(r["fwd_bwd_vs_sdpa"], ".1f"),
              C.ratio(r.get("fwd_fla_speedup"), ".1f"), C.ratio(r.get("fwd_bwd_fla_speedup"), ".1f"),
              f"{C.fmt(r['fwd_host_ms'])} / {C.fmt(r['fwd_bwd_host_ms'])}"]
             for r in rows]
    print(C.markdown_table(["heads x dim", "B x T", "op", "fwd ms", "fwd TFLOP/s", "fwd / SDPA",
                            "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd / SDPA",
                            "fla / path-lm fwd", "fla / path-lm fwd+bwd", "host ms fwd / fwd+bwd"], table))


if __name__ == "__main__":
    main()
