"""Generation cache of PaTH attention on transformers' Cache API.

PaTH keys are position dependent in a cumulative way: each new token's Householder transform rewrites
every cached key (``k <- k - beta (k . w) w``). The cache therefore keeps, per layer, the keys already
carried up to the last cached position (in ``cache_key_dtype``, float32 by default, because the
repeated rank-one updates drift when rounded to half precision), the raw values, the cumulative forget
gate of every position, and the last ``conv_size - 1`` inputs of the short convolution.

Buffers grow in blocks, so decoding writes one slot per token in place instead of copying the cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH_BLOCK = 256


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
    gates [B, HQ, capacity] (cumulative log forget gate, float32), conv_state [B, K-1, kv_dim]."""

    is_compileable = False
    is_croppable = False

    def __init__(self, key_dtype: str = "float32", **kwargs):
        super().__init__()
        self.key_dtype = key_dtype
        self.gates: torch.Tensor | None = None
        self.conv_state: torch.Tensor | None = None
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
        self.keys = self.values = self.gates = self.conv_state = None
        self.is_initialized = False
        self.length = 0

    def _map_batch(self, fn) -> None:
        for name in ("keys", "values", "gates", "conv_state"):
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
    def _resolve_key_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.key_dtype == "model":
            return model_dtype
        return {"float32": torch.float32, "float64": torch.float64}[self.key_dtype]

    def append(self, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor | None):
        """Write T new positions: keys [B, T, H, D] (already transformed to the newest position), values
        [B, T, H, Dv], gates [B, T, HQ] cumulative. Returns views over the whole cache:
        keys [B, H, L, D], values [B, H, L, Dv], gates [B, HQ, L] or None."""
        B, T, H, D = keys.shape
        start, end = self.length, self.length + T
        if self.keys is None:
            self.is_initialized = True
            self._key_dtype = self._resolve_key_dtype(values.dtype)
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
        return self.keys_view(), self.values_view(), self.gates_view() if gates is not None else None

    def keys_view(self) -> torch.Tensor:
        return self.keys[:, :, : self.length]

    def values_view(self) -> torch.Tensor:
        return self.values[:, :, : self.length]

    def gates_view(self) -> torch.Tensor:
        return self.gates[:, :, : self.length]

    def gate_offset(self) -> torch.Tensor | None:
        """Cumulative gate at the last cached position, [B, HQ]."""
        return self.gates[:, :, self.length - 1] if self.length and self.gates is not None else None

    def cumulative_gate(self, g: torch.Tensor) -> torch.Tensor:
        """Per-step log gates g [B, T, HQ] -> cumulative gates continuing the cache, float32."""
        cumulative = g.to(torch.promote_types(g.dtype, torch.float32)).cumsum(1)
        offset = self.gate_offset()
        return cumulative if offset is None else cumulative + offset[:, None, :]

    def transform_keys(self, transform: torch.Tensor) -> None:
        """Carry every cached key through a block of new tokens: keys <- keys @ transform^T, with
        transform [B, H, D, D] the product of the block's Householder matrices."""
        keys = self.keys_view()
        keys.copy_(keys.to(transform.dtype) @ transform.transpose(-1, -2))


class PaTHCache(Cache):
    """Cache of a PaTH model: one :class:`PaTHCacheLayer` per layer.

    ``generate()`` creates one by itself; to keep and continue a generation, pass
    ``cache=PaTHCache(model.config)`` (``past_key_values=`` before transformers 5.24) and read it back
    from the output.
    """

    def __init__(self, config=None, num_hidden_layers: int | None = None, cache_key_dtype: str | None = None):
        if config is not None:
            num_hidden_layers = config.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
            cache_key_dtype = cache_key_dtype or getattr(config, "cache_key_dtype", "float32")
        if num_hidden_layers is None:
            raise ValueError("PaTHCache needs the model config or num_hidden_layers")
        super().__init__(layers=[PaTHCacheLayer(cache_key_dtype or "float32") for _ in range(num_hidden_layers)])

    def layer(self, layer_idx: int | None) -> PaTHCacheLayer:
        return self.layers[layer_idx or 0]

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size


__all__ = ["PaTHCache", "PaTHCacheLayer"]
