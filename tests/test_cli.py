"""The command line for using and sharing a model: ``path-lm generate``, ``eval``, ``convert``, ``push`` and ``benchmark``.

Each test calls the library function and ``path_lm.cli.main([...])`` on tiny random models (CPU) with a
word-level tokenizer built offline. Hub calls are mocked at ``huggingface_hub.HfApi``; fla's model classes
build (but cannot run) on a CPU, so fla checkpoints are written with them and compared by weights, and
logits come from path_lm's model.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from path_lm import PaTHConfig, PaTHForCausalLM
from path_lm.cli import main
from path_lm.convert import fla_to_path_lm, path_lm_to_fla
from path_lm.evaluation import perplexity, perplexity_by_position, read_tokens
from path_lm.hub import CODE_FILES, model_card

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "to", "park", "and", "bird", "sang", "in",
         "tree", "by", "river"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    tok.train_from_iterator([" ".join(WORDS)] * 2, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_model(vocab_size: int, seed: int = 0, **overrides) -> PaTHForCausalLM:
    options = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
        use_forget_gate=True, attn_chunk_size=8, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.3,  # far from uniform predictions, so a wrong window or shift shows
    )
    options.update(overrides)
    torch.manual_seed(seed)
    return PaTHForCausalLM(PaTHConfig(**options)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A saved tiny path_lm model with its tokenizer and a training summary, as `path-lm train` leaves it."""
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = {  # the fields path_lm.training writes
        "data_files": ["data/corpus.txt"], "documents": {"train": 40, "eval": 2},
        "tokens": {"train_packed": 4096, "eval_packed": 256, "seen": 12345}, "seq_len": 16,
        "training": {"steps": 30, "global_batch_size": 8, "learning_rate": 0.003}, "final_train_loss": 2.5,
        "eval_loss": 2.58, "eval_perplexity": 13.2,
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    return folder


def text_file(path: Path, n_words: int, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=gen)]
    path.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, n_words, 12)) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------


def expected_completion(folder, prompt, max_new_tokens):
    model = PaTHForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + max_new_tokens
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_the_decoded_output(checkpoint, capsys):
    expected = [expected_completion(checkpoint, p, 6) for p in ("the cat", "dog ran to")]
    assert all(expected)
    code = main(["generate", str(checkpoint), "the cat", "dog ran to", "--max-new-tokens", "6", "--greedy",
                 "--device", "cpu", "--dtype", "float32", "--no-trust-remote-code"])
    assert code == 0
    assert capsys.readouterr().out == "".join(text + "\n" for text in expected)


