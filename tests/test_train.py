"""``path-lm train``: end to end, resume, torchrun (DDP) and accelerate (FSDP2), packing and bad input, on a tiny
corpus on the CPU."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from path_lm import PaTHConfig, PaTHForCausalLM, training
from path_lm.cli import main
from path_lm.training import IGNORE_INDEX, ThroughputMeter, load_documents, pack_documents, train

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "to", "big", "red", "house", "under",
         "blue", "sky", "over", "green", "hill"]
# Small enough for the 2-core CI: a 2-layer width-64 model, 32-token rows, a 300-token BPE.
FAST = {"preset": "tiny", "vocab_size": 300, "seq_len": 32, "batch_size": 4, "learning_rate": 3e-3,
        "logging_steps": 1, "use_cpu": True, "disable_tqdm": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))

    text = folder / "docs.txt"
    text.write_text("\n\n".join(sentence() + "\n" + sentence() for _ in range(40)) + "\n")
    lines = folder / "docs.jsonl"
    lines.write_text("".join(json.dumps({"body": sentence(), "id": i}) + "\n" for i in range(30)))
    empty = folder / "empty.txt"
    empty.write_text("\n\n   \n")
    return {"txt": text, "jsonl": lines, "empty": empty}


def logged_losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_train_end_to_end_from_the_command_line(corpus, tmp_path):
    out = tmp_path / "run"
    status = main([
        "train", str(corpus["txt"]), str(corpus["jsonl"]), "--text-field", "body", "--output-dir", str(out),
        "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--learning-rate", "3e-3",
        "--max-steps", "30", "--save-steps", "15", "--logging-steps", "5", "--warmup", "0.1", "--cpu", "--no-progress",
    ])
    assert status == 0
    assert (out / "loss_curve.png").stat().st_size > 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
    model_dir = out / "model"
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary == json.loads((out / "training_summary.json").read_text())
    assert summary["data_files"] == [str(corpus["txt"]), str(corpus["jsonl"])]
    assert summary["documents"]["train"] + summary["documents"]["eval"] == 70
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 32 and summary["seq_len"] == 32
    losses = [loss for _, loss in summary["loss_curve"]]
    assert losses[-1] < losses[0] and summary["final_loss"] == losses[-1]
    assert 1 < summary["eval_perplexity"] < 300
    rates = summary["throughput_curve"]
    assert [step for step, _ in rates] == [5, 10, 15, 20, 25, 30] and all(rate > 0 for _, rate in rates)
    assert summary["tokens_per_second"] == pytest.approx(statistics.median(rate for _, rate in rates[1:]))
    assert (model_dir / "loss_curve.png").exists() and (model_dir / "modeling_path.py").exists()

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == model.config.vocab_size == 300
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "the cat sat"
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


def test_throughput_counts_training_time_only(monkeypatch):
    clock = iter([0.0, 2.0, 5.0, 9.0, 10.0])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    meter, state = ThroughputMeter(tokens_per_step=100), SimpleNamespace(global_step=0)
    meter.on_train_begin(None, state, None)  # t = 0
    assert meter.rate(4) == 200.0  # t = 2: 4 steps of 100 tokens in 2 s
    state.global_step = 4
    meter.on_evaluate(None, state, None)  # t = 5: the 3 s of evaluation are not training time
    assert meter.rate(8) == 100.0  # t = 9
    assert meter.rate(8) is None  # t = 10: no step since the last log


def test_resume_matches_an_uninterrupted_run(corpus, tmp_path):
    # A constant learning rate: the schedule of a max_steps=N run would differ from the 2N run's.
    common = dict(FAST, lr_scheduler_type="constant", eval_fraction=0, seed=3)
    n = 6
    train(corpus["txt"], tmp_path / "full", max_steps=2 * n, save_steps=2 * n, **common)
    train(corpus["txt"], tmp_path / "split", max_steps=n, save_steps=n, **common)
    summary = train(corpus["txt"], tmp_path / "split", max_steps=2 * n, save_steps=n, resume=True, **common)
    assert summary["training"]["resumed_from"].endswith(f"checkpoint-{n}")
    full = logged_losses(tmp_path / "full" / f"checkpoint-{2 * n}")
    resumed = logged_losses(tmp_path / "split" / f"checkpoint-{2 * n}")
    assert sorted(resumed) == list(range(1, 2 * n + 1))
    assert resumed[2 * n] == pytest.approx(full[2 * n], rel=1e-5)


def train_on_two_processes_and_one(corpus, tmp_path, launcher: list[str]) -> None:
    """``path-lm train`` in this process (batch 4) and under ``python -m LAUNCHER ...`` with 2 CPU processes
    (batch 2 each, gloo): the same global batch gives the same loss at every step."""
    args = ["train", str(corpus["txt"]), "--vocab-size", "300", "--seq-len", "32", "--learning-rate", "3e-3",
            "--max-steps", "8", "--save-steps", "8", "--logging-steps", "1", "--eval-fraction", "0", "--cpu",
            "--no-progress"]
    main(args + ["--output-dir", str(tmp_path / "one"), "--batch-size", "4"])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", *launcher, "-m", "path_lm.cli", *args, "--output-dir", str(tmp_path / "two"),
         "--batch-size", "2"],
        env=env, check=True, timeout=240,
    )
    one = json.loads((tmp_path / "one" / "training_summary.json").read_text())
    two = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert two["training"]["world_size"] == 2 and two["training"]["global_batch_size"] == 4
    for (step_one, loss_one), (step_two, loss_two) in zip(one["loss_curve"], two["loss_curve"], strict=True):
        assert step_one == step_two and loss_two == pytest.approx(loss_one, rel=1e-4)
    assert not list((tmp_path / "two").glob(".model.tmp*")), "the save's temporary folder was left behind"


def test_torchrun_two_processes_match_one(corpus, tmp_path):
    train_on_two_processes_and_one(corpus, tmp_path, ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model", trust_remote_code=True)


def test_accelerate_fsdp_two_processes_match_one(corpus, tmp_path):
    """examples/fsdp_config.yaml's FSDP2 setup (a unit per PaTHBlock, full state dict), on 2 CPU processes."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "fsdp_config.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")  # gloo, float32
    config_file = tmp_path / "fsdp_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    train_on_two_processes_and_one(corpus, tmp_path, ["accelerate.commands.launch", "--config_file", str(config_file)])
    # The sharded run's final save is an ordinary full checkpoint with the single run's weights.
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model", trust_remote_code=True)
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model", trust_remote_code=True)
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    ids = torch.tensor([[5, 17, 42, 7]])
    assert torch.equal(sharded.generate(ids, max_new_tokens=8, do_sample=False),
                       single.generate(ids, max_new_tokens=8, do_sample=False))


