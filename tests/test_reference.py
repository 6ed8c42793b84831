"""The SwiftKV forward against an independent reference written from the paper's equations (arXiv 2410.03960).

The rest of the suite compares the SwiftKV forward with itself (skipping vs full, cached vs recomputed) or with the
base model at L = N-1, where SwiftKV reduces to the stock forward. Here `reference_logits` recomputes the logits as
a plain loop over layers from the model's state dict and torch arithmetic only (no transformers or swiftkv module
runs), for every family, with L in the middle of the network and AcrossKV groups of 1 and 3:

    h_L = layers[0:L](embed(ids))                     every token, the base model's own attention
    x = norm_swiftkv(h_L)                             one K/V input for every later layer
    layer i >= L, leader j = L + (i-L) // g * g:      K = RoPE(k_norm_j(k_proj_swiftkv_j(x))), V = v_proj_swiftkv_j(x)
                                                      Q = RoPE(q_norm_i(q_proj_swiftkv_i(input_layernorm_i(h))))
    logits = lm_head(norm(h_N))

k_norm_j and q_norm_i exist in Qwen3 only; the paper predates Qwen3, and which per-head norms SwiftKV keys and
queries go through (the leader's, the layer's own) is this project's choice (README, "How it works").

Every weight is drawn afresh (the SwiftKV ones start as copies or means of the base ones), so a forward that used
the base projection, another layer's leader, the wrong norm or the wrong position would give other logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_base

from swiftkv.conversion import convert
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modes import swiftkv_mode

NUM_LAYERS = 8  # N
LAYOUTS = [(4, 1), (5, 3), (2, 3)]  # (L, g): L in the middle with g=1 and g=3, and two AcrossKV groups of 3
# Float32, logits of size ~1-5: the model's oneDNN products, sdpa and native decode step differ from this file's
# plain matmuls by summation order only (measured <= 4.5e-6). Each deliberate break tried (base K/V or Q projections,
# the first group's leader for every layer, input_layernorm for norm_swiftkv, no k_norm, keys one position late,
# the native step reading the wrong cache entry) made this test fail.
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] / rms(x) * weight [D]."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on x [B, heads, T, Dh] at positions 0..T-1: the pair (d, d + Dh/2) turns by position * theta^(-2d/Dh)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])  # [Dh/2]
    angle = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * inv_freq  # [T, Dh/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh), causal) v: q [B, H, T, Dh], k and v [B, Hkv, T, Dh] -> [B, T, H*Dh].

    GQA: query head h reads key/value head h // (H / Hkv)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # [B, H, T, Dh]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, T]
    future = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).triu(1)
    out = scores.masked_fill(future, -math.inf).softmax(-1) @ v  # [B, H, T, Dh]
    return out.transpose(1, 2).flatten(2)


def reference_logits(model, ids: torch.Tensor, num_key_value_layers: int) -> torch.Tensor:
    """Logits [B, T, V] of ids [B, T] (no padding) from `model`'s weights; layers >= `num_key_value_layers` run
    the SwiftKV equations with the model's group size (`num_key_value_layers = N` is the base model)."""
    config, weights = model.config, model.state_dict()
    assert config.hidden_act == "silu" and config.rope_parameters["rope_type"] == "default"
    assert getattr(config, "sliding_window", None) is None  # full causal attention in every layer
    theta, eps, group = config.rope_parameters["rope_theta"], config.rms_norm_eps, config.key_value_group_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weights[f"{name}.weight"], weights.get(f"{name}.bias"))

    def heads(proj: str, x: torch.Tensor, norm: str | None = None) -> torch.Tensor:
        """[B, T, heads*Dh] -> [B, heads, T, Dh], through Qwen3's per-head RMSNorm `norm` where the model has one."""
        out = linear(proj, x).unflatten(-1, (-1, head_dim))  # [B, T, heads, Dh]
        if norm is not None and f"{norm}.weight" in weights:
            out = rms_norm(out, weights[f"{norm}.weight"], eps)
        return out.transpose(1, 2)

    h = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        attn = f"{layer}.self_attn"
        x = rms_norm(h, weights[f"{layer}.input_layernorm.weight"], eps)
        if i < num_key_value_layers:  # the base layer: Q, K, V from its own input
            q = heads(f"{attn}.q_proj", x, f"{attn}.q_norm")
            k, v = heads(f"{attn}.k_proj", x, f"{attn}.k_norm"), heads(f"{attn}.v_proj", x)
        else:
            if i == num_key_value_layers:
                x_kv = rms_norm(h, weights["model.norm_swiftkv.weight"], eps)  # norm_swiftkv(h_L) [B, T, D]
            leader = f"model.layers.{num_key_value_layers + (i - num_key_value_layers) // group * group}.self_attn"
            q = heads(f"{attn}.q_proj_swiftkv", x, f"{attn}.q_norm")
            k = heads(f"{leader}.k_proj_swiftkv", x_kv, f"{leader}.k_norm")
            v = heads(f"{leader}.v_proj_swiftkv", x_kv)
        h = h + linear(f"{attn}.o_proj", causal_attention(rope(q, theta), rope(k, theta), v))
        x, mlp = rms_norm(h, weights[f"{layer}.post_attention_layernorm.weight"], eps), f"{layer}.mlp"
        h = h + linear(f"{mlp}.down_proj", F.silu(linear(f"{mlp}.gate_proj", x)) * linear(f"{mlp}.up_proj", x))
    return linear("lm_head", rms_norm(h, weights["model.norm.weight"], eps))


def randomised_swiftkv(family: str, num_key_value_layers: int, group: int):
    """A SwiftKV model of `family` whose every weight is random: Linear weights at std 1/sqrt(fan-in) (so attention
    is far from uniform and RoPE and the causal mask matter), norms 1 + 0.3 * noise, biases 0.3 * noise."""
    model = convert(tiny_base(family, num_layers=NUM_LAYERS), num_key_value_layers, group)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("bias"):
                param.copy_(0.3 * noise)
            elif param.dim() == 1:  # RMSNorm weights
                param.copy_(1 + 0.3 * noise)
            else:  # [out, in] projections, and the embedding [V, D]
                param.copy_(noise / math.sqrt(param.shape[1]))
    return model


def _ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"L{layout[0]}-g{layout[1]}")
@torch.no_grad()
def test_swiftkv_forward_matches_the_reference(family, layout):
    num_key_value_layers, group = layout
    model = randomised_swiftkv(family, num_key_value_layers, group)
    ids = _ids()
    # The reference's base arithmetic first (norms, RoPE, GQA, mask, MLP), against the stock forward.
    with swiftkv_mode(model, False):
        torch.testing.assert_close(model(ids).logits, reference_logits(model, ids, NUM_LAYERS), **TIGHT)
    expected = reference_logits(model, ids, num_key_value_layers)  # [B, T, V]
    torch.testing.assert_close(model(ids).logits, expected, **TIGHT)  # the full SwiftKV forward
    for keep in (1, 4):  # prompt tokens skip layers >= L
        torch.testing.assert_close(model(ids, logits_to_keep=keep).logits, expected[:, -keep:], **TIGHT)
    # What generate runs: the prompt into a preallocated SwiftKVCache, then one decode step.
    cache = SwiftKVCache(model.config, max_cache_len=ids.shape[1])
    model(ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
    step = model(ids[:, -1:], cache=cache, use_cache=True, logits_to_keep=1).logits
    torch.testing.assert_close(step, expected[:, -1:], **TIGHT)