def test_generate_reads_prompts_from_stdin(checkpoint, capsys, monkeypatch):
    expected = [expected_completion(checkpoint, p, 4) for p in ("a mat", "bird sang")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a mat\n\nbird sang\n"))
    assert main(["generate", str(checkpoint), "--max-new-tokens", "4", "--no-trust-remote-code"]) == 0
    assert capsys.readouterr().out == "".join(text + "\n" for text in expected)


def test_generate_bad_input(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", str(tmp_path / "missing"), "the"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    with pytest.raises(SystemExit, match="no prompt"):
        main(["generate", str(checkpoint)])


def test_generate_sampling_is_seeded(checkpoint, capsys):
    args = ["generate", str(checkpoint), "the", "--max-new-tokens", "8", "--do-sample", "--top-k", "5",
            "--temperature", "1.5", "--seed", "3", "--no-trust-remote-code"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first and first.strip()


# ---------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------


def test_eval_perplexity_equals_direct_cross_entropy(checkpoint, tmp_path, capsys):
    data = text_file(tmp_path / "eval.txt", 150)
    model = PaTHForCausalLM.from_pretrained(checkpoint).eval()
    tokens = read_tokens(PreTrainedTokenizerFast.from_pretrained(checkpoint), data)
    assert len(tokens) == 150

    # Direct: disjoint windows of 16 (the last one partial), each predicting its tokens after the first.
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(tokens), 16):
            window = tokens[begin : begin + 16][None]
            if window.shape[1] < 2:
                continue
            logits = model(window, use_cache=False).logits[0, :-1]
            total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    expected = math.exp(total / count)
    result = perplexity(model, tokens, seq_len=16, batch_size=3)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert 1.5 < expected < 100  # a random model far from uniform (vocab 22), so a shift error would show

    # Overlapping windows score every token after the first exactly once.
    assert perplexity(model, tokens, seq_len=16, stride=8)["tokens"] == len(tokens) - 1

    out_dir = tmp_path / "out"
    assert main(["eval", str(checkpoint), "--data", str(data), "--seq-len", "16", "--output-dir", str(out_dir),
                 "--no-trust-remote-code"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out_dir / "eval_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert f"{expected:.3f}"[:4] in printed


def test_eval_by_position_table_and_plot(checkpoint, tmp_path, capsys):
    data = text_file(tmp_path / "eval.txt", 100)
    out_dir = tmp_path / "out"
    assert main(["eval", str(checkpoint), "--data", str(data), "--seq-len", "16", "--by-position", "--max-len", "32",
                 "--bucket-size", "8", "--output-dir", str(out_dir), "--no-trust-remote-code"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out_dir / "eval_results.json").read_text())["by_position"]["rows"]
    assert [(r["start"], r["end"]) for r in rows] == [(1, 9), (9, 17), (17, 25), (25, 32)]
    assert all(r["tokens"] == (r["end"] - r["start"]) * 3 for r in rows)  # 100 tokens: 3 sequences of 32
    assert (out_dir / "eval_by_position.png").read_bytes()[:4] == b"\x89PNG"
    assert "beyond the training length (16)" in printed  # from training_summary.json

    # The rows average the per-position losses of the direct computation.
    model = PaTHForCausalLM.from_pretrained(checkpoint).eval()
    tokens = read_tokens(PreTrainedTokenizerFast.from_pretrained(checkpoint), data)
    seqs = tokens[:96].view(3, 32)
    with torch.no_grad():
        logits = model(seqs, use_cache=False).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")  # [3, 31]: target 1..31
    assert rows[2]["loss"] == pytest.approx(nll[:, 16:24].mean().item(), rel=1e-5)
    assert perplexity_by_position(model, tokens, 32, 8)[2]["loss"] == pytest.approx(rows[2]["loss"])

    with pytest.raises(ValueError, match="at least"):
        perplexity_by_position(model, tokens, 500)
    with pytest.raises(SystemExit, match="--max-len"):
        main(["eval", str(checkpoint), "--data", str(data), "--by-position"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["eval", str(checkpoint), "--data", str(tmp_path / "missing.txt")])


# ---------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model


def test_convert_fla_checkpoint_both_ways(tmp_path):
    fla = pytest.importorskip("fla.models")
    fla_config = fla.PaTHAttentionConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, use_forget_gate=True,
        intermediate_size=48,
    )
    fla_model = randomize_(fla.PaTHAttentionForCausalLM(fla_config))
    fla_state = {k: v.clone() for k, v in fla_model.state_dict().items()}
    fla_model.save_pretrained(tmp_path / "fla")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "fla")

    assert main(["convert", str(tmp_path / "fla"), str(tmp_path / "converted")]) == 0
    out = tmp_path / "converted"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "path"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_path.PaTHForCausalLM"
    files = {p.name for p in out.iterdir()}
    assert {*CODE_FILES, "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files

    # Loaded with the checkpoint's own code, in a process that never imports path_lm.
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert 'path_lm' not in sys.modules and not type(model).__module__.startswith('path_lm'), type(model)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(model(ids, use_cache=False).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = PaTHForCausalLM.from_pretrained(tmp_path / "fla").eval()
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), reference(ids, use_cache=False).logits)

    # Back to fla: fla's own class loads it, weights unchanged.
    assert main(["convert", str(out), str(tmp_path / "back"), "--to", "fla"]) == 0
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_config["model_type"] == "path_attn" and "auto_map" not in back_config
    assert not any((tmp_path / "back" / name).exists() for name in CODE_FILES)
    loaded, info = fla.PaTHAttentionForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = loaded.state_dict()
    assert state.keys() == fla_state.keys()
    assert all(torch.equal(state[k], v) for k, v in fla_state.items())
    assert loaded.config.use_forget_gate and loaded.config.num_kv_heads == 2

    # An existing output folder is refused unless --overwrite.
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["convert", str(out), str(tmp_path / "back"), "--to", "fla"])
    assert main(["convert", str(out), str(tmp_path / "back"), "--to", "fla", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(use_qk_norm=True), "use_qk_norm=True"),
        (dict(conv_size=4), "conv_size=4"),
        (dict(conv_bias=True), "conv_bias=True"),
        (dict(beta_max=1.5), "beta_max=1.5"),
    ],
)
def test_convert_to_fla_refuses_what_fla_cannot_express(tmp_path, options, message):
    make_model(30, **options).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=message):
        path_lm_to_fla(tmp_path / "model", tmp_path / "out")
    with pytest.raises(SystemExit, match=message):
        main(["convert", str(tmp_path / "model"), str(tmp_path / "out"), "--to", "fla"])
    assert not (tmp_path / "out").exists()


