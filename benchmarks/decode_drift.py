"""Drift of step-by-step decoding in bfloat16: logits of the last token of a long sequence.

Each decoded token rewrites every cached key (k <- k - beta (k . w) w). Rounding the keys to bf16 after
every update accumulates error with the number of steps; the cache therefore stores keys in
`config.cache_key_dtype`. This compares, at token T (default 4096), the logits of
  - the bf16 model's full forward (its own bf16 error),
  - step-by-step decoding with float32 cached keys (the default),
  - step-by-step decoding with bf16 cached keys (cache_key_dtype="model"),
against a float64 forward of the same (bf16-rounded) weights. The forget-gate bias is raised to +4 so that
old keys keep attention mass (with the random init's gate of about 0.5 per step, old keys are forgotten
and no drift is visible).

    python benchmarks/decode_drift.py [--length 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from path_lm import PaTHCache, PaTHConfig, PaTHForCausalLM


def decode_last_logits(model, ids, key_dtype):
    cache = PaTHCache(model.config, cache_key_dtype=key_dtype)
    with torch.no_grad():
        model(ids[:, :1], cache=cache, use_cache=True)
        for t in range(1, ids.shape[1]):
            logits = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits
    return logits[:, -1].double()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--gate-bias", type=float, default=4.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = PaTHConfig(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
                        use_forget_gate=True, use_qk_norm=True, initializer_range=0.05, attn_chunk_size=128)
    model = PaTHForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.g_proj.bias.fill_(args.gate_bias)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, args.length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.to(torch.float64)(ids, use_cache=False).logits[:, -1]
        model = model.to(torch.bfloat16)
        full = model(ids, use_cache=False).logits[:, -1].double()
    rows = {"full forward (bf16)": full,
            "decode, float32 keys (default)": decode_last_logits(model, ids, "float32"),
            "decode, bf16 keys": decode_last_logits(model, ids, "model")}
    results = {}
    print(f"# bf16 model, {args.layers} layers, hidden {args.hidden}, {args.heads} heads; logits of token {args.length}")
    print("| variant | max abs error vs float64 | relative error | vs full forward's error |")
    print("|---|---|---|---|")
    base = (full - reference).norm().item() / reference.norm().item()
    for name, logits in rows.items():
        err_max = (logits - reference).abs().max().item()
        err_rel = (logits - reference).norm().item() / reference.norm().item()
        results[name] = {"max_abs": err_max, "relative": err_rel, "ratio_to_full": err_rel / base}
        print(f"| {name} | {err_max:.4f} | {err_rel:.2e} | {err_rel / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"length": args.length, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
