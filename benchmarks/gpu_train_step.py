"""Training-step throughput and peak memory: a ~350M PaTH model against transformers' Llama of the same shape.

PaTHForCausalLM (hidden 1024, 24 layers, 16 heads x 64, vocab 32000, forget gate on; one row per attention
backend in --backends: "triton" (path-lm's kernels), "fla")
vs LlamaForCausalLM (SDPA attention, RoPE, same hidden/layers/heads/vocab, intermediate_size equal to the
PaTH config's, untied embeddings in both). float32 parameters, bf16 autocast, loss from `labels` (the
models' own cross-entropy), loss.backward(), fused AdamW step, zero_grad(set_to_none). Activation
checkpointing off. Batch 2 x 4096 tokens (the same random batch every step), a few warm-up steps, then
timed steps (CUDA events per step; tokens/s from the median step). Peak memory: max_memory_allocated over
the timed steps (weights, gradients and AdamW state included).

--profile prints torch.profiler's table (time per kernel) of one more step per model after the timed ones.

    python benchmarks/gpu_train_step.py [--batch 2] [--seq 4096] [--steps 8] [--backends triton fla] [--profile] [--out-dir DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from path_lm import PaTHConfig, PaTHForCausalLM, path_ops


def build_configs(args, backends):
    path_cfgs = {
        f"PaTH ({backend})": PaTHConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
            use_forget_gate=True, attn_backend=backend.removesuffix("-kept"), tie_word_embeddings=False, use_cache=False,
        )
        for backend in backends
    }
    path_cfg = next(iter(path_cfgs.values()))
    llama_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=path_cfg.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        hidden_act="silu", rms_norm_eps=path_cfg.norm_eps, max_position_embeddings=max(args.seq, 4096),
        tie_word_embeddings=path_cfg.tie_word_embeddings, use_cache=False, attn_implementation="sdpa",
    )
    return {**{name: (PaTHForCausalLM, cfg) for name, cfg in path_cfgs.items()}, "Llama": (LlamaForCausalLM, llama_cfg)}


def train_steps(model_cls, config, args, device):
    with torch.device(device):
        model = model_cls(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step().item() for _ in range(args.warmup)]
    C.free(device)  # peak memory from here on: the steady state, AdamW state allocated
    losses_timed = []
    times = C.time_calls_ms(lambda: losses_timed.append(step()), device, repeats=args.steps)
    losses += [x.item() for x in losses_timed]
    if args.profile:
        print(f"# profile of one step, {type(model).__name__} ({getattr(config, 'attn_backend', 'sdpa')})\n"
              + C.profile_table(step, device), flush=True)
    return {"params": params, "step_ms": times, "peak_gib": C.peak_gib(device), "first_loss": losses[0],
            "last_loss": losses[-1]}


def autocast_sdpa_dtype(device):
    """What SDPA receives under autocast when handed float32 (Llama's RoPE upcasts q and k to the
    residual dtype, float32 here): a record of whether the baseline ran its bf16 flash kernel."""
    x = torch.randn(1, 1, 8, 64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return str(F.scaled_dot_product_attention(x, x, x, is_causal=True).dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--models", nargs="+", default=["PaTH", "Llama"], choices=["PaTH", "Llama"])
    parser.add_argument("--backends", nargs="+", default=["triton", "fla"],
                        choices=["triton", "triton-kept", "fla", "torch", "auto"],
                        help="PaTH attention backends, one row each (the CPU and --tiny runs use torch); "
                             "triton-kept: path-lm's kernels keeping the forward's preparation for the backward")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of one step per model")
    C.add_common_args(parser, "gpu_train_step")
    args = parser.parse_args()
    device = C.pick_device(args)
    backends = args.backends if device.type == "cuda" and not args.tiny else ["torch"]
    if args.tiny:
        args.hidden, args.layers, args.heads, args.vocab, args.seq, args.warmup, args.steps = 128, 2, 2, 256, 128, 1, 2
    configs = build_configs(args, backends)
    names = [name for name in configs if name.split(" ")[0] in args.models]
    meta = {**C.environment(device), "batch": args.batch, "seq": args.seq, "hidden": args.hidden,
            "layers": args.layers, "heads": args.heads, "vocab": args.vocab,
            "intermediate_size": configs["Llama"][1].intermediate_size, "path_attn_backends": backends,
            "precision": "float32 params, bf16 autocast, " + ("fused AdamW" if device.type == "cuda" else "AdamW"),
            "gradient_checkpointing": False,
            "warmup_steps": args.warmup, "timed_steps": args.steps,
            "sdpa_dtype_under_autocast": autocast_sdpa_dtype(device), "tiny": args.tiny}

    results = {}
    for name in names:
        model_cls, config = configs[name]
        path_ops.KEEP_PREPARATION = name.endswith("-kept)")
        try:
            r = train_steps(model_cls, config, args, device)
            r["median_step_ms"] = statistics.median(r["step_ms"])
            r["tokens_per_s"] = args.batch * args.seq / (r["median_step_ms"] * 1e-3)
        except Exception as err:
            r = {"error": C.failure(err)}
        C.free(device)  # outside `except`, so the failed step's tensors are gone
        results[name] = r
        print(f"# {name}: " + (r.get("error") or f"{r['tokens_per_s']:,.0f} tokens/s, peak {C.fmt(r['peak_gib'])} GiB"),
              flush=True)
    path = C.write_json(args, "gpu_train_step", {"meta": meta, "results": results})

    base = results.get("Llama", {}).get("tokens_per_s")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", r["error"], "-", "-", "-", "-", "-"])
            continue
        rel = r["tokens_per_s"] / base if base else None
        rows.append([name, f"{r['params'] / 1e6:.1f}M", f"{r['median_step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
                     C.ratio(rel), C.fmt(r["peak_gib"], ".2f"), f"{r['first_loss']:.3f}", f"{r['last_loss']:.3f}"])
    print(f"\n# wrote {path}")
    print(f"# {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
          f"fla {meta['fla']}; {meta['date']}")
    print(f"# batch {args.batch} x {args.seq}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab "
          f"{args.vocab}, intermediate {meta['intermediate_size']}; {meta['precision']}; no activation checkpointing; "
          f"PaTH backends {', '.join(backends)}; median of {args.steps} steps after {args.warmup} warm-up; SDPA input dtype under "
          f"autocast: {meta['sdpa_dtype_under_autocast']}\n")
    headers = ["model", "params", "step ms", "tokens/s", "vs Llama", "peak GiB", "loss first", "loss last"]
    print(C.markdown_table(headers, rows))


if __name__ == "__main__":
    main()
