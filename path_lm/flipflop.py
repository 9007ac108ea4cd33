"""Flip-flop language data and its evaluator.

Flip-flop language modeling (Liu et al., 2023, "Exposing Attention Glitches with Flip-Flop Language
Modeling"; Table 1 of the PaTH paper) tests whether a model can recall the last written bit across
distractors. A sequence is a list of instruction/bit pairs:

    w b   write bit b                     (b random)
    i b   ignore: b is noise              (b random)
    r b   read: b must equal the last bit written

A sequence starts with a write and ends with a read, so every sequence has at least one read, and the
only deterministic tokens are the read answers (the bit after each ``r``). The distribution FFL(p_i) draws
each other instruction independently: ignore with probability ``p_i``, write and read with
``(1 - p_i) / 2`` each. The standard sets are in-distribution ``p_i = 0.8``, sparse out-of-distribution
``p_i = 0.98`` (long gaps, rarely seen in training) and dense out-of-distribution ``p_i = 0.1``.

Tokens: ``w r i 0 1`` are ids 0-4 (:data:`VOCAB`); no special tokens are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = ("w", "r", "i", "0", "1")
WRITE, READ, IGNORE, ZERO, ONE = range(len(VOCAB))
VOCAB_SIZE = len(VOCAB)

# The three evaluation distributions of Liu et al. (2023), by their ignore probability.
DISTRIBUTIONS = {"in_distribution": 0.8, "sparse_ood": 0.98, "dense_ood": 0.1}


def generate_flipflop(
    num_sequences: int,
    seq_len: int,
    p_ignore: float,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Sample flip-flop sequences from FFL(p_ignore).

    Args:
        num_sequences: N, the number of sequences.
        seq_len: T, tokens per sequence (even, at least 4: a write and a read).
        p_ignore: probability of ``i`` for the instructions between the first (``w``) and the last (``r``);
            ``w`` and ``r`` share the rest equally.
        generator: a seeded ``torch.Generator`` for reproducible data.

    Returns:
        token ids [N, T] (int64): instructions at even positions, bits at odd positions.
    """
    if seq_len % 2 or seq_len < 4:
        raise ValueError(f"seq_len must be even and >= 4 (instruction/bit pairs), got {seq_len}")
    if not 0.0 <= p_ignore <= 1.0:
        raise ValueError(f"p_ignore must be in [0, 1], got {p_ignore}")
    n_pairs = seq_len // 2
    p_write = (1.0 - p_ignore) / 2
    u = torch.rand(num_sequences, n_pairs, generator=generator)
    instr = torch.full((num_sequences, n_pairs), IGNORE, dtype=torch.long)
    instr[u < 2 * p_write] = READ
    instr[u < p_write] = WRITE
    instr[:, 0] = WRITE
    instr[:, -1] = READ
    bits = torch.randint(0, 2, (num_sequences, n_pairs), generator=generator)
    # Each read returns the bit of the latest write at or before it (the first pair is always a write).
    pair_index = torch.arange(n_pairs).expand(num_sequences, n_pairs)
    last_write = torch.where(instr == WRITE, pair_index, 0).cummax(dim=1).values  # [N, n_pairs]
    bits = torch.where(instr == READ, bits.gather(1, last_write), bits)
    tokens = torch.stack([instr, ZERO + bits], dim=2)  # [N, n_pairs, 2]
    return tokens.reshape(num_sequences, seq_len)


def read_answer_mask(tokens: torch.LongTensor) -> torch.BoolTensor:
    """True at every read answer (the bit right after an ``r``), [N, T] like ``tokens``."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 1:] = tokens[:, :-1] == READ
    mask[:, 0::2] = False  # instructions sit at even positions; only bits can be answers
    return mask


def read_answer_labels(tokens: torch.LongTensor) -> torch.LongTensor:
    """Causal-LM labels that train only on read answers: the token at answers, -100 elsewhere."""
    return torch.where(read_answer_mask(tokens), tokens, torch.full_like(tokens, -100))


def distance_since_write(tokens: torch.LongTensor) -> torch.LongTensor:
    """Instructions since the last write, at every position [N, T].

    At a read answer it counts the instructions from the governing ``w`` to the ``r`` (1 when the read
    immediately follows the write); it is 0 at the write itself. Sequences must start with a write.
    """
    instr = tokens[:, 0::2]  # [N, n_pairs]
    if not (instr[:, 0] == WRITE).all():
        raise ValueError("every flip-flop sequence must start with a write")
    pair_index = torch.arange(instr.shape[1], device=tokens.device).expand_as(instr)
    last_write = torch.where(instr == WRITE, pair_index, 0).cummax(dim=1).values
    return (pair_index - last_write).repeat_interleave(2, dim=1)


def flipflop_text(tokens: torch.LongTensor) -> str:
    """One sequence as text, pairs separated by spaces: ``w0 i1 r0 ...``."""
    symbols = [VOCAB[t] for t in tokens.tolist()]
    return " ".join(a + b for a, b in zip(symbols[0::2], symbols[1::2]))


@dataclass
class FlipFlopEval:
    """Read-answer errors of one model on one set of sequences.

    by_distance maps the number of instructions since the last write to (errors, reads).
    """

    errors: int
    reads: int
    by_distance: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.reads if self.reads else float("nan")

    def to_dict(self) -> dict:
        return {
            "error_rate": self.error_rate,
            "errors": self.errors,
            "reads": self.reads,
            "by_distance": {str(d): list(v) for d, v in sorted(self.by_distance.items())},
        }


def next_token_logits(model, input_ids: torch.LongTensor) -> torch.Tensor:
    """Logits [B, T, V] of a transformers causal LM (no cache), or of any callable returning them."""
    if isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model, "generate"):
        return model(input_ids=input_ids, use_cache=False).logits
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_flipflop(model, tokens: torch.LongTensor, batch_size: int = 64) -> FlipFlopEval:
    """Error at read answers under teacher forcing.

    Every sequence is run whole; the prediction for the answer at position t is the greedy argmax (over the
    whole vocabulary) of the next-token logits at t - 1.

    Args:
        model: a transformers causal LM, or a callable mapping input ids [B, T] to logits [B, T, V]
            (or to an output with ``.logits``).
        tokens: flip-flop sequences [N, T] (see :func:`generate_flipflop`).
        batch_size: sequences per forward.
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device
    else:
        device = tokens.device
    errors = torch.zeros(0, dtype=torch.bool)
    distances = torch.zeros(0, dtype=torch.long)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size]
            logits = next_token_logits(model, batch.to(device)).float().cpu()  # [B, T, V]
            mask = read_answer_mask(batch)
            predicted = logits[:, :-1].argmax(-1)  # predicted[:, t - 1] is the guess for token t
            wrong = predicted != batch[:, 1:]
            errors = torch.cat([errors, wrong[mask[:, 1:]]])
            distances = torch.cat([distances, distance_since_write(batch)[mask]])
    finally:
        if was_training:
            model.train()
    by_distance = {}
    for d in distances.unique().tolist():
        at_d = distances == d
        by_distance[d] = (int(errors[at_d].sum()), int(at_d.sum()))
    return FlipFlopEval(errors=int(errors.sum()), reads=int(errors.numel()), by_distance=by_distance)


__all__ = [
    "DISTRIBUTIONS",
    "FlipFlopEval",
    "VOCAB",
    "VOCAB_SIZE",
    "distance_since_write",
    "evaluate_flipflop",
    "flipflop_text",
    "generate_flipflop",
    "next_token_logits",
    "read_answer_labels",
    "read_answer_mask",
]
