"""PaTH attention language models for transformers.

The parameter names follow fla's ``PaTHAttentionForCausalLM`` exactly (``model.embeddings``,
``model.layers.N.attn.*``, ``model.layers.N.mlp.*``, ``model.norm``, ``lm_head``), so checkpoints move
between the two packages. This file and its relative imports travel inside checkpoints: they import only
torch and transformers (fla lazily, inside ``path_ops``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_path import PaTHCache, PaTHStaticCache, _concatenated
from .configuration_path import PaTHConfig
from .path_ops import (
    add_rms_norm, decode_inputs, decode_kernel_usable, gated_silu, gated_silu_usable, path_attention, rms_norm, rms_norm_usable,
    short_conv_kernel_usable, short_conv_normalize, small_linear, small_linear_usable,
)

logger = logging.get_logger(__name__)


# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _plain_linear(module: nn.Module, x: torch.Tensor, bias: bool = True, autocast: bool = False) -> bool:
    """Whether ``module`` is a plain ``nn.Linear`` with its weight on x's device and in x's dtype (and, with
    ``bias=False``, no bias): the layers whose weights the fused paths read directly (adapters, quantized or
    offloaded layers keep their own calls). With ``autocast``, for paths that cast the weights as the layer's
    call would: x may also be in autocast's dtype over float32 weights (under CUDA autocast a block's norm
    writes its output so)."""
    if type(module) is not nn.Linear or module.weight.device != x.device or not (bias or module.bias is None):
        return False
    weight, device = module.weight.dtype, x.device.type
    return weight == x.dtype or (
        autocast and weight == torch.float32 and torch.is_autocast_enabled(device)
        and x.dtype == torch.get_autocast_dtype(device)
    )


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks are registered on ``module``: a product that skips its call would skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _joint_weight(modules: list, x: torch.Tensor) -> torch.Tensor:
    """The weights of these linear layers concatenated along their outputs, for one product with x. Under
    autocast each weight is cast first (as the layer's own call would cast it) and the concatenation runs in
    the half-precision dtype."""
    weights = [m.weight for m in modules]
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # (autocast leaves float64 alone)
        weights = [w.to(torch.get_autocast_dtype(x.device.type)) for w in weights]
    return torch.cat(weights)


def _dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), skipping the call where the module is a plain ``nn.Dropout`` that is the identity
    (evaluation, p = 0): a decoding step would otherwise pay a module call's host time for each of the
    2L + 1 dropouts. Any other module put in its place is called."""
    if type(module) is nn.Dropout and not (module.training and module.p > 0):
        return x
    return module(x)


class _StepPlan:
    """What single-token decoding steps of one attention layer reuse (:meth:`PaTHAttention._step_plan`), for
    inputs of one dtype and device: ``joint``, the input projections' concatenated (weight, bias), or None
    where one of them is not a plain ``nn.Linear`` (the module calls then run); ``widths``, their output
    widths; ``inputs``, the arguments of ``path_triton.decode_inputs`` that come from the layer, or None
    where that kernel does not apply (a module it cannot read in place of the low-rank w's second factor or
    the qk-norm, a non-contiguous convolution weight)."""

    __slots__ = ("dtype", "device", "widths", "joint", "inputs")

    def __init__(self, dtype: torch.dtype, device: torch.device, widths: list):
        self.dtype, self.device, self.widths = dtype, device, widths
        self.joint: tuple | None = None
        self.inputs: dict | None = None


class PaTHRMSNorm(nn.Module):
    """RMSNorm computed in float32 or better (as fla's fused norm), returned in the input dtype.

    ``eps=None`` is torch.nn.RMSNorm's default: the machine epsilon of the compute dtype (that is what
    torch's kernel adds, for bf16 inputs too), so the result equals ``torch.nn.RMSNorm(eps=None)``.

    ``autocast_kernel`` (the blocks' norms, whose outputs only products read): in training under CUDA autocast
    the norm runs as ``path_triton.rms_norm`` and returns autocast's dtype, the products' input, in one kernel
    (and one for the backward) instead of the norm, the products' cast of its output and, in the backward, the
    cast of its gradient back and two norm kernels. The values are the cast's: computed in float32, rounded
    once."""

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, autocast_kernel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.autocast_kernel = autocast_kernel

    def _kernel_options(self, x: torch.Tensor) -> dict | None:
        """path_triton's norm arguments for x where its kernel runs (see ``autocast_kernel``), else None."""
        if not (self.autocast_kernel and rms_norm_usable(x, self.weight)):
            return None
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        return dict(eps=eps, out_dtype=torch.get_autocast_dtype(x.device.type))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel_options(x)
        if kernel is not None:
            return rms_norm(x, self.weight, **kernel)
        if x.dtype == self.weight.dtype:  # torch computes half precision in float32 and rounds once
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dt = torch.promote_types(x.dtype, torch.float32)
        eps = torch.finfo(dt).eps if self.eps is None else self.eps
        # x * rsqrt(mean(x^2) + eps) * weight, one fused op (decoding runs one launch per op)
        return F.rms_norm(x.to(dt), self.weight.shape, self.weight.to(dt), eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, a: torch.Tensor) -> tuple:
        """(x + a, this norm of it): a residual stream and a sublayer's output summed, then normalized. Where the
        kernel runs (see ``autocast_kernel``) both are ``path_triton.add_rms_norm``'s one kernel each way (no add
        of its own forward, none of autograd's for the sum's gradient in the backward); with hooks on this
        module it is called as a module."""
        kernel = self._kernel_options(x)
        if (
            kernel is not None and not _hooked(self) and a.shape == x.shape and a.is_contiguous()
            and a.dtype in (torch.bfloat16, torch.float16, torch.float32)
        ):
            return add_rms_norm(x, a, self.weight, **kernel)
        h = x + a
        return h, self(h)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class PaTHShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time followed by SiLU (fla's ``ShortConvolution`` layout).

    Works on [B, T, channels]. Positions only see earlier positions of the same segment, and a cache
    state (the last ``kernel_size - 1`` inputs) continues a sequence across calls.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=0, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C]; segment_ids [B, T]; state [B, K-1, C] (earlier inputs). Returns (y, new state [B, K-1,
        C], x's last inputs)."""
        K = self.kernel_size[0]
        T = x.shape[1]
        has_state = state is not None
        if not has_state:
            state = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        padded = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
        weight = self.weight[:, 0, :].to(x.dtype)  # [C, K]; tap K-1 multiplies the current input
        y = padded[:, K - 1 :] * weight[:, K - 1]
        for shift in range(1, K):
            tap = padded[:, K - 1 - shift : K - 1 - shift + T] * weight[:, K - 1 - shift]
            if segment_ids is not None:
                same = torch.zeros_like(segment_ids, dtype=torch.bool)
                same[:, shift:] = segment_ids[:, shift:] == segment_ids[:, :-shift]
                if has_state:  # the cached inputs belong to the first segment of this call
                    same[:, :shift] = segment_ids[:, :shift] == segment_ids[:, :1]
                tap = tap * same[..., None].to(x.dtype)
            y = y + tap
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        # The new state as a tensor of its own: a view would keep the whole input alive in a cache (a long
        # prompt's [B, T, C] per layer).
        return F.silu(y), padded[:, padded.shape[1] - (K - 1) :].clone()


def is_static_step(layer_cache, new_len: int) -> bool:
    """A single-token step on a filled static cache: the decoding step that compiles into one graph."""
    return layer_cache is not None and layer_cache.is_static and layer_cache.filled and new_len == 1


def padding_masks(attention_mask: torch.Tensor | None, layer_cache, new_len: int):
    """(key_mask [B, cached + new_len], token_mask [B, new_len]) as bool, False at padding; each is None
    when it has no padding. On a compiled decoding step (:func:`is_static_step`) both are the new token's
    column, with no host sync: the static cache keeps the mask of the earlier positions."""
    if is_static_step(layer_cache, new_len):
        step = attention_mask[:, -1:].bool() if attention_mask is not None else None
        return step, step
    if attention_mask is None:
        return None, None
    past_len = layer_cache.length if layer_cache is not None else 0
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2D [batch, past + new tokens] with 0 at padding, got shape "
            f"{tuple(attention_mask.shape)}; PaTH builds its own causal structure"
        )
    if attention_mask.shape[1] != past_len + new_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions but the cache holds {past_len} "
            f"and {new_len} are new; pass the mask of the whole sequence so far"
        )
    key_mask = attention_mask.bool()
    if key_mask.all():
        return None, None
    token_mask = key_mask[:, past_len:]
    return key_mask, None if token_mask.all() else token_mask


