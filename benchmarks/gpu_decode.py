"""Greedy decoding speed of PaTH against transformers' Llama of the same shape, with dynamic caches and with
static caches compiled (generate()'s own torch.compile + CUDA graphs), beside the memory-bandwidth floor.

Both models bf16, hidden 768, 12 layers, 12 heads x 64, vocab 32000, intermediate 2048 by default (~134M
with untied embeddings); random prompts of --contexts tokens at --batches rows, no padding.

- modes: "dynamic" = generate() with the default cache (PaTH: PaTHCache, transformed keys in
  --path-key-dtype, "auto" by default: bf16 with a float32 window ("mixed") where frames pay off, else float32;
  Llama: DynamicCache); "static" = generate(cache_implementation="static", max_cache_len=context + new tokens),
  which transformers compiles (mode "reduce-overhead": CUDA graphs) on CUDA; PaTH then decodes through a
  PaTHStaticCache. PaTH's decoding steps run path-lm's fused Triton kernel in both modes; its prefill runs
  the model's attn_backend ("auto": fla when installed, else path-lm's kernel).
- ms/token: two generate() calls after a warm-up call (which compiles in static mode), with N0 and N1 new
  tokens (min_new_tokens = max_new_tokens); ms/token = (time(N1) - time(N0)) / (N1 - N0), so the prefill,
  the cache set-up and the first graph replay cancel out. tokens/s = batch / ms/token. Dynamic mode (bound
  by the host, whose speed drifts by up to 2x within seconds on the device machines) runs --rounds rounds,
  each timing both calls of each model in turn, after a warm-up call of N1 tokens per model: ms/token is a
  model's median over rounds, "vs Llama" the median of the rounds' ratios. Static mode: the fastest of
  --repeats calls per length.
- step ms (static mode, --step-batches): the compiled decoding step alone, without generate()'s per-token
  work (logits processing, stopping checks, appending the token): the callable generate() compiled
  (``model.get_compiled_call``), called in a loop of --step-count greedy steps on a prefilled static cache
  (PaTHStaticCache / transformers' StaticCache), CUDA events around the loop. --profile prints
  torch.profiler's table (time per kernel) of 8 more of those steps per case.
- floor: bytes one decoding step must move over the measured copy bandwidth (a large device-to-device
  copy, read + write). Bytes: every weight except the input embedding (one row of it is read); Llama reads
  K and V (bf16); PaTH reads its transformed keys (float32, or bf16 when "mixed") once, rewrites the last window of them (and all
  of them once per window, amortized) and reads and writes its frames, or, for caches too small for frames
  (``cache_path.frames_pay_off``), reads and rewrites every key; plus the values (bf16), the cumulative
  gates (float32 per query head) and the padding mask, at the context length.
Cases that run out of memory are reported and skipped.

    python benchmarks/gpu_decode.py [--contexts 1024 8192 32768] [--batches 1 8 32] [--modes dynamic static]
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import torch
from transformers import LlamaForCausalLM, StaticCache

from path_lm import PaTHConfig, PaTHForCausalLM, PaTHStaticCache
from path_lm.benchmarking import llama_peer_config, time_decoding
from path_lm.cache_path import FRAME_WINDOW, frames_pay_off, key_layout


def build_configs(args):
    """One PaTH model per --path-key-dtype ("PaTH" alone, "PaTH (mixed)" etc. when several), then Llama, in
    the order of --models."""
    path_cfgs = {
        "PaTH" if len(args.path_key_dtype) == 1 else f"PaTH ({key_dtype})": PaTHConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
            use_forget_gate=True, tie_word_embeddings=False, attn_backend=args.path_backend,
            cache_key_dtype=key_dtype,
        )
        for key_dtype in args.path_key_dtype
    }
    path_cfg = next(iter(path_cfgs.values()))
    llama_cfg = llama_peer_config(path_cfg, attn_implementation="sdpa")
    configs = {}
    for name in args.models:
        if name == "PaTH":
            configs.update({path_name: (PaTHForCausalLM, cfg) for path_name, cfg in path_cfgs.items()})
        else:
            configs["Llama"] = (LlamaForCausalLM, llama_cfg)
    return configs


def step_bytes(name, model, config, batch, context) -> int:
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    weights += config.hidden_size * 2  # one embedding row
    kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) if name == "Llama" \
        else config.num_kv_heads * (config.hidden_size // config.num_heads)
    if name == "Llama":
        per_token = 2 * kv_dim * 2
    else:
        key_dtype = key_layout(config.cache_key_dtype, torch.bfloat16, True, batch, config.num_kv_heads, context)
        mixed = key_dtype == "mixed"  # bf16 keys, the window's in a float32 ring
        key_bytes = 4 if key_dtype == "float32" else 2
        per_token = kv_dim * 2 + config.num_heads * 4 + 1  # values, cumulative gates, padding mask
        if mixed or frames_pay_off(batch, config.num_kv_heads, context):
            # The decoding kernel reads every key once and rewrites the last window of them; every window
            # steps it rewrites all of them (amortized: 2 / window of a read + write); its frames (a D x D
            # float32 matrix per kv head) are read and written once per step. "mixed": the window is read
            # and written in float32 and its rounded copy written.
            per_token += kv_dim * key_bytes * (1 + 2 / FRAME_WINDOW)
            head_dim = config.hidden_size // config.num_heads
            window_bytes = (2 * 4 + 2) if mixed else 2 * key_bytes
            per_token += FRAME_WINDOW * kv_dim * window_bytes / context
            weights += config.num_hidden_layers * batch * config.num_kv_heads * head_dim**2 * 4 * 2
        else:  # small caches: every key read and written back each step
            per_token += 2 * kv_dim * key_bytes
    return int(weights + config.num_hidden_layers * batch * context * per_token)


def run_case(model, ids, mode, args, device):
    B, L = ids.shape
    result = time_decoding(model, ids, mode, (args.n0, args.n1), args.repeats)
    result.update(tokens_per_s=B / (result["ms_per_token"] * 1e-3), peak_gib=C.peak_gib(device))
    if mode == "static" and B in args.step_batches and device.type == "cuda":
        result["step_ms"] = compiled_step_ms(model, ids, L + args.n1, args, device)
    return result


def dynamic_rounds(models: dict, ids, args, device) -> dict:
    """Dynamic-cache decoding of every model in turn, ``--rounds`` times: each round times generate(n0) and
    generate(n1) once per model, so that a change of the host's speed (these steps are bound by Python and
    launches) falls on all models alike. A model's ms/token is the median over rounds; ``round_ratios``
    holds, per round, each model's ms/token over the first model's."""
    B = ids.shape[0]
    options = dict(do_sample=False, attention_mask=torch.ones_like(ids))
    results, rounds, peaks = {}, {name: [] for name in models}, {name: 0.0 for name in models}

    def generate(model, n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=model.config.pad_token_id, **options)

    for name, (model, _) in models.items():
        try:
            # warm-up over every length the rounds reach: a model's first step at a new cache length can pay
            # one-time costs (Llama's first round took 50-100 ms/token without it), as can Triton compiles
            generate(model, args.n1)
        except Exception as err:
            results[name] = {"error": C.failure(err)}
        C.free(device)
    live = [name for name in models if name not in results]
    for _ in range(args.rounds):
        for name in list(live):
            model = models[name][0]
            if device.type == "cuda":  # (no empty_cache: a generate() that allocates anew would time cudaMalloc)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                t0 = C.time_calls_ms(lambda: generate(model, args.n0), device, repeats=1)[0]
                t1 = C.time_calls_ms(lambda: generate(model, args.n1), device, repeats=1)[0]
            except Exception as err:
                results[name] = {"error": C.failure(err)}
                live.remove(name)
                continue
            rounds[name].append(max(t1 - t0, 0.0) / (args.n1 - args.n0))
            peaks[name] = max(peaks[name], C.peak_gib(device) or 0.0)
    if args.host_profile:
        for name in live:
            print(f"# cProfile of generate({args.n1}), {name} dynamic {tuple(ids.shape)}\n"
                  + C.cprofile_table(lambda: generate(models[name][0], args.n1), device), flush=True)
    for name in live:
        ms = statistics.median(rounds[name])
        results[name] = dict(ms_per_token=ms, tokens_per_s=B / (ms * 1e-3), peak_gib=peaks[name] or None,
                             round_ms=rounds[name])
    return results


def compiled_step_ms(model, ids, max_cache_len, args, device) -> float:
    """Milliseconds per call of generate()'s compiled forward, greedy steps on a prefilled static cache."""
    config = model.config
    if isinstance(model, PaTHForCausalLM):
        cache = PaTHStaticCache(config, max_cache_len=max_cache_len)
    else:
        cache = StaticCache(config=config, max_cache_len=max_cache_len)
    step = model.get_compiled_call(model.generation_config.compile_config)
    logits = model(ids, use_cache=True, logits_to_keep=1, **{C.CACHE_KW: cache}).logits
    token = logits[:, -1:].argmax(-1)

    def run(n):
        nonlocal token
        for _ in range(n):
            out = step(input_ids=token, use_cache=True, logits_to_keep=1, return_dict=True, **{C.CACHE_KW: cache})
            token = out.logits[:, -1:].argmax(-1)

    run(3)  # warm-up: recompiles or re-records if this call differs from generate()'s
    count = min(args.step_count, max_cache_len - ids.shape[1] - 3 - 8 * args.profile)
    ms = C.time_calls_ms(lambda: run(count), device, repeats=1)[0] / count
    if args.profile:
        print(f"# profile of 8 compiled steps, {type(model).__name__} {tuple(ids.shape)}\n" + C.profile_table(lambda: run(8), device),
              flush=True)
    return ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    parser.add_argument("--models", nargs="+", default=["PaTH", "Llama"], choices=["PaTH", "Llama"])
    parser.add_argument("--n0", type=int, default=8, help="new tokens of the shorter timed generate()")
    parser.add_argument("--n1", type=int, default=72, help="new tokens of the longer timed generate()")
    parser.add_argument("--repeats", type=int, default=2,
                        help="static mode: timed calls per length (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="dynamic mode: rounds of both models in turn (the median counts)")
    parser.add_argument("--host-profile", action="store_true",
                        help="dynamic mode: print cProfile's table of one generate() per model and case")
    parser.add_argument("--step-batches", type=int, nargs="*", default=[1], help="batches timed as compiled steps")
    parser.add_argument("--step-count", type=int, default=48)
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of the compiled steps")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--path-backend", default="auto")
    parser.add_argument("--path-key-dtype", nargs="+", default=["auto"], choices=["auto", "float32", "mixed", "model"],
                        help="PaTH's cache_key_dtype (one PaTH model per value)")
    C.add_common_args(parser, "gpu_decode")
    args = parser.parse_args()
    device = C.pick_device(args)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.vocab, args.path_backend = 64, 2, 2, 128, "torch"
        args.contexts, args.batches, args.n0, args.n1, args.repeats, args.rounds = [16, 32], [1, 2], 2, 6, 1, 2
    assert args.n1 > args.n0 >= 1
    args.contexts = sorted(args.contexts)  # generate() keeps the largest static cache length it has seen
    configs = build_configs(args)
    bandwidth = C.copy_bandwidth(device)
    meta = {**C.environment(device), "dtype": "bfloat16", "hidden": args.hidden, "layers": args.layers,
            "heads": args.heads, "vocab": args.vocab, "n0": args.n0, "n1": args.n1,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "path_attn_backend": args.path_backend,
            "path_cache_key_dtype": args.path_key_dtype, "tiny": args.tiny}
    print(f"# copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)

    # Both models stay loaded and take turns case by case, so that a change of the host's speed during the run
    # (these eager steps are bound by Python and launches) touches both alike.
    models = {}
    for name, (model_cls, config) in configs.items():
        models[name] = C.bf16_model(model_cls, config, device)
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for mode in args.modes:
            for L in args.contexts:
                for B in args.batches:
                    ids = torch.randint(3, args.vocab, (B, L), generator=gen).to(device)
                    if mode == "dynamic":
                        C.free(device)
                        dynamic = dynamic_rounds(models, ids, args, device)
                    for name, (model, params) in models.items():
                        if mode == "dynamic":
                            r = dynamic[name]
                        else:
                            torch.compiler.reset()  # a fresh compile per shape: no recompilation limit reached
                            C.free(device)
                            try:
                                r = run_case(model, ids, mode, args, device)
                            except Exception as err:
                                r = {"error": C.failure(err)}
                        C.free(device)
                        mean_context = L + (args.n0 + args.n1) // 2
                        floor_ms = 1e3 * step_bytes(name, model, model.config, B, mean_context) / bandwidth
                        rows.append({"model": name, "params": params, "mode": mode, "context": L, "batch": B,
                                     "floor_ms": floor_ms, **r})
                        done = r.get("error") or f"{r['ms_per_token']:.3f} ms/token, {r['tokens_per_s']:,.0f} tok/s"
                        if r.get("step_ms"):
                            done += f", step {r['step_ms']:.3f} ms"
                        if r.get("round_ms"):
                            done += f", rounds {' '.join(f'{ms:.2f}' for ms in r['round_ms'])}"
                        print(f"# {name} {mode} L={L} B={B}: {done} (floor {floor_ms:.3f} ms)", flush=True)
                        # after every case, so that a run cut by a time limit keeps what it finished
                        C.write_json(args, "gpu_decode", {"meta": meta, "rows": rows})
                    del ids
    del models
    C.free(device)
    rows.sort(key=lambda r: list(configs).index(r["model"]))  # the table lists one model, then the next
    path = C.write_json(args, "gpu_decode", {"meta": meta, "rows": rows})

    llama = {(r["mode"], r["context"], r["batch"]): r for r in rows if r["model"] == "Llama" and "error" not in r}
    table = []
    for r in rows:
        head = [r["model"], r["mode"], r["context"], r["batch"]]
        if "error" in r:
            table.append(head + [r["error"], "-", "-", "-", f"{r['floor_ms']:.3f}", "-", "-", "-"])
            continue
        base = llama.get((r["mode"], r["context"], r["batch"]))
        vs = C.ratio(r["tokens_per_s"] / base["tokens_per_s"]) if base else "-"
        if base and r.get("round_ms") and r is not base:
            # paired: the two models' times of one round are seconds apart, so the host's drift cancels
            per_round = [b / a for a, b in zip(r["round_ms"], base["round_ms"])]
            vs = f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        step = r.get("step_ms")
        table.append(head + [f"{r['ms_per_token']:.3f}", f"{r['tokens_per_s']:,.0f}", vs, C.fmt(step, ".3f"),
                             f"{r['floor_ms']:.3f}", C.ratio(r["ms_per_token"] / r["floor_ms"], ".1f"),
                             C.ratio(step / r["floor_ms"], ".1f") if step else "-", C.fmt(r["peak_gib"], ".1f")])
    print(f"\n# wrote {path}")
    print(f"# {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
          f"fla {meta['fla']}; {meta['date']}")
    print(f"# bf16, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; greedy; "
          f"ms/token = (generate({args.n1}) - generate({args.n0})) / {args.n1 - args.n0}; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s\n")
    print("# dynamic mode: ms/token and tokens/s are each model's median over --rounds rounds; vs Llama is the median of the"
          " rounds' ratios (each round times both models in turn), in brackets the lowest and highest")
    print(C.markdown_table(["model", "mode", "context", "batch", "ms/token", "tokens/s", "vs Llama (same mode)",
                            "step ms", "floor ms", "token x floor", "step x floor", "peak GiB"], table))


if __name__ == "__main__":
    main()
