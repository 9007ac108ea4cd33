"""Quickstart: PaTH against RoPE on flip-flop language modeling, on a CPU in a few minutes.

:func:`run_quickstart` reproduces the shape of Table 1 of the PaTH paper at toy scale:

1. samples flip-flop training data (in-distribution, ignore probability 0.8) and three evaluation sets
   (in-distribution, sparse OOD 0.98, dense OOD 0.1; see :mod:`path_lm.flipflop`);
2. trains a tiny PaTH model (:class:`~path_lm.PaTHForCausalLM`) and a RoPE transformer of the same shape
   (``transformers.LlamaForCausalLM``) with ``transformers.Trainer``, the loss on read answers only
   (the only predictable tokens);
3. evaluates the read-answer error on the three sets, prints it beside the paper's figures and plots the
   error by distance since the last write;
4. saves the PaTH model with its remote code, reloads it with ``trust_remote_code=True`` and generates
   answers to flip-flop prompts.

The pieces (:func:`build_model`, :func:`train_model`, :func:`evaluate_models`, ...) are reused by
``benchmarks/flipflop.py`` at the paper's scale.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .configuration_path import PaTHConfig
from .flipflop import (
    DISTRIBUTIONS,
    READ,
    VOCAB,
    VOCAB_SIZE,
    WRITE,
    ZERO,
    FlipFlopEval,
    evaluate_flipflop,
    generate_flipflop,
    read_answer_labels,
)
from .modeling_path import PaTHForCausalLM

# Table 1 of the PaTH paper (1 layer, 2 heads, head dim 64): read-answer error in percent.
PAPER_ERRORS = {
    "RoPE": {"in_distribution": 6.9, "sparse_ood": 40.3, "dense_ood": 0.01},
    "FoX": {"in_distribution": 8.3, "sparse_ood": 36.3, "dense_ood": 0.0},
    "PaTH": {"in_distribution": 0.0, "sparse_ood": 0.0001, "dense_ood": 0.0},
}
DISTRIBUTION_NAMES = {"in_distribution": "in-distribution", "sparse_ood": "sparse OOD", "dense_ood": "dense OOD"}

# Model kinds: the label in tables and the paper row it corresponds to.
MODEL_KINDS = {
    "path": ("PaTH", "PaTH"),
    "path-fox": ("PaTH-FoX", None),
    "fox": ("FoX", "FoX"),
    "rope": ("RoPE", "RoPE"),
}


# ----------------------------------------------------------------------------------------------- models


def build_model(
    kind: str,
    hidden_size: int = 64,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_seq_len: int = 4096,
    attn_chunk_size: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """A freshly initialized flip-flop model of the given kind (see :data:`MODEL_KINDS`).

    ``path`` and ``path-fox`` are :class:`PaTHForCausalLM` without/with the forget gate. ``rope`` is a
    ``LlamaForCausalLM`` of the same width, depth, heads and gated-MLP size. ``fox`` is the basic Forgetting
    Transformer (softmax attention + data-dependent forget gate, no position embedding; none of FoX-Pro's
    output gate, qk-norm or key shift) expressed as PaTH-FoX with every Householder transform frozen to the
    identity (beta = 0); its unused w projection and short convolution stay in the parameter count.
    ``intermediate_size=None`` means 2 * hidden_size.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_KINDS)}")
    set_seed(seed)
    intermediate_size = intermediate_size or 2 * hidden_size
    if kind == "rope":
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_seq_len,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    config = PaTHConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        use_forget_gate=kind in ("path-fox", "fox"),
        attn_chunk_size=attn_chunk_size,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = PaTHForCausalLM(config)
    if kind == "fox":
        for layer in model.model.layers:
            # beta = 2 * sigmoid(-inf) = 0: every H_s is the identity, leaving softmax attention + forget gate.
            layer.attn.bt_proj.weight.data.zero_()
            layer.attn.bt_proj.bias.data.fill_(-float("inf"))
            layer.attn.bt_proj.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------- data


class FlipFlopDataset(torch.utils.data.Dataset):
    """Flip-flop sequences as causal-LM examples whose labels are the read answers only."""

    def __init__(self, tokens: torch.LongTensor):
        self.tokens = tokens
        self.labels = read_answer_labels(tokens)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.labels[index]}


def make_flipflop_data(
    seq_len: int,
    num_train: int,
    num_eval: dict[str, int],
    seed: int = 0,
) -> tuple[torch.LongTensor, dict[str, torch.LongTensor]]:
    """Training sequences (in-distribution) and one evaluation set per entry of ``num_eval`` (keys of
    :data:`~path_lm.flipflop.DISTRIBUTIONS`), each from its own seeded generator."""
    train = generate_flipflop(num_train, seq_len, DISTRIBUTIONS["in_distribution"], torch.Generator().manual_seed(seed))
    evals = {}
    for offset, (name, n) in enumerate(num_eval.items(), start=1):
        generator = torch.Generator().manual_seed(seed + 1000 * offset)
        evals[name] = generate_flipflop(n, seq_len, DISTRIBUTIONS[name], generator)
    return train, evals


