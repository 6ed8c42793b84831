"""The family-independent SwiftKV forward, as mixins over a Hugging Face decoder family.

Each family file subclasses the stock attention / decoder layer / model / causal-LM classes and puts the
mixins below first in the MRO; with `config.swiftkv = False` every mixin defers to the stock forward, so the
teacher is the base model (bit for bit under `kernels.onednn_linears(False)`; otherwise the Linear layers use
oneDNN on CPU, equal to float32 rounding). Shapes: B batch, T new tokens, K kept tokens, D hidden size,
H query heads, Hkv key/value heads, Dh head dim, P tokens already in the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from swiftkv.modeling import decode
from swiftkv.modeling.attention import SKIPPABLE_ATTENTION
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modeling.common import apply_rope, mask_function
from swiftkv.modeling.kernels import copy_weights_to_process_memory, prefill_rows, use_fast_linears


def _linear_like(proj: nn.Linear) -> nn.Linear:
    """A new Linear with the shape, bias, dtype and device of `proj` (its values are set by conversion)."""
    return nn.Linear(
        proj.in_features,
        proj.out_features,
        bias=proj.bias is not None,
        dtype=proj.weight.dtype,
        device=proj.weight.device,
    )


class SwiftKVAttentionMixin:
    """Adds `q_proj_swiftkv` to layers >= L and `k/v_proj_swiftkv` to AcrossKV group leaders.

    Families with per-head q/k norms (Qwen3) apply the layer's own `q_norm` to SwiftKV queries and the
    leader's `k_norm` to SwiftKV keys: the attention logits keep the per-head scale the frozen weights were
    trained with, conversion stays exact at initialisation for g=1, and the checkpoint format needs no new
    parameters.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx >= config.num_key_value_layers:
            self.q_proj_swiftkv = _linear_like(self.q_proj)
            if config.is_group_leader(layer_idx):
                self.k_proj_swiftkv = _linear_like(self.k_proj)
                self.v_proj_swiftkv = _linear_like(self.v_proj)

    def heads(self, projected: torch.Tensor, norm_name: str | None = None) -> torch.Tensor:
        """A projection split into heads, with the family's per-head norm if it has one: [B, T, heads*Dh] ->
        [B, heads, T, Dh]."""
        heads = projected.view(*projected.shape[:-1], -1, self.head_dim)  # [B, T, heads, Dh]
        norm = getattr(self, norm_name, None) if norm_name else None
        if norm is not None:
            heads = norm(heads)
        return heads.transpose(1, 2)

    def swiftkv_key_values(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, Hkv, T, Dh] of this group from x = norm_swiftkv(h_L) [B, T, D]; RoPE at each token's position."""
        keys = apply_rope(self.heads(self.k_proj_swiftkv(x), "k_norm"), position_embeddings)
        return keys, self.heads(self.v_proj_swiftkv(x))

    def own_query_key_values(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q [B, H, T, Dh] and K, V [B, Hkv, P+T, Dh] (the cache updated) of a layer with its own K/V, as the stock
        forward computes them (bit for bit), with apply_rope's native RoPE for CPU prefills."""
        queries = apply_rope(self.heads(self.q_proj(hidden_states), "q_norm"), position_embeddings)
        keys = apply_rope(self.heads(self.k_proj(hidden_states), "k_norm"), position_embeddings)
        values = self.heads(self.v_proj(hidden_states))
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)
        return queries, keys, values

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        swiftkv_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if swiftkv_key_values is None:  # layers < L, and every layer of the base model: the stock forward's steps,
            if not prefill_rows(hidden_states):  # its own code but for CPU prefills (apply_rope's native RoPE)
                return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
            queries, keys, values = self.own_query_key_values(hidden_states, position_embeddings, cache, kwargs)
            kwargs["sliding_window"] = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        else:  # later layer: only the kept tokens arrive here [B, K, D]; K/V cover every token [B, Hkv, P+T, Dh]
            queries = apply_rope(self.heads(self.q_proj_swiftkv(hidden_states), "q_norm"), position_embeddings)
            keys, values = swiftkv_key_values
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(output), weights


def _check_cache(cache: Cache | None, config) -> None:
    """Tag `cache` with the layout that fills it; refuse a cache filled under another layout.

    Layers >= L hold SwiftKV K/V (one entry per group) in SwiftKV mode and their own K/V in base mode, so a cache
    is only valid for the mode that wrote it.
    """
    if cache is None:
        return
    layout = (config.num_key_value_layers, config.key_value_group_size) if config.swiftkv else "base"
    written = _WRITTEN_LAYOUT.get(cache)
    if written is not None and written != layout and cache.get_seq_length() > 0:
        raise ValueError(
            f"This cache was filled with SwiftKV layout {written} but the model now runs with {layout}. "
            "Use a new cache (or `past_key_values=None`) after switching `swiftkv` on or off."
        )
    _WRITTEN_LAYOUT[cache] = layout


