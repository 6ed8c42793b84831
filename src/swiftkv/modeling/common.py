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
    """RoPE on one tensor [B, heads, T, Dh] with (cos, sin) [B|1, T, Dh]; the families' `apply_rotary_pos_emb` bit for
    bit. A CPU prefill's runs as one native pass (csrc/elementwise.cpp) instead of six eager ops."""
    from swiftkv.modeling import kernels  # kernels imports this module

    if kernels.prefill_rows(x) and _native_rope_applies(x, *position_embeddings):
        return kernels.native.extension().prefill_rope(x, *position_embeddings)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return (x * cos) + (rotate_half(x) * sin)


def _native_rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The native RoPE's layouts: x [B, heads, T, Dh] with a contiguous last dim, cos and sin [B|1, T, Dh] like x."""
    batch, _, tokens, dh = x.shape
    return (
        x.stride(-1) == 1
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, batch)
        and tuple(cos.shape[1:]) == (tokens, dh)
        and cos.dtype == sin.dtype == x.dtype
    )


def mask_function(config) -> Callable:
    """transformers' mask builder for the config's attention type (SwiftKV needs one type for all layers)."""
    return create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask


def own_key_value_layers(config) -> int:
    """How many layers compute their own K/V from their own input: L in SwiftKV mode, every layer with SwiftKV off."""
    return config.num_key_value_layers if config.swiftkv else config.num_hidden_layers
