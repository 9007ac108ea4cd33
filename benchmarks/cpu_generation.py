"""CPU decoding speed of a small PaTH model against transformers' Llama of the same shape.

Greedy generation, prompt 512, 256 new tokens, batch 1 and 8, float32, each model with its default cache
(PaTHCache / DynamicCache; Llama with SDPA). Decode tokens/s = batch * (256 - 1) / (time(256 new) -
time(1 new)), so the prefill is excluded. Also the cache memory after generation.

    python benchmarks/cpu_generation.py [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from path_lm import PaTHConfig, PaTHForCausalLM


def build(kind: str, args):
    torch.manual_seed(0)
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers)
    if kind == "path":
        config = PaTHConfig(**shape, num_heads=args.heads, use_forget_gate=True, attn_backend="torch")
        return PaTHForCausalLM(config).eval(), config.intermediate_size
    intermediate = PaTHConfig(**shape, num_heads=args.heads).intermediate_size
    config = LlamaConfig(**shape, num_attention_heads=args.heads, intermediate_size=intermediate,
                         max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval(), intermediate


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "gates", "conv_state"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def time_generate(model, ids, new_tokens, repeats):
    def once():
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=0)
        return time.perf_counter() - start, out
    once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {kind: build(kind, args)[0] for kind in ("path", "llama")}
    params = {kind: sum(p.numel() for p in m.parameters()) / 1e6 for kind, m in models.items()}
    rows = []
    for batch in args.batches:
        ids = torch.randint(1, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        row = {"batch": batch}
        for kind, model in models.items():
            t_prefill, _ = time_generate(model, ids, 1, args.repeats)
            t_full, out = time_generate(model, ids, args.new_tokens, args.repeats)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            row[f"{kind}_tok_s"] = batch * (args.new_tokens - 1) / (t_full - t_prefill)
            row[f"{kind}_ms_per_step"] = 1e3 * (t_full - t_prefill) / (args.new_tokens - 1)
            row[f"{kind}_cache_mib"] = cache_bytes(cache) / 2**20
        row["ratio"] = row["path_tok_s"] / row["llama_tok_s"]
        rows.append(row)
    meta = {
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "params_M": params, "prompt": args.prompt, "new_tokens": args.new_tokens, "dtype": "float32",
    }
    print(f"# {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}; "
          f"PaTH {params['path']:.1f}M / Llama {params['llama']:.1f}M params; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy, float32")
    print("| batch | PaTH tok/s | Llama tok/s | PaTH / Llama | PaTH ms/step | Llama ms/step | PaTH cache MiB | Llama cache MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['path_tok_s']:.1f} | {r['llama_tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['path_ms_per_step']:.2f} | {r['llama_ms_per_step']:.2f} | {r['path_cache_mib']:.1f} | "
              f"{r['llama_cache_mib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
