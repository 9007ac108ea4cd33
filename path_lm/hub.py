"""Sharing a checkpoint folder on the Hugging Face Hub with a generated model card. What ``path-lm push``
calls; every Hub call goes through ``huggingface_hub.HfApi``."""

from __future__ import annotations

import json
from pathlib import Path

CODE_FILES = ("configuration_path.py", "modeling_path.py", "cache_path.py", "path_ops.py")
TAGS = ["path-attention", "path_lm", "custom_code"]
# Trainer leftovers that do not belong in a published model.
IGNORE_PATTERNS = ["checkpoint-*/**", "runs/**", ".*"]


def count_parameters(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files (tied weights are stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                numel = 1
                for size in f.get_slice(key).get_shape():
                    numel *= size
                total += numel
    return total if files else None


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def architecture_summary(config: dict, num_parameters: int | None) -> str:
    heads, kv_heads = config.get("num_heads"), config.get("num_kv_heads") or config.get("num_heads")
    shortconv = config.get("use_w_shortconv", True)
    if shortconv:
        shortconv = f"True (kernel {config.get('conv_size', 3)}, bias {config.get('conv_bias', False)})"
    rows = [
        ("parameters", f"{num_parameters:,} ({_human(num_parameters)})" if num_parameters else "unknown"),
        ("layers", config.get("num_hidden_layers")),
        ("hidden size", config.get("hidden_size")),
        ("attention heads", heads),
        ("key/value heads", f"{kv_heads}" + (" (grouped-query attention)" if kv_heads != heads else "")),
        ("MLP intermediate size", config.get("intermediate_size")),
        ("vocabulary", config.get("vocab_size")),
        ("forget gate (PaTH-FoX)", config.get("use_forget_gate", False)),
        ("qk-norm", config.get("use_qk_norm", False)),
        ("short conv on w", shortconv),
        ("low-rank w", config.get("use_low_rank_w", True)),
        ("tied embeddings", config.get("tie_word_embeddings", False)),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def training_section(summary: dict) -> str:
    """The data and metrics ``path-lm train`` recorded (training_summary.json), whatever subset it holds."""

    def get(*keys):  # summary["a"]["b"] or None
        value = summary
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    lines = []
    data = summary.get("data_files") or summary.get("data")
    if data:
        data = [data] if isinstance(data, str) else list(data)
        lines.append("Data: " + ", ".join(f"`{Path(str(d)).name}`" for d in data))
    tokens = summary.get("tokens")
    rows = [
        ("training documents", get("documents", "train")),
        ("training tokens seen", get("tokens", "seen") if isinstance(tokens, dict) else tokens),
        ("sequence length", summary.get("seq_len")),
        ("steps", get("training", "steps") or summary.get("steps")),
        ("global batch size (sequences)", get("training", "global_batch_size")),
        ("learning rate", get("training", "learning_rate")),
        ("tokenizer vocabulary", get("tokenizer", "size")),
        ("final training loss", summary.get("final_train_loss", summary.get("final_loss"))),
        ("eval loss", summary.get("eval_loss")),
        ("eval perplexity", summary.get("eval_perplexity")),
    ]
    rows = [(label, value) for label, value in rows if value is not None]
    if rows:
        lines += ["", "| | |", "|---|---|"]
        for label, value in rows:
            text = f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
            lines.append(f"| {label} | {text} |")
    return "\n".join(lines)


def model_card(folder, repo_id: str, license: str | None = None):
    """A ``huggingface_hub.ModelCard`` for a path_lm checkpoint folder: metadata, architecture from
    config.json, data and metrics from training_summary.json (if present) and a usage snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    summary_path = folder / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=list(TAGS), license=license)
    variant = "PaTH-FoX" if config.get("use_forget_gate") else "PaTH"
    sections = [
        f"# {repo_id.split('/')[-1]}",
        (
            f"A {variant} attention causal language model (Yang et al., *PaTH Attention: Position Encoding via "
            "Accumulating Householder Transformations*, NeurIPS 2025), built with `path_lm`. Position is encoded "
            "by accumulated data-dependent Householder transformations instead of RoPE."
        ),
        "## Architecture",
        architecture_summary(config, count_parameters(folder)),
    ]
    if summary:
        sections += ["## Training", training_section(summary)]
    sections += [
        "## Usage",
        "This repository holds the modeling code (`" + "`, `".join(CODE_FILES) + "`), so `path_lm` need not be "
        + "installed: `trust_remote_code=True` loads it with plain `transformers`.",
        (
            "```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'inputs = tokenizer("Once upon a time", return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=50)\n"
            "print(tokenizer.decode(output[0], skip_special_tokens=True))\n"
            "```"
        ),
        (
            "On CUDA with `flash-linear-attention` installed, attention runs on fla's Triton kernels; elsewhere "
            "an exact PyTorch implementation runs on any device."
        ),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def check_folder(folder: Path) -> dict:
    """config.json of a path_lm checkpoint folder that can be published; ValueError / FileNotFoundError saying
    what is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: no config.json in it")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == "path_attn":
        raise ValueError(f"{folder} is an fla checkpoint; run `path-lm convert {folder} OUT` first, then push OUT")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{folder} holds no weights (model.safetensors)")
    missing = [name for name in CODE_FILES if not (folder / name).is_file()]
    if config.get("model_type") == "path" and (missing or not config.get("auto_map")):
        raise FileNotFoundError(
            f"{folder} lacks the modeling code ({', '.join(missing) or 'auto_map in config.json'}) that lets it load "
            f"without path_lm; re-save it with path_lm's save_pretrained"
        )
    return config


def push_to_hub(
    folder, repo_id: str, private: bool = False, revision: str | None = None, commit_message: str | None = None,
    token: str | None = None, license: str | None = None, write_card: bool = True,
) -> str:
    """Write README.md (the model card) into ``folder``, then create the repo (if needed) and upload the folder.
    Returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_folder(folder)
    if write_card:
        model_card(folder, repo_id, license=license).save(folder / "README.md")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
        commit_message=commit_message or "Upload PaTH model with path_lm", ignore_patterns=IGNORE_PATTERNS,
    )
    return str(getattr(commit, "commit_url", commit))


__all__ = ["architecture_summary", "check_folder", "count_parameters", "model_card", "push_to_hub"]
