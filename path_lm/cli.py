"""The ``path-lm`` command line: one subcommand per job, each a thin call into library code.

    path-lm quickstart [--output-dir DIR] [--steps N] [--seq-len T] [--seed S] ...

To add a subcommand, write ``add_<name>_parser(subparsers)`` that registers its arguments and sets
``func`` to a ``cmd_<name>(args)`` that calls the library, then append it to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
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


SUBCOMMANDS = [add_quickstart_parser]


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
