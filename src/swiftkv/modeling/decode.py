"""The decode step: one new token per sequence through a `SwiftKVCache`, in base or SwiftKV mode.

At batch 1 a decode step is ~80% matrix-vector products; they go through `kernels.linear` (oneDNN on CPU in float32;
measured against MKL's GEMV in docs/decode.md). The cache is written in place (no per-token `torch.cat`), and the
step walks the layers directly: no per-layer module kwargs plumbing, output capturing or mask rebuilding, and RMSNorm
as one fused op. The arithmetic is otherwise the stock layers' own, in the same order, so logits agree with
transformers' path to float32 rounding and greedy tokens match (tests/test_decode.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from swiftkv.modeling import native
from swiftkv.modeling.attention import SKIPPABLE_ATTENTION
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modeling.common import apply_rope, mask_function, own_key_value_layers
from swiftkv.modeling.kernels import linear


def applies(model, input_ids, cache, labels, logits_to_keep, kwargs: dict) -> bool:
    """True when this forward is one plain decode step the fast path computes exactly."""
    return input_ids is not None and input_ids.shape[1] == 1 and _plain(model, cache, labels, logits_to_keep, kwargs)


def _plain(model, cache, labels, logits_to_keep, kwargs: dict) -> bool:
    """No gradient, loss, attention weights or hidden states asked for; a preallocated `SwiftKVCache` to write."""
    config = model.config
    return (
        not torch.is_grad_enabled()
        and isinstance(cache, SwiftKVCache)
        and cache.preallocated
        and labels is None
        and isinstance(logits_to_keep, int)
        and config._attn_implementation in SKIPPABLE_ATTENTION
        and not kwargs.get("output_attentions", config.output_attentions)
        and not kwargs.get("output_hidden_states", config.output_hidden_states)
    )


def kept_token_applies(causal_lm, input_ids, inputs_embeds, cache, labels, logits_to_keep, kwargs: dict) -> bool:
    """True when this forward is a SwiftKV prefill whose one kept token per sequence can run the later layers in the
    native step (`kept_token_logits`): a prompt of several tokens into a preallocated `SwiftKVCache`, the last
    token's logits only, nothing else asked for."""
    config, prompt = causal_lm.config, inputs_embeds if input_ids is None else input_ids
    return (
        config.swiftkv
        and config.num_key_value_layers < config.num_hidden_layers
        and _plain(causal_lm, cache, labels, logits_to_keep, kwargs)  # an int logits_to_keep among them
        and logits_to_keep == 1
        and prompt is not None
        and prompt.shape[1] > 1
        # the hidden states' device and dtype are the embeddings' (or inputs_embeds')
        and native.runtime(causal_lm, cache, causal_lm.model.embed_tokens.weight if input_ids is not None else prompt)
        is not None
    )


def kept_token_logits(
    causal_lm,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: SwiftKVCache,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """Logits [B, 1, V] after a SwiftKV prompt: every layer's K/V written into `cache` by the prefill's own
    products (`cache_prompt`), then the last token's h_L through layers L..N-1 and the LM head in ONE native call,
    as a decode step runs a token (its later layers read the K/V just cached). That is the same arithmetic as the
    Python layers' few-row path (the products' 8-bit activations for int8/int4 included) without ~0.5 ms of module
    calls per later layer (docs/cpu.md)."""
    model, config = causal_lm.model, causal_lm.config
    hidden, inputs = model.cache_prompt(input_ids, attention_mask, position_ids, cache, inputs_embeds)
    mask = None if inputs.mask is None else inputs.mask[:, :, -1:]  # [B, 1, 1, P+T], the kept token's row
    rope = tuple(t[:, -1:] for t in inputs.rope)  # (cos, sin) [B|1, 1, Dh]
    return native.step(cache.native, cache, hidden[:, -1:], mask, rope, first=config.num_key_value_layers)


def decode_logits(
    causal_lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: SwiftKVCache,
) -> torch.Tensor:
    """Logits [B, 1, V] of the next token after `input_ids` [B, 1]; writes the step's K/V into `cache`."""
    model, config = causal_lm.model, causal_lm.config
    hidden = model.embed_tokens(input_ids)  # [B, 1, D]
    if position_ids is None:
        position_ids = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=hidden.device)
    mask = mask_function(config)(  # sized from the cache BEFORE this step's K/V are written; None = no padding
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache, position_ids=position_ids
    )
    rope = model.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin), each [B|1, 1, Dh]
    if (native_model := native.runtime(causal_lm, cache, hidden)) is not None:
        return native.step(native_model, cache, hidden, mask, rope)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
    own_layers = own_key_value_layers(config)
    h_l = None  # norm_swiftkv(h_L) [B, 1, D]: the K/V input of every layer >= L
    for idx, layer in enumerate(model.layers):
        attn = layer.self_attn
        if idx >= own_layers and h_l is None:
            h_l = _rms_norm(model.norm_swiftkv, hidden)
        x = _rms_norm(layer.input_layernorm, hidden)  # [B, 1, D]
        if idx < own_layers:
            queries = apply_rope(attn.heads(linear(x, attn.q_proj), "q_norm"), rope)  # [B, H, 1, Dh]
            keys = apply_rope(attn.heads(linear(x, attn.k_proj), "k_norm"), rope)  # [B, Hkv, 1, Dh]
            keys, values = cache.update(keys, attn.heads(linear(x, attn.v_proj)), idx)  # [B, Hkv, P+1, Dh]
        else:
            queries = apply_rope(attn.heads(linear(x, attn.q_proj_swiftkv), "q_norm"), rope)
            keys, values = _group_key_values(cache, model, config.leader_of(idx), idx, h_l, rope)
        out, _ = attend(attn, queries, keys, values, mask, dropout=0.0, scaling=attn.scaling)  # [B, 1, H, Dh]
        hidden = hidden + linear(out.reshape(*x.shape[:-1], -1).contiguous(), attn.o_proj)
        hidden = hidden + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden))
    return linear(_rms_norm(model.norm, hidden), causal_lm.lm_head)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The families' RMSNorm as ONE fused op (theirs is 7 eager ops); same formula, float32 rounding apart."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The families' gated MLP, down(act(gate(x)) * up(x)), on [B, 1, D]."""
    return linear(mlp.act_fn(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)


def _group_key_values(cache: SwiftKVCache, model, leader: int, idx: int, h_l: torch.Tensor, rope):
    """K, V [B, Hkv, P+1, Dh] of layer idx's AcrossKV group: computed and cached when its leader runs, then read."""
    if idx == leader:
        keys, values = model.layers[leader].self_attn.swiftkv_key_values(h_l, rope)  # FastLinear modules
        return cache.update(keys, values, leader)
    return cache.layers[leader].keys, cache.layers[leader].values
