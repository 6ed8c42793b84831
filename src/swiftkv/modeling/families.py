"""SwiftKV classes for each supported Hugging Face family, written out, and their Auto* registration.

Every family is the stock transformers implementation with the SwiftKV mixin first in the MRO (as transformers'
modular files do: subclass, override only the difference, which lives in `base.py`); parameter names are the
family's own plus `*_swiftkv`, so Snowflake's checkpoints and the base weights both load.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from swiftkv.config import LlamaSwiftKVConfig, MistralSwiftKVConfig, Qwen2SwiftKVConfig, Qwen3SwiftKVConfig
from swiftkv.modeling.base import (
    SwiftKVAttentionMixin,
    SwiftKVDecoderLayerMixin,
    SwiftKVForCausalLMMixin,
    SwiftKVModelMixin,
)

# --- Llama


class LlamaSwiftKVAttention(SwiftKVAttentionMixin, modeling_llama.LlamaAttention):
    config_class = LlamaSwiftKVConfig


class LlamaSwiftKVDecoderLayer(SwiftKVDecoderLayerMixin, modeling_llama.LlamaDecoderLayer):
    config_class = LlamaSwiftKVConfig
    attention_class = LlamaSwiftKVAttention


class LlamaSwiftKVModel(SwiftKVModelMixin, modeling_llama.LlamaModel):
    config_class = LlamaSwiftKVConfig
    decoder_layer_class = LlamaSwiftKVDecoderLayer


class LlamaSwiftKVForCausalLM(SwiftKVForCausalLMMixin, modeling_llama.LlamaForCausalLM):
    config_class = LlamaSwiftKVConfig
    swiftkv_model_class = LlamaSwiftKVModel
    _no_split_modules = ["LlamaSwiftKVDecoderLayer"]


# --- Mistral


class MistralSwiftKVAttention(SwiftKVAttentionMixin, modeling_mistral.MistralAttention):
    config_class = MistralSwiftKVConfig


class MistralSwiftKVDecoderLayer(SwiftKVDecoderLayerMixin, modeling_mistral.MistralDecoderLayer):
    config_class = MistralSwiftKVConfig
    attention_class = MistralSwiftKVAttention


class MistralSwiftKVModel(SwiftKVModelMixin, modeling_mistral.MistralModel):
    config_class = MistralSwiftKVConfig
    decoder_layer_class = MistralSwiftKVDecoderLayer


class MistralSwiftKVForCausalLM(SwiftKVForCausalLMMixin, modeling_mistral.MistralForCausalLM):
    config_class = MistralSwiftKVConfig
    swiftkv_model_class = MistralSwiftKVModel
    _no_split_modules = ["MistralSwiftKVDecoderLayer"]


# --- Qwen2


class Qwen2SwiftKVAttention(SwiftKVAttentionMixin, modeling_qwen2.Qwen2Attention):
    config_class = Qwen2SwiftKVConfig


class Qwen2SwiftKVDecoderLayer(SwiftKVDecoderLayerMixin, modeling_qwen2.Qwen2DecoderLayer):
    config_class = Qwen2SwiftKVConfig
    attention_class = Qwen2SwiftKVAttention


class Qwen2SwiftKVModel(SwiftKVModelMixin, modeling_qwen2.Qwen2Model):
    config_class = Qwen2SwiftKVConfig
    decoder_layer_class = Qwen2SwiftKVDecoderLayer


class Qwen2SwiftKVForCausalLM(SwiftKVForCausalLMMixin, modeling_qwen2.Qwen2ForCausalLM):
    config_class = Qwen2SwiftKVConfig
    swiftkv_model_class = Qwen2SwiftKVModel
    _no_split_modules = ["Qwen2SwiftKVDecoderLayer"]


# --- Qwen3


class Qwen3SwiftKVAttention(SwiftKVAttentionMixin, modeling_qwen3.Qwen3Attention):
    config_class = Qwen3SwiftKVConfig


class Qwen3SwiftKVDecoderLayer(SwiftKVDecoderLayerMixin, modeling_qwen3.Qwen3DecoderLayer):
    config_class = Qwen3SwiftKVConfig
    attention_class = Qwen3SwiftKVAttention


class Qwen3SwiftKVModel(SwiftKVModelMixin, modeling_qwen3.Qwen3Model):
    config_class = Qwen3SwiftKVConfig
    decoder_layer_class = Qwen3SwiftKVDecoderLayer


class Qwen3SwiftKVForCausalLM(SwiftKVForCausalLMMixin, modeling_qwen3.Qwen3ForCausalLM):
    config_class = Qwen3SwiftKVConfig
    swiftkv_model_class = Qwen3SwiftKVModel
    _no_split_modules = ["Qwen3SwiftKVDecoderLayer"]


MODEL_FOR_FAMILY: dict[str, type] = {
    "llama": LlamaSwiftKVForCausalLM,
    "mistral": MistralSwiftKVForCausalLM,
    "qwen2": Qwen2SwiftKVForCausalLM,
    "qwen3": Qwen3SwiftKVForCausalLM,
}


def register_auto_classes() -> None:
    """Make `AutoConfig`/`AutoModelForCausalLM` resolve `llama_swiftkv`, `qwen2_swiftkv`, ... checkpoints."""
    for causal_lm in MODEL_FOR_FAMILY.values():
        AutoConfig.register(causal_lm.config_class.model_type, causal_lm.config_class, exist_ok=True)
        AutoModelForCausalLM.register(causal_lm.config_class, causal_lm, exist_ok=True)
