"""Checkpoint conversion between fla's PaTH models (model type ``path_attn``) and path_lm checkpoints
(model type ``path``, with their modeling code for ``trust_remote_code``). Parameter names are the same in
both, so weights are never changed: only config.json differs. What ``path-lm convert`` calls."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Files besides the weights and config that travel with a checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
EXTRA_FILES = (*TOKENIZER_FILES, "generation_config.json", "training_summary.json")
WEIGHT_PATTERNS = (
    "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
)

# fla's PaTHAttentionConfig fields that mean the same thing in PaTHConfig.
FLA_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "hidden_ratio",
    "intermediate_size", "hidden_act", "initializer_range", "norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "use_forget_gate", "use_w_shortconv", "use_low_rank_w",
)
# fla-only fields, with fla's defaults (a path_lm config converted from fla keeps the original values).
FLA_ONLY_DEFAULTS = {
    "elementwise_affine": True, "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
    "fuse_linear_cross_entropy": False, "use_l2warp": False, "attnres_block_size": None,
}
# path_lm fields that only choose how the same math runs: dropped for fla.
RUNTIME_FIELDS = ("attn_backend", "attn_keep_preparation", "cache_key_dtype", "attn_chunk_size", "auto_map")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: no config.json in it")
    return json.loads(path.read_text())


@contextmanager
def atomic_output_dir(dst, overwrite: bool = False):
    """Yield a fresh temporary folder beside ``dst``; when the block completes it is renamed to ``dst``, and on
    any error it is removed, so an interrupted conversion never leaves a half-written checkpoint. A non-empty
    ``dst`` is refused unless ``overwrite``."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {dst} exists and is not empty; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def _copy_extras(src: Path, dst: Path) -> None:
    for name in EXTRA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def fla_to_path_lm(src, dst, overwrite: bool = False) -> Path:
    """Convert an fla ``path_attn`` checkpoint folder into a path_lm checkpoint (model type ``path``, auto_map,
    modeling code) that loads with ``trust_remote_code=True`` where neither fla nor path_lm is installed.
    Weights keep their names, values and dtype; tokenizer files are copied."""
    from .modeling_path import PaTHForCausalLM

    src, dst = Path(src), Path(dst)
    model_type = _read_config(src).get("model_type")
    if model_type != "path_attn":
        raise ValueError(f"{src} holds a {model_type!r} checkpoint, not an fla 'path_attn' one")
    model = PaTHForCausalLM.from_pretrained(src, dtype="auto")
    with atomic_output_dir(dst, overwrite) as tmp:
        model.save_pretrained(tmp)
        _copy_extras(src, tmp)
    return dst


def fla_config_dict(config: dict) -> dict:
    """fla's config.json for a path_lm config dict; ValueError naming every option fla cannot express."""
    from .configuration_path import PaTHConfig

    path_config = PaTHConfig(**{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")})
    values = path_config.to_dict()
    problems = []
    if path_config.use_qk_norm:
        problems.append("use_qk_norm=True (fla's model has no qk-norm)")
    if path_config.use_w_shortconv and path_config.conv_size != 3:
        problems.append(f"conv_size={path_config.conv_size} (fla's short convolution has kernel size 3)")
    if path_config.use_w_shortconv and path_config.conv_bias:
        problems.append("conv_bias=True (fla's short convolution has no bias)")
    if path_config.norm_eps is None:
        problems.append("norm_eps=None (fla's RMSNorm needs a number)")
    if path_config.hidden_act not in ("swish", "silu"):
        problems.append(f"hidden_act={path_config.hidden_act!r} (fla's gated MLP uses swish)")
    # Any other path_lm option fla lacks must be at the value that makes it fla's architecture (its default).
    handled = {*FLA_SHARED_FIELDS, *FLA_ONLY_DEFAULTS, *RUNTIME_FIELDS, "use_qk_norm", "conv_size", "conv_bias"}
    defaults = PaTHConfig().to_dict()
    base = set(PaTHConfig.__mro__[1]().to_dict())  # PretrainedConfig's own fields
    for key, value in values.items():
        if key in handled or key in base or key not in defaults:
            continue
        if value != defaults[key]:
            problems.append(f"{key}={value!r} (fla's PaTHAttentionConfig has no {key})")
    if problems:
        raise ValueError("fla's PaTH model cannot express this config: " + "; ".join(problems))

    fla = {key: values[key] for key in FLA_SHARED_FIELDS}
    fla["hidden_act"] = "swish"
    fla.update({key: values.get(key, default) for key, default in FLA_ONLY_DEFAULTS.items()})
    extra = {k: v for k, v in values.items() if k not in handled and k not in defaults and k not in base}
    fla.update(extra)  # attributes PaTHConfig does not know either (carried through unchanged)
    fla.update(model_type="path_attn", architectures=["PaTHAttentionForCausalLM"])
    for key in ("dtype", "transformers_version"):
        if key in values:
            fla[key] = values[key]
    return fla


def path_lm_to_fla(src, dst, overwrite: bool = False) -> Path:
    """Convert a path_lm checkpoint folder to fla's format (config.json with model type ``path_attn`` and
    fla's field names; weight files copied unchanged) when fla can express the config, else ValueError."""
    src, dst = Path(src), Path(dst)
    config = _read_config(src)
    if config.get("model_type") != "path":
        raise ValueError(f"{src} holds a {config.get('model_type')!r} checkpoint, not a path_lm 'path' one")
    fla_config = fla_config_dict(config)
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in src.glob(pattern)})
    if not weights:
        raise FileNotFoundError(f"{src} holds no weight files (model.safetensors or pytorch_model.bin)")
    with atomic_output_dir(dst, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(fla_config, indent=2, sort_keys=True) + "\n")
        for path in weights:
            shutil.copy2(path, tmp / path.name)
        _copy_extras(src, tmp)
    return dst


__all__ = ["fla_config_dict", "fla_to_path_lm", "path_lm_to_fla"]