def test_distributed_benchmark_logic_on_cpu(tmp_path):
    """benchmarks/gpu_distributed.py --tiny (one process, then 2 gloo processes in a second call against the
    first call's JSON): the script that will run on several GPUs, kept working until a machine has them."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_distributed.py"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    subprocess.run([sys.executable, str(script), "--tiny", "--launchers", "single", "--out-dir", str(tmp_path / "a"),
                    "--json", str(first)], env=env, check=True, timeout=300, capture_output=True)
    subprocess.run([sys.executable, str(script), "--tiny", "--launchers", "ddp", "--reference", str(first), "--out-dir",
                    str(tmp_path / "b"), "--json", str(second)], env=env, check=True, timeout=300, capture_output=True)
    runs = json.loads(second.read_text())["runs"]
    assert [(r["launcher"], r["processes"]) for r in runs] == [("single", 1), ("ddp", 2)]
    one, two = (r["summary"] for r in runs)
    assert two["training"]["world_size"] == 2 and two["training"]["global_batch_size"] == one["training"]["global_batch_size"]
    assert runs[1]["curve_gap"][0] < 1e-3 and len(two["loss_curve"]) == len(one["loss_curve"]) > 1
    assert [len(tokens) for tokens in runs[1]["greedy_cpu"]] == [8] * 4  # 4 prompts x --new-tokens of --tiny


def test_final_save_replaces_a_stale_temporary_folder(tmp_path):
    """An interrupted earlier save left its temporary folder: the next save starts it afresh, and the model
    folder holds only what this save wrote."""
    from transformers import Trainer, TrainingArguments

    from path_lm.training import save_final_model

    model = PaTHForCausalLM(PaTHConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    stale = tmp_path / ".model.tmp"
    stale.mkdir()
    (stale / "leftover.bin").write_bytes(b"x")
    final = save_final_model(trainer, tmp_path, {"steps": 0})
    assert not stale.exists() and not (final / "leftover.bin").exists()
    assert json.loads((final / "training_summary.json").read_text()) == {"steps": 0}
    assert AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)


def test_packed_loss_is_the_token_weighted_mean_of_the_documents():
    torch.manual_seed(0)
    config = PaTHConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, attn_chunk_size=4)
    model = PaTHForCausalLM(config).eval()
    documents = [torch.randint(0, 50, (n,)).tolist() for n in (5, 9, 3, 7)]
    rows = pack_documents(documents, seq_len=24)  # 24 tokens: all four in one row
    assert len(rows) == 1
    row = {k: torch.tensor([v]) for k, v in rows[0].items()}
    assert row["position_ids"][0].tolist() == [*range(5), *range(9), *range(3), *range(7)]
    assert (row["labels"] == IGNORE_INDEX).sum() == len(documents)
    with torch.no_grad():
        packed = model(**row).loss
        total, count = 0.0, 0
        for document in documents:
            ids = torch.tensor([document])
            total += model(ids, labels=ids).loss * (len(document) - 1)
            count += len(document) - 1
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-6)


def test_pack_documents_splits_long_documents_and_pads_the_last_row():
    rows = pack_documents([[1, 2, 3, 4, 5], [6, 7]], seq_len=4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], [0, 0, 1, 0]]
    assert [r["labels"] for r in rows] == [[-100, 2, 3, 4], [-100, -100, 7, -100]]


def test_load_documents_formats(corpus, tmp_path):
    import datasets

    assert len(load_documents([corpus["txt"]])) == 40
    assert len(load_documents([corpus["jsonl"]], text_field="body")) == 30
    texts = ["one document", "another one"]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(tmp_path / "saved")
    assert load_documents([tmp_path / "d.parquet"]) == texts
    assert load_documents([tmp_path / "saved"]) == texts


@pytest.mark.parametrize("case", ["missing file", "empty data", "vocab too large", "wrong field", "output exists"])
def test_bad_input_exits_with_a_message_and_writes_nothing(case, corpus, tmp_path):
    out = tmp_path / "run"
    data, extra = [str(corpus["txt"])], []
    if case == "missing file":
        data, expected = [str(tmp_path / "nope.txt")], "does not exist"
    elif case == "empty data":
        data, expected = [str(corpus["empty"])], "no text found"
    elif case == "vocab too large":
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"vocab_size": 280, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2}))
        extra, expected = ["--config", str(config)], "vocab_size 280"
    elif case == "wrong field":
        data, expected = [str(corpus["jsonl"])], "--text-field"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        expected = "--overwrite"
    with pytest.raises(SystemExit) as error:
        main(["train", *data, "--output-dir", str(out), "--vocab-size", "300", "--seq-len", "32", "--max-steps", "2",
              "--cpu", "--no-progress", *extra])
    assert expected in str(error.value.code) and str(error.value.code).startswith("path-lm train: error:")
    if case == "output exists":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


def test_overwrite_replaces_a_previous_run(corpus, tmp_path):
    out = tmp_path / "run"
    train(corpus["txt"], out, max_steps=4, save_steps=2, **FAST)
    (out / "notes.txt").write_text("keep me")
    train(corpus["txt"], out, max_steps=3, save_steps=3, overwrite=True, **FAST)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "model" / "training_summary.json").read_text())["steps"] == 3


def test_interrupted_save_leaves_no_model_folder(corpus, tmp_path, monkeypatch):
    original = PaTHForCausalLM.save_pretrained

    def save_then_crash(self, save_directory, *args, **kwargs):
        if Path(save_directory).name.startswith(".model.tmp"):
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            (Path(save_directory) / "config.json").write_text("{")  # half written
            raise KeyboardInterrupt
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PaTHForCausalLM, "save_pretrained", save_then_crash)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(corpus["txt"], out, max_steps=2, save_steps=2, **FAST)
    assert (out / "checkpoint-2").is_dir()  # the Trainer's checkpoint saved before the crash
    assert not (out / "model").exists()
    assert not list(out.glob(".model.tmp*"))


def test_fine_tune_from_a_checkpoint(corpus, tmp_path):
    base = train(corpus["txt"], tmp_path / "base", max_steps=3, save_steps=3, eval_fraction=0, **FAST)
    tuned = train(corpus["jsonl"], tmp_path / "tuned", from_checkpoint=tmp_path / "base" / "model", text_field="body",
                  eval_files=[corpus["txt"]], max_steps=3, save_steps=3, gradient_checkpointing=True, **FAST)
    assert tuned["model"]["source"].startswith("checkpoint") and tuned["tokenizer"]["size"] == 300
    assert tuned["loss_curve"][0][1] < base["loss_curve"][0][1]  # starts from the trained weights
    assert tuned["documents"] == {"train": 30, "eval": 40} and tuned["eval_perplexity"] is not None


class _Tokenizer:
    """What build_model reads of a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 300


