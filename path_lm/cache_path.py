"""Generation cache of PaTH attention on transformers' Cache API.

PaTH keys are position dependent in a cumulative way: each new token's Householder transform rewrites
every cached key (``k <- k - beta (k . w) w``). The cache therefore keeps, per layer, the keys already
carried up to the last cached position (in ``cache_key_dtype``: float32 unless "mixed" applies, because
the repeated rank-one updates drift when rounded to half precision at every step), the raw values, the
cumulative forget gate of every position, and the last ``conv_size - 1`` inputs of the short convolution.

Buffers grow in blocks, so decoding writes one slot per token in place instead of copying the cache.

On CUDA the fused decoding kernel keeps most keys in place between steps once the cache holds more than
``FRAMES_MIN_KEYS`` keys (batch x heads x positions): only the last ``FRAME_WINDOW`` keys are rewritten
per token; older ones stay in an earlier frame, carried by a D x D matrix per head (``frames``), and are
rewritten once every ``FRAME_WINDOW`` tokens. :meth:`PaTHCacheLayer.carry_framed_keys`
brings every key to the last position; :meth:`PaTHCacheLayer.keys_view` calls it.

With ``cache_key_dtype="mixed"`` and the decoding kernel, keys are stored in the model's dtype and frames
are kept at every cache size: framed keys are then rounded once per ``FRAME_WINDOW`` tokens (at the fold)
instead of at every token, and the window's keys, rewritten every token, are kept exactly in a float32
ring (``key_ring``) beside their rounded copies in ``keys``. ``"auto"`` (the default) picks "mixed" at the
first write for half-precision models on the decoding kernel whose cache is large enough for frames
(:func:`frames_pay_off` at the written length, or ``max_cache_len`` of a static cache), else "float32".
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH_BLOCK = 256
FRAME_WINDOW = 64
# Caches of at most this many keys (batch x kv heads x positions) rewrite every key per step instead: there
# the frames' fixed cost (a D x D matrix per head read by every program, the fold launch) is more than the
# traffic they save. Measured on an H100 at head dim 64 (docs/kernels.md, run 4).
FRAMES_MIN_KEYS = 2**17


def frames_pay_off(batch: int, kv_heads: int, length: int) -> bool:
    """Whether the decoding kernel should keep framed keys for a cache of this size."""
    return batch * kv_heads * length > FRAMES_MIN_KEYS


def key_layout(key_dtype: str, model_dtype: torch.dtype, decoding_kernel: bool, batch: int, kv_heads: int,
               length: int) -> str:
    """The layout a cache with ``cache_key_dtype=key_dtype`` takes for this model dtype and cache size:
    "auto" becomes "mixed" for a bf16/fp16 model on the decoding kernel whose cache keeps frames
    (:func:`frames_pay_off`), else "float32"; any other value stays."""
    if key_dtype != "auto":
        return key_dtype
    half = model_dtype in (torch.bfloat16, torch.float16)
    return "mixed" if decoding_kernel and half and frames_pay_off(batch, kv_heads, length) else "float32"


def _grow(buffer: torch.Tensor | None, length: int, needed: int, shape_fn) -> torch.Tensor:
    """Return a buffer with room for `needed` positions along dim 2, keeping the first `length`."""
    if buffer is not None and buffer.shape[2] >= needed:
        return buffer
    # Headroom of one block past what is needed, and 1.5x growth: amortized O(1) copies per token without
    # doubling a long prompt's cache on the first decoded token.
    capacity = max(needed + GROWTH_BLOCK, (3 * buffer.shape[2]) // 2 if buffer is not None else 0)
    capacity = GROWTH_BLOCK * ((capacity + GROWTH_BLOCK - 1) // GROWTH_BLOCK)
    new = shape_fn(capacity)
    if buffer is not None and length:
        new[:, :, :length] = buffer[:, :, :length]
    return new


class PaTHCacheLayer(CacheLayerMixin):
    """One layer's PaTH state. Keys [B, H, capacity, D], values [B, H, capacity, Dv],
    gates [B, HQ, capacity] (cumulative log forget gate, float32), conv_state [B, K-1, kv_dim], and
    frames [B, 2, H, D, D] (float32) once the decoding kernel has run (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_static = False

    def __init__(self, key_dtype: str = "auto", **kwargs):
        super().__init__()
        self.requested_key_dtype = key_dtype  # "auto" is resolved into key_dtype at the first write
        self.key_dtype = key_dtype
        self.gates: torch.Tensor | None = None
        self.conv_state: torch.Tensor | None = None
        self.frames: torch.Tensor | None = None
        self.key_ring: torch.Tensor | None = None
        self.frame_window = FRAME_WINDOW
        self._frames_used = False
        self.input_weight: torch.Tensor | None = None
        self.input_bias: torch.Tensor | None = None
        # What the attention layer's single-token steps reuse, worked out whenever it keeps the projections
        # (its own object; the cache only holds it for the length of one generation)
        self.step_plan = None
        self.length = 0

    def __repr__(self):
        return f"{self.__class__.__name__}(length={self.length}, key_dtype={self.key_dtype})"

    # -- transformers' CacheLayerMixin interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "a PaTH cache layer is written by PaTHAttention (keys must be transformed, not appended); "
            "it cannot serve a standard attention layer"
        )

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.gates = self.conv_state = self.frames = self.key_ring = None
        self.key_dtype = self.requested_key_dtype
        self.input_weight = self.input_bias = self.step_plan = None
        self._frames_used = False
        self.is_initialized = False
        self.length = 0

    _batch_tensors = ("keys", "values", "gates", "conv_state", "frames", "key_ring")

    def _map_batch(self, fn) -> None:
        for name in self._batch_tensors:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a PaTH cache cannot be cropped: every token has already rewritten all earlier cached keys. "
            "Assisted and prompt-lookup decoding need cropping and are not supported with PaTH models; "
            "use plain generation (greedy, sampling or beam search)"
        )

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.keys is not None else -1

    # -- what PaTHAttention reads and writes --------------------------------------------------------------
    def _resolve_key_dtype(self, keys: torch.Tensor, model_dtype: torch.dtype, decoding_kernel: bool,
                           size: int) -> torch.dtype:
        """The stored keys' dtype, at the first write of keys [B, T, H, D]; ``"auto"`` becomes "mixed" or
        "float32" here (``size``: the positions the cache holds, for the frame rule)."""
        self.key_dtype = key_layout(self.key_dtype, model_dtype, decoding_kernel, keys.shape[0], keys.shape[2], size)
        if self.key_dtype == "model" or (self.key_dtype == "mixed" and decoding_kernel):
            return model_dtype
        return {"float32": torch.float32, "float64": torch.float64, "mixed": torch.float32}[self.key_dtype]

    def _new_ring(self, keys: torch.Tensor, decoding_kernel: bool) -> torch.Tensor | None:
        """The float32 ring of window keys for ``cache_key_dtype="mixed"`` (None in every other case)."""
        if self.key_dtype != "mixed" or not decoding_kernel:
            return None
        B, _, H, D = keys.shape
        return keys.new_zeros(B, H, 2 * self.frame_window, D, dtype=torch.float32)

    def fill_key_ring(self, new_keys: torch.Tensor | None = None, start: int = 0) -> None:
        """After keys were written other than by the decoding kernel (up to position ``length``): copy the
        window's keys, [window * floor((length - 1) / window), length), into the ring (if the layer has
        one), exactly where new_keys [B, T, H, D] (positions from ``start``) gave them, else as stored."""
        if self.key_ring is None:
            return
        length, size = self.length, self.key_ring.shape[2]
        first = self.frame_window * ((length - 1) // self.frame_window)
        positions = torch.arange(first, length, device=self.keys.device)
        window = self.keys[:, :, first:length].to(torch.float32)
        exact = positions >= start
        if new_keys is not None and exact.any():
            window[:, :, exact] = new_keys[:, positions[exact] - start].transpose(1, 2).to(torch.float32)
        self.key_ring[:, :, positions % size] = window

    def get_conv_state(self) -> torch.Tensor | None:
        """The last ``conv_size - 1`` inputs of the short convolution, [B, K-1, kv_dim] (None when empty)."""
        return self.conv_state

    def set_conv_state(self, state: torch.Tensor) -> None:
        self.conv_state = state

    def keep_input_projection(self, weights: list, biases: list) -> tuple:
        """Keep the attention layer's input projections concatenated along the output dim (weights, and
        biases with zeros for the projections without one), so that decoding steps run them as one product
        without concatenating again. Returns (weight, bias)."""
        self.input_weight, self.input_bias = _concatenated(weights, biases)
        return self.input_weight, self.input_bias

    def kept_input_projection(self) -> tuple | None:
        """(weight, bias) kept by :meth:`keep_input_projection`, or None."""
        return None if self.input_weight is None else (self.input_weight, self.input_bias)

    def append(self, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor | None, key_mask=None, *,
               decoding_kernel: bool = False):
        """Write T new positions: keys [B, T, H, D] (already transformed to the newest position), values
        [B, T, H, Dv], gates [B, T, HQ] cumulative, key_mask [B, T] (False at padding; kept by the static
        cache only, the dynamic cache reads the caller's attention mask). ``decoding_kernel``: whether the
        decoding steps will run path-lm's kernel (read at the first write, for ``cache_key_dtype="mixed"``).
        Returns views over the whole cache: keys [B, H, L, D], values [B, H, L, Dv], gates [B, HQ, L] or
        None."""
        B, T, H, D = keys.shape
        start = self.length
        end = start + T
        if self.keys is None:
            self.is_initialized = True
            self._key_dtype = self._resolve_key_dtype(keys, values.dtype, decoding_kernel, end)
            self.key_ring = self._new_ring(keys, decoding_kernel)
        self.keys = _grow(self.keys, start, end, lambda c: keys.new_zeros(B, H, c, D, dtype=self._key_dtype))
        self.values = _grow(self.values, start, end, lambda c: values.new_zeros(B, H, c, values.shape[-1]))
        self.keys[:, :, start:end] = keys.transpose(1, 2)
        self.values[:, :, start:end] = values.transpose(1, 2)
        if gates is not None:
            self.gates = _grow(
                self.gates, start, end, lambda c: gates.new_zeros(B, gates.shape[-1], c)
            )
            self.gates[:, :, start:end] = gates.transpose(1, 2)
        self.length = end
        self.fill_key_ring(keys, start)
        keys_now = self.keys[:, :, :end]  # as stored: framed keys are not carried here
        return keys_now, self.values_view(), self.gates_view() if gates is not None else None

    def reserve(self, needed: int) -> None:
        """Grow the buffers of a filled layer to hold at least ``needed`` positions (the decoding kernel then
        writes the new slot itself)."""
        length = self.length
        for name in ("keys", "values", "gates"):
            buffer = getattr(self, name)
            if buffer is not None:
                setattr(self, name, _grow(buffer, length, needed, lambda c: buffer.new_zeros(*buffer.shape[:2], c, *buffer.shape[3:])))

    def keys_view(self) -> torch.Tensor:
        """The cached keys [B, H, L, D], carried to the last cached position."""
        self.carry_framed_keys()
        return self.keys[:, :, : self.length]

    def decode_frames(self) -> torch.Tensor | None:
        """The frame buffer of the decoding kernel, [B, 2, H, D, D] float32, created as identities once the
        cache is large enough (:func:`frames_pay_off`; None before: every key is rewritten per step)."""
        if self.frames is None:
            B, H, _, D = self.keys.shape
            if self.key_ring is None and not frames_pay_off(B, H, self.length):
                return None
            self.frames = _identity_frames(B, H, D, self.keys.device)
        self._frames_used = True
        return self.frames

    def carry_framed_keys(self) -> None:
        """Rewrite the keys the decoding kernel left in an older frame (all but the last FRAME_WINDOW, at
        most) as carried to the last cached position, and reset the frames to the identity."""
        if self.frames is None or not self._frames_used:
            return
        self._carry_framed_keys()
        self._frames_used = False

    def _carry_framed_keys(self) -> None:
        length = self.length
        framed = self.frame_window * ((length - 1) // self.frame_window) if length else 0
        if framed:
            carry = self.frames[:, length % 2]  # [B, H, D, D]
            keys = self.keys[:, :, :framed]
            keys.copy_(keys.to(torch.float32) @ carry.transpose(-1, -2))
        self._reset_frames()

    def _reset_frames(self) -> None:
        self.frames.copy_(torch.eye(self.frames.shape[-1], device=self.frames.device).expand_as(self.frames))

    def values_view(self) -> torch.Tensor:
        return self.values[:, :, : self.length]

    def gates_view(self) -> torch.Tensor:
        return self.gates[:, :, : self.length]

    def gate_offset(self) -> torch.Tensor | None:
        """Cumulative gate at the last cached position, [B, HQ]."""
        return self.gates[:, :, self.length - 1] if self.length and self.gates is not None else None

    def cumulative_gate(self, g: torch.Tensor) -> torch.Tensor:
        """Per-step log gates g [B, T, HQ] -> cumulative gates continuing the cache, float32."""
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        cumulative = g.cumsum(1) if g.shape[1] > 1 else g
        offset = self.gate_offset()
        return cumulative if offset is None else cumulative + offset[:, None, :]

    def transform_keys(self, transform: torch.Tensor) -> None:
        """Carry every cached key through a block of new tokens: keys <- keys @ transform^T, with
        transform [B, H, D, D] the product of the block's Householder matrices (a ring's window keys are
        refilled from the result by the next :meth:`append`)."""
        keys = self.keys_view()
        keys.copy_(keys.to(transform.dtype) @ transform.transpose(-1, -2))


def _concatenated(weights: list, biases: list) -> tuple:
    bias = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return torch.cat(weights), torch.cat(bias)


def _identity_frames(B: int, H: int, D: int, device) -> torch.Tensor:
    return torch.eye(D, device=device).expand(B, 2, H, D, D).contiguous()


def _mark_static(tensor: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile that the buffer keeps its address (CUDA graphs replay it in place)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


class PaTHStaticCacheLayer(PaTHCacheLayer):
    """A PaTH cache layer with buffers of fixed size ``max_cache_len``, allocated once (at the prefill) and
    written in place, and the cached length kept as a device tensor: a single-token decoding step reads and
    writes only device memory, so it can run under ``torch.compile`` and CUDA graphs without recompiling.

    Beside the dynamic layer's buffers it keeps key_mask [B, max_cache_len] (False at padding) and
    ``position`` (int64 scalar tensor, the number of cached tokens). ``length`` reads ``position`` back to
    the host and is used only outside compiled decoding steps (prefill, multi-token continuation)."""

    is_compileable = True
    is_static = True
    _batch_tensors = ("keys", "values", "gates", "conv_state", "key_mask", "frames", "key_ring")

    def __init__(self, max_cache_len: int, key_dtype: str = "auto", **kwargs):
        self.max_cache_len = int(max_cache_len)
        self.position: torch.Tensor | None = None
        self.key_mask: torch.Tensor | None = None
        self.filled = False
        super().__init__(key_dtype)

    def __repr__(self):
        return f"{self.__class__.__name__}(max_cache_len={self.max_cache_len}, key_dtype={self.key_dtype})"

    @property
    def length(self) -> int:
        return int(self.position) if self.position is not None else 0

    @length.setter
    def length(self, value: int) -> None:
        if self.position is not None:
            self.position.fill_(value)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (and their addresses, which compiled graphs hold)."""
        for name in self._batch_tensors:
            tensor = getattr(self, name)
            if tensor is not None and name != "frames":
                tensor.fill_(name == "key_mask")
        if self.frames is not None:
            self._reset_frames()
        if self.position is not None:
            self.position.zero_()
        self.filled = False

    def _map_batch(self, fn) -> None:
        for name in self._batch_tensors:
            tensor = getattr(self, name)
            if tensor is None:
                continue
            mapped = fn(tensor)
            if mapped.shape == tensor.shape:
                tensor.copy_(mapped)  # beam reordering: in place, the address stays
            else:
                setattr(self, name, _mark_static(mapped.contiguous()))

    def get_conv_state(self) -> torch.Tensor | None:
        return self.conv_state if self.filled else None

    def decode_frames(self) -> torch.Tensor | None:
        # For large caches (frames_pay_off): allocated with the buffers on CUDA (a compiled step needs its
        # address fixed), else at the first eager kernel step. Compiled steps cannot tell the host they used
        # it, so carry_framed_keys() always runs.
        B, H, _, D = self.keys.shape
        if self.frames is None and frames_pay_off(B, H, self.max_cache_len) and not torch.compiler.is_compiling():
            self.frames = _identity_frames(B, H, D, self.keys.device)
        return self.frames

    def keep_input_projection(self, weights: list, biases: list) -> tuple:
        """As the dynamic layer's, refreshed in place, so the addresses that compiled graphs hold stay."""
        weight, bias = _concatenated(weights, biases)
        if self.input_weight is None or self.input_weight.shape != weight.shape or self.input_weight.dtype != weight.dtype:
            self.input_weight, self.input_bias = _mark_static(weight), _mark_static(bias)
        else:
            self.input_weight.copy_(weight)
            self.input_bias.copy_(bias)
        return self.input_weight, self.input_bias

    def carry_framed_keys(self) -> None:
        if self.frames is not None:
            self._carry_framed_keys()

    def set_conv_state(self, state: torch.Tensor) -> None:
        if self.conv_state is None or self.conv_state.shape != state.shape:
            self.conv_state = _mark_static(state.clone())
        else:
            self.conv_state.copy_(state)

    def _allocate(self, keys, values, gates, decoding_kernel: bool) -> None:
        B, _, H, D = keys.shape
        L = self.max_cache_len
        self._key_dtype = self._resolve_key_dtype(keys, values.dtype, decoding_kernel, L)
        self.keys = _mark_static(keys.new_zeros(B, H, L, D, dtype=self._key_dtype))
        ring = self._new_ring(keys, decoding_kernel)
        self.key_ring = _mark_static(ring) if ring is not None else None
        self.values = _mark_static(values.new_zeros(B, H, L, values.shape[-1]))
        self.gates = _mark_static(gates.new_zeros(B, gates.shape[-1], L)) if gates is not None else None
        self.key_mask = _mark_static(torch.ones(B, L, dtype=torch.bool, device=keys.device))
        self.position = _mark_static(torch.zeros((), dtype=torch.long, device=keys.device))
        if ring is not None or (keys.is_cuda and frames_pay_off(B, H, L)):  # for the decoding kernel, fixed address
            self.frames = _mark_static(_identity_frames(B, H, D, keys.device))
        self.is_initialized = True

    def append(self, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor | None, key_mask=None, *,
               decoding_kernel: bool = False):
        B, T = keys.shape[:2]
        start = self.length
        if start + T > self.max_cache_len:
            raise ValueError(
                f"the static PaTH cache holds max_cache_len={self.max_cache_len} tokens; {start} are cached and "
                f"{T} more were given. Create it with a larger max_cache_len (generate(): max_cache_len=...)"
            )
        if self.keys is None:
            self._allocate(keys, values, gates, decoding_kernel)
        if self.keys.shape[0] != B:
            raise ValueError(
                f"the static PaTH cache was allocated for batch {self.keys.shape[0]}, got batch {B}; "
                f"create a new cache (or call reset() before a new batch of the same size)"
            )
        if self.key_mask is not None:
            self.key_mask[:, start : start + T] = True if key_mask is None else key_mask
        self.filled = True
        return super().append(keys, values, gates, decoding_kernel=decoding_kernel)


class PaTHCache(Cache):
    """Cache of a PaTH model: one :class:`PaTHCacheLayer` per layer.

    ``generate()`` creates one by itself; to keep and continue a generation, pass
    ``cache=PaTHCache(model.config)`` (``past_key_values=`` before transformers 5.24) and read it back
    from the output.

    Each layer keeps a copy of its attention's concatenated input projections from its last call of several
    tokens (the prompt), and which of its modules the fused steps can read, which single-token steps reuse:
    change the weights or swap modules (adapters) between generations, or run a multi-token call after
    changing them, not between decoding steps of one cache.
    """

    def __init__(self, config=None, num_hidden_layers: int | None = None, cache_key_dtype: str | None = None):
        if config is not None:
            num_hidden_layers = config.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
            cache_key_dtype = cache_key_dtype or getattr(config, "cache_key_dtype", "auto")
        if num_hidden_layers is None:
            raise ValueError(f"{type(self).__name__} needs the model config or num_hidden_layers")
        super().__init__(layers=[self._new_layer(cache_key_dtype or "auto") for _ in range(num_hidden_layers)])

    def _new_layer(self, key_dtype: str) -> PaTHCacheLayer:
        return PaTHCacheLayer(key_dtype)

    def layer(self, layer_idx: int | None) -> PaTHCacheLayer:
        return self.layers[layer_idx or 0]

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size


class PaTHStaticCache(PaTHCache):
    """Preallocated PaTH cache for compiled decoding: ``generate(..., cache_implementation="static")``
    creates one, and ``torch.compile`` (``generate()``'s automatic compilation on CUDA, or your own)
    then runs each decoding step as one graph. Buffers are allocated at the prefill for the prompt's batch
    and ``max_cache_len`` positions.

    >>> cache = PaTHStaticCache(model.config, max_cache_len=4096)
    >>> out = model.generate(ids, max_new_tokens=256, cache=cache)   # past_key_values= before 5.24

    Each layer also keeps a copy of its attention's concatenated input projections (one product per
    decoding step instead of six), taken at every call that runs outside ``torch.compile`` (generate()'s
    prefill always does). Compiled steps read that copy: if you change the weights, run the next prompt
    through the model (or ``reset()`` the cache and prefill again) before compiled steps.
    """

    def __init__(
        self,
        config=None,
        max_cache_len: int | None = None,
        num_hidden_layers: int | None = None,
        cache_key_dtype: str | None = None,
    ):
        if max_cache_len is None or int(max_cache_len) <= 0:
            raise ValueError(f"PaTHStaticCache needs max_cache_len > 0 (prompt + new tokens), got {max_cache_len}")
        self._layer_length = int(max_cache_len)  # transformers' Cache has a read-only `max_cache_len`
        super().__init__(config, num_hidden_layers, cache_key_dtype)

    def _new_layer(self, key_dtype: str) -> PaTHStaticCacheLayer:
        return PaTHStaticCacheLayer(self._layer_length, key_dtype)

    @property
    def filled(self) -> bool:
        """True once a prompt has been written: single-token calls then take the compiled decoding step."""
        return self.layers[0].filled


__all__ = ["PaTHCache", "PaTHCacheLayer", "PaTHStaticCache", "PaTHStaticCacheLayer"]
