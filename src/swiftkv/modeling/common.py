"""Small pieces the SwiftKV forward (base.py) and the decode step (decode.py) share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import rotate_half


class Switch:
    """A process-wide on/off flag; calling it gives a context manager that sets it for a block, then restores it."""

    def __init__(self, on: bool):
        self.on = on

    @contextlib.contextmanager
    def __call__(self, enabled: bool) -> Iterator[None]:
        previous, self.on = self.on, enabled
        try:
            yield
        finally:
            self.on = previous


def apply_rope(x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on one tensor [B, heads, T, Dh]; same arithmetic as the families' `apply_rotary_pos_emb`."""
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return (x * cos) + (rotate_half(x) * sin)


def mask_function(config) -> Callable:
    """transformers' mask builder for the config's attention type (SwiftKV needs one type for all layers)."""
    return create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask


def own_key_value_layers(config) -> int:
    """How many layers compute their own K/V from their own input: L in SwiftKV mode, every layer with SwiftKV off."""
    return config.num_key_value_layers if config.swiftkv else config.num_hidden_layers