# --------------------------------------------------------------------------------------------- training


def train_model(
    model: PreTrainedModel,
    train_tokens: torch.LongTensor,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    logging_steps: int = 50,
    use_cpu: bool = True,
    bf16: bool = False,
    output_dir: str | os.PathLike | None = None,
    disable_tqdm: bool = False,
) -> dict:
    """Train with ``transformers.Trainer`` (AdamW, linear warmup then cosine decay, gradient clipping 1.0),
    one pass over ``train_tokens`` in random order, repeated if ``steps * batch_size`` exceeds it.
    Returns the log history, the last logged loss and the wall time. Nothing is checkpointed."""
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=str(output_dir or scratch),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=warmup,
            weight_decay=weight_decay,
            max_grad_norm=1.0,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to="none",
            use_cpu=use_cpu,
            bf16=bf16,
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=disable_tqdm,
        )
        trainer = Trainer(model=model, args=args, train_dataset=FlipFlopDataset(train_tokens))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    return {"train_seconds": seconds, "final_loss": losses[-1] if losses else None, "log_history": trainer.state.log_history}


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_models(
    models: dict[str, PreTrainedModel], eval_sets: dict[str, torch.LongTensor], batch_size: int = 64
) -> dict[str, dict[str, FlipFlopEval]]:
    """``{model label: {distribution: FlipFlopEval}}``."""
    return {
        label: {name: evaluate_flipflop(model, tokens, batch_size=batch_size) for name, tokens in eval_sets.items()}
        for label, model in models.items()
    }


