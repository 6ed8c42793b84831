"""SwiftKV configuration: the base family's config plus Snowflake's three fields.

Field names and `model_type` strings follow Snowflake's published checkpoints
(`"model_type": "llama_swiftkv"`, `"swiftkv": true`, `"num_key_value_layers": 16`,
`"key_value_group_size": 1`), so their `config.json` files load unchanged.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names users type


class SwiftKVConfigMixin:
    """Validation and derived layout shared by every family's SwiftKV config.

    Layers `0 .. L-1` (L = `num_key_value_layers`) run as usual for every token. Layers `L .. N-1` take
    their K/V from `norm_swiftkv(h_L)`; with AcrossKV they form groups of `key_value_group_size`
    consecutive layers whose first layer (the "leader") owns the group's K/V projection and cache entry.
    """

    num_hidden_layers: int
    swiftkv: bool
    num_key_value_layers: int | None
    key_value_group_size: int

    def __post_init__(self, **kwargs):
        if self.num_key_value_layers is None:
            self.num_key_value_layers = self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        validate_swiftkv_layout(self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size)
        validate_attention_types(self)

    def is_group_leader(self, layer_idx: int) -> bool:
        """True for layers < L and for the first layer of each AcrossKV group: they own a cache entry."""
        return layer_idx < self.num_key_value_layers or self.leader_of(layer_idx) == layer_idx

    def leader_of(self, layer_idx: int) -> int:
        """Index of the layer whose K/V (projection and cache entry) `layer_idx` reads."""
        skip = layer_idx - self.num_key_value_layers
        if skip < 0:
            return layer_idx
        return self.num_key_value_layers + (skip // self.key_value_group_size) * self.key_value_group_size

    @property
    def kv_sharing_modes(self) -> list[str | None] | None:
        """Read by transformers' `DynamicCache`/`StaticCache`: "reuse" layers get a `DummyLayer`, no storage.

        This is what makes AcrossKV save memory inside `model.generate`: each group keeps ONE cache entry.
        With `swiftkv=False` (the teacher / base model) every layer keeps its own entry, as in the base model.
        """
        if not self.swiftkv:
            return None
        return [None if self.is_group_leader(i) else "reuse" for i in range(self.num_hidden_layers)]


def validate_attention_types(config) -> None:
    """SwiftKV's single mask for layers >= L needs one attention type (all full, or all sliding) for all layers."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if sliding and len(sliding) != len(layer_types):
        raise ValueError(
            f"SwiftKV needs every layer to use the same attention type, but layers {sliding} use "
            f"sliding-window attention and the others full attention. Set `use_sliding_window=False` "
            "(or remove `layer_types`) to run this model with SwiftKV."
        )


def parse_layout(text: str) -> tuple[int, int]:
    """A layout as users write it everywhere: 'L:g' ('15:3') or 'L' ('15' = g 1) -> (L, g)."""
    layers, _, group = str(text).partition(":")
    if not layers.strip().isdigit() or not (group.strip().isdigit() or group == ""):
        raise ValueError(f"layout {text!r} is invalid: write L:g, e.g. 15:1 or 15:3 (L layers keep their own K/V).")
    return int(layers), int(group or 1)


def validate_swiftkv_layout(num_layers: int, num_key_value_layers: int, group_size: int) -> None:
    """Raise a ValueError that names the bad value and the valid range."""
    if not 1 <= num_key_value_layers <= num_layers:
        raise ValueError(
            f"num_key_value_layers={num_key_value_layers} is invalid: the model has {num_layers} layers, "
            f"so it must be between 1 and {num_layers} (e.g. {num_layers // 2} skips half of the layers)."
        )
    if group_size < 1:
        raise ValueError(f"key_value_group_size={group_size} is invalid: it must be >= 1 (1 = no AcrossKV).")
    later = num_layers - num_key_value_layers
    if later % group_size != 0:
        valid = [g for g in range(1, later + 1) if later % g == 0] or [1]
        raise ValueError(
            f"key_value_group_size={group_size} does not divide the {later} SwiftKV layers "
            f"(num_hidden_layers={num_layers} - num_key_value_layers={num_key_value_layers}); "
            f"valid group sizes for this L: {valid}."
        )


@strict
class LlamaSwiftKVConfig(SwiftKVConfigMixin, LlamaConfig):
    model_type = "llama_swiftkv"
    swiftkv: bool = False  # True: later layers use the SwiftKV projections (student); False: the base model
    num_key_value_layers: int | None = None  # L: layers 0..L-1 run for every token (None: all layers)
    key_value_group_size: int = 1  # AcrossKV: consecutive later layers sharing one K/V entry (1: off)


@strict
class MistralSwiftKVConfig(SwiftKVConfigMixin, MistralConfig):
    model_type = "mistral_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


@strict
class Qwen2SwiftKVConfig(SwiftKVConfigMixin, Qwen2Config):
    model_type = "qwen2_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


@strict
class Qwen3SwiftKVConfig(SwiftKVConfigMixin, Qwen3Config):
    model_type = "qwen3_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


# base model_type -> SwiftKV config class; the single list of supported families.
CONFIG_FOR_FAMILY: dict[str, type] = {
    "llama": LlamaSwiftKVConfig,
    "mistral": MistralSwiftKVConfig,
    "qwen2": Qwen2SwiftKVConfig,
    "qwen3": Qwen3SwiftKVConfig,
}
SUPPORTED_FAMILIES = tuple(CONFIG_FOR_FAMILY)


def swiftkv_config_class(model_type: str) -> type:
    """The SwiftKV config class for a base (or SwiftKV) `model_type`, with an actionable error."""
    family = model_type.removesuffix("_swiftkv")
    if family not in CONFIG_FOR_FAMILY:
        raise ValueError(
            f"Unsupported model family {model_type!r}: swiftkv supports {', '.join(SUPPORTED_FAMILIES)} "
            "(and their `*_swiftkv` checkpoints)."
        )
    return CONFIG_FOR_FAMILY[family]
