"""Conversion of MinimalLLM checkpoints (the GPT-style model of hand-written PaTH training scripts) to path_lm.

MinimalLLM: ``x = token_embedding(ids) * sqrt(d_model)``, dropout, blocks of
``x = x + dropout(attention(norm1(x)))`` and ``x = x + dropout(feed_forward(norm2(x)))`` where
``attention.path_attention`` is fla's (or path_lm's) ``PaTHAttention`` and ``feed_forward`` is
``linear2(silu(linear1(x)))`` without biases, ``torch.nn.RMSNorm`` with its default eps everywhere, a final
``norm`` and ``lm_head`` (usually tied to the embedding). In path_lm terms that is ``mlp_type="plain"``,
``hidden_act="silu"``, ``embedding_multiplier=sqrt(hidden_size)``, ``norm_eps=None``; the logits are the same.

Key mapping (after stripping DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes):

| MinimalLLM | path_lm |
|---|---|
| token_embedding.weight | model.embeddings.weight |
| transformer_blocks.N.norm1.weight | model.layers.N.attn_norm.weight |
| transformer_blocks.N.attention.path_attention.* | model.layers.N.attn.* |
| transformer_blocks.N.norm2.weight | model.layers.N.mlp_norm.weight |
| transformer_blocks.N.feed_forward.linear1.weight | model.layers.N.mlp.up_proj.weight |
| transformer_blocks.N.feed_forward.linear2.weight | model.layers.N.mlp.down_proj.weight |
| norm.weight | model.norm.weight |
| lm_head.weight (absent or equal to the embedding: tied) | lm_head.weight |

Dropout rates are not in a state dict: they default to 0 (pass ``dropout=`` to keep training with the
script's rate). The script's dropout inside the FFN (after the activation) and after the final norm have no
path_lm counterpart; both are inactive at inference.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_path import PaTHConfig
from .convert import atomic_output_dir
from .modeling_path import PaTHForCausalLM

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the model's state dict in a larger checkpoint dict.
NESTED_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_LOW_RANK = 32  # path_lm's (and fla's) fixed rank of the low-rank Householder projection


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``torch.save``d state dict safely (``weights_only=True``, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as err:
        raise ValueError(
            f"{str(path)!r} is not a state dict that loads safely with torch.load(weights_only=True) ({err}). "
            f"Save the model's tensors alone: torch.save(model.state_dict(), path)"
        ) from err
    return unwrap_state_dict(obj, source=str(path))


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The state dict itself, or one nested under a common key (``model_state_dict``, ``state_dict``,
    ``model``, ``module``) when that value is clearly a state dict (string keys, tensor values)."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in NESTED_STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        raise ValueError(
            f"{source} is not a state dict: key {bad!r} holds a {type(obj.get(bad)).__name__}, not a tensor, and "
            f"none of {list(NESTED_STATE_DICT_KEYS)} holds a state dict. Save torch.save(model.state_dict(), path)"
        )
    raise ValueError(
        f"{source} is not a state dict but a {type(obj).__name__}; save torch.save(model.state_dict(), path)"
    )


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` (at any depth) from every key."""
    out = {}
    for key, value in state_dict.items():
        new = key
        while True:
            stripped = re.sub(r"^(module\.|_orig_mod\.)", "", new)
            if stripped == new:
                break
            new = stripped
        new = new.replace("._orig_mod.", ".")
        if new in out:
            raise ValueError(f"key {key!r} duplicates {new!r} once DDP / torch.compile prefixes are removed")
        out[new] = value
    return out


