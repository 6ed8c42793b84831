"""SwiftKV configs for vLLM's transformers: the family's config plus Snowflake's three fields.

Same `model_type` strings and field names as swiftkv's Hugging Face side (`src/swiftkv/config.py`) and Snowflake's
published checkpoints (`"model_type": "llama_swiftkv"`, `"swiftkv": true`, `"num_key_value_layers": 16`,
`"key_value_group_size": 1`). Kept separate from that package on purpose: vLLM pins an older transformers, and this
module must import without swiftkv's modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

# The user's switches for fast prefill, named here so the config hook (plugin.py) and the prompt-logprobs guard
# (guard.py) share them without importing each other.
FAST_PREFILL_ENV = "SWIFTKV_VLLM_FAST_PREFILL"
FAST_PREFILL_OVERRIDE = "swiftkv_fast_prefill"  # hf_overrides / config.json key
PROMPT_LOGPROBS_ERROR = (
    "This SwiftKV model runs with fast prefill: prompt tokens skip layers >= num_key_value_layers, so their "
    "logprobs would be wrong and prompt_logprobs is refused. To score prompt tokens, start vLLM with fast prefill "
    f"off: environment variable {FAST_PREFILL_ENV}=0, or --hf-overrides '{{\"{FAST_PREFILL_OVERRIDE}\": false}}' "
    f"(LLM(..., hf_overrides={{'{FAST_PREFILL_OVERRIDE}': False}}))."
)


@dataclass(frozen=True)
class SwiftKVLayout:
    """Which layers run every token and which AcrossKV group each later layer reads.

    Layers `0 .. L-1` run every token; layers `L .. N-1` read the K/V that the first layer of their group (the
    "leader", every g-th layer from L) computes from `norm_swiftkv(h_L)`.
    """

    num_layers: int  # N
    num_key_value_layers: int  # L (= N for the base model: no SwiftKV layer)
    group_size: int  # g, AcrossKV

    def __post_init__(self) -> None:
        validate_swiftkv_layout(self.num_layers, self.num_key_value_layers, self.group_size)

    @classmethod
    def of(cls, config) -> SwiftKVLayout:
        """The layout a config runs: with `swiftkv` false every layer is a base layer (L = N)."""
        layers = config.num_hidden_layers
        if not getattr(config, "swiftkv", False):
            return cls(layers, layers, 1)
        kv_layers = config.num_key_value_layers if config.num_key_value_layers is not None else layers
        return cls(layers, kv_layers, config.key_value_group_size)

    @property
    def skips(self) -> bool:
        """True when some layers are SwiftKV layers (prompt tokens can stop after layer L-1)."""
        return self.num_key_value_layers < self.num_layers

    def leader_of(self, layer_idx: int) -> int:
        """The layer whose K/V projection and cache entry `layer_idx` (>= L) reads."""
        skip = layer_idx - self.num_key_value_layers
        return self.num_key_value_layers + (skip // self.group_size) * self.group_size

    @property
    def leaders(self) -> list[int]:
        """AcrossKV group leaders, one KV-cache entry each."""
        return list(range(self.num_key_value_layers, self.num_layers, self.group_size))

    @property
    def cache_entries(self) -> int:
        """KV-cache entries the engine allocates: L + (N - L) / g."""
        return self.num_key_value_layers + len(self.leaders)


def validate_swiftkv_layout(num_layers: int, num_key_value_layers: int, group_size: int) -> None:
    """Raise a ValueError that names the bad value and the valid range (same rules as the HF side)."""
    if not 1 <= num_key_value_layers <= num_layers:
        raise ValueError(
            f"num_key_value_layers={num_key_value_layers} is invalid: the model has {num_layers} layers, "
            f"so it must be between 1 and {num_layers}."
        )
    if group_size < 1:
        raise ValueError(f"key_value_group_size={group_size} is invalid: it must be >= 1 (1 = no AcrossKV).")
    later = num_layers - num_key_value_layers
    if later % group_size != 0:
        valid = [g for g in range(1, later + 1) if later % g == 0] or [1]
        raise ValueError(
            f"key_value_group_size={group_size} does not divide the {later} SwiftKV layers "
            f"(num_hidden_layers={num_layers} - num_key_value_layers={num_key_value_layers}); valid: {valid}."
        )


def check_parallel_layout(config, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Raise a ValueError naming the numbers when the SwiftKV model cannot be split this way.

    Run by the config hook while the engine config is built (the front-end process, before any worker starts or
    any weight loads) and again by the model's constructor (a model built without the hook).
    """
    if pipeline_parallel_size > 1:
        raise ValueError(
            f"SwiftKV models in vLLM do not support pipeline parallelism yet (pipeline_parallel_size="
            f"{pipeline_parallel_size}); use pipeline_parallel_size=1 and tensor parallelism."
        )
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    if heads % tensor_parallel_size or kv_heads % tensor_parallel_size:
        sizes = [tp for tp in range(1, kv_heads + 1) if heads % tp == 0 and kv_heads % tp == 0]
        raise ValueError(
            f"SwiftKV in vLLM needs num_attention_heads ({heads}) and num_key_value_heads ({kv_heads}) divisible "
            f"by the tensor-parallel size ({tensor_parallel_size}) (no K/V-head replication yet); "
            f"tensor-parallel sizes that divide both: {sizes}."
        )


class _SwiftKVConfigMixin:
    num_hidden_layers: int
    num_key_value_layers: int | None
    key_value_group_size: int

    def validate_architecture(self):
        super().validate_architecture()
        SwiftKVLayout.of(self)  # raises on a bad layout
        layer_types = getattr(self, "layer_types", None) or []
        if len(set(layer_types)) > 1:
            raise ValueError(
                f"SwiftKV needs every layer to use one attention type, but this config mixes {sorted(set(layer_types))}"
                " (layer_types). Set `use_sliding_window=False` or remove `layer_types` in config.json."
            )


@strict
class LlamaSwiftKVConfig(_SwiftKVConfigMixin, LlamaConfig):
    model_type = "llama_swiftkv"
    swiftkv: bool = False  # True: later layers use the SwiftKV projections; False: the base model
    num_key_value_layers: int | None = None  # L: layers 0..L-1 run for every token (None: all layers)
    key_value_group_size: int = 1  # AcrossKV: consecutive later layers sharing one K/V entry (1: off)


@strict
class MistralSwiftKVConfig(_SwiftKVConfigMixin, MistralConfig):
    model_type = "mistral_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


@strict
class Qwen2SwiftKVConfig(_SwiftKVConfigMixin, Qwen2Config):
    model_type = "qwen2_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


@strict
class Qwen3SwiftKVConfig(_SwiftKVConfigMixin, Qwen3Config):
    model_type = "qwen3_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


# family -> (config class, architecture name written in config.json by `swiftkv convert`)
FAMILIES: dict[str, tuple[type, str]] = {
    "llama": (LlamaSwiftKVConfig, "LlamaSwiftKVForCausalLM"),
    "mistral": (MistralSwiftKVConfig, "MistralSwiftKVForCausalLM"),
    "qwen2": (Qwen2SwiftKVConfig, "Qwen2SwiftKVForCausalLM"),
    "qwen3": (Qwen3SwiftKVConfig, "Qwen3SwiftKVForCausalLM"),
}
