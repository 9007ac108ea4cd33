"""`path-lm train` on one GPU and on several: loss curves, throughput per GPU, and the final checkpoint's greedy
tokens on a GPU and on the CPU.

Runs `path-lm train` (a ~350M preset by default, bf16) on a corpus this script writes (documents from a
random word chain: learnable, no download), once per launcher in --launchers, all with the same global batch:
  single  one process, one GPU (the reference; --repeat-single runs it twice to show the run-to-run noise);
  ddp     `torchrun --standalone --nproc_per_node N` (DistributedDataParallel through the Trainer);
  fsdp    `accelerate launch --config_file examples/fsdp_config.yaml --num_processes N` (FSDP2, one unit per block).
Each run's per-device batch is the global batch / N. The first run trains the BPE tokenizer; the others
load it, so every run sees the same packed rows in the same order.

Reported per run, from its training_summary.json: the loss curve against the reference's (largest and
mean absolute difference over the logged steps), steady tokens/s (median over the logging intervals after
the first; evaluation and saving excluded), tokens/s per GPU, scaling efficiency (tokens/s / (N x the
reference's)), peak memory of rank 0. Then each run's final model is loaded with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` in float32 on one GPU and on the CPU
and greedy-decodes --new-tokens from a few prompts: the tokens must agree.

The NVLink-multicast switches (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1) are set for every launched process unless already set.

    python benchmarks/gpu_distributed.py --gpus 2 [--launchers single ddp fsdp] [--preset 350m] [--steps 300]
        [--global-batch 16] [--seq-len 2048] [--attn-backend fla] [--out-dir DIR]
    python benchmarks/gpu_distributed.py --tiny   # CPU logic check: tiny model, 2 gloo processes

To split the runs over several calls (each run's corpus and tokenizer are made again, identically): first
`--launchers single [--repeat-single] --json A.json`, then `--launchers ddp fsdp --reference A.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from path_lm import PaTHConfig
from path_lm.training import PRESETS

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def write_corpus(path: Path, documents: int, seed: int = 0) -> None:
    """Documents of made-up words from a random chain (each word has four likely successors)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "qu", "de", "fo", "gu"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    successors = {w: rng.sample(words, 4) for w in words}
    texts = []
    for _ in range(documents):
        word = rng.choice(words)
        out = [word]
        for _ in range(rng.randint(40, 600)):
            word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(words)
            out.append(word)
        texts.append(" ".join(out) + ".")
    path.write_text("\n\n".join(texts) + "\n")


def launch_command(launcher: str, processes: int) -> list[str]:
    if launcher == "single":
        return [sys.executable, "-m", "path_lm.cli"]
    if launcher == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "path_lm.cli"]
    if launcher == "fsdp":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(C.REPO / "examples" / "fsdp_config.yaml"), "--num_processes", str(processes), "-m", "path_lm.cli"]
    raise ValueError(f"unknown launcher {launcher!r}; use single, ddp or fsdp")


def run_training(name, launcher, processes, args, corpus, config_file, tokenizer, run_dir, log) -> dict:
    if args.global_batch % processes:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {processes} processes")
    command = launch_command(launcher, processes) + [
        "train", str(corpus), "--output-dir", str(run_dir), "--overwrite", "--config", str(config_file),
        "--seq-len", str(args.seq_len), "--batch-size", str(args.global_batch // processes),
        "--max-steps", str(args.steps), "--save-steps", str(args.steps), "--logging-steps", str(args.logging_steps),
        "--learning-rate", str(args.learning_rate), "--warmup", "0.1", "--eval-fraction", "0.01",
        "--seed", "0", "--no-progress",
    ]
    command += ["--tokenizer", str(tokenizer)] if tokenizer else ["--vocab-size", str(args.vocab_size)]
    command += ["--cpu"] if args.device == "cpu" else ["--bf16"]
    env = {**MULTICAST_OFF, **os.environ}  # the switches unless the environment sets them
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(C.REPO), env.get("PYTHONPATH")]))
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    elif launcher == "single":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    log(f"# {name}: {' '.join(command)}")
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.run_timeout)
    if done.returncode:
        tail = run_dir.with_suffix(".log").read_text()[-3000:]
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{tail}")
    summary = json.loads((run_dir / "training_summary.json").read_text())
    summary["launcher_seconds"] = time.perf_counter() - start
    return summary