class PaTHAttention(nn.Module):
    """PaTH attention layer, a drop-in for ``fla.layers.PaTHAttention`` (same arguments, defaults and
    parameter names; returns ``(output, None, cache)``) that runs on any device.

    One preprocessing path serves training, prefill and decoding: project q, k, v, w, beta, g; short
    convolution on w; per-head reshape; optional qk RMSNorm; normalize w; then :func:`path_attention`.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        use_forget_gate: bool = False,
        use_qk_norm: bool = False,
        layer_idx: int | None = None,
        use_low_rank_w: bool = True,
        use_w_shortconv: bool = True,
        conv_size: int = 3,
        conv_bias: bool = False,
        attn_backend: str = "auto",
        chunk_size: int = 64,
        beta_max: float | None = None,
        keep_preparation: bool | None = None,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        self.head_dim = hidden_size // num_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.layer_idx = layer_idx
        self.use_forget_gate = use_forget_gate
        self.use_qk_norm = use_qk_norm
        self.use_w_shortconv = use_w_shortconv
        self.attn_backend = attn_backend
        self.chunk_size = chunk_size
        self.beta_max = beta_max
        self.keep_preparation = keep_preparation

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=False)
        if use_low_rank_w:
            self.w_proj = nn.Sequential(nn.Linear(hidden_size, 32, bias=False), nn.Linear(32, self.kv_dim, bias=False))
        else:
            self.w_proj = nn.Linear(hidden_size, self.kv_dim, bias=False)
        if use_qk_norm:
            self.maybe_q_norm = PaTHRMSNorm(self.head_dim, eps=1e-5)
            self.maybe_k_norm = PaTHRMSNorm(self.head_dim, eps=1e-5)
        else:
            self.maybe_q_norm = nn.Identity()
            self.maybe_k_norm = nn.Identity()
        if use_w_shortconv:
            self.w_conv1d = PaTHShortConvolution(self.kv_dim, conv_size, bias=conv_bias)
        self.bt_proj = nn.Linear(hidden_size, self.num_kv_heads, bias=True)
        if use_forget_gate:
            self.g_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _input_heads(self) -> list:
        """The projections that read the layer's input: q, k, v, w (its first factor when low-rank), beta
        and the gate (when on)."""
        w_in = self.w_proj[0] if isinstance(self.w_proj, nn.Sequential) else self.w_proj
        heads = [self.q_proj, self.k_proj, self.v_proj, w_in, self.bt_proj]
        return heads + [self.g_proj] if self.use_forget_gate else heads

    def _step_plan(self, x: torch.Tensor, layer_cache=None) -> _StepPlan:
        """The :class:`_StepPlan` of this layer for inputs like x (autograd off). A cache keeps it with the
        concatenated projections (:meth:`~cache_path.PaTHCacheLayer.keep_input_projection`), worked out anew
        at a dynamic cache's calls of several tokens (the prefill) and at a static cache's calls outside
        torch.compile, so single-token steps repeat neither the concatenation nor the checks; without a cache
        it is worked out per call."""
        plan = layer_cache.step_plan if layer_cache is not None else None
        if plan is not None and plan.dtype == x.dtype and plan.device == x.device:
            refresh = not torch.compiler.is_compiling() if layer_cache.is_static else x.shape[1] > 1
            if not refresh:
                return plan
        heads = self._input_heads()
        plan = _StepPlan(x.dtype, x.device, [m.out_features for m in heads])
        if all(_plain_linear(m, x) for m in heads):
            weights, biases = [m.weight for m in heads], [m.bias for m in heads]
            if layer_cache is not None:
                plan.joint = layer_cache.keep_input_projection(weights, biases)
            elif x.shape[1] == 1:
                plan.joint = _concatenated(weights, biases)
        w_up = self.w_proj[1] if isinstance(self.w_proj, nn.Sequential) else None
        conv_weight = self.w_conv1d.weight if self.use_w_shortconv else None
        if (
            plan.joint is not None
            and (conv_weight is None or conv_weight.is_contiguous())
            and isinstance(self.maybe_q_norm, (nn.Identity, PaTHRMSNorm))
            and (w_up is None or (_plain_linear(w_up, x, bias=False) and w_up.weight.is_contiguous()))
        ):
            norm = self.use_qk_norm
            plan.inputs = dict(
                heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                has_gate=self.use_forget_gate, w_up=w_up.weight if w_up is not None else None,
                conv_weight=conv_weight, conv_bias=self.w_conv1d.bias if conv_weight is not None else None,
                q_norm=self.maybe_q_norm.weight if norm else None, k_norm=self.maybe_k_norm.weight if norm else None,
                qk_eps=self.maybe_q_norm.eps if norm else 0.0, beta_max=self.beta_max,
            )
        if layer_cache is not None:
            layer_cache.step_plan = plan
        return plan

    def _input_projections(self, x: torch.Tensor, layer_cache=None) -> tuple:
        """q, k, v, w (before the short convolution), the beta and the gate pre-activations (gate: None
        without a forget gate), each [B, T, features] in x's dtype. The projections that read x run as one
        product over their concatenated weights: one matrix kernel (and one per gradient) instead of five or
        six. A decoding step (one token, autograd off) takes the concatenation kept by :meth:`_step_plan`;
        calls of several tokens (training, prefill) concatenate anew. A projection that is not a plain
        ``nn.Linear`` on x's device and dtype (adapters, quantized or offloaded layers) or that has forward
        hooks, and single tokens without a plan, take the module calls."""
        plan = None
        if not torch.is_grad_enabled() and (x.shape[1] == 1 or layer_cache is not None):
            plan = self._step_plan(x, layer_cache)
        if plan is not None and plan.joint is not None and x.shape[1] == 1:
            parts = list(F.linear(x, *plan.joint).split(plan.widths, -1))
        else:
            heads = self._input_heads()
            if x.shape[1] == 1 or not all(_plain_linear(m, x, autocast=True) and not _hooked(m) for m in heads):
                w = self.w_proj(x)
                g = self.g_proj(x) if self.use_forget_gate else None
                return self.q_proj(x), self.k_proj(x), self.v_proj(x), w, self.bt_proj(x), g
            # Several tokens (training, prefill): one product over the weights concatenated anew (autograd
            # takes each weight's gradient back out of the concatenation); q, k, v copied out of the product
            # once here rather than by the attention kernels in both passes. The biases (beta's and the gate's)
            # are added to their own columns: a bias of the whole product would take its gradient as a sum
            # over every column of the product's gradient.
            parts = list(F.linear(x, _joint_weight(heads, x)).split([m.out_features for m in heads], -1))
            parts[:3] = [t.contiguous() for t in parts[:3]]
            parts = [t if m.bias is None else t + m.bias for t, m in zip(parts, heads)]
        if isinstance(self.w_proj, nn.Sequential):
            parts[3] = self.w_proj[1](parts[3])
        return (*parts, None) if len(parts) == 5 else tuple(parts)

    def _fused_step_inputs(self, x: torch.Tensor, layer_cache, token_mask) -> tuple | None:
        """The inputs of a single-token decoding step on CUDA from one projection product and one Triton
        launch (``path_triton.decode_inputs``: the low-rank w's second factor, short convolution, SiLU,
        qk-norm, w normalization, beta and gate, with the PyTorch path's roundings), instead of ~40 small
        PyTorch ops. On a dynamic cache the launch is held back (a seventh value, ``path_triton.StepInputs``)
        for :func:`path_attention`, whose decoding kernel computes the inputs itself where it can. None where
        that kernel does not apply (the caller then takes the PyTorch path)."""
        plan = self._step_plan(x, layer_cache)
        conv_state = layer_cache.get_conv_state() if self.use_w_shortconv else None
        if plan.inputs is None or (self.use_w_shortconv and conv_state is None):
            return None
        q, k, v, w, beta, g, *held = decode_inputs(
            F.linear(x[:, 0], *plan.joint), conv_state=conv_state,
            token_mask=token_mask.reshape(-1) if token_mask is not None else None, launch=layer_cache.is_static,
            **plan.inputs,
        )
        g = g[:, None] if g is not None else None
        return q[:, None], k[:, None], v[:, None], w[:, None], beta[:, None], g, held[0] if held else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: PaTHCache | None = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        segment_ids: torch.Tensor | None = None,
        cache: PaTHCache | None = None,
        padding: tuple | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None, PaTHCache | None]:
        """hidden_states [B, T, hidden]; attention_mask [B, L + T] with 0 at padding (L cached tokens);
        segment_ids [B, T] for packed documents (a token only sees its own segment); ``padding``: the
        result of :func:`padding_masks` when the caller computed it once for all layers. Returns
        (output [B, T, hidden], None, cache)."""
        if output_attentions:
            raise ValueError("PaTH attention never materializes attention weights; use output_attentions=False")
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        layer_cache = None
        if cache is not None:
            layer_cache = cache.layer(self.layer_idx)
        elif use_cache:
            raise ValueError("use_cache=True needs a PaTHCache; pass cache=PaTHCache(config) (the model does this)")
        key_mask, token_mask = padding if padding is not None else padding_masks(attention_mask, layer_cache, T)
        if token_mask is not None and segment_ids is None and not is_static_step(layer_cache, T):
            # Padding is its own segment, so padded queries stay finite and real ones never see it.
            segment_ids = token_mask.long() - 1

        fused = None
        if (
            T == 1 and layer_cache is not None and segment_ids is None and not torch.is_grad_enabled()
            and (layer_cache.filled if layer_cache.is_static else layer_cache.length > 0)
            and decode_kernel_usable(hidden_states.device, (self.head_dim,), self.attn_backend)
        ):
            fused = self._fused_step_inputs(hidden_states, layer_cache, token_mask)
        if fused is not None:
            *inputs, held = fused
            out = self._attend(*inputs, segment_ids, key_mask, layer_cache, hidden_states, held)
            if held is not None and held.conv_state is not None:  # (the kernel may have written a new one)
                layer_cache.set_conv_state(held.conv_state)
            return out, None, cache

        # One preprocessing path for every mode.
        q, k, v, w, beta_logit, g_logit = self._input_projections(hidden_states, layer_cache)
        dt = torch.promote_types(hidden_states.dtype, torch.float32)  # w, beta, g in float32 or better
        beta = 2 * torch.sigmoid(beta_logit.to(dt))
        if self.beta_max is not None:
            beta = beta.clamp(max=self.beta_max)
        g = F.logsigmoid(g_logit.to(dt)) if self.use_forget_gate else None
        if token_mask is not None:  # padding: identity transform, no gate mass, nothing into the conv
            keep = token_mask[..., None]
            w = w * keep.to(w.dtype)
            beta = beta * keep
            g = g * keep if g is not None else None
        normalized = False
        if self.use_w_shortconv:
            conv_state = layer_cache.get_conv_state() if layer_cache is not None else None
            conv = self.w_conv1d
            if (
                conv_state is None and dt == torch.float32 and type(conv) is PaTHShortConvolution and not _hooked(conv)
                and short_conv_kernel_usable(w, self.head_dim, self.attn_backend)
            ):
                # convolution, SiLU and the normalization below in one kernel (and one for the backward)
                taps = conv.kernel_size[0]
                if layer_cache is not None:  # the last taps - 1 inputs, zeros before the sequence
                    last = w[:, max(T - taps + 1, 0) :]
                    layer_cache.set_conv_state(F.pad(last, (0, 0, max(taps - 1 - T, 0), 0)).clone())
                w = short_conv_normalize(w.contiguous(), conv.weight, conv.bias, segment_ids, head_dim=self.head_dim)
                normalized = True
            else:
                w, new_conv_state = conv(w, segment_ids, conv_state)
                if layer_cache is not None:
                    layer_cache.set_conv_state(new_conv_state)

        q = self.maybe_q_norm(q.view(B, T, self.num_heads, self.head_dim))
        k = self.maybe_k_norm(k.view(B, T, self.num_kv_heads, self.head_dim))
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        w = w.view(B, T, self.num_kv_heads, self.head_dim).to(dt)
        if not normalized:
            w = w * torch.rsqrt(w.pow(2).sum(-1, keepdim=True) + 1e-6)

        return self._attend(q, k, v, w, beta, g, segment_ids, key_mask, layer_cache, hidden_states), None, cache

    def _attend(self, q, k, v, w, beta, g, segment_ids, key_mask, layer_cache, hidden_states, step_inputs=None):
        o = path_attention(
            q, k, v, w, beta, g,
            segment_ids=segment_ids,
            key_mask=key_mask,
            cache=layer_cache,
            backend=self.attn_backend,
            chunk_size=self.chunk_size,
            step_inputs=step_inputs,
            keep_preparation=self.keep_preparation,
        )
        o = o.reshape(hidden_states.shape)
        if not torch.is_autocast_enabled(o.device.type):  # (under autocast the projection casts o itself)
            o = o.to(hidden_states.dtype)
        return self.o_proj(o)


class PaTHMLP(nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)) (fla's, config.mlp_type "gated"), or plain down(act(up(x)))."""

    def __init__(self, config: PaTHConfig):
        super().__init__()
        if config.mlp_type == "gated":
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.gated = config.mlp_type == "gated"
        self.silu = config.hidden_act in ("silu", "swish")
        self.backend = config.attn_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_proj, self.up_proj
            plain = _plain_linear(gate, x, bias=False) and _plain_linear(up, x, bias=False)
            if self.silu and plain and small_linear_usable(x, gate.weight, up.weight):
                # a compiled decoding step of one row: both products, the SiLU and the product in one launch
                return self.down_proj(small_linear(x, gate.weight, up=up.weight))
            joint = _plain_linear(gate, x, bias=False, autocast=True) and _plain_linear(up, x, bias=False, autocast=True)
            if (
                self.silu and joint and x.dim() == 3 and x.shape[1] > 1 and not (_hooked(gate) or _hooked(up))
                and gated_silu_usable(x, self.backend)
            ):
                # several tokens on CUDA (training, prefill): both products as one, then the SiLU and the product
                # in one kernel each way (whose backward writes the one product's gradient)
                return self.down_proj(gated_silu(F.linear(x, _joint_weight([gate, up], x))))
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class PaTHBlock(GradientCheckpointingLayer):
    """Pre-norm block: h = x + dropout(attn(attn_norm(x))); y = h + dropout(mlp(mlp_norm(h)))."""

    def __init__(self, config: PaTHConfig, layer_idx: int):
        super().__init__()
        kernel = config.attn_backend != "torch"  # (the norms' kernel under CUDA autocast; see PaTHRMSNorm)
        self.attn_norm = PaTHRMSNorm(config.hidden_size, eps=config.norm_eps, autocast_kernel=kernel)
        self.attn = PaTHAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            use_forget_gate=config.use_forget_gate,
            use_qk_norm=config.use_qk_norm,
            layer_idx=layer_idx,
            use_low_rank_w=config.use_low_rank_w,
            use_w_shortconv=config.use_w_shortconv,
            conv_size=config.conv_size,
            conv_bias=config.conv_bias,
            attn_backend=config.attn_backend,
            chunk_size=config.attn_chunk_size,
            beta_max=config.beta_max,
            keep_preparation=config.attn_keep_preparation,
        )
        self.attn_dropout = nn.Dropout(config.attention_dropout)
        self.mlp_norm = PaTHRMSNorm(config.hidden_size, eps=config.norm_eps, autocast_kernel=kernel)
        self.mlp = PaTHMLP(config)
        self.mlp_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: PaTHCache | None = None,
        padding: tuple | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _, _ = self.attn(
            self.attn_norm(hidden_states),
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            cache=cache,
            padding=padding,
        )
        hidden_states, normed = self.mlp_norm.add_and_norm(hidden_states, _dropout(self.attn_dropout, attn_out))
        return hidden_states + _dropout(self.mlp_dropout, self.mlp(normed))