def _path_lm_key(key: str) -> str | None:
    """path_lm name of a MinimalLLM key, None for a key the layout does not have."""
    if key == "token_embedding.weight":
        return "model.embeddings.weight"
    if key in ("norm.weight", "lm_head.weight"):
        return {"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}[key]
    match = _BLOCK.match(key)
    if match is None:
        return None
    layer, rest = match.group(1), key[match.end():]
    prefix = f"model.layers.{layer}."
    if rest.startswith("attention.path_attention."):
        return prefix + "attn." + rest[len("attention.path_attention."):]
    block_names = {
        "norm1.weight": "attn_norm.weight",
        "norm2.weight": "mlp_norm.weight",
        "feed_forward.linear1.weight": "mlp.up_proj.weight",
        "feed_forward.linear2.weight": "mlp.down_proj.weight",
    }
    return prefix + block_names[rest] if rest in block_names else None


def minimal_llm_config(state_dict: Mapping[str, torch.Tensor], **overrides) -> PaTHConfig:
    """The PaTHConfig of a MinimalLLM state dict (prefixes already stripped), inferred from its shapes."""

    def get(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(f"missing key {key!r}: not a MinimalLLM state dict (or a truncated one)")
        return state_dict[key]

    def dim(key: str, ndim: int) -> tuple[int, ...]:
        shape = tuple(get(key).shape)
        if len(shape) != ndim:
            raise ValueError(f"key {key!r} has shape {shape}; expected a {ndim}D tensor")
        return shape

    vocab_size, hidden_size = dim("token_embedding.weight", 2)
    layers = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    if not layers:
        raise ValueError(f"missing key {'transformer_blocks.0.attention.path_attention.q_proj.weight'!r}: no blocks")
    for i in range(layers[-1] + 1):
        if i not in layers:
            raise ValueError(f"missing key 'transformer_blocks.{i}.*': the blocks are numbered 0..{layers[-1]}")
    attn = "transformer_blocks.0.attention.path_attention."
    kv_dim = dim(attn + "k_proj.weight", 2)[0]
    num_kv_heads = dim(attn + "bt_proj.weight", 2)[0]
    if kv_dim % num_kv_heads:
        raise ValueError(
            f"key {attn + 'k_proj.weight'!r} has {kv_dim} rows, not a multiple of the {num_kv_heads} kv heads of "
            f"{attn + 'bt_proj.weight'!r}"
        )
    head_dim = kv_dim // num_kv_heads  # k_proj is num_kv_heads * head_dim wide; bt_proj has one row per kv head
    if hidden_size % head_dim:
        raise ValueError(
            f"key {attn + 'k_proj.weight'!r}: head dim {head_dim} does not divide hidden size {hidden_size}"
        )
    num_heads = hidden_size // head_dim
    use_forget_gate = attn + "g_proj.weight" in state_dict
    if use_forget_gate and dim(attn + "g_proj.weight", 2)[0] != num_heads:
        raise ValueError(
            f"key {attn + 'g_proj.weight'!r} has {state_dict[attn + 'g_proj.weight'].shape[0]} rows; the head dim "
            f"{head_dim} of k_proj / bt_proj gives {num_heads} heads"
        )
    use_low_rank_w = attn + "w_proj.0.weight" in state_dict
    if use_low_rank_w and dim(attn + "w_proj.0.weight", 2)[0] != _LOW_RANK:
        raise ValueError(
            f"key {attn + 'w_proj.0.weight'!r} has rank {state_dict[attn + 'w_proj.0.weight'].shape[0]}; "
            f"PaTHAttention's low-rank projection has rank {_LOW_RANK}"
        )
    use_w_shortconv = attn + "w_conv1d.weight" in state_dict
    lm_head = state_dict.get("lm_head.weight")
    embedding = state_dict["token_embedding.weight"]
    tie = lm_head is None or (lm_head.shape == embedding.shape and torch.equal(lm_head, embedding))
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mlp_type="plain",
        intermediate_size=dim("transformer_blocks.0.feed_forward.linear1.weight", 2)[0],
        hidden_act="silu",
        norm_eps=None,
        embedding_multiplier=math.sqrt(hidden_size),
        tie_word_embeddings=tie,
        use_forget_gate=use_forget_gate,
        use_qk_norm=attn + "maybe_q_norm.weight" in state_dict,
        use_low_rank_w=use_low_rank_w,
        use_w_shortconv=use_w_shortconv,
        conv_size=dim(attn + "w_conv1d.weight", 3)[-1] if use_w_shortconv else 3,
        conv_bias=attn + "w_conv1d.bias" in state_dict,
        bos_token_id=None,
        eos_token_id=None,
    )
    return PaTHConfig(**{**fields, **overrides})


def minimal_llm_to_path_lm(state_dict: Mapping, dropout: float = 0.0, **config_overrides) -> PaTHForCausalLM:
    """A PaTHForCausalLM (eval mode, in the state dict's dtype) with the weights of a MinimalLLM state dict.

    Accepts the state dict as saved (``module.`` / ``_orig_mod.`` prefixes, or nested under a common key).
    ``dropout`` sets the embedding, attention-output and MLP-output dropout (MinimalLLM uses one rate for
    all); ``config_overrides`` go to :class:`PaTHConfig` (e.g. ``bos_token_id``). Raises ValueError naming
    the key for missing, unexpected or wrongly shaped tensors."""
    state_dict = strip_wrapper_prefixes(unwrap_state_dict(state_dict))
    config = minimal_llm_config(
        state_dict,
        embedding_dropout=dropout,
        attention_dropout=dropout,
        hidden_dropout=dropout,
        **config_overrides,
    )
    renamed = {}
    for key, value in state_dict.items():
        new = _path_lm_key(key)
        if new is None:
            raise ValueError(f"unexpected key {key!r}: not part of the MinimalLLM layout this converter reads")
        renamed[new] = (key, value)
    if config.tie_word_embeddings:
        renamed["lm_head.weight"] = renamed["model.embeddings.weight"]

    dtype = state_dict["token_embedding.weight"].dtype
    model = PaTHForCausalLM(config).to(dtype)
    expected = model.state_dict()
    originals = {new: old for new, (old, _) in renamed.items()}
    for new, param in expected.items():
        if new not in renamed:
            old = minimal_llm_key(new)
            raise ValueError(f"missing key {old!r} (path_lm {new!r}) for this architecture ({describe(config)})")
        tensor = renamed[new][1]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"key {originals[new]!r} has shape {tuple(tensor.shape)}; {describe(config)} needs "
                f"{tuple(param.shape)}"
            )
    for new in renamed:
        if new not in expected:
            raise ValueError(
                f"unexpected key {originals[new]!r} for {describe(config)} (layer 0 decides which optional "
                f"parameters exist; every block must have the same ones)"
            )
    model.load_state_dict({new: value.to(dtype) for new, (_, value) in renamed.items()}, strict=True)
    return model.eval()