def greedy_tokens(model_dir: Path, prompts: list[str], new_tokens: int, device: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        generated = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        out.append(generated[0, ids.shape[1]:].tolist())
    del model
    C.free(torch.device(device))
    return out


def curve_gap(curve, reference) -> tuple[float | None, float | None]:
    """(largest, mean) |loss - reference loss| over the steps both curves logged."""
    ref = dict(map(tuple, reference))
    gaps = [abs(loss - ref[step]) for step, loss in curve if step in ref]
    return (max(gaps), statistics.fmean(gaps)) if gaps else (None, None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the ddp and fsdp runs")
    parser.add_argument("--launchers", nargs="+", default=["single", "ddp", "fsdp"], choices=["single", "ddp", "fsdp"])
    parser.add_argument("--repeat-single", action="store_true", help="run the single-GPU reference twice (noise)")
    parser.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    parser.add_argument("--attn-backend", default="auto", help="the model config's attn_backend (fla, triton, auto)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--documents", type=int, default=6000, help="documents in the generated corpus")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--run-timeout", type=float, default=3600, help="seconds per training run")
    parser.add_argument("--reference", default=None,
                        help="JSON of an earlier call whose one-process run(s) are the reference (to split the "
                             "runs over calls: first --launchers single, then --launchers ddp fsdp --reference)")
    C.add_common_args(parser, "gpu_distributed")
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.steps, args.global_batch, args.seq_len = "tiny", 12, 4, 64
        args.logging_steps, args.vocab_size, args.documents, args.new_tokens = 2, 300, 60, 8
        args.launchers = [x for x in args.launchers if x != "fsdp"]  # FSDP2 needs GPUs
        args.device = args.device or "cpu"
    args.device = C.pick_device(args).type
    gpus = args.gpus if args.device == "cuda" else 2
    if args.device == "cuda" and torch.cuda.device_count() < gpus and any(x != "single" for x in args.launchers):
        raise SystemExit(f"--gpus {gpus} but {torch.cuda.device_count()} GPU(s) visible")

    out_dir = Path(args.out_dir) / "gpu_distributed"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(line=""):
        print(line, flush=True)
        lines.append(line)

    env = C.environment(torch.device(args.device))
    env["accelerate"] = C.version("accelerate")
    corpus = out_dir / "corpus.txt"
    write_corpus(corpus, args.documents)
    config = PaTHConfig(vocab_size=args.vocab_size, attn_backend=args.attn_backend, **PRESETS[args.preset])
    config_file = out_dir / "config.json"
    config.to_json_file(config_file)

    results = []
    plan = [("1 GPU" if args.device == "cuda" else "1 process", "single", 1)] * (2 if args.repeat_single else 1)
    if args.reference:  # the one-process runs of an earlier call (the same arguments otherwise)
        results = [r for r in json.loads(Path(args.reference).read_text())["runs"] if r["launcher"] == "single"]
        if not results:
            raise SystemExit(f"{args.reference} holds no one-process run")
        plan = []
        log(f"# reference: the one-process run(s) of {args.reference}")
    elif "single" not in args.launchers:
        raise SystemExit("--launchers needs single (the reference the others are compared with), or --reference")
    plan += [(f"{x.upper()} x {gpus}", x, gpus) for x in args.launchers if x != "single"]
    documents = corpus.read_text().split("\n\n")
    prompts = [" ".join(doc.split()[:24]) for doc in documents[-args.prompts:]]
    tokenizer = None  # the first run trains it (deterministically, so a later call trains the same one)
    for i, (name, launcher, processes) in enumerate(plan):
        run_dir = out_dir / f"run{i}-{launcher}-{processes}"
        summary = run_training(name, launcher, processes, args, corpus, config_file, tokenizer, run_dir, log)
        tokenizer = tokenizer or run_dir / "tokenizer"
        cpu = greedy_tokens(run_dir / "model", prompts, args.new_tokens, "cpu")
        gpu = greedy_tokens(run_dir / "model", prompts, args.new_tokens, "cuda") if args.device == "cuda" else cpu
        results.append(dict(name=name, launcher=launcher, processes=processes, dir=str(run_dir), summary=summary,
                            greedy_cpu=cpu, greedy_gpu=gpu))
        log(f"# {name}: final loss {summary['final_loss']:.4f}, {C.fmt(summary['tokens_per_second'], ',.0f')} tokens/s,"
            f" {summary['launcher_seconds']:.0f} s")

    reference = results[0]["summary"]
    rows = []
    for result in results:
        s = result["summary"]
        gap_max, gap_mean = curve_gap(s["loss_curve"], reference["loss_curve"])
        result["curve_gap"] = (gap_max, gap_mean)
        cpu, gpu = result["greedy_cpu"], result["greedy_gpu"]
        same = sum(a == b for a, b in zip(cpu, gpu))
        rate = s["tokens_per_second"]
        scaling = rate / (result["processes"] * reference["tokens_per_second"]) if rate and reference["tokens_per_second"] else None
        rows.append([
            result["name"], s["training"]["global_batch_size"], s["steps"], f"{s['loss_curve'][0][1]:.3f}",
            f"{s['final_loss']:.3f}", f"{C.fmt(gap_max, '.4f')} / {C.fmt(gap_mean, '.4f')}", C.fmt(rate, ",.0f"),
            C.fmt(s["tokens_per_second_per_device"], ",.0f"), C.fmt(scaling), C.fmt(s.get("peak_gpu_memory_gib")),
            f"{same}/{len(cpu)}",
        ])
    log()
    log(f"# {env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}, fla {env['fla']}; {env['date']}")
    log(f"# preset {args.preset} ({reference['model']['parameters'] / 1e6:.1f}M), attn_backend {args.attn_backend}, "
        f"seq {args.seq_len}, global batch {args.global_batch}, {args.steps} steps, lr {args.learning_rate}; "
        f"loss gap: |loss - 1-process run's| over the logged steps (largest / mean); greedy: prompts whose "
        f"{args.new_tokens} greedy tokens agree between the float32 model on {'the GPU' if args.device == 'cuda' else 'the CPU twice'} and on the CPU")
    log(C.markdown_table(
        ["run", "global batch", "steps", "first loss", "final loss", "loss gap vs 1 process", "tokens/s",
         "tokens/s per device", "scaling", "peak GiB (rank 0)", "greedy GPU = CPU"], rows))
    path = C.write_json(args, "gpu_distributed", {"environment": env, "args": vars(args), "runs": results})
    log(f"# wrote {path}")
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