def _percent(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    return f"{x:.2f}" if x >= 0.01 or x == 0 else f"{x:.4f}"


def format_error_table(results: dict[str, dict[str, FlipFlopEval]], paper: dict | None = None) -> str:
    """Markdown table of read-answer error % per model and distribution, with the paper's figure beside ours
    (``ours (paper)``) where ``paper`` has the model's label (or its base label, e.g. RoPE for "RoPE (Llama)")."""
    paper = PAPER_ERRORS if paper is None else paper
    names = list(next(iter(results.values())).keys())
    header = "| model | " + " | ".join(f"{DISTRIBUTION_NAMES.get(n, n)} error % (paper)" for n in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for label, evals in results.items():
        reference = paper.get(label) or paper.get(label.split(" ")[0])
        cells = []
        for name in names:
            cell = f"{_percent(100 * evals[name].error_rate)}"
            if reference is not None and name in reference:
                cell += f" ({reference[name]:g})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    reads = ", ".join(f"{DISTRIBUTION_NAMES.get(n, n)} {evals[n].reads}" for n in names)
    return "\n".join(lines) + f"\n\nread answers evaluated per model: {reads}"


def distance_bins(max_distance: int) -> list[tuple[int, int]]:
    """Inclusive distance ranges 1, 2, 3-4, 5-8, ... (powers of two) covering 1..max_distance."""
    bins, low = [], 1
    while low <= max_distance:
        high = max(1, 2 * (low - 1))
        bins.append((low, min(high, max_distance)))
        low = high + 1
    return bins


def binned_error_by_distance(evaluation: FlipFlopEval, bins: list[tuple[int, int]]) -> list[float]:
    """Error % per distance bin (nan where the bin has no reads)."""
    out = []
    for low, high in bins:
        errors = sum(e for d, (e, n) in evaluation.by_distance.items() if low <= d <= high)
        reads = sum(n for d, (e, n) in evaluation.by_distance.items() if low <= d <= high)
        out.append(100 * errors / reads if reads else float("nan"))
    return out


def plot_error_by_distance(results: dict[str, dict[str, FlipFlopEval]], path: str | os.PathLike) -> None:
    """One panel per distribution: each model's read-answer error % against the number of instructions
    since the last write (log2-spaced bins), saved with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values())).keys())
    max_distance = max(max(ev.by_distance, default=1) for evals in results.values() for ev in evals.values())
    bins = distance_bins(max_distance)
    centers = [math.sqrt(low * high) for low, high in bins]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, evals in results.items():
            ax.plot(centers, binned_error_by_distance(evals[name], bins), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(centers, [str(low) if low == high else f"{low}-{high}" for low, high in bins], fontsize=8)
        ax.minorticks_off()
        ax.set_title(f"{DISTRIBUTION_NAMES.get(name, name)} (p_ignore={DISTRIBUTIONS.get(name, float('nan')):g})")
        ax.set_xlabel("instructions since the last write")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("read-answer error %")
    axes[0][0].legend()
    fig.suptitle("Flip-flop language modeling: error by distance since the last write")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- generation


def check_read_answers(tokens: list[int], start: int = 0) -> list[dict]:
    """Every read answer at a position >= start of one token list: its position, the answer given, the
    bit expected (the last written one) and the instructions since that write."""
    checks, last_written, last_write_pair = [], None, None
    for pos in range(1, len(tokens), 2):
        instruction, bit = tokens[pos - 1], tokens[pos]
        if instruction == WRITE:
            last_written, last_write_pair = bit - ZERO, pos // 2
        elif instruction == READ and pos >= start:
            checks.append({
                "position": pos,
                "answer": bit - ZERO if bit in (ZERO, ZERO + 1) else VOCAB[bit],
                "expected": last_written,
                "distance": None if last_write_pair is None else pos // 2 - last_write_pair,
            })
    return checks


def describe_generation(tokens: list[int], prompt_len: int, context_pairs: int = 3) -> str:
    """``w1 <41 pairs> i0 i1 i0 r|1 [right]``: the last write of the prompt, the number of pairs skipped, the
    prompt's last pairs, ``|`` where generation starts, and the generated tokens with every generated read
    answer marked ``[right]`` or ``[WRONG, want b]``."""
    symbols = [VOCAB[t] for t in tokens]
    pairs = ["".join(symbols[pos : pos + 2]) for pos in range(0, len(tokens), 2)]
    prompt_pair = prompt_len // 2  # index of the pair the prompt cuts (its instruction is in the prompt)
    pairs[prompt_pair] = pairs[prompt_pair][0] + "|" + pairs[prompt_pair][1:]
    for check in check_read_answers(tokens, prompt_len):
        right = check["answer"] == check["expected"]
        pairs[check["position"] // 2] += " [right]" if right else f" [WRONG, want {check['expected']}]"
    writes = [pos // 2 for pos in range(0, prompt_len, 2) if tokens[pos] == WRITE]
    first = max(0, prompt_pair - context_pairs)
    shown = pairs[first:]
    if writes and writes[-1] < first:
        skipped = first - writes[-1] - 1
        shown = [pairs[writes[-1]]] + ([f"<{skipped} pairs>"] if skipped else []) + shown
    return ("... " if shown[0] != pairs[0] else "") + " ".join(shown)


@torch.no_grad()
def generation_demo(model: PreTrainedModel, prompts: torch.LongTensor, max_new_tokens: int = 1) -> list[dict]:
    """Greedy ``model.generate`` from equal-length prompts that end in ``r``. Every read answer in the
    continuation (the first token, and any after an ``r`` the model writes itself) is checked against the
    last written bit. The quickstart's models are trained on read answers only, so tokens after the answer
    are not flip-flop language; one new token (the answer) is the default."""
    model.eval()
    output = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=ZERO,  # never used: the prompts have equal lengths; silences generate's warning
    )
    demos = []
    for row in output.tolist():
        checks = check_read_answers(row, prompts.shape[1])
        demos.append({
            "continuation": "".join(VOCAB[t] for t in row[prompts.shape[1] :]),
            "checks": checks,
            "all_right": all(c["answer"] == c["expected"] for c in checks),
            "text": describe_generation(row, prompts.shape[1]),
        })
    return demos


# ------------------------------------------------------------------------------------------- quickstart


def run_quickstart(
    output_dir: str | os.PathLike = "path-lm-quickstart",
    steps: int = 1500,
    seq_len: int = 128,
    seed: int = 0,
    batch_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    learning_rate: float = 3e-3,
    attn_chunk_size: int = 64,
    num_eval: int = 1000,
    logging_steps: int | None = None,
    use_cpu: bool = True,
    verbose: bool = True,
) -> dict:
    """Train PaTH and RoPE on flip-flop data, compare their errors with the paper, save, reload and generate.

    Writes to ``output_dir``: ``results.json``, ``error_by_distance.png``, ``error_table.md`` and the PaTH
    checkpoint ``path-model/`` (with its remote code). ``num_eval`` is the number of in-distribution
    sequences; sparse OOD gets twice as many (it has few reads per sequence), dense OOD half.
    ``logging_steps=None`` logs the loss 15 times per model. ``use_cpu=False`` lets Trainer take a GPU.
    Returns the contents of results.json.
    """
    say = print if verbose else (lambda *a, **k: None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()

    num_train = steps * batch_size
    eval_sizes = {"in_distribution": num_eval, "sparse_ood": 2 * num_eval, "dense_ood": max(1, num_eval // 2)}
    train_tokens, eval_sets = make_flipflop_data(seq_len, num_train, eval_sizes, seed=seed)
    say(f"flip-flop data: {num_train} training sequences of {seq_len} tokens (p_ignore 0.8); eval sets "
        + ", ".join(f"{DISTRIBUTION_NAMES[n]} {t.shape[0]}" for n, t in eval_sets.items()))

    shape = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                 intermediate_size=intermediate_size, max_seq_len=seq_len, attn_chunk_size=attn_chunk_size)
    models, training = {}, {}
    for kind in ("path", "rope"):
        label = MODEL_KINDS[kind][0]
        model = build_model(kind, seed=seed, **shape)
        n_params = model.num_parameters()
        say(f"\n== training {label} ({type(model).__name__}, {n_params:,} parameters), {steps} steps of {batch_size} ==")
        training[label] = train_model(
            model, train_tokens, steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            logging_steps=logging_steps or max(1, steps // 15), use_cpu=use_cpu, disable_tqdm=not verbose,
        )
        training[label]["parameters"] = n_params
        models[label] = model

    results = evaluate_models(models, eval_sets)
    table = format_error_table(results)
    say("\n== read-answer error % on flip-flop (ours, paper Table 1 in parentheses; paper: 1 layer, 2 heads x 64, "
        "longer training) ==\n" + table)
    (output_dir / "error_table.md").write_text(table + "\n")
    plot_path = output_dir / "error_by_distance.png"
    plot_error_by_distance(results, plot_path)
    say(f"\nplot: {plot_path}")

    # Save with remote code, reload through the Auto classes, generate (on the CPU).
    trained = models["PaTH"].cpu()
    checkpoint = output_dir / "path-model"
    trained.save_pretrained(checkpoint)
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    reloaded.eval()
    remote_code = sorted(p.name for p in checkpoint.glob("*.py"))
    auto_map = json.loads((checkpoint / "config.json").read_text()).get("auto_map", {})
    # Prompts: two sequences from each evaluation set, cut before their final read answer; from the sparse
    # set, those whose final read is farthest from its write.
    prompts = []
    for name, tokens in eval_sets.items():
        distance = [check_read_answers(row)[-1]["distance"] for row in tokens.tolist()]
        order = sorted(range(len(distance)), key=lambda i: -distance[i]) if name == "sparse_ood" else range(len(distance))
        prompts.append(tokens[list(order)[:2], :-1])
    prompts = torch.cat(prompts)
    with torch.no_grad():
        same_logits = torch.allclose(
            reloaded(input_ids=prompts, use_cache=False).logits,
            trained(input_ids=prompts, use_cache=False).logits,
            atol=1e-5, rtol=1e-4,
        )
    demos = generation_demo(reloaded, prompts)
    reloaded_class = f"{type(reloaded).__module__}.{type(reloaded).__name__}"
    say(f"\n== saved {checkpoint} (remote code {', '.join(remote_code)}; auto_map {sorted(auto_map)}) and reloaded "
        f"with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) ==")
    say(f"class: {reloaded_class}"
        + (" (path_lm is imported here, so transformers prefers it; without path_lm the folder's own code loads)"
           if reloaded_class.startswith("path_lm.") else ""))
    say(f"logits match the trained model: {same_logits}")
    say("greedy answers to flip-flop prompts ending in 'r' (prompt | generated):")
    for demo in demos:
        say("  " + demo["text"])
    say(f"{sum(d['all_right'] for d in demos)}/{len(demos)} answers right")

    wall = time.perf_counter() - wall_start
    summary = {
        "settings": {
            "steps": steps, "seq_len": seq_len, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
            "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
            "intermediate_size": intermediate_size or 2 * hidden_size, "attn_chunk_size": attn_chunk_size,
            "num_train_sequences": num_train, "eval_sequences": eval_sizes, "torch_threads": torch.get_num_threads(),
        },
        "error_percent": {
            label: {name: 100 * ev.error_rate for name, ev in evals.items()} for label, evals in results.items()
        },
        "paper_error_percent": PAPER_ERRORS,
        "evaluations": {label: {name: ev.to_dict() for name, ev in evals.items()} for label, evals in results.items()},
        "training": {
            label: {k: v for k, v in info.items() if k != "log_history"}
            | {"loss_curve": [(e["step"], e["loss"]) for e in info["log_history"] if "loss" in e]}
            for label, info in training.items()
        },
        "checkpoint": str(checkpoint),
        "checkpoint_remote_code": remote_code,
        "checkpoint_auto_map": auto_map,
        "reloaded_class": reloaded_class,
        "reloaded_logits_match": bool(same_logits),
        "generation": demos,
        "wall_seconds": wall,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    say(f"\nwrote {output_dir / 'results.json'}; total wall time {wall:.0f} s")
    return summary


__all__ = [
    "MODEL_KINDS",
    "PAPER_ERRORS",
    "FlipFlopDataset",
    "build_model",
    "evaluate_models",
    "format_error_table",
    "generation_demo",
    "make_flipflop_data",
    "plot_error_by_distance",
    "run_quickstart",
    "train_model",
]