def minimal_llm_key(path_lm_key: str) -> str:
    """The MinimalLLM name of a path_lm parameter name (inverse of the table in the module docstring)."""
    fixed = {"model.embeddings.weight": "token_embedding.weight", "model.norm.weight": "norm.weight"}
    if path_lm_key in fixed or path_lm_key == "lm_head.weight":
        return fixed.get(path_lm_key, path_lm_key)
    layer, rest = re.match(r"model\.layers\.(\d+)\.(.*)", path_lm_key).groups()
    names = {
        "attn_norm.weight": "norm1.weight",
        "mlp_norm.weight": "norm2.weight",
        "mlp.up_proj.weight": "feed_forward.linear1.weight",
        "mlp.down_proj.weight": "feed_forward.linear2.weight",
    }
    if rest.startswith("attn."):
        return f"transformer_blocks.{layer}.attention.path_attention.{rest[len('attn.'):]}"
    return f"transformer_blocks.{layer}.{names.get(rest, rest)}"


def describe(config: PaTHConfig) -> str:
    return (
        f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_heads} heads "
        f"({config.num_kv_heads} kv), FFN {config.intermediate_size}, forget gate {config.use_forget_gate}, "
        f"qk norm {config.use_qk_norm}, low-rank w {config.use_low_rank_w}, short conv {config.use_w_shortconv}"
        f"{f' (size {config.conv_size}, bias {config.conv_bias})' if config.use_w_shortconv else ''}"
    )


def convert_minimal_llm(
    state_dict_path: str | Path,
    output_dir: str | Path,
    tokenizer: str | Path | None = None,
    dropout: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Convert a ``torch.save``d MinimalLLM state dict into a path_lm checkpoint folder (weights, config and
    the model code, so it loads with ``trust_remote_code=True`` where path_lm is not installed).

    ``tokenizer``: a local folder or Hub id, saved into the folder; its bos / eos ids go into the config so
    that ``generate()`` stops where the tokenizer says. The folder is written atomically; a non-empty one
    is refused unless ``overwrite``. Returns the output folder."""
    tok = None
    overrides = {}
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer))  # before writing anything: fail early
        overrides = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = minimal_llm_to_path_lm(load_state_dict_file(state_dict_path), dropout=dropout, **overrides)
    if tok is not None and len(tok) > model.config.vocab_size:
        logger.warning(
            "tokenizer %s has %d tokens but the model's embedding only %d: ids >= %d cannot be embedded",
            tokenizer, len(tok), model.config.vocab_size, model.config.vocab_size,
        )
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(output_dir)


__all__ = ["convert_minimal_llm", "load_state_dict_file", "minimal_llm_config", "minimal_llm_to_path_lm"]
