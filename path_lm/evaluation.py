"""Perplexity of a causal LM on a text file, overall and by position (the PaTH paper's length-extrapolation
plot: loss at positions beyond the training length). What ``path-lm eval`` calls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def read_tokens(tokenizer, data_file) -> torch.Tensor:
    """The whole file as one token stream [N] (no special tokens added)."""
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"{path} holds {len(ids)} token(s); perplexity needs at least 2")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every next token: [B, T] ids -> [B, T - 1] nats, in float32."""
    logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()


def perplexity(model, tokens: torch.Tensor, seq_len: int, stride: int | None = None, batch_size: int = 8) -> dict:
    """Token-level perplexity of a stream of ids [N] with windows of ``seq_len`` tokens every ``stride``
    (default ``seq_len``: disjoint windows). Each token is scored at most once, in the
    first window that predicts it (disjoint windows leave each window's first token unscored), so overlapping
    windows (stride < seq_len) give tokens more context."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    windows = []  # (begin, first scored target position)
    scored_until = 1  # targets before this position are scored already (position 0 has no context)
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + seq_len, len(tokens))
        first = max(scored_until, begin + 1)  # a window's first token has no context in it
        if end > first:
            windows.append((begin, end, first))
            scored_until = end
        if end == len(tokens):
            break
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        full = [w for w in group if w[1] - w[0] == seq_len]
        rest = [w for w in group if w[1] - w[0] != seq_len]  # at most one: the tail
        for batch in (full, *([w] for w in rest)):
            if not batch:
                continue
            nll = token_nll(model, torch.stack([tokens[b:e] for b, e, _ in batch]))
            for row, (b, e, first) in zip(nll, batch):
                scored = row[first - b - 1 :]  # nll[j] is the loss of target position b + j + 1
                total += scored.double().sum().item()
                count += scored.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "seq_len": seq_len, "stride": stride}


def perplexity_by_position(
    model, tokens: torch.Tensor, max_len: int, bucket_size: int | None = None, batch_size: int = 1,
    max_sequences: int | None = None,
) -> list[dict]:
    """Loss and perplexity by position for sequences of ``max_len`` tokens cut from the stream (disjoint),
    averaged over sequences and over buckets of ``bucket_size`` positions (default ``max_len / 16``).
    Each row: start, end (target positions, end exclusive), tokens, loss, perplexity."""
    n_seq = len(tokens) // max_len
    if max_sequences:
        n_seq = min(n_seq, max_sequences)
    if n_seq == 0:
        raise ValueError(
            f"the data holds {len(tokens)} tokens; --max-len {max_len} needs at least that many in one sequence"
        )
    bucket_size = bucket_size or max(1, max_len // 16)
    sequences = tokens[: n_seq * max_len].view(n_seq, max_len)
    nll_sum = torch.zeros(max_len - 1, dtype=torch.float64)
    for i in range(0, n_seq, batch_size):
        nll_sum += token_nll(model, sequences[i : i + batch_size]).double().sum(0)
    rows = []
    for start in range(1, max_len, bucket_size):  # target positions 1 .. max_len - 1
        end = min(start + bucket_size, max_len)
        count = (end - start) * n_seq
        loss = (nll_sum[start - 1 : end - 1].sum() / count).item()
        rows.append({"start": start, "end": end, "tokens": count, "loss": loss, "perplexity": math.exp(loss)})
    return rows


def format_table(rows: list[dict], train_len: int | None = None) -> str:
    lines = [f"{'positions':>17} {'tokens':>9} {'loss':>8} {'ppl':>10}"]
    for row in rows:
        mark = " *" if train_len is not None and row["end"] > train_len else ""
        positions = f"{row['start']:>8}-{row['end'] - 1:<8}"
        lines.append(f"{positions} {row['tokens']:>9} {row['loss']:>8.4f} {row['perplexity']:>10.3f}{mark}")
    if train_len is not None:
        lines.append(f"* beyond the training length ({train_len})")
    return "\n".join(lines)


def plot_by_position(rows: list[dict], path, train_len: int | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = [(row["start"] + row["end"] - 1) / 2 for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(centers, [row["perplexity"] for row in rows], marker="o")
    if train_len is not None:
        ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
        ax.legend()
    ax.set_xlabel("position")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity by position")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def training_length(model_path) -> int | None:
    """The sequence length a checkpoint was trained at, from the training_summary.json that ``path-lm
    train`` writes, if any."""
    summary = Path(model_path) / "training_summary.json"
    if summary.is_file():
        value = json.loads(summary.read_text()).get("seq_len")
        return int(value) if value else None
    return None


def evaluate(
    model, tokenizer, data_file, seq_len: int = 512, stride: int | None = None, batch_size: int = 8,
    by_position: bool = False, max_len: int | None = None, bucket_size: int | None = None,
    train_len: int | None = None, output_dir=None,
) -> dict:
    """Perplexity on ``data_file``; with ``by_position``, also the table by position up to ``max_len``,
    written with a PNG into ``output_dir`` (eval_by_position.json / .png). Returns the results dict."""
    tokens = read_tokens(tokenizer, data_file)
    results = {"data": str(data_file), **perplexity(model, tokens, seq_len, stride, batch_size)}
    if by_position:
        if not max_len:
            raise ValueError("--by-position needs --max-len")
        rows = perplexity_by_position(model, tokens, max_len, bucket_size, batch_size)
        results["by_position"] = {"max_len": max_len, "train_len": train_len, "rows": rows}
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
        if by_position:
            plot_by_position(results["by_position"]["rows"], output_dir / "eval_by_position.png", train_len)
    return results


__all__ = [
    "evaluate",
    "format_table",
    "perplexity",
    "perplexity_by_position",
    "plot_by_position",
    "read_tokens",
    "token_nll",
    "training_length",
]
