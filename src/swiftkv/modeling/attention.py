"""Prefill attention on CPU: swiftkv's flash attention (csrc/attention.cpp) for causal prefills, SDPA otherwise.

Registered with transformers as the attention implementation `"swiftkv_cpu"` (its masks are SDPA's), which
`swiftkv.load` selects for models on CPU. The native kernel runs a causal prefill (no padding mask, no dropout,
window or soft cap, head dim 64 or 128) without autograd; everything else goes to transformers' SDPA as it is.
Its arithmetic follows the layer's products (weights.py): in a layer that multiplies in bf16 (bf16 weights; int8/int4
blocks on bf16 hardware) q, k, v and the softmax numerators are rounded to bf16 and multiplied by `vdpbf16ps`, with
float32 scores, sums and outputs (PyTorch's bf16 flash attention's arithmetic); elsewhere float32 FMAs, SDPA's
formula summed in another order. Against PyTorch's CPU flash attention on a 2048-token SmolLM2 layer: ~2.2x (bf16)
and ~1.3x (float32) on two Zen 4 cores (docs/cpu.md).

`sdpa_for_bf16_layers(True)` sends bf16 layers' causal prefills to PyTorch's flash attention on bf16 q/k/v instead,
which runs AMX tiles where the CPU has them (Intel Xeons), where `vdpbf16ps` may not beat float32 FMAs. Off until an
AMX CPU has measured which is faster in a whole prefill (docs/cpu.md): `benchmarks/prefill_profile.py --attention
sdpa-bf16` turns it on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from swiftkv.modeling import native
from swiftkv.modeling.common import Switch
from swiftkv.modeling.weights import BlockLinear, layer_product_dtype

NAME = "swiftkv_cpu"
HEAD_DIMS = (64, 128)  # the kernel's instantiations
# Implementations whose masks are dense tensors SwiftKV can slice by query row (modeling/base.py; the decode step
# too); others run the full SwiftKV forward (still correct, without the prefill saving).
SKIPPABLE_ATTENTION = ("sdpa", "eager", NAME)
_sdpa_bf16 = Switch(False)


def sdpa_for_bf16_layers(enabled: bool) -> contextlib.AbstractContextManager:
    """Within the block, bf16 layers' causal prefills that the kernel would run (as many query rows as keys) run
    PyTorch's SDPA on bf16 q/k/v instead (module doc; False: the kernel), then restore."""
    return _sdpa_bf16(enabled)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, H, Tq, Dh], key/value [B, Hkv, Tk, Dh] -> ([B, Tq, H, Dh], None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = attention_mask is None and not dropout and causal and not _extras(kwargs)
    if plain and _kernel_applies(query, key, value):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        bf16 = _multiplies_in_bf16(module, query)
        if bf16 and _sdpa_bf16.on and query.shape[2] == key.shape[2]:
            return _sdpa_bf16_attention(query, key, value, scale), None
        return _run_kernel(query, key, value, scale, bf16 and bf16_kernel_available()), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _run_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bf16: bool) -> torch.Tensor:
    return native.extension().prefill_attention(query, key, value, scale, bf16)


def _sdpa_bf16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """PyTorch's causal SDPA of q [B, H, T, Dh], k/v [B, Hkv, T, Dh] rounded to bf16 (GQA without copying heads), the
    output as the kernel gives it: [B, T, H, Dh], float32."""
    out = F.scaled_dot_product_attention(
        query.bfloat16(), key.bfloat16(), value.bfloat16(), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)


def _extras(kwargs: dict) -> bool:
    """Options SDPA handles and the kernel does not: a sliding window, a logit soft cap, returned weights."""
    return any(kwargs.get(name) for name in ("sliding_window", "softcap", "output_attentions"))


def _kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    tensors = (query, key, value)
    return (
        query.shape[2] > 1
        and query.shape[-1] in HEAD_DIMS
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and kernel_available()
    )


def _multiplies_in_bf16(module: nn.Module, x: torch.Tensor) -> bool:
    """The attention layer's products of x run in bf16 (weights.py): its output projection says for the whole
    layer."""
    proj = getattr(module, "o_proj", None)
    return isinstance(proj, (nn.Linear, BlockLinear)) and layer_product_dtype(proj, x) == torch.bfloat16


def kernel_available() -> bool:
    """The native extension builds (or is built) here and has the kernel (SWIFTKV_NATIVE=0 turns it off)."""
    ext = native.usable()
    return ext is not None and hasattr(ext, "prefill_attention")


def bf16_kernel_available() -> bool:
    """The kernel's bf16 arithmetic is built: AVX512-BF16 (not in x86-64-v3 builds or on CPUs without it)."""
    return kernel_available() and native.extension().has_bf16_attention()


def use_cpu_attention(model: nn.Module) -> None:
    """Select `NAME` for a model that runs transformers' SDPA (eager, flash, ... are left as they are): on CPU, where
    its kernel runs (elsewhere it is SDPA itself)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
