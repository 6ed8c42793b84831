"""SwiftKV classes for each supported Hugging Face family, and their Auto* registration.

Every family is the stock transformers implementation with the SwiftKV mixins first in the MRO; parameter
names are the family's own plus `*_swiftkv`, so Snowflake's checkpoints and the base weights both load.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from swiftkv.config import CONFIG_FOR_FAMILY
from swiftkv.modeling.base import (
    SwiftKVAttentionMixin,
    SwiftKVDecoderLayerMixin,
    SwiftKVForCausalLMMixin,
    SwiftKVModelMixin,
)

# family -> (transformers module, class-name prefix used by that module)
_STOCK = {
    "llama": (modeling_llama, "Llama"),
    "mistral": (modeling_mistral, "Mistral"),
    "qwen2": (modeling_qwen2, "Qwen2"),
    "qwen3": (modeling_qwen3, "Qwen3"),
}


def _build_family(family: str) -> type:
    """Define `<Prefix>SwiftKV{Attention,DecoderLayer,Model,ForCausalLM}`; return the causal-LM class."""
    module, prefix = _STOCK[family]
    config_class = CONFIG_FOR_FAMILY[family]

    def stock(suffix: str) -> type:
        return getattr(module, f"{prefix}{suffix}")

    def subclass(suffix: str, mixin: type, **attrs) -> type:
        name = f"{prefix}SwiftKV{suffix}"
        cls = type(name, (mixin, stock(suffix)), {"__module__": __name__, "config_class": config_class, **attrs})
        globals()[name] = cls  # importable by name, e.g. for `architectures` and pickling
        return cls

    attention = subclass("Attention", SwiftKVAttentionMixin)
    layer = subclass("DecoderLayer", SwiftKVDecoderLayerMixin, attention_class=attention)
    model = subclass("Model", SwiftKVModelMixin, decoder_layer_class=layer)
    return subclass(
        "ForCausalLM", SwiftKVForCausalLMMixin, swiftkv_model_class=model, _no_split_modules=[layer.__name__]
    )


MODEL_FOR_FAMILY: dict[str, type] = {family: _build_family(family) for family in _STOCK}


def register_auto_classes() -> None:
    """Make `AutoConfig`/`AutoModelForCausalLM` resolve `llama_swiftkv`, `qwen2_swiftkv`, ... checkpoints."""
    for family, causal_lm in MODEL_FOR_FAMILY.items():
        config_class = CONFIG_FOR_FAMILY[family]
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm, exist_ok=True)
