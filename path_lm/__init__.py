"""PaTH attention language models for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .cache_path import PaTHCache, PaTHCacheLayer, PaTHStaticCache, PaTHStaticCacheLayer
from .configuration_path import PaTHConfig
from .modeling_path import (
    PaTHAttention,
    PaTHForCausalLM,
    PaTHForSequenceClassification,
    PaTHModel,
    PaTHPreTrainedModel,
)
from .path_ops import path_attention, path_attention_torch, path_decode_step

__version__ = "0.1.0"

AutoConfig.register(PaTHConfig.model_type, PaTHConfig, exist_ok=True)
AutoModel.register(PaTHConfig, PaTHModel, exist_ok=True)
AutoModelForCausalLM.register(PaTHConfig, PaTHForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(PaTHConfig, PaTHForSequenceClassification, exist_ok=True)

# save_pretrained copies configuration_path.py, modeling_path.py and their relative imports into the
# checkpoint and writes an auto_map, so trust_remote_code loading needs no install of path_lm.
PaTHConfig.register_for_auto_class()
PaTHModel.register_for_auto_class("AutoModel")
PaTHForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PaTHForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "PaTHAttention",
    "PaTHCache",
    "PaTHStaticCache",
    "PaTHStaticCacheLayer",
    "PaTHCacheLayer",
    "PaTHConfig",
    "PaTHForCausalLM",
    "PaTHForSequenceClassification",
    "PaTHModel",
    "PaTHPreTrainedModel",
    "path_attention",
    "path_attention_torch",
    "path_decode_step",
]