def test_run_options_set_the_attention_of_every_model_source_for_the_run(corpus, tmp_path, monkeypatch):
    """--attn-backend and --keep-preparation reach train(); build_model sets them on the attention layers of
    a preset's, a config file's and a checkpoint's model, and not in its config, so checkpoints keep the
    source's; a CUDA-only kernel on a machine or run without CUDA stops with a message before anything is
    written."""
    seen = {}
    monkeypatch.setattr(training, "train", lambda data, **options: seen.update(options))
    main(["train", str(corpus["txt"]), "--output-dir", str(tmp_path / "run"), "--attn-backend", "torch",
          "--keep-preparation"])
    assert (seen["attn_backend"], seen["keep_preparation"]) == ("torch", True)
    main(["train", str(corpus["txt"]), "--output-dir", str(tmp_path / "run")])
    assert (seen["attn_backend"], seen["keep_preparation"]) == (None, False)
    monkeypatch.undo()

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
                                  "attn_backend": "fla"}))
    PaTHForCausalLM(PaTHConfig(**json.loads(config.read_text()))).save_pretrained(tmp_path / "checkpoint")
    for source, saved in ((dict(preset="tiny"), "auto"), (dict(config_file=config), "fla"),
                          (dict(from_checkpoint=tmp_path / "checkpoint"), "auto")):
        model = training.build_model(_Tokenizer(), **source, attn_backend="torch", keep_preparation=True)
        layers = {(layer.attn.attn_backend, layer.attn.keep_preparation) for layer in model.model.layers}
        assert layers == {("torch", True)}, source
        assert (model.config.attn_backend, model.config.attn_keep_preparation) == (saved, None), source
        default = training.build_model(_Tokenizer(), **source)
        layers = {(layer.attn.attn_backend, layer.attn.keep_preparation) for layer in default.model.layers}
        assert layers == {(saved, None)}, source

    out = tmp_path / "cpu-run"
    with pytest.raises(SystemExit, match="runs on a CUDA GPU only"):
        main(["train", str(corpus["txt"]), "--output-dir", str(out), "--attn-backend", "triton", "--cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training.path_ops, "kernel_import_error", lambda name: f"{name} is not importable")
    with pytest.raises(SystemExit, match="--attn-backend fla: fla is not importable"):
        main(["train", str(corpus["txt"]), "--output-dir", str(out), "--attn-backend", "fla"])
    assert not out.exists()


def test_a_run_shorter_than_the_logging_interval_reports_its_mean_loss(corpus, tmp_path, capsys):
    """No step logs a loss when --max-steps < --logging-steps: the summary has no final loss, and the
    closing line gives the run's mean loss instead."""
    summary = train(corpus["txt"], tmp_path / "run", max_steps=2, eval_fraction=0, **{**FAST, "logging_steps": 10})
    assert summary["final_loss"] is None and summary["mean_train_loss"] > 0
    assert f"mean train loss {summary['mean_train_loss']:.4f}" in capsys.readouterr().out
