"""Train a MinimalLLM-style PaTH model with the recipe of the hand-written PaTH scripts, through ``path-lm train``.

The recipe: Muon for the 2D hidden weights and AdamW for embeddings, norms, biases and the (tied) head, linear
warmup over 5% of the steps then cosine down to 10% of the peak, gradient clipping at 1.0, bf16, 512-token
rows, the SmolLM-135M tokenizer. The architecture: MinimalLLM's (plain SiLU MLP, embedding scaled by
sqrt(d_model), torch's default RMSNorm eps, tied head) with PaTH attention using a forget gate and qk-norm.

    # 8 GPUs (data parallel); DATA: local files or a Hub dataset id (see `path-lm train --help`)
    torchrun --standalone --nproc_per_node 8 examples/minimal_llm_recipe.py --output-dir runs/minimal-llm \\
        --data HuggingFaceTB/smollm-corpus --dataset-config cosmopedia-v2 --max-documents 2000000

    # a real, tiny run on the CPU with a corpus and tokenizer it writes itself (about 10 s)
    python examples/minimal_llm_recipe.py --tiny --output-dir /tmp/minimal-llm-tiny

Any other ``path-lm train`` flag given after the ones above is passed on (e.g. ``--max-steps 5000``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from path_lm.cli import main as path_lm
from path_lm.training import train_bpe_tokenizer

# A MinimalLLM-sized shape (d_model, n_layers, n_heads, d_ff): set these, and the rates in RECIPE, to your script's.
FULL = {"hidden_size": 384, "num_hidden_layers": 6, "num_heads": 8, "intermediate_size": 1536}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "intermediate_size": 128}
RECIPE = [
    "--optim", "muon", "--muon-lr", "0.01", "--muon-momentum", "0.95", "--learning-rate", "3e-3",
    "--weight-decay", "0.1", "--lr-scheduler", "cosine_with_min_lr", "--warmup", "0.05", "--min-lr-ratio", "0.1",
    "--max-grad-norm", "1.0",
]


def model_config(shape: dict) -> dict:
    return {
        **shape,
        "mlp_type": "plain",  # linear2(silu(linear1(x)))
        "hidden_act": "silu",
        "embedding_multiplier": math.sqrt(shape["hidden_size"]),
        "norm_eps": None,  # torch.nn.RMSNorm's default eps
        "tie_word_embeddings": True,
        "use_forget_gate": True,
        "use_qk_norm": True,
        "use_low_rank_w": True,
        "use_w_shortconv": True,
        "conv_size": 3,
        "conv_bias": False,
    }


def write_tiny_inputs(folder: Path) -> tuple[Path, Path]:
    """A small repeating corpus and a byte-level BPE trained on it: the stand-ins for the Hub data and tokenizer."""
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "the", "dog", "ran", "to", "the", "big", "red", "house", "under", "the", "blue", "sky"]
    rng = random.Random(0)
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(200)]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "corpus.txt"
    data.write_text("\n\n".join(documents) + "\n")
    tokenizer = folder / "tokenizer"
    train_bpe_tokenizer(documents, vocab_size=300).save_pretrained(str(tokenizer))
    return data, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", nargs="+", default=["HuggingFaceTB/smollm-corpus"], help="files or Hub dataset id")
    parser.add_argument("--tokenizer", default="HuggingFaceTB/SmolLM-135M")
    parser.add_argument("--tiny", action="store_true", help="a tiny CPU run on data and a tokenizer it writes")
    args, passed_on = parser.parse_known_args(argv)

    output_dir = Path(args.output_dir)
    inputs = output_dir.with_name(output_dir.name + "-inputs")
    inputs.mkdir(parents=True, exist_ok=True)
    config = inputs / "config.json"
    if args.tiny:
        data, tokenizer = write_tiny_inputs(inputs)
        config.write_text(json.dumps({**model_config(TINY), "vocab_size": 300}))
        run = [str(data), "--tokenizer", str(tokenizer), "--seq-len", "32", "--batch-size", "4", "--max-steps", "20",
               "--save-steps", "20", "--logging-steps", "5", "--eval-fraction", "0.05", "--cpu", "--no-progress"]
    else:
        config.write_text(json.dumps({**model_config(FULL), "vocab_size": 49152}))  # SmolLM-135M's vocabulary
        run = [*args.data, "--tokenizer", args.tokenizer, "--seq-len", "512", "--batch-size", "24", "--bf16",
               "--max-steps", "20000", "--save-steps", "2000", "--save-total-limit", "3"]
    return path_lm(["train", *run, "--config", str(config), "--output-dir", str(output_dir), *RECIPE, *passed_on])


if __name__ == "__main__":
    sys.exit(main())
