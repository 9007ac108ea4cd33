"""The ``path-lm`` command line: one subcommand per job, each a thin call into library code.

    path-lm quickstart [--output-dir DIR] [--steps N] [--seq-len T] [--seed S] ...
    path-lm train DATA... --output-dir DIR [--preset tiny|125m|350m|760m | --config F | --from CKPT] [--optim muon] ...
    path-lm generate MODEL [PROMPT ...] [--max-new-tokens N] [--do-sample] [--temperature T] ...
    path-lm eval MODEL --data FILE.txt [--seq-len T] [--by-position --max-len L]
    path-lm convert SRC DST [--to path_lm|fla]
    path-lm push FOLDER REPO_ID [--private] [--revision BRANCH] [--commit-message MSG]
    path-lm benchmark [MODEL | --preset 125m] [--batch 1 8] [--context 1024] [--cache dynamic static] [--train]

To add a subcommand, write ``add_<name>_parser(subparsers)`` that registers its arguments and sets
``func`` to a ``cmd_<name>(args)`` that calls the library, then append it to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_quickstart_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train tiny PaTH and RoPE models on flip-flop data on the CPU (2-3 min on 2 cores) and compare with the paper",
        description=(
            "Train a tiny PaTH model and a RoPE transformer of the same shape on flip-flop language data, "
            "report read-answer errors in-distribution / sparse OOD / dense OOD beside the PaTH paper's "
            "Table 1, plot the error by distance since the last write, then save the PaTH model with its "
            "remote code, reload it with trust_remote_code=True and generate. The defaults take 2-3 minutes "
            "on 2 idle CPU cores; the flags scale it up."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="path-lm-quickstart", help="where results, plot and checkpoint go")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (instruction/bit pairs x 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=1, dest="num_layers")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (heads x head dim)")
    parser.add_argument("--heads", type=int, default=2, dest="num_heads")
    parser.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default 2 x hidden)")
    parser.add_argument("--attn-chunk-size", type=int, default=64, help="block length of PaTH's exact attention")
    parser.add_argument("--num-eval", type=int, default=1000, help="in-distribution eval sequences (sparse 2x, dense 0.5x)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="auto: let Trainer pick a GPU if any")
    parser.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    from .quickstart import run_quickstart

    if args.threads:
        torch.set_num_threads(args.threads)
    run_quickstart(
        output_dir=args.output_dir,
        steps=args.steps,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        attn_chunk_size=args.attn_chunk_size,
        num_eval=args.num_eval,
        use_cpu=args.device == "cpu",
    )
    return 0


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train (--preset / --config) or fine-tune (--from) a PaTH model on local text with transformers.Trainer",
        description=(
            "Train a PaTH language model from scratch (--preset or --config) or fine-tune one (--from) on local "
            "data: .txt (one document per blank-line-separated block), .jsonl (--text-field), .parquet, or a "
            "folder saved with datasets' save_to_disk. Documents are packed to --seq-len with their boundaries "
            "kept. The model, its remote code, the tokenizer and training_summary.json end up in OUTPUT_DIR/model; "
            "checkpoints, loss_curve.png and the summary in OUTPUT_DIR. Runs unchanged under torchrun / "
            "accelerate launch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("data", nargs="+", help="data files, saved datasets folders or Hub dataset ids")
    parser.add_argument("--output-dir", required=True, help="run folder: checkpoints, plot, summary, final model")
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", help="model shape: tiny, 125m, 350m, 760m")
    source.add_argument("--config", dest="config_file", default=None, help="PaTHConfig JSON file")
    source.add_argument("--from", dest="from_checkpoint", default=None, help="checkpoint folder to fine-tune")
    model.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id "
                       "(default: the checkpoint's with --from, else a BPE trained on the data)")
    model.add_argument("--vocab-size", type=int, default=8192, help="size of the BPE trained when no --tokenizer")
    model.add_argument("--attn-backend", choices=("auto", "torch", "triton", "fla"), default=None,
                       help="attention kernel for this run only (default: the model config's, which "
                       "checkpoints keep)")
    model.add_argument("--keep-preparation", action="store_true",
                       help="path-lm's Triton kernel keeps its preparation for the backward in this run: "
                       "5-10%% faster attention for ~3 KiB more memory per token and query head")
    data = parser.add_argument_group("data")
    data.add_argument("--text-field", default="text", help="text field of .jsonl / .parquet / datasets data")
    data.add_argument("--dataset-config", default=None, help="config name of Hub datasets (load_dataset's name)")
    data.add_argument("--max-documents", type=int, default=None,
                      help="stream at most this many documents from each Hub dataset (default: load it all)")
    data.add_argument("--seq-len", type=int, default=512, help="tokens per packed training row")
    data.add_argument("--eval-fraction", type=float, default=0.05, help="documents held out for eval perplexity")
    data.add_argument("--eval-files", nargs="+", default=None, help="eval data instead of a held-out fraction")
    run = parser.add_argument_group("run (transformers.TrainingArguments)")
    run.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty output dir")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    run.add_argument("--batch-size", type=int, default=8, help="per-device train batch size")
    run.add_argument("--eval-batch-size", type=int, default=None, help="per-device eval batch (default --batch-size)")
    run.add_argument("--gradient-accumulation-steps", type=int, default=1)
    run.add_argument("--learning-rate", type=float, default=3e-4)
    run.add_argument("--lr-scheduler", dest="lr_scheduler_type", default="cosine",
                     help="a transformers schedule name; cosine_with_min_lr: warmup, then cosine to --min-lr-ratio")
    run.add_argument("--warmup", type=float, default=0.0, help="warmup steps, or a fraction of --max-steps if < 1")
    run.add_argument("--min-lr-ratio", type=float, default=0.1,
                     help="floor of cosine_with_min_lr, as a fraction of the peak learning rate")
    run.add_argument("--optim", choices=("adamw", "muon"), default="adamw",
                     help="muon: torch.optim.Muon for the 2D hidden weights, AdamW (--learning-rate) for embeddings, "
                     "head, norms, biases and convolutions")
    run.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak learning rate (with --optim muon)")
    run.add_argument("--muon-momentum", type=float, default=0.95, help="Muon's (Nesterov) momentum")
    run.add_argument("--weight-decay", type=float, default=0.01, help="of AdamW and, with --optim muon, of Muon")
    run.add_argument("--max-grad-norm", type=float, default=1.0)
    run.add_argument("--max-steps", type=int, default=1000)
    run.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    run.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing per block")
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--eval-steps", type=int, default=None, help="default --save-steps")
    run.add_argument("--save-steps", type=int, default=500)
    run.add_argument("--save-total-limit", type=int, default=None, help="keep at most this many checkpoints")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--cpu", dest="use_cpu", action="store_true", help="train on the CPU even if a GPU is present")
    run.add_argument("--no-progress", dest="disable_tqdm", action="store_true", default=None, help="no progress bar")
    run.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="any other TrainingArguments field (VALUE read as JSON, else a string); repeatable")
    parser.set_defaults(func=cmd_train)


def _trainer_args(pairs: list[str]) -> dict:
    import json

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"path-lm train: error: --trainer-arg wants KEY=VALUE, got {pair!r}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "data", "trainer_arg")}
    try:
        train(args.data, trainer_args=_trainer_args(args.trainer_arg), **options)
    finally:
        import torch.distributed as dist

        # Under torchrun, close the process group before exit: a process that exits with it open can
        # abort in the communication threads' teardown ("terminate called without an active exception").
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# --- generate / eval / convert / push (inference, evaluation, conversion and Hub sharing) -----------------


def _add_device_args(parser, tokenizer: bool = True) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: the checkpoint's dtype on CUDA, float32 on CPU")
    if tokenizer:
        parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: MODEL's)")
    parser.add_argument("--no-trust-remote-code", dest="trust_remote_code", action="store_false",
                        help="refuse to run the modeling code stored in MODEL (path_lm must then be installed)")


def _load(args: argparse.Namespace, command: str, tokenizer: bool = True):
    """The model (and its tokenizer) named by the command's arguments; a clear error where they cannot load."""
    from .inference import load_model, load_model_and_tokenizer

    if args.model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(args.model)):
        raise SystemExit(f"path-lm {command}: error: model folder {args.model} does not exist")
    options = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    try:
        if not tokenizer:
            return load_model(args.model, **options)
        return load_model_and_tokenizer(args.model, args.tokenizer, **options)
    except (OSError, ValueError) as error:
        raise SystemExit(f"path-lm {command}: error: {error}") from error


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed to the terminal",
        description="Generate a continuation of each PROMPT (or of each line of stdin when no PROMPT is given), "
        "streamed to stdout as it is produced.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="checkpoint folder or Hub id")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: one per line of stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy (or beam) search")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    _add_device_args(parser)
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference import generate_text

    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("path-lm generate: error: no prompt given (as arguments or on stdin)")
    model, tokenizer = _load(args, "generate")
    options = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")
    kwargs = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    generate_text(model, tokenizer, prompts, seed=args.seed, **kwargs)
    return 0


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity on a text file, and by position beyond the training length",
        description="Token-level perplexity of MODEL on a text file in windows of --seq-len tokens. With "
        "--by-position, also perplexity by position in sequences of --max-len tokens (the PaTH paper's "
        "length-extrapolation plot): a table, eval_results.json and eval_by_position.png in --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="checkpoint folder or Hub id")
    parser.add_argument("--data", required=True, help="UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=512, help="window length")
    parser.add_argument("--stride", type=int, default=None, help="window step (default --seq-len: disjoint)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--by-position", action="store_true", help="also perplexity by position up to --max-len")
    parser.add_argument("--max-len", type=int, default=None, help="sequence length for --by-position")
    parser.add_argument("--bucket-size", type=int, default=None, help="positions per row (default --max-len / 16)")
    parser.add_argument("--train-len", type=int, default=None,
                        help="training length marked in the table and plot (default: training_summary.json's)")
    parser.add_argument("--output-dir", default="path-lm-eval", help="where eval_results.json and the PNG go")
    _add_device_args(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluation import evaluate, format_table, training_length

    if args.by_position and not args.max_len:
        raise SystemExit("path-lm eval: error: --by-position needs --max-len")
    if not os.path.isfile(args.data):
        raise SystemExit(f"path-lm eval: error: data file {args.data} does not exist")
    model, tokenizer = _load(args, "eval")
    train_len = args.train_len or (training_length(args.model) if os.path.isdir(args.model) else None)
    results = evaluate(
        model, tokenizer, args.data, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
        by_position=args.by_position, max_len=args.max_len, bucket_size=args.bucket_size, train_len=train_len,
        output_dir=args.output_dir,
    )
    print(f"perplexity {results['perplexity']:.4f} (loss {results['loss']:.4f}) over {results['tokens']} tokens, "
          f"windows of {results['seq_len']}")
    if args.by_position:
        print(format_table(results["by_position"]["rows"], train_len))
    print(json.dumps({k: v for k, v in results.items() if k != "by_position"}))
    print(f"results in {args.output_dir}")
    return 0


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="fla path_attn checkpoint <-> path_lm checkpoint with remote code",
        description="Convert an fla PaTH checkpoint folder (model type path_attn) into a path_lm one that loads "
        "with trust_remote_code=True and no install, or back with --to fla where fla can express the config. "
        "Weights are unchanged. With --from-state-dict FILE --layout minimal-llm, build a path_lm checkpoint "
        "from a plain PyTorch state dict instead (then give only DST).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", nargs="?", help="checkpoint folder to convert")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", choices=("path_lm", "fla"), default="path_lm", help="output format")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    other = parser.add_argument_group("other model layouts")
    other.add_argument("--from-state-dict", default=None, metavar="FILE", help="a torch / safetensors state dict")
    other.add_argument("--layout", choices=("minimal-llm",), default=None, help="parameter layout of --from-state-dict")
    other.add_argument("--tokenizer", default=None, help="tokenizer folder saved with the converted model")
    parser.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from . import convert

    if args.from_state_dict is not None:
        return _convert_state_dict(args)
    if args.src is None:
        raise SystemExit("path-lm convert: error: give SRC and DST folders (or --from-state-dict FILE and DST)")
    if args.layout or args.tokenizer:
        raise SystemExit("path-lm convert: error: --layout and --tokenizer go with --from-state-dict")
    if not os.path.isdir(args.src):
        raise SystemExit(f"path-lm convert: error: checkpoint folder {args.src} does not exist")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise SystemExit("path-lm convert: error: SRC and DST must differ")
    function = convert.path_lm_to_fla if args.to == "fla" else convert.fla_to_path_lm
    try:
        out = function(args.src, args.dst, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"path-lm convert: error: {error}") from error
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def _convert_state_dict(args: argparse.Namespace) -> int:
    # Hook for state dicts of hand-written PaTH models; path_lm.minimal_llm owns the layout.
    if args.src is not None:
        raise SystemExit("path-lm convert: error: with --from-state-dict give only DST")
    if args.layout != "minimal-llm":
        raise SystemExit("path-lm convert: error: --from-state-dict needs --layout minimal-llm")
    if not os.path.isfile(args.from_state_dict):
        raise SystemExit(f"path-lm convert: error: state dict {args.from_state_dict} does not exist")
    from .minimal_llm import convert_minimal_llm

    convert_minimal_llm(args.from_state_dict, args.dst, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote path_lm checkpoint to {args.dst}")
    return 0


def add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a checkpoint folder to the Hugging Face Hub with a generated model card",
        description="Write a model card (README.md: metadata, architecture, training data and metrics from "
        "training_summary.json, usage) into FOLDER, then upload FOLDER to the Hub repo REPO_ID (created if needed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("folder", help="checkpoint folder (save_pretrained output)")
    parser.add_argument("repo_id", help="Hub repo, e.g. user/my-path-model")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    parser.add_argument("--license", default=None, help="license id for the card's metadata, e.g. apache-2.0")
    parser.add_argument("--no-card", dest="write_card", action="store_false", help="keep FOLDER's README.md as is")
    parser.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    try:
        url = push_to_hub(
            args.folder, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, token=args.token, license=args.license, write_card=args.write_card,
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"path-lm push: error: {error}") from error
    print(f"pushed {args.folder} to {url}")
    return 0


def add_benchmark_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="prefill, decoding and training speed on this machine, beside Llama of the same shape",
        description="Time MODEL (a checkpoint, or random weights of a --preset shape) on random prompts: "
        "prefill tokens/s, greedy decoding ms/token and tokens/s with each --cache, and with --train the "
        "forward and backward tokens/s; unless --no-llama, the same for transformers' LlamaForCausalLM of the "
        "same width, depth, heads, MLP and vocabulary (random weights), with the ratios.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (or use --preset)")
    parser.add_argument("--preset", default=None, help="a shape of `path-lm train --preset`, random weights")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of a --preset model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, nargs="+", default=[1024], help="prompt lengths")
    parser.add_argument("--cache", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[8, 40], metavar=("N0", "N1"),
                        help="new tokens of the two timed generate() calls")
    parser.add_argument("--train", action="store_true", help="also time forward + backward")
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="skip the Llama comparison")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    _add_device_args(parser, tokenizer=False)  # (a --preset model: bfloat16 for dtype auto on CUDA)
    parser.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> int:
    import json

    import torch

    from .benchmarking import format_table, llama_peer, run_benchmark
    from .inference import resolve_device, resolve_dtype

    if (args.model is None) == (args.preset is None):
        raise SystemExit("path-lm benchmark: error: give a MODEL or a --preset, not both")
    if min(args.batch + args.context) < 1:
        raise SystemExit("path-lm benchmark: error: --batch and --context must be positive")
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as error:
        raise SystemExit(f"path-lm benchmark: error: {error}") from error
    if args.preset is not None:
        from .configuration_path import PaTHConfig
        from .modeling_path import PaTHForCausalLM
        from .training import PRESETS

        if args.preset not in PRESETS:
            raise SystemExit(f"path-lm benchmark: error: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
        torch.manual_seed(0)
        model = PaTHForCausalLM(PaTHConfig(vocab_size=args.vocab_size, **PRESETS[args.preset]))
        model = model.to(device, torch.bfloat16 if dtype == "auto" else dtype).eval()
    else:
        model = _load(args, "benchmark", tokenizer=False)
    models = {"PaTH": model}
    if args.llama:
        torch.manual_seed(0)
        models["Llama"] = llama_peer(model.config).to(device, model.dtype).eval()
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {model.dtype}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; torch {torch.__version__}", flush=True)
    rows = run_benchmark(models, args.batch, args.context, caches=args.cache, train=args.train,
                         new_tokens=tuple(args.new_tokens), log=lambda line: print(f"# {line}", flush=True))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"rows in {args.json}")
    return 0


SUBCOMMANDS = [
    add_quickstart_parser,
    add_train_parser,
    add_generate_parser,
    add_eval_parser,
    add_convert_parser,
    add_push_parser,
    add_benchmark_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="path-lm", description="PaTH attention language models for transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