def test_convert_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    make_model(30).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="not an fla 'path_attn'"):
        fla_to_path_lm(tmp_path / "model", tmp_path / "out")
    with pytest.raises(SystemExit, match="--layout minimal-llm"):
        main(["convert", "--from-state-dict", str(tmp_path / "model" / "model.safetensors"), str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's network methods replaced: records calls and the folder's files at upload time."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, **kwargs)

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = dict(repo_id=repo_id, **kwargs)

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls["upload_folder"] = dict(folder_path=folder_path, repo_id=repo_id, files=files, **kwargs)
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_folder_with_model_card(checkpoint, tmp_path, fake_hub, capsys):
    import shutil

    from huggingface_hub import ModelCard

    folder = Path(shutil.copytree(checkpoint, tmp_path / "model"))
    assert main(["push", str(folder), "me/tiny-path", "--private", "--revision", "dev", "--commit-message", "hi",
                 "--license", "apache-2.0", "--token", "hf_x"]) == 0
    assert "https://huggingface.co/me/tiny-path/commit/abc" in capsys.readouterr().out
    assert fake_hub["create_repo"]["repo_id"] == "me/tiny-path"
    assert fake_hub["create_repo"]["private"] is True and fake_hub["create_repo"]["exist_ok"] is True
    assert fake_hub["create_branch"]["branch"] == "dev"
    upload = fake_hub["upload_folder"]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == ("me/tiny-path", "dev", "hi")
    assert set(upload["files"]) >= {
        "config.json", "model.safetensors", *CODE_FILES, "README.md", "tokenizer.json", "tokenizer_config.json",
        "training_summary.json",
    }

    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["path-attention", "path_lm", "custom_code"] and meta["license"] == "apache-2.0"
    params = sum(p.numel() for p in PaTHForCausalLM.from_pretrained(folder).parameters())
    for text in (f"{params:,}", "| layers | 2 |", "| key/value heads | 2 (grouped-query attention) |",
                 "| forget gate (PaTH-FoX) | True |", "`corpus.txt`", "| training tokens seen | 12,345 |",
                 "| steps | 30 |", "| final training loss | 2.5 |",
                 "| eval perplexity | 13.2 |", 'from_pretrained("me/tiny-path", trust_remote_code=True)',
                 "model.generate(", "need not be installed"):
        assert text in card.text, text


def test_push_without_summary_and_bad_input(tmp_path, fake_hub):
    make_model(30).save_pretrained(tmp_path / "model")
    text = str(model_card(tmp_path / "model", "me/x"))
    assert "## Training" not in text and "license" not in text.split("---")[1]

    with pytest.raises(SystemExit, match="does not exist"):
        main(["push", str(tmp_path / "missing"), "me/x"])
    (tmp_path / "model" / "modeling_path.py").unlink()
    with pytest.raises(SystemExit, match="modeling_path.py"):
        main(["push", str(tmp_path / "model"), "me/x"])
    assert not fake_hub  # nothing reached the Hub

    # As a user sees it: a non-zero exit status and the message on stderr.
    result = subprocess.run([sys.executable, "-m", "path_lm.cli", "push", str(tmp_path / "missing"), "me/x"],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "does not exist" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# path-lm benchmark
# ---------------------------------------------------------------------------------------------------------

PATH_ONLY = ("w_proj", "w_conv1d", "bt_proj", "g_proj", "maybe_q_norm", "maybe_k_norm")


def test_llama_peer_has_the_same_shape():
    """Every parameter the two architectures share (embeddings, q/k/v/o, MLP, norms, head) has the same size:
    Llama's count equals PaTH's without its PaTH-only projections, with and without tying and GQA."""
    from path_lm.benchmarking import llama_peer

    for tie, kv_heads in ((False, 2), (True, 4)):
        model = make_model(50, tie_word_embeddings=tie, num_kv_heads=kv_heads)
        peer = llama_peer(model.config)
        shared = sum(p.numel() for n, p in model.named_parameters() if not any(k in n for k in PATH_ONLY))
        assert sum(p.numel() for p in peer.parameters()) == shared
        assert peer.config.num_key_value_heads == kv_heads and peer.config.tie_word_embeddings == tie


def test_decode_time_per_token_cancels_the_fixed_cost(monkeypatch):
    """(t(n1) - t(n0)) / (n1 - n0): a generate() costing 30 ms plus 4 ms per new token measures 4 ms/token.
    The clock is simulated (sleeps overshoot by milliseconds on a loaded machine)."""
    import types

    from path_lm import benchmarking

    model = make_model(50)
    calls = []
    clock = [0.0]

    def fake_generate(ids, max_new_tokens, min_new_tokens, **options):
        calls.append((ids.shape, max_new_tokens, min_new_tokens, options.get("cache_implementation")))
        clock[0] += 0.030 + 0.004 * max_new_tokens

    monkeypatch.setattr(benchmarking, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(model, "generate", fake_generate)
    ms = benchmarking.decode_ms_per_token(model, batch=3, context=7, cache="static", new_tokens=(2, 12), repeats=2)
    assert ms == pytest.approx(4.0, abs=0.8)
    assert calls[0] == (torch.Size([3, 7]), 2, 2, "static") and [c[1] for c in calls] == [2, 2, 12, 2, 12]

    def flat_generate(ids, max_new_tokens, min_new_tokens, **options):
        clock[0] += 0.030  # the time per token drowned in noise: n1 tokens no slower than n0
    monkeypatch.setattr(model, "generate", flat_generate)
    with pytest.warns(UserWarning, match="widen new_tokens"):
        assert benchmarking.decode_ms_per_token(model, 1, 4, "dynamic", new_tokens=(1, 3)) == 0.0
    with pytest.raises(ValueError, match="cache must be one of"):
        benchmarking.decode_ms_per_token(model, 1, 4, "paged")
    with pytest.raises(ValueError, match="increasing"):
        benchmarking.decode_ms_per_token(model, 1, 4, "dynamic", new_tokens=(5, 5))


def test_cli_benchmark_preset_and_checkpoint(checkpoint, tmp_path, capsys):
    """Random weights of a preset shape, or a checkpoint, against Llama of the same shape: every task for
    both models, positive speeds, and the ratio column equal to the rows' own speeds."""
    out = tmp_path / "rows.json"
    assert main(["benchmark", "--preset", "tiny", "--vocab-size", "64", "--batch", "1", "2", "--context", "8",
                 "--new-tokens", "1", "9", "--train", "--json", str(out), "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())
    tasks = {"prefill", "decode, dynamic cache", "decode, static cache", "train (forward + backward)"}
    for name in ("PaTH", "Llama"):
        for batch in (1, 2):
            assert {r["task"] for r in rows if r["model"] == name and r["batch"] == batch} == tasks
    assert all(r["value"] > 0 and math.isfinite(r["value"]) for r in rows)
    for r in rows:
        if r["model"] == "Llama":
            path = next(p for p in rows if p["model"] == "PaTH" and (p["batch"], p["task"]) == (r["batch"], r["task"]))
            speed = lambda row: row.get("tokens_per_second", row["value"])  # noqa: E731
            assert r["first_vs_this"] == pytest.approx(speed(path) / speed(r))
    table = capsys.readouterr().out
    assert "| batch | context | task | PaTH | Llama | PaTH vs Llama (speed) |" in table
    assert main(["benchmark", str(checkpoint), "--no-llama", "--batch", "1", "--context", "4", "--cache", "dynamic",
                 "--new-tokens", "1", "2", "--device", "cpu"]) == 0
    assert "| 1 | 4 | decode, dynamic cache |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="MODEL or a --preset"):
        main(["benchmark", str(checkpoint), "--preset", "tiny"])
    with pytest.raises(SystemExit, match="unknown preset"):
        main(["benchmark", "--preset", "huge"])
