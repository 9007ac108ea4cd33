"""Fine-tuning with standard tools: transformers.Trainer on PaTHForSequenceClassification, and PEFT LoRA on the
attention and MLP projections of PaTHForCausalLM (train, then merge into a plain PaTHForCausalLM). CPU, tiny."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from path_lm import PaTHConfig, PaTHForCausalLM, PaTHForSequenceClassification

VOCAB = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> PaTHConfig:
    options = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
        use_forget_gate=True, attn_chunk_size=8, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    options.update(overrides)
    return PaTHConfig(**options)


def toy_classification_data(n: int = 32, length: int = 10):
    """Label 1 when token 5 occurs in the (right-padded) sequence."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        size = int(torch.randint(4, length + 1, (), generator=gen))
        ids = torch.randint(6, VOCAB, (size,), generator=gen)
        if i % 2:
            ids[int(torch.randint(0, size, (), generator=gen))] = 5
        mask = torch.cat([torch.ones(size, dtype=torch.long), torch.zeros(length - size, dtype=torch.long)])
        ids = torch.cat([ids, torch.zeros(length - size, dtype=torch.long)])
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 2)})
    return rows


@torch.no_grad()
def mean_loss(model, rows) -> float:
    model.eval()
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return model(**batch).loss.item()


def test_sequence_classification_trains_with_trainer(tmp_path):
    torch.manual_seed(0)
    model = PaTHForSequenceClassification(tiny_config(num_labels=2))
    data = toy_classification_data()
    before = mean_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    after = mean_loss(model, data)
    assert after < 0.7 * before, (before, after)

    model.save_pretrained(tmp_path / "clf")
    loaded = PaTHForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert mean_loss(loaded, data) == pytest.approx(after, rel=1e-5)


def test_lora_on_attention_and_mlp_trains_and_merges():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = PaTHForCausalLM(tiny_config(pad_token_id=None))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    )
    adapted = {name.split(".")[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(targets)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(15):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    lora.eval()
    with torch.no_grad():
        expected = lora(input_ids=ids, use_cache=False).logits
    merged = lora.merge_and_unload()
    assert type(merged) is PaTHForCausalLM
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