class PaTHPreTrainedModel(PreTrainedModel):
    config_class = PaTHConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PaTHBlock"]
    _supports_cache_class = True
    _is_stateful = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes only the saved class into auto_map; list every head so that AutoModel and
        # AutoModelForSequenceClassification also load the checkpoint with trust_remote_code.
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_path.PaTHConfig",
            "AutoModel": "modeling_path.PaTHModel",
            "AutoModelForCausalLM": "modeling_path.PaTHForCausalLM",
            "AutoModelForSequenceClassification": "modeling_path.PaTHForSequenceClassification",
        }
        # The kernel is a choice of the machine that runs the model, not a property of its weights (as
        # transformers' attn_implementation): a model that ran on a CUDA-only kernel ("fla", "triton") is saved
        # with "auto", so the checkpoint also loads and runs on a CPU; pass attn_backend=... to from_pretrained
        # to pick a kernel there.
        # Keeping the kernel's preparation for the backward (memory for speed) is the machine's choice too.
        backend, keep = self.config.attn_backend, self.config.attn_keep_preparation
        if backend in ("fla", "triton"):
            self.config.attn_backend = "auto"
        self.config.attn_keep_preparation = None
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.attn_backend, self.config.attn_keep_preparation = backend, keep

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # fla's init: normal(0, initializer_range) for linear, conv and embedding weights, zero biases
        # (so beta = 1 and g = log 0.5 at init), ones for norms.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, PaTHRMSNorm):
            nn.init.ones_(module.weight)


