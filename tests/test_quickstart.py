"""Train: flip-flop data, its evaluator, and the quickstart job end to end (tiny, CPU).

The data checks compare the generator with an independent per-pair reading of the sequences; the evaluator
is checked on hand-made sequences with hand-made "models" whose right and wrong answers are known, so the
error rates are exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from path_lm import PaTHForCausalLM
from path_lm.cli import build_parser, main
from path_lm.flipflop import (
    DISTRIBUTIONS,
    IGNORE,
    ONE,
    READ,
    VOCAB,
    VOCAB_SIZE,
    WRITE,
    ZERO,
    distance_since_write,
    evaluate_flipflop,
    generate_flipflop,
    read_answer_labels,
    read_answer_mask,
)
from path_lm.quickstart import (
    build_model,
    check_read_answers,
    distance_bins,
    format_error_table,
)


def encode(text: str) -> torch.LongTensor:
    """'w1 i0 r1' -> token ids [T]."""
    return torch.tensor([VOCAB.index(symbol) for pair in text.split() for symbol in pair])


def reads_by_hand(row: list[int]) -> list[tuple[int, int, int]]:
    """(answer position, expected bit token, instructions since the write) for every read, pair by pair."""
    out, last_bit, last_pair = [], None, None
    for pair in range(len(row) // 2):
        instruction, bit = row[2 * pair], row[2 * pair + 1]
        if instruction == WRITE:
            last_bit, last_pair = bit, pair
        elif instruction == READ:
            out.append((2 * pair + 1, last_bit, pair - last_pair))
    return out


# ------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_instruction_frequencies_match_the_distribution(name):
    p_ignore = DISTRIBUTIONS[name]
    tokens = generate_flipflop(4000, 64, p_ignore, torch.Generator().manual_seed(1))
    assert tokens.shape == (4000, 64) and tokens.dtype == torch.long
    instructions = tokens[:, 0::2]
    bits = tokens[:, 1::2]
    assert (instructions[:, 0] == WRITE).all(), "every sequence starts with a write"
    assert (instructions[:, -1] == READ).all(), "every sequence ends with a read"
    assert set(instructions.unique().tolist()) <= {WRITE, READ, IGNORE}
    assert set(bits.unique().tolist()) <= {ZERO, ONE}
    inner = instructions[:, 1:-1]  # the freely drawn instructions: 4000 * 30 = 120k draws
    p_write = (1 - p_ignore) / 2
    for token, p in ((IGNORE, p_ignore), (WRITE, p_write), (READ, p_write)):
        freq = (inner == token).float().mean().item()
        assert abs(freq - p) < 5 * (p * (1 - p) / inner.numel()) ** 0.5 + 1e-9, (VOCAB[token], freq, p)
    # Written and ignored bits are fair coins.
    free_bits = bits[instructions != READ]
    assert abs((free_bits == ONE).float().mean().item() - 0.5) < 0.01


def test_generator_is_seeded_and_validates():
    a = generate_flipflop(8, 32, 0.8, torch.Generator().manual_seed(3))
    b = generate_flipflop(8, 32, 0.8, torch.Generator().manual_seed(3))
    c = generate_flipflop(8, 32, 0.8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="even"):
        generate_flipflop(2, 31, 0.8)
    with pytest.raises(ValueError, match="p_ignore"):
        generate_flipflop(2, 32, 1.5)


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_read_answers_equal_the_last_written_bit(name):
    tokens = generate_flipflop(300, 48, DISTRIBUTIONS[name], torch.Generator().manual_seed(2))
    mask = read_answer_mask(tokens)
    labels = read_answer_labels(tokens)
    distance = distance_since_write(tokens)
    for i, row in enumerate(tokens.tolist()):
        reads = reads_by_hand(row)
        assert reads, "every sequence has a read"
        positions = [pos for pos, _, _ in reads]
        assert mask[i].nonzero().flatten().tolist() == positions
        for pos, expected, gap in reads:
            assert row[pos] == expected, "".join(VOCAB[t] for t in row)
            assert labels[i, pos] == expected
            assert distance[i, pos] == gap
        assert (labels[i][~mask[i]] == -100).all()


def test_masks_and_distances_on_a_hand_made_sequence():
    tokens = encode("w1 i0 r1 w0 i1 i1 r0 r0").unsqueeze(0)
    assert read_answer_mask(tokens)[0].nonzero().flatten().tolist() == [5, 13, 15]
    assert distance_since_write(tokens)[0, [5, 13, 15]].tolist() == [2, 3, 4]
    assert read_answer_labels(tokens)[0].tolist() == [-100] * 5 + [ONE] + [-100] * 7 + [ZERO, -100, ZERO]
    with pytest.raises(ValueError, match="start with a write"):
        distance_since_write(encode("i1 w0 r0").unsqueeze(0))


# -------------------------------------------------------------------------------------------- evaluator


class CopyLastWrite(torch.nn.Module):
    """A perfect flip-flop 'model' computed by hand: at every position, logits favour the last written bit,
    except that it answers wrong whenever the read is more than `horizon` instructions after the write."""

    def __init__(self, horizon: int = 10**9):
        super().__init__()
        self.horizon = horizon
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so that it has a device

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, VOCAB_SIZE)
        for b, row in enumerate(input_ids.tolist()):
            last_bit, last_pair = ZERO, 0
            for t in range(T):
                if t % 2 == 1 and row[t - 1] == WRITE:
                    last_bit, last_pair = row[t], t // 2
                if t % 2 == 0:  # an instruction: the next token is its bit
                    far = t // 2 - last_pair > self.horizon
                    guess = (ONE + ZERO - last_bit) if far else last_bit
                    logits[b, t, guess] = 1.0
        return logits


def test_evaluator_exact_error_rates_on_hand_made_sequences():
    tokens = torch.stack([
        encode("w1 i0 r1 i1 i0 i1 r1 w0"),  # reads at distance 2 and 6
        encode("w0 r0 i1 i1 i1 r0 r0 r0"),  # reads at distance 1, 5, 6, 7
    ])
    perfect = evaluate_flipflop(CopyLastWrite(), tokens)
    assert (perfect.errors, perfect.reads, perfect.error_rate) == (0, 6, 0.0)
    assert perfect.by_distance == {1: (0, 1), 2: (0, 1), 5: (0, 1), 6: (0, 2), 7: (0, 1)}

    short = evaluate_flipflop(CopyLastWrite(horizon=5), tokens, batch_size=1)  # wrong at distances 6 and 7
    assert (short.errors, short.reads) == (3, 6)
    assert short.error_rate == pytest.approx(0.5)
    assert short.by_distance == {1: (0, 1), 2: (0, 1), 5: (0, 1), 6: (2, 2), 7: (1, 1)}
    assert short.to_dict()["by_distance"]["6"] == [2, 2]


def test_evaluator_uses_the_logits_before_each_answer_with_a_plain_function():
    tokens = encode("w1 r1 i0 r1").unsqueeze(0).repeat(4, 1)  # answers at positions 3 and 7

    def always(bit_token):
        def model(input_ids):
            logits = torch.zeros(*input_ids.shape, VOCAB_SIZE)
            logits[..., bit_token] = 1.0
            return logits
        return model

    assert evaluate_flipflop(always(ONE), tokens).error_rate == 0.0
    assert evaluate_flipflop(always(ZERO), tokens).error_rate == 1.0
    # Argmax over the whole vocabulary: predicting an instruction at an answer is an error too.
    assert evaluate_flipflop(always(IGNORE), tokens).error_rate == 1.0

    def right_only_at_position_6(input_ids):  # the guess for token 7 comes from position 6
        logits = torch.zeros(*input_ids.shape, VOCAB_SIZE)
        logits[..., ZERO] = 1.0
        logits[:, 6, ONE] = 2.0
        return logits

    result = evaluate_flipflop(right_only_at_position_6, tokens)
    assert (result.errors, result.reads) == (4, 8)
    assert result.by_distance == {1: (4, 4), 3: (0, 4)}


def test_evaluator_runs_a_transformers_model_and_restores_train_mode():
    model = build_model("path", hidden_size=16, num_heads=2, attn_chunk_size=8)
    model.train()
    tokens = generate_flipflop(6, 20, 0.5, torch.Generator().manual_seed(0))
    result = evaluate_flipflop(model, tokens, batch_size=4)
    assert result.reads == int(read_answer_mask(tokens).sum())
    assert model.training


# ---------------------------------------------------------------------------------------------- helpers


def test_build_model_kinds():
    shape = dict(hidden_size=16, num_heads=2, num_layers=1, attn_chunk_size=8)
    path, fox, rope = (build_model(kind, **shape) for kind in ("path", "fox", "rope"))
    assert not path.config.use_forget_gate and fox.config.use_forget_gate
    assert type(rope).__name__ == "LlamaForCausalLM"
    assert rope.config.hidden_size == path.config.hidden_size == 16
    assert rope.config.intermediate_size == path.config.intermediate_size
    # FoX: beta is exactly 0 (identity transforms), and stays so (frozen).
    attn = fox.model.layers[0].attn
    x = torch.randn(3, 16)
    assert (2 * torch.sigmoid(attn.bt_proj(x))).abs().max() == 0
    assert not any(p.requires_grad for p in attn.bt_proj.parameters())
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("alibi")


def test_distance_bins_cover_every_distance_once():
    bins = distance_bins(63)
    assert bins[:5] == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16)] and bins[-1] == (33, 63)
    covered = [d for low, high in bins for d in range(low, high + 1)]
    assert covered == list(range(1, 64))


def test_check_read_answers_marks_generated_answers():
    row = encode("w1 i0 r1 w0 i1 r1").tolist()
    checks = check_read_answers(row, start=6)
    assert [(c["answer"], c["expected"], c["distance"]) for c in checks] == [(1, 0, 2)]


# ------------------------------------------------------------------------------------------- end to end


def test_quickstart_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the `train` extra
    out = tmp_path / "qs"
    code = main([
        "quickstart", "--output-dir", str(out), "--steps", "4", "--seq-len", "24", "--batch-size", "8",
        "--hidden-size", "16", "--num-eval", "16", "--attn-chunk-size", "8",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| PaTH |" in printed and "| RoPE |" in printed and "(40.3)" in printed
    assert "answers right" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results["error_percent"]) == {"PaTH", "RoPE"}
    for errors in results["error_percent"].values():
        assert set(errors) == {"in_distribution", "sparse_ood", "dense_ood"}
        assert all(0 <= e <= 100 for e in errors.values())
    assert results["settings"]["steps"] == 4
    assert (out / "error_table.md").read_text().startswith("| model |")
    png = (out / "error_by_distance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert results["reloaded_logits_match"] is True
    assert len(results["generation"]) == 6 and all(len(d["checks"]) == 1 for d in results["generation"])

    # The checkpoint carries its code and loads through the Auto classes with trust_remote_code.
    checkpoint = out / "path-model"
    assert {"configuration_path.py", "modeling_path.py"} <= {p.name for p in checkpoint.glob("*.py")}
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_path.PaTHForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    assert isinstance(model, PaTHForCausalLM) or type(model).__name__ == "PaTHForCausalLM"
    tokens = generate_flipflop(2, 24, 0.8, torch.Generator().manual_seed(0))
    assert evaluate_flipflop(model, tokens).reads == int(read_answer_mask(tokens).sum())


def test_error_table_and_cli_parser():
    from path_lm.flipflop import FlipFlopEval

    results = {
        "PaTH": {"in_distribution": FlipFlopEval(0, 100), "sparse_ood": FlipFlopEval(1, 1000)},
        "RoPE (Llama)": {"in_distribution": FlipFlopEval(5, 100), "sparse_ood": FlipFlopEval(300, 1000)},
    }
    table = format_error_table(results).splitlines()
    assert table[2] == "| PaTH | 0.00 (0) | 0.10 (0.0001) |"
    assert table[3] == "| RoPE (Llama) | 5.00 (6.9) | 30.00 (40.3) |"
    args = build_parser().parse_args(["quickstart", "--steps", "7", "--layers", "2"])
    assert (args.steps, args.num_layers, args.command) == (7, 2, "quickstart")
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
