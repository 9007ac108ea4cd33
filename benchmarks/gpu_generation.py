"""Prefill time and greedy decoding speed: a ~125M PaTH model against transformers' Llama of the same shape.

Both bf16 weights, hidden 768, 12 layers, 12 heads x 64, vocab 32000, intermediate 2048 (fla's rule),
random prompts of 1k/8k/32k tokens at batch 1 and 16. PaTH: forget gate on, the prefill on each kernel of
--backends (default fla's; `triton` is path-lm's, so `--backends fla triton` compares them), its default
cache (PaTHCache, float32 transformed keys, in-place rank-one updates). Llama: SDPA, the default DynamicCache.

- prefill ms: `model(input_ids, use_cache=True, logits_to_keep=1)` (the cache is built), CUDA events,
  median of --prefill-repeats after one warm-up call (a case whose warm-up takes > --slow-ms is timed once).
- decode: one `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` call, timed whole; it runs
  the prefill and N - 1 single-token steps, so decode tokens/s = B * (N - 1) / (generate - prefill).
  --prefill-only skips the decode timing.
Cases that run out of memory are reported as OOM and skipped.

    python benchmarks/gpu_generation.py [--contexts 1024 8192 32768] [--batches 1 16] [--new-tokens 64]
        [--backends fla triton] [--prefill-only] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from path_lm import PaTHConfig, PaTHForCausalLM


def build_configs(args, backends):
    path_cfgs = {
        backend: PaTHConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
            use_forget_gate=True, attn_backend=backend, tie_word_embeddings=False,
        )
        for backend in backends
    }
    path_cfg = path_cfgs[backends[0]]
    llama_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=path_cfg.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        hidden_act="silu", rms_norm_eps=path_cfg.norm_eps, tie_word_embeddings=False,
        max_position_embeddings=max(args.contexts) + args.new_tokens, attn_implementation="sdpa",
    )
    path = {f"PaTH {backend}" if len(backends) > 1 else "PaTH": (PaTHForCausalLM, cfg)
            for backend, cfg in path_cfgs.items()}
    return {**path, "Llama": (LlamaForCausalLM, llama_cfg)}


def run_case(model, ids, args, device):
    B, L = ids.shape
    N = args.new_tokens

    def prefill():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def generate():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (B, L + N), out.shape

    first = C.time_calls_ms(prefill, device, repeats=1)  # warm-up
    times = first if first[0] > args.slow_ms else C.time_calls_ms(prefill, device, repeats=args.prefill_repeats)
    prefill_ms = statistics.median(times)
    prefill_peak = C.peak_gib(device)
    C.free(device)
    if args.prefill_only:
        return {"prefill_ms": prefill_ms, "prefill_times_ms": times, "prefill_peak_gib": prefill_peak}
    gen_ms = C.time_calls_ms(generate, device, repeats=1)[0]
    decode_ms = gen_ms - prefill_ms
    return {"prefill_ms": prefill_ms, "prefill_times_ms": times, "prefill_peak_gib": prefill_peak,
            "generate_ms": gen_ms, "generate_peak_gib": C.peak_gib(device),
            "decode_ms_per_step": decode_ms / (N - 1), "decode_tokens_per_s": B * (N - 1) / (decode_ms * 1e-3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--slow-ms", type=float, default=2000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--models", nargs="+", default=["PaTH", "Llama"], choices=["PaTH", "Llama"])
    parser.add_argument("--backends", nargs="+", default=["fla"], choices=["fla", "triton", "torch", "auto"],
                        help="PaTH's attention kernels for the prefill, one model each (torch on a CPU / --tiny)")
    parser.add_argument("--prefill-only", action="store_true", help="time the prefill only, not generate()")
    C.add_common_args(parser, "gpu_generation")
    args = parser.parse_args()
    device = C.pick_device(args)
    backends = args.backends if device.type == "cuda" and not args.tiny else ["torch"]
    backend = ", ".join(backends)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.vocab = 128, 2, 2, 256
        args.contexts, args.batches, args.new_tokens, args.prefill_repeats = [32, 64], [1, 2], 4, 2
    assert args.new_tokens >= 2, "decode speed needs at least 2 new tokens"
    configs = build_configs(args, backends)
    path_cfg = next(cfg for name, (_, cfg) in configs.items() if name != "Llama")
    meta = {**C.environment(device), "dtype": "bfloat16", "hidden": args.hidden, "layers": args.layers,
            "heads": args.heads, "vocab": args.vocab, "intermediate_size": path_cfg.intermediate_size,
            "new_tokens": args.new_tokens, "path_attn_backend": backend, "prefill_only": args.prefill_only,
            "path_cache": f"PaTHCache, {path_cfg.cache_key_dtype} keys", "llama_cache": "DynamicCache",
            "decode_rule": "decode tokens/s = B * (N - 1) / (generate ms - prefill ms)", "tiny": args.tiny}

    rows = []
    names = [name for name in configs if name.split()[0] in args.models]
    for name in names:
        model_cls, config = configs[name]
        model, params = C.bf16_model(model_cls, config, device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        with torch.inference_mode():  # warm-up: kernels compiled, generate's first-call setup done
            ids = torch.randint(0, config.vocab_size, (1, min(args.contexts)), generator=gen).to(device)
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            for L in args.contexts:
                for B in args.batches:
                    ids = torch.randint(0, config.vocab_size, (B, L), generator=gen).to(device)
                    C.free(device)
                    try:
                        r = run_case(model, ids, args, device)
                    except Exception as err:
                        r = {"error": "OOM/skipped" if C.is_oom(err) else C.failure(err)}
                    del ids
                    C.free(device)  # outside `except`, so the failed call's tensors are gone
                    rows.append({"model": name, "params": params, "context": L, "batch": B, **r})
                    done = r.get("error") or f"prefill {r['prefill_ms']:.1f} ms" + (
                        "" if args.prefill_only else
                        f", generate {r['generate_ms']:.0f} ms, decode {r['decode_tokens_per_s']:.1f} tok/s")
                    print(f"# {name} L={L} B={B}: {done}", flush=True)
        del model
        C.free(device)
    path = C.write_json(args, "gpu_generation", {"meta": meta, "rows": rows})

    llama = {(r["context"], r["batch"]): r for r in rows if r["model"] == "Llama" and "error" not in r}
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], r["context"], r["batch"], r["error"], "-", "-", "-", "-", "-"])
            continue
        base = llama.get((r["context"], r["batch"]))
        rel = (lambda key: r[key] / base[key]) if base else (lambda key: None)
        decode = [f"{r['decode_tokens_per_s']:,.1f}", C.ratio(rel("decode_tokens_per_s")),
                  f"{r['decode_ms_per_step']:.2f}"] if "decode_tokens_per_s" in r else ["-", "-", "-"]
        table.append([
            r["model"], r["context"], r["batch"], f"{r['prefill_ms']:.1f}", C.ratio(rel("prefill_ms")),
            *decode, C.fmt(r.get("generate_peak_gib"), ".2f"),
        ])
    print(f"\n# wrote {path}")
    print(f"# {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
          f"fla {meta['fla']}; {meta['date']}")
    print(f"# bf16, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
          f"PaTH {meta['path_cache']}, backend {backend}; Llama SDPA + DynamicCache; {args.new_tokens} new tokens, "
          f"greedy; {meta['decode_rule']}\n")
    print(C.markdown_table(["model", "context", "batch", "prefill ms", "prefill vs Llama", "decode tok/s",
                            "decode vs Llama", "ms/step", "peak GiB (generate)"], table))


if __name__ == "__main__":
    main()