def segment_ids_from_packing(position_ids=None, cu_seq_lens=None, seq_len=None):
    """Document ids [B, T] of packed rows, from `cu_seq_lens_q` (FlashAttention convention, batch 1) or
    from `position_ids` that restart at 0 at each document (as DataCollatorWithFlattening writes)."""
    if cu_seq_lens is not None:
        positions = torch.arange(seq_len, device=cu_seq_lens.device)
        return (torch.searchsorted(cu_seq_lens[1:-1].contiguous(), positions, right=True)).unsqueeze(0)
    if position_ids is not None and position_ids.shape[-1] > 1 and (position_ids[..., 1:] == 0).any():
        return (position_ids == 0).long().cumsum(-1)
    return None


class PaTHModel(PaTHPreTrainedModel):
    def __init__(self, config: PaTHConfig):
        # from_pretrained(..., field=value) sets config fields after the config's own checks ran: check again.
        config._validate()
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([PaTHBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = PaTHRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PaTHCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: PaTHCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Same inputs as a transformers causal LM. Packed sequences: ``position_ids`` that restart at 0 per
        document, or ``cu_seq_lens_q``; a 2D ``attention_mask`` marks padding on either side. PaTH has no
        positional embedding: position ids serve only to find document boundaries."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if cache is not None and not isinstance(cache, PaTHCache):
            # generate() creates a standard cache for every model; an empty one is swapped for a PaTH cache
            # (a static one for cache_implementation="static"), which the output carries back to generate().
            if cache.get_seq_length() > 0:
                raise TypeError(
                    f"PaTH models need a PaTHCache or PaTHStaticCache (its keys are rewritten every step), got a "
                    f"filled {type(cache).__name__}; pass cache=None, PaTHCache(model.config) or "
                    f"PaTHStaticCache(model.config, max_cache_len=...)"
                )
            if cache.is_compileable:
                max_len = cache.get_max_length()
                if max_len <= 0:
                    raise ValueError(
                        f"a static cache ({type(cache).__name__}) without a maximum length cannot be replaced by "
                        f"a PaTHStaticCache; pass cache=PaTHStaticCache(model.config, max_cache_len=...)"
                    )
                cache = PaTHStaticCache(self.config, max_cache_len=max_len)
            else:
                cache = PaTHCache(self.config)
            use_cache = True
        if use_cache and cache is None:
            cache = PaTHCache(config=self.config)
        if self.gradient_checkpointing and self.training and cache is not None:
            logger.warning_once("gradient checkpointing does not work with a cache; continuing without it")
            cache = None

        segment_ids = None
        T = inputs_embeds.shape[1]
        first_layer = cache.layers[0] if cache is not None else None
        padding = padding_masks(attention_mask, first_layer, T)  # once for all layers
        empty = first_layer is None or (not is_static_step(first_layer, T) and not first_layer.length)
        if padding[0] is None and empty:
            # A padding mask takes precedence: generate() writes position ids that restart after left padding.
            segment_ids = segment_ids_from_packing(position_ids, kwargs.get("cu_seq_lens_q"), T)

        hidden_states = inputs_embeds
        if self.config.embedding_multiplier is not None:
            hidden_states = hidden_states * self.config.embedding_multiplier
        hidden_states = _dropout(self.embedding_dropout, hidden_states)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=attention_mask, segment_ids=segment_ids, cache=cache, padding=padding
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache}
        )
        return output if return_dict else output.to_tuple()


