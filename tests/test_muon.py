"""``path-lm train --optim muon``, the warmup-cosine-to-a-floor schedule, Hub ids as data and tokenizer, and the
MinimalLLM recipe example: on a tiny repeating corpus on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from path_lm import PaTHConfig, PaTHForCausalLM, training
from path_lm.training import (
    MuonWithAdamW,
    PaTHLMTrainer,
    load_documents,
    load_tokenizer,
    muon_parameter_names,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = {"preset": "tiny", "vocab_size": 300, "seq_len": 32, "batch_size": 4, "learning_rate": 3e-3,
        "logging_steps": 1, "use_cpu": True, "disable_tqdm": True, "eval_fraction": 0, "optim": "muon"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "the", "dog", "ran", "to", "the", "big", "red", "house"]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(60)))
    return path


def tiny_model(tie: bool) -> PaTHForCausalLM:
    config = PaTHConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_heads=2, mlp_type="plain",
                        intermediate_size=128, tie_word_embeddings=tie, use_forget_gate=True, use_qk_norm=True)
    return PaTHForCausalLM(config)


def muon_trainer(model, tmp_path, **args) -> PaTHLMTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=3e-3,
                             weight_decay=0.1, **args)
    return PaTHLMTrainer(model=model, args=args, muon={"lr": 0.02, "momentum": 0.95})


@pytest.mark.parametrize("tie", [True, False])
def test_muon_gets_the_2d_hidden_weights_and_adamw_the_rest(tie, tmp_path):
    model = tiny_model(tie)
    hidden = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn.w_proj.0", "attn.w_proj.1",
        "attn.bt_proj", "attn.g_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(muon_parameter_names(model)) == hidden

    optimizer = muon_trainer(model, tmp_path).create_optimizer()
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]]
    adamw = [names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]]
    assert sorted(muon + adamw) == sorted(names.values())  # every parameter in exactly one group
    assert set(muon) == hidden
    assert "model.embeddings.weight" in adamw and ("lm_head.weight" in adamw) != tie
    assert all(n.endswith(("norm.weight", ".bias", "conv1d.weight", "embeddings.weight", "lm_head.weight"))
               for n in adamw)
    decayed = {names[id(p)] for group in optimizer.adamw.param_groups if group["weight_decay"] for p in group["params"]}
    assert not any(n.endswith((".bias", "norm.weight")) for n in decayed)
    assert optimizer.muon.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups == optimizer.muon.param_groups + optimizer.adamw.param_groups


def test_warmup_cosine_floor_schedule_scales_both_optimizers(tmp_path):
    steps, warmup, floor = 100, 5, 0.1
    trainer = muon_trainer(tiny_model(True), tmp_path, lr_scheduler_type="cosine_with_min_lr",
                           lr_scheduler_kwargs={"min_lr_rate": floor}, warmup_steps=0.05)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)

    def factor(step):
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / (steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in range(steps + 1):
        if step in (0, 2, 5, 30, 52, 80, 100):
            lrs = [group["lr"] for group in trainer.optimizer.param_groups]
            assert lrs[0] == pytest.approx(0.02 * factor(step))  # Muon
            assert lrs[1:] == pytest.approx([3e-3 * factor(step)] * (len(lrs) - 1))  # AdamW
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert factor(steps) == pytest.approx(floor)


def test_muon_training_lowers_the_loss_and_resumes_exactly(corpus, tmp_path):
    common = dict(FAST, lr_scheduler_type="constant", seed=1)
    n = 8
    full = train(corpus, tmp_path / "full", max_steps=2 * n, save_steps=2 * n, **common)
    losses = [loss for _, loss in full["loss_curve"]]
    assert full["training"]["optim"] == "muon"
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    train(corpus, tmp_path / "split", max_steps=n, save_steps=n, **common)
    state = torch.load(tmp_path / "split" / f"checkpoint-{n}" / "optimizer.pt", weights_only=True)
    assert set(state) == {"muon", "adamw"}
    assert all("momentum_buffer" in s for s in state["muon"]["state"].values()) and state["muon"]["state"]
    assert all("exp_avg" in s for s in state["adamw"]["state"].values()) and state["adamw"]["state"]
    resumed = train(corpus, tmp_path / "split", max_steps=2 * n, save_steps=n, resume=True, **common)
    assert resumed["training"]["resumed_from"].endswith(f"checkpoint-{n}")
    assert dict(resumed["loss_curve"])[2 * n] == pytest.approx(dict(full["loss_curve"])[2 * n], rel=1e-5)


def test_hub_ids_are_loaded_from_the_hub_and_misspelt_paths_are_not(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["one document", "another one"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_documents(["someone/corpus"], dataset_config="en") == ["one document", "another one"]
    assert calls == [("someone/corpus", "en", "train", False)]
    with pytest.raises(SystemExit, match="does not exist"):
        load_documents([str(tmp_path / "nope.txt")])
    with pytest.raises(SystemExit, match="does not exist"):
        load_documents(["data/nope.jsonl"])

    monkeypatch.setattr(training.AutoTokenizer, "from_pretrained", lambda name: f"tokenizer of {name}")
    assert load_tokenizer("HuggingFaceTB/SmolLM-135M") == "tokenizer of HuggingFaceTB/SmolLM-135M"
    with pytest.raises(SystemExit, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


def test_minimal_llm_recipe_example_runs_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("minimal_llm_recipe", ROOT / "examples" / "minimal_llm_recipe.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--tiny", "--output-dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "model" / "training_summary.json").read_text())
    assert summary["training"]["optim"] == "muon" and summary["training"]["min_lr_ratio"] == 0.1
    assert summary["final_loss"] < summary["loss_curve"][0][1]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["mlp_type"] == "plain" and config["norm_eps"] is None and config["tie_word_embeddings"]
    assert config["embedding_multiplier"] == pytest.approx(8.0)
