"""Flip-flop language modeling at the paper's scale: Table 1 of the PaTH paper.

Trains 1-layer, 2-head models with head dim 64 (hidden 128) on FFL(0.8) sequences of 512 tokens (Liu et al.,
2023) and reports the read-answer error in-distribution, sparse OOD (p_ignore 0.98) and dense OOD (0.1):

    PaTH       PaTHForCausalLM
    PaTH-FoX   PaTHForCausalLM(use_forget_gate=True)
    FoX        basic Forgetting Transformer: softmax attention + forget gate, no position embedding, built as
               PaTH-FoX with beta frozen at 0 (every Householder transform the identity). FoX-Pro's output
               gate, qk-norm and key shift are not included; the unused w projection and short conv remain.
    RoPE       transformers.LlamaForCausalLM of the same width, depth, heads and MLP

Uses the library functions of the quickstart (path_lm.quickstart) with bigger settings, on a GPU when one
is available (Trainer picks it; PaTH uses fla's kernel when installed). Prints a markdown table beside the
paper's figures and writes JSON.

    python benchmarks/flipflop.py                      # paper scale (GPU)
    python benchmarks/flipflop.py --tiny               # seconds on a CPU: checks that everything runs
    python benchmarks/flipflop.py --models path rope --seeds 0 1 2 --steps 20000 --json out.json

Training budget: the paper does not restate its flip-flop training schedule; the defaults here (10k steps of
batch 32, AdamW 1e-3 with warmup and cosine decay, loss on read answers) are this project's choice. The
sparse set is large (0.0001 % needs about a million reads: raise --eval-sequences to resolve it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from path_lm.quickstart import (
    DISTRIBUTION_NAMES,
    MODEL_KINDS,
    PAPER_ERRORS,
    build_model,
    evaluate_models,
    make_flipflop_data,
    train_model,
)

DISTRIBUTIONS = ("in_distribution", "sparse_ood", "dense_ood")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["path", "path-fox", "fox", "rope"], choices=sorted(MODEL_KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=128, help="2 heads x head dim 64")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default 2 x hidden)")
    parser.add_argument("--attn-chunk-size", type=int, default=64)
    parser.add_argument(
        "--eval-sequences", nargs=3, type=int, default=[10000, 100000, 2000], metavar=("IN", "SPARSE", "DENSE"),
        help="evaluation sequences per distribution",
    )
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--json", default="flipflop_results.json", help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long CPU run of every model (smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.seq_len, args.hidden_size = 10, 8, 32, 16
        args.eval_sequences, args.eval_batch_size, args.attn_chunk_size, args.cpu = [16, 32, 8], 16, 16, True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if use_cpu else torch.cuda.get_device_name()
    print(f"flip-flop benchmark on {device}: {args.layers} layer(s), {args.heads} heads, hidden {args.hidden_size}, "
          f"T={args.seq_len}, {args.steps} steps x {args.batch_size}, seeds {args.seeds}")
    runs = []  # one per (seed, model)
    for seed in args.seeds:
        eval_sizes = dict(zip(DISTRIBUTIONS, args.eval_sequences))
        train_tokens, eval_sets = make_flipflop_data(args.seq_len, args.steps * args.batch_size, eval_sizes, seed=seed)
        for kind in args.models:
            label = MODEL_KINDS[kind][0]
            model = build_model(
                kind, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                intermediate_size=args.intermediate_size, max_seq_len=args.seq_len,
                attn_chunk_size=args.attn_chunk_size, seed=seed,
            )
            print(f"\n== {label}, seed {seed}: {sum(p.numel() for p in model.parameters()):,} parameters ==")
            info = train_model(
                model, train_tokens, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                seed=seed, logging_steps=max(1, args.steps // 20), use_cpu=use_cpu, bf16=args.bf16 and not use_cpu,
            )
            start = time.perf_counter()
            evals = evaluate_models({label: model}, eval_sets, batch_size=args.eval_batch_size)[label]
            eval_seconds = time.perf_counter() - start
            print(" ".join(f"{name} {100 * ev.error_rate:.4f}%" for name, ev in evals.items()))
            runs.append({
                "model": label, "kind": kind, "seed": seed,
                "error_percent": {name: 100 * ev.error_rate for name, ev in evals.items()},
                "evaluations": {name: ev.to_dict() for name, ev in evals.items()},
                "train_seconds": info["train_seconds"], "eval_seconds": eval_seconds, "final_loss": info["final_loss"],
            })

    # Markdown: mean over seeds (and the spread when there are several).
    lines = ["| model | " + " | ".join(f"{DISTRIBUTION_NAMES[d]} error % (paper)" for d in DISTRIBUTIONS) + " | train s |", "|---|" + "---:|" * 4]
    for kind in args.models:
        label = MODEL_KINDS[kind][0]
        mine = [r for r in runs if r["kind"] == kind]
        paper = PAPER_ERRORS.get(MODEL_KINDS[kind][1] or "", {})
        cells = []
        for d in DISTRIBUTIONS:
            values = [r["error_percent"][d] for r in mine]
            cell = f"{statistics.mean(values):.4f}"
            if len(values) > 1:
                cell += f" [{min(values):.4f}-{max(values):.4f}]"
            cells.append(cell + (f" ({paper[d]:g})" if d in paper else " (-)"))
        train_s = statistics.mean(r["train_seconds"] for r in mine)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    table = "\n".join(lines)
    print(f"\n== flip-flop read-answer error %, mean over seeds {args.seeds} (paper Table 1 in parentheses) ==\n{table}")
    reads = {d: runs[0]["evaluations"][d]["reads"] for d in DISTRIBUTIONS}
    print(f"read answers per model and seed: {reads}")
    summary = {
        "settings": vars(args) | {"device": device, "torch": torch.__version__, "python": platform.python_version()},
        "paper_error_percent": PAPER_ERRORS,
        "runs": runs,
        "table_markdown": table,
    }
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