class PaTHForCausalLM(PaTHPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: PaTHConfig):
        super().__init__(config)
        self.model = PaTHModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def create_masks_for_generate(self, attention_mask=None, inputs_embeds=None, **kwargs):
        """generate() asks models with a static cache for a 4D causal mask; PaTH builds its own causal
        structure and reads only the 2D padding mask. A decoding step on a filled static cache needs only
        the new token's column (the cache keeps the rest), which has the same shape at every step, so the
        compiled step is not recompiled as the sequence grows."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        new_len = inputs_embeds.shape[1] if inputs_embeds is not None else None
        if attention_mask is not None and isinstance(cache, PaTHStaticCache) and cache.filled and new_len == 1:
            # a fresh tensor: a [B, 1] view keeps the row stride, which grows every step (and recompiles)
            return attention_mask[:, -1:].clone(memory_format=torch.contiguous_format)
        return attention_mask

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PaTHCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: PaTHCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` give the loss through transformers' loss function (shifted inside; -100 ignored;
        ``num_items_in_batch`` honored). ``logits_to_keep``: an int keeps the last positions (0 = all),
        a 1D tensor the given positions."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=cache if cache is not None else past_key_values,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )
        return output if return_dict else output.to_tuple()


class PaTHForSequenceClassification(GenericForSequenceClassification, PaTHPreTrainedModel):
    def __init__(self, config: PaTHConfig):
        # Built directly (not through AutoModel) so that remote-code checkpoints need no registration.
        PaTHPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = PaTHModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = [
    "PaTHAttention",
    "PaTHPreTrainedModel",
    "PaTHModel",
    "PaTHForCausalLM",
    "PaTHForSequenceClassification",
]
