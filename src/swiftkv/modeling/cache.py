"""A KV cache that is written in place instead of grown by concatenation.

transformers' `DynamicLayer` appends each step with `torch.cat`, which re-allocates and copies the whole layer
cache for every new token (a cost that grows with the context). `PreallocatedLayer` owns buffers
[B, H, capacity, Dh] (sized once by `generate`), copies the new tokens into them and exposes
`keys`/`values` as views of the filled part [B, H, P+T, Dh], so attention and masks see exactly what a
`DynamicLayer` would hold. AcrossKV sharing is kept: `SwiftKVCache` takes its layer types from the config like
`DynamicCache`, so non-leaders are `DummyLayer`s and each group owns ONE buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DummyLayer,
    DynamicCache,
    DynamicLayer,
    get_layer_types_and_kwargs,
)


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose storage is allocated once for `capacity` tokens and doubles if it runs out."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # K, V [B, H, capacity, Dh]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers = None  # after `reset()` the next sequence may have another batch size

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K, V [B, H, T, Dh] after the cached tokens; returns views [B, H, P+T, Dh] of every cached token."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        end = past + key_states.shape[-2]
        if not self._owns_views() or end > self._buffers[0].shape[-2]:
            self._reallocate(key_states, value_states, max(end, self.capacity, 2 * past))
        for buffer, new in zip(self._buffers, (key_states, value_states), strict=True):
            buffer[:, :, past:end].copy_(new)
        self.advance(end)
        return self.keys, self.values

    def reserve(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers K, V [B, H, capacity, Dh] holding the cached tokens, with room for `end` tokens (a native step
        writes into them, then calls `advance`)."""
        if not self._owns_views() or end > self._buffers[0].shape[-2]:
            self._reallocate(self.keys, self.values, max(end, self.capacity, 2 * self.get_seq_length()))
        return self._buffers

    def advance(self, end: int) -> None:
        """The first `end` positions of the buffers are now the cached tokens."""
        self.keys, self.values = (buffer[:, :, :end] for buffer in self._buffers)

    def _owns_views(self) -> bool:
        """False when `keys`/`values` were replaced by new tensors (beam reordering, batch selection...)."""
        if self._buffers is None:
            return False
        return self.keys.numel() == 0 or (
            self.keys.data_ptr() == self._buffers[0].data_ptr() and self.keys.shape[0] == self._buffers[0].shape[0]
        )

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        """New buffers for `capacity` tokens holding the cached tokens (amortised: capacity at least doubles)."""
        past = self.get_seq_length()
        buffers = []
        for cached, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
            if past:
                buffer[:, :, :past].copy_(cached)
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])
        self.capacity = capacity


class SwiftKVCache(DynamicCache):
    """`DynamicCache` with `PreallocatedLayer`s for full-attention layers (others keep transformers' own layers).

    `max_cache_len` sizes the buffers up front (`generate` passes prompt + max_new_tokens); a longer sequence
    still works, the buffers grow by doubling.
    """

    def __init__(self, config, max_cache_len: int = 0):
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = [
            PreallocatedLayer(max_cache_len)
            if layer_type == "full_attention"
            else DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)
            for layer_type, kwargs in zip(layer_types, per_layer_kwargs, strict=True)
        ]
        Cache.__init__(self, layers=layers)  # skips DynamicCache's own layer construction
        self.native = None  # the native decode model built for this cache (native.NativeModel), or False: none
        self.native_owner = None  # the causal LM `native` was built from (a cache may be handed to another model)

    @property
    def preallocated(self) -> bool:
        """True when every layer that stores K/V is a `PreallocatedLayer` (the fast decode step needs it)."""
        return all(isinstance(layer, PreallocatedLayer) for layer in self.layers if not isinstance(layer, DummyLayer))


def measured_kv_bytes(cache: Cache) -> int:
    """Bytes of the DISTINCT tensor storages a cache holds (a storage shared by several layers counts once)."""
    storages: dict[int, int] = {}
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
