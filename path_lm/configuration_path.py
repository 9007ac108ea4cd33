"""Configuration of PaTH attention language models."""

from __future__ import annotations

import math

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

ATTN_BACKENDS = ("auto", "torch", "triton", "fla")
MLP_TYPES = ("gated", "plain")
CACHE_KEY_DTYPES = ("auto", "float32", "float64", "model", "mixed")
# fla's config fields that change the architecture in ways this package does not implement.
_UNSUPPORTED_FLA_FIELDS = {"attnres_block_size": None, "elementwise_affine": True}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_intermediate_size(hidden_size: int, hidden_ratio: float | None, mlp_type: str = "gated") -> int:
    """fla's GatedMLP rule for the gated MLP: 2/3 of hidden_size * hidden_ratio, rounded up to a multiple of
    256 (same parameter count as a plain MLP of hidden_size * hidden_ratio); the plain MLP takes
    hidden_size * hidden_ratio itself."""
    ratio = 4 if hidden_ratio is None else hidden_ratio
    if mlp_type == "plain":
        return int(hidden_size * ratio)
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class PaTHConfig(PretrainedConfig):
    r"""
    Configuration of a PaTH attention causal language model (Yang et al., 2025): pre-norm decoder blocks
    whose attention encodes position with accumulated data-dependent Householder transformations
    instead of RoPE, with a gated MLP. Field names and defaults follow fla's ``PaTHAttentionConfig``
    (model type ``path_attn``), so fla configs and checkpoints mean the same thing here. The options
    ``mlp_type``, ``embedding_multiplier``, the dropouts and ``norm_eps=None`` (all off by default) express
    hand-written PaTH models too, such as the MinimalLLM of PaTH training scripts (see ``path_lm.minimal_llm``).

    ```python
    >>> from path_lm import PaTHConfig, PaTHForCausalLM

    >>> config = PaTHConfig(hidden_size=256, num_hidden_layers=4, num_heads=4, vocab_size=1000, use_forget_gate=True)
    >>> model = PaTHForCausalLM(config)
    >>> config.num_attention_heads  # transformers' names are aliases
    4
    ```

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream; must be a multiple of ``num_heads``.
        num_hidden_layers: number of decoder blocks.
        num_heads: query heads (alias ``num_attention_heads``).
        num_kv_heads: key/value heads for grouped-query attention (alias ``num_key_value_heads``);
            ``None`` means ``num_heads``. Must divide ``num_heads``.
        mlp_type: ``"gated"`` (default, fla's GatedMLP): ``down_proj(act(gate_proj(x)) * up_proj(x))``;
            ``"plain"``: ``down_proj(act(up_proj(x)))``, no ``gate_proj``. All without bias.
        hidden_ratio, intermediate_size: MLP width; ``intermediate_size=None`` takes fla's rule
            ``256 * ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)`` for the gated MLP and
            ``int(hidden_size * hidden_ratio)`` for the plain one.
        hidden_act: MLP activation, any name in ``transformers.activations.ACT2FN`` (fla uses ``"swish"``).
        norm_eps: RMSNorm epsilon of the block and final norms (alias ``rms_norm_eps``). ``None`` means
            ``torch.nn.RMSNorm``'s default: the machine epsilon of the dtype the norm computes in (float32
            for float32/bf16/fp16 inputs, float64 for float64 ones), so the norm equals
            ``torch.nn.RMSNorm(eps=None)``.
        embedding_multiplier: scale of the token embeddings before the first block (also of ``inputs_embeds``
            passed in); ``None`` (default) leaves them unscaled. MinimalLLM uses ``sqrt(hidden_size)``.
        embedding_dropout: dropout probability on the (scaled) embeddings before the first block.
        attention_dropout: dropout probability on each attention block's output, before the residual add
            (PaTH has no attention-probability dropout: fla's kernel has none).
        hidden_dropout: dropout probability on each MLP's output, before the residual add.
        initializer_range: standard deviation of the normal init of linear, conv and embedding weights.
        tie_word_embeddings: share the input embedding with the output head.
        use_forget_gate: add the data-dependent forget gate (PaTH-FoX).
        use_w_shortconv: causal depthwise short convolution (then SiLU) on the Householder directions.
        use_low_rank_w: project the Householder directions through a rank-32 bottleneck.
        use_qk_norm: per-head RMSNorm (eps 1e-5) on queries and keys.
        conv_size, conv_bias: kernel size and bias of the short convolution.
        attn_backend: ``"auto"`` (on CUDA, head dim 64/128, bf16/fp16: the faster of path-lm's own Triton
            kernel and fla's that can run, by head dim, sequence length and whether gradients are needed;
            otherwise the exact PyTorch path), ``"torch"``, ``"triton"`` or ``"fla"``.
        attn_keep_preparation: path-lm's Triton kernel keeps the forward's preparation for the backward
            instead of recomputing it: a faster forward+backward (5-10 % of the attention op on an H100) for
            about 3 KiB more training memory per token and query head. ``None`` (default) takes
            ``path_ops.KEEP_PREPARATION`` (off); other backends ignore it. Like ``attn_backend``, a choice
            of the machine: ``save_pretrained`` writes ``None``.
        cache_key_dtype: dtype of the transformed keys in the generation cache: ``"float32"`` (keys are
            rewritten every step, so half-precision storage drifts), ``"float64"``, ``"model"`` for the
            model's dtype, ``"mixed"``: where decoding runs path-lm's CUDA kernel, keys in the model's
            dtype, rewritten only once every 64 tokens, beside the last 64 to 128 keys in float32 (half the
            key bytes per step at long contexts); float32 keys elsewhere. ``"auto"`` (default): ``"mixed"``
            for a bf16/fp16 model decoding with the CUDA kernel on a cache large enough for the kernel's
            frames (batch x kv heads x length over 2^17 at the first write: the prompt's length, or
            ``max_cache_len`` of a static cache), else ``"float32"``.
        attn_chunk_size: block length of the exact PyTorch attention.
        beta_max: clip the Householder strength beta = 2 sigmoid(.) to at most this value (the paper clips beta
            away from 2 under bf16 training); ``None`` (default, as fla) leaves it in (0, 2).
    """

    model_type = "path"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "rms_norm_eps": "norm_eps",
    }
    base_model_tp_plan = {
        "layers.*.attn.q_proj": "colwise",
        "layers.*.attn.k_proj": "colwise",
        "layers.*.attn.v_proj": "colwise",
        "layers.*.attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        hidden_ratio: float | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        norm_eps: float | None = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        use_forget_gate: bool = False,
        use_w_shortconv: bool = True,
        use_low_rank_w: bool = True,
        use_qk_norm: bool = False,
        conv_size: int = 3,
        conv_bias: bool = False,
        attn_backend: str = "auto",
        attn_keep_preparation: bool | None = None,
        cache_key_dtype: str = "auto",
        attn_chunk_size: int = 64,
        beta_max: float | None = None,
        mlp_type: str = "gated",
        embedding_multiplier: float | None = None,
        embedding_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        **kwargs,
    ):
        # transformers' names are aliases (attribute_map); accept them as arguments too.
        num_heads = kwargs.pop("num_attention_heads", num_heads)
        num_kv_heads = kwargs.pop("num_key_value_heads", num_kv_heads)
        norm_eps = kwargs.pop("rms_norm_eps", norm_eps)
        for name, supported in _UNSUPPORTED_FLA_FIELDS.items():
            if kwargs.get(name, supported) != supported:
                raise ValueError(
                    f"{name}={kwargs[name]!r} (an fla option) is not supported by path_lm; "
                    f"only {name}={supported!r} is. Convert a checkpoint trained without it."
                )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.hidden_ratio = hidden_ratio
        self.mlp_type = mlp_type
        self.intermediate_size = (
            default_intermediate_size(hidden_size, hidden_ratio, mlp_type)
            if intermediate_size is None
            else intermediate_size
        )
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.use_forget_gate = use_forget_gate
        self.use_w_shortconv = use_w_shortconv
        self.use_low_rank_w = use_low_rank_w
        self.use_qk_norm = use_qk_norm
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.attn_backend = attn_backend
        self.attn_keep_preparation = attn_keep_preparation
        self.cache_key_dtype = cache_key_dtype
        self.attn_chunk_size = attn_chunk_size
        self.beta_max = beta_max
        self.embedding_multiplier = embedding_multiplier
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            positive(name)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}); "
                f"choose num_heads among the divisors of hidden_size or change hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}); "
                f"set num_kv_heads to a divisor of num_heads (or None for num_heads)"
            )
        if self.use_w_shortconv and (not isinstance(self.conv_size, int) or self.conv_size < 1):
            raise ValueError(
                f"conv_size must be an integer >= 1 when use_w_shortconv=True, got {self.conv_size!r}; "
                f"set conv_size (fla's default is 3) or use_w_shortconv=False"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not a known activation; use one of {sorted(ACT2FN)}"
            )
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        if self.norm_eps is not None and not (is_number(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(
                f"norm_eps must be > 0, or None for torch.nn.RMSNorm's default eps, got {self.norm_eps!r}"
            )
        if self.embedding_multiplier is not None and not (
            is_number(self.embedding_multiplier) and 0 < self.embedding_multiplier < math.inf
        ):
            raise ValueError(
                f"embedding_multiplier must be a finite number > 0, or None for no scaling, got "
                f"{self.embedding_multiplier!r}"
            )
        for name in ("embedding_dropout", "attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value < 1):
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
        if not self.initializer_range >= 0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.attn_keep_preparation not in (None, True, False):
            raise ValueError(f"attn_keep_preparation must be True, False or None, got {self.attn_keep_preparation!r}")
        if self.cache_key_dtype not in CACHE_KEY_DTYPES:
            raise ValueError(f"cache_key_dtype must be one of {CACHE_KEY_DTYPES}, got {self.cache_key_dtype!r}")
        if self.beta_max is not None and not 0 < self.beta_max <= 2:
            raise ValueError(f"beta_max must be in (0, 2] or None, got {self.beta_max!r}")
        if not isinstance(self.attn_chunk_size, int) or self.attn_chunk_size < 1:
            raise ValueError(f"attn_chunk_size must be a positive integer, got {self.attn_chunk_size!r}")


__all__ = ["PaTHConfig"]
