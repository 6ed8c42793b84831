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


@dataclass(frozen=True)
class PipelineStage:
    """The layers [start, end) one pipeline stage runs, and its part of the SwiftKV forward.

    x = norm_swiftkv(h_L), every token's input to the K/V of every AcrossKV group, is computed by the stage that
    holds layer L and sent on (full length) to every later stage, which writes its own groups' cache entries from it.
    """

    layout: SwiftKVLayout
    start: int
    end: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.layout.num_layers

    @property
    def base_layers(self) -> range:
        """Layers < L of this stage: every token."""
        return range(self.start, min(self.end, self.layout.num_key_value_layers))

    @property
    def swiftkv_layers(self) -> range:
        """Layers >= L of this stage: the kept rows only (with fast prefill)."""
        return range(max(self.start, self.layout.num_key_value_layers), self.end)

    @property
    def leaders(self) -> list[int]:
        """The AcrossKV groups whose K/V projection and cache entry live here (a stage holds whole groups)."""
        return [leader for leader in self.layout.leaders if self.start <= leader < self.end]

    @property
    def computes_x(self) -> bool:
        """This stage holds layer L: it computes x = norm_swiftkv(h_L)."""
        return self.layout.skips and self.start <= self.layout.num_key_value_layers < self.end

    @property
    def receives_x(self) -> bool:
        """This stage starts after layer L: x comes with the intermediate tensors."""
        return self.layout.skips and self.start > self.layout.num_key_value_layers

    @property
    def intermediate_keys(self) -> list[str]:
        """What the previous stage sends here, each [T, D]: the residual stream, and x for stages after L."""
        return ["hidden_states", "residual"] + (["swiftkv_x"] if self.receives_x else [])


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
    check_tensor_parallel(config, tensor_parallel_size)
    if pipeline_parallel_size > 1:
        check_pipeline_stages(
            SwiftKVLayout.of(config), pipeline_stages(config.num_hidden_layers, pipeline_parallel_size)
        )


def splits_heads(heads: int, kv_heads: int, tp: int) -> bool:
    """vLLM's `QKVParallelLinear` rule: tp divides the query heads, and tp divides the K/V heads (each rank holds
    kv_heads / tp) or the K/V heads divide tp (each head replicated on tp / kv_heads ranks)."""
    return heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)


def check_tensor_parallel(config, tensor_parallel_size: int) -> None:
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    if not splits_heads(heads, kv_heads, tensor_parallel_size):
        sizes = [tp for tp in range(1, heads + 1) if splits_heads(heads, kv_heads, tp)]
        raise ValueError(
            f"SwiftKV in vLLM cannot split num_attention_heads ({heads}) and num_key_value_heads ({kv_heads}) over "
            f"tensor-parallel size {tensor_parallel_size}: it must divide the query heads, and divide or be a multiple "
            f"of the K/V heads (then each K/V head is replicated, as vLLM's Llama does); valid sizes: {sizes}."
        )


def pipeline_stages(num_layers: int, pipeline_parallel_size: int) -> list[tuple[int, int]]:
    """(first layer, end layer) of each stage, as vLLM's `get_pp_indices` splits them (VLLM_PP_LAYER_PARTITION or
    an even split); its ValueError names a bad partition."""
    from vllm.distributed.utils import get_pp_indices

    return [get_pp_indices(num_layers, rank, pipeline_parallel_size) for rank in range(pipeline_parallel_size)]


def check_pipeline_stages(layout: SwiftKVLayout, stages: list[tuple[int, int]]) -> None:
    """Every stage holds a layer, and no stage boundary cuts an AcrossKV group: a group's layers read one cache
    entry, which lives in one stage's process."""
    if any(start == end for start, end in stages):
        raise ValueError(
            f"SwiftKV in vLLM needs a layer on every pipeline stage, but the {layout.num_layers} layers split as "
            f"{stages} (first, end) over {len(stages)} stages: use fewer stages or set VLLM_PP_LAYER_PARTITION."
        )
    cuts = [start for start, _ in stages[1:] if layout.num_key_value_layers < start < layout.num_layers]
    bad = [cut for cut in cuts if (cut - layout.num_key_value_layers) % layout.group_size]
    if bad:
        valid = list(range(1, layout.num_key_value_layers + 1)) + layout.leaders[1:]
        raise ValueError(
            f"Pipeline stages start at layers {[start for start, _ in stages]}, but {bad} falls inside an AcrossKV "
            f"group (num_key_value_layers={layout.num_key_value_layers}, key_value_group_size={layout.group_size}: "
            f"groups start at {layout.leaders}), whose layers share one KV-cache entry in one process. A stage may "
            f"start at layers {valid}: set VLLM_PP_LAYER_PARTITION (layers per stage) accordingly."
        )


def check_stored_weights(config) -> None:
    """A checkpoint `swiftkv convert --weights int8/int4` wrote keeps BlockLinear buffers that vLLM's loader has no
    weights for: refused before any worker starts, with the conversion that serves."""
    stored = getattr(config, "swiftkv_weights", "float32")  # how `swiftkv convert --weights` stored the Linears
    if stored not in ("float32", "bf16"):
        raise ValueError(
            f"This checkpoint stores its Linear layers as swiftkv's {stored} blocks (swiftkv_weights={stored!r} "
            "in config.json), which vLLM cannot load. Convert it for vLLM with float weights: `swiftkv convert SRC "
            "OUT --weights bf16` (or float32), and use vLLM's own quantization (e.g. --quantization fp8) for "
            "smaller weights."
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