# cache -> the layout that filled it, for any Cache class (transformers' own included), without touching it
_WRITTEN_LAYOUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class LayerInputs:
    """Everything the decoder layers of one forward share besides the hidden states."""

    mask: torch.Tensor | None  # for layers < L (and every layer in the full forward); None = sdpa is_causal
    late_mask: torch.Tensor | None  # rows of the kept queries, for layers >= L
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [B|1, T, Dh]
    position_ids: torch.Tensor  # [B|1, T]
    kept: int | None  # trailing tokens that run layers >= L; None = all of them
    cache: Cache | None
    use_cache: bool


class SwiftKVDecoderLayerMixin:
    """The family's decoder layer with a SwiftKV attention (class attribute `attention_class`)."""

    attention_class: type

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = self.attention_class(config, layer_idx)


class SwiftKVModelMixin:
    """Adds `norm_swiftkv` and the SwiftKV forward to the family's decoder stack."""

    decoder_layer_class: type

    def __init__(self, config):
        super().__init__(config)
        # The stock __init__ built stock layers; swap in SwiftKV ones (under from_pretrained this is on meta).
        self.layers = nn.ModuleList([self.decoder_layer_class(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm_swiftkv = type(self.norm)(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_kept_tokens: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`num_kept_tokens=n`: only the last n tokens run layers >= L (their hidden states are returned)."""
        _check_cache(cache, self.config)
        if not self.config.swiftkv:
            if num_kept_tokens is not None:
                raise ValueError(
                    "num_kept_tokens needs swiftkv=True: the base model runs every token through every layer."
                )
            call = super().forward
        else:
            call = functools.partial(self._swiftkv_forward, num_kept_tokens=num_kept_tokens)
        outputs = call(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        _check_cache(getattr(outputs, "cache", None), self.config)  # tags a cache created inside the call
        return outputs

    @merge_with_config_defaults
    @capture_outputs
    def _swiftkv_forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        num_kept_tokens: int | None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        hidden, inputs = self.prepare_layer_inputs(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, num_kept_tokens
        )
        hidden, _ = self.run_swiftkv_layers(self.run_prefix_layers(hidden, inputs, **kwargs), inputs, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=inputs.cache)

    def prepare_layer_inputs(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = False,
        num_kept_tokens: int | None = None,
    ) -> tuple[torch.Tensor, LayerInputs]:
        """Embeddings [B, T, D] and what every layer needs (masks, RoPE, cache) for one forward."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # AcrossKV: DummyLayer for non-leaders (see config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        # Masks are sized from the cache BEFORE this step's K/V are written into it.
        mask_args = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        mask = mask_function(self.config)(**mask_args)
        kept = self._kept_tokens(hidden.shape[1], num_kept_tokens)
        inputs = LayerInputs(
            mask=mask,
            late_mask=mask if kept is None else _mask_rows(self.config, mask_args, kept),
            rope=self.rotary_emb(hidden, position_ids=position_ids),  # (cos, sin), each [B|1, T, Dh]
            position_ids=position_ids,
            kept=kept,
            cache=cache,
            use_cache=bool(use_cache),
        )
        return hidden, inputs

    def run_prefix_layers(self, hidden: torch.Tensor, inputs: LayerInputs, **kwargs) -> torch.Tensor:
        """Layers 0..L-1 on every token: [B, T, D] -> h_L [B, T, D]. Identical for teacher and student."""
        for layer in self.layers[: self.config.num_key_value_layers]:
            hidden = layer(
                hidden,
                attention_mask=inputs.mask,
                position_embeddings=inputs.rope,
                position_ids=inputs.position_ids,
                cache=inputs.cache,
                use_cache=inputs.use_cache,
                **kwargs,
            )
        return hidden

    def run_swiftkv_layers(
        self, hidden: torch.Tensor, inputs: LayerInputs, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student layers L..N-1 from h_L [B, T, D]: each group's K/V comes from norm_swiftkv(h_L) and is written
        once into the group's cache entry; only the kept tokens [B, K, D] run the layers.

        Returns (output of the last layer, before the final norm; input of the last layer), both [B, K, D].
        """
        x, full_rope, rope = self.norm_swiftkv(hidden), inputs.rope, inputs.rope  # x [B, T, D]
        if inputs.kept is not None:  # prompt tokens stop here; only the last `kept` tokens go on
            hidden = hidden[:, -inputs.kept :]
            rope = (rope[0][:, -inputs.kept :], rope[1][:, -inputs.kept :])
        last_input = hidden
        for idx in range(self.config.num_key_value_layers, self.config.num_hidden_layers):
            if self.config.leader_of(idx) == idx:
                # Just in time, not all groups up front: a group's cache is read right after it is written,
                # while it is still in the CPU cache (measurably faster decode than writing all 15 first).
                group_kv = self._group_key_values(idx, x, full_rope, inputs.cache, kwargs)
            last_input = hidden
            hidden = self.layers[idx](
                hidden,
                attention_mask=inputs.late_mask,
                position_embeddings=rope,
                swiftkv_key_values=group_kv,
                **kwargs,
            )
        return hidden, last_input

    def cache_prompt(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache,
        inputs_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, LayerInputs]:
        """A SwiftKV prompt's K/V, every layer's, written into `cache`: layers 0..L-1 run on every token and each
        group's K/V comes from norm_swiftkv(h_L). Returns h_L [B, T, D] and the layer inputs; the kept tokens' later
        layers are left to the caller (decode.kept_token_logits)."""
        hidden, inputs = self.prepare_layer_inputs(input_ids, attention_mask, position_ids, cache, inputs_embeds, True)
        hidden = self.run_prefix_layers(hidden, inputs)
        x = self.norm_swiftkv(hidden)  # [B, T, D]
        for idx in range(self.config.num_key_value_layers, self.config.num_hidden_layers):
            if self.config.leader_of(idx) == idx:
                self._group_key_values(idx, x, inputs.rope, cache, {})
        return hidden, inputs

    def run_base_layers(self, hidden: torch.Tensor, inputs: LayerInputs, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher layers L..N-1 from h_L [B, T, D]: the base model's own attention, every token, no cache.

        Returns (output of the last layer, before the final norm; input of the last layer), both [B, T, D].
        """
        last_input = hidden
        for layer in self.layers[self.config.num_key_value_layers :]:
            last_input = hidden
            hidden = layer(hidden, attention_mask=inputs.mask, position_embeddings=inputs.rope, **kwargs)
        return hidden, last_input

    def _kept_tokens(self, num_tokens: int, num_kept_tokens: int | None) -> int | None:
        """How many trailing tokens run layers >= L, or None when all of them must (full SwiftKV forward)."""
        if num_kept_tokens is None or num_kept_tokens >= num_tokens:
            return None
        if self.config._attn_implementation not in SKIPPABLE_ATTENTION:
            return None
        return num_kept_tokens

    def _group_key_values(
        self, leader: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Cache | None, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the group led by `leader` from x = norm_swiftkv(h_L) [B, T, D], appended to its ONE cache entry.

        Returns K, V [B, Hkv, P+T, Dh]: every cached token plus the new ones.
        """
        keys, values = self.layers[leader].self_attn.swiftkv_key_values(x, rope)
        if cache is not None:
            keys, values = cache.update(keys, values, leader, kwargs=kwargs)
        return keys, values


def _mask_rows(config, mask_args: dict, kept: int) -> torch.Tensor:
    """The mask rows of the last `kept` queries: [B, 1, kept, P+T] (materialised, never an `is_causal` None)."""
    full = mask_function(config)(**mask_args, allow_is_causal_skip=False)  # [B, 1, T, P+T]
    return full[:, :, -kept:, :]


class SwiftKVForCausalLMMixin:
    """Chooses between the skipping and the full forward from what the caller asks for.

    Only an integer `logits_to_keep > 0` without `labels` lets prompt tokens skip the later layers: any request
    for the logits of every token (labels, `logits_to_keep=0`, a tensor of positions) runs the full forward,
    so scoring prompt tokens is never silently wrong.
    """

    swiftkv_model_class: type

    def __init__(self, config):
        super().__init__(config)
        self.model = self.swiftkv_model_class(config)
        self.post_init()
        use_fast_linears(self)  # oneDNN products on CPU wherever no gradient flows (see kernels.py)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, ignore_mismatched_sizes: bool = False, **kwargs):
        """The stock loader, but a checkpoint whose weights don't match its config is an error that names them."""
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        copy_weights_to_process_memory(model)
        problems = [f"missing {k}" for k in sorted(info["missing_keys"]) if "swiftkv" in k]
        problems += [f"unexpected {k}" for k in sorted(info["unexpected_keys"]) if "swiftkv" in k]
        problems += [
            f"{key} has shape {tuple(found)} in the checkpoint but {tuple(wanted)} in the model"
            for key, found, wanted in info["mismatched_keys"]
            if "swiftkv" in key or not ignore_mismatched_sizes
        ]
        if problems:
            config = model.config
            raise ValueError(
                f"Checkpoint does not match its config (num_key_value_layers={config.num_key_value_layers}, "
                f"key_value_group_size={config.key_value_group_size}): "
                + "; ".join(problems[:8])
                + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
                + ". Convert the base model with `swiftkv convert`, or fix config.json."
            )
        return (model, info) if output_loading_info else model

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate` writes into a `SwiftKVCache` (preallocated, fast decode step) unless told otherwise.

        `cache_implementation="dynamic"` (or any other) and a user-given cache keep transformers' behaviour.
        """
        wants_default = generation_config.cache_implementation is None and not generation_config.is_assistant
        if wants_default and model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = SwiftKVCache(self.config, max_cache_len=max_cache_length)
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if decode.applies(self, input_ids, cache, labels, logits_to_keep, kwargs):
            _check_cache(cache, self.config)
            logits = decode.decode_logits(self, input_ids, attention_mask, position_ids, cache)
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        if decode.kept_token_applies(self, input_ids, inputs_embeds, cache, labels, logits_to_keep, kwargs):
            _check_cache(cache, self.config)
            logits = decode.kept_token_logits(self, input_ids, attention_mask, position_ids, cache, inputs_embeds)
            _check_cache(cache, self.config)
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        args = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        if not self.config.swiftkv:
            return super().forward(**args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        skip = labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0
        outputs = self.model(**args, num_kept_tokens=logits_to_keep if skip else None, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
