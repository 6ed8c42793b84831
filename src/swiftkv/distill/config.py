"""Typed distillation config: a YAML file plus `key=value` overrides, validated with actionable errors.

Every field has a comment; the example configs in `configs/*.yaml` repeat them. Defaults follow the reference
recipe (arXiv 2410.03960, docs/quality.md) except the sequence length and batch, which are sized for one machine.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from swiftkv.config import DTYPES
from swiftkv.modeling.weights import FORMATS

SCHEDULES = ("linear", "cosine", "constant")
DISTRIBUTED = ("ddp", "fsdp")
INITS = ("recipe", "least_squares")


@dataclasses.dataclass
class DistillConfig:
    # --- model and SwiftKV layout
    model: str = "default"  # base model: an embedded name ('default': SmolLM2-135M-Instruct), a HF dir or a .gguf
    num_key_value_layers: int | None = None  # L: layers 0..L-1 keep their own K/V (None: half the layers)
    key_value_group_size: int = 1  # g: AcrossKV group size for layers >= L (1: off)
    dtype: str = "float32"  # dtype of the frozen weights; trainable weights and optimizer state stay float32
    # format of the frozen Linear layers, which teacher and student share: 'float32' (as `dtype` loads them), 'bf16',
    # 'int8', 'int4' (modeling/weights.py: distil against the weights you will serve); the trained *_swiftkv
    # projections stay float32, the full checkpoint (output_dir/model) is saved in this format
    weights: str = "float32"
    device: str = "auto"  # 'auto' (cuda if available, else cpu), 'cpu', 'cuda'
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    init: str = "recipe"  # new projections' start: 'recipe' (copies, as in the paper) or 'least_squares' (K/V fit)
    init_tokens: int = 100_000  # least_squares: calibration tokens taken from the training data
    init_adapter: str | None = None  # start from this SwiftKV adapter's weights (then `init` is not used)
    # --- data
    # named sources or local paths: a list (every example of each, in order) or a mixture {source: token share}
    # (each run draws max_steps x global batch x max_length tokens in those proportions; needs max_steps)
    data: list[str] | dict[str, float] = dataclasses.field(default_factory=lambda: ["chitchat"])
    split: str = "train"  # 'train' (all but the fixed ~5% held-out part) or 'all' (never 'heldout')
    assistant_only: bool = True  # chat data: only assistant tokens are KL targets (else every token)
    max_length: int = 2048  # tokens per sequence: plain text is packed to it, longer chats are truncated
    max_examples: int | None = None  # use only the first N examples of each source (None: all)
    # --- batch and schedule
    micro_batch_size: int = 1  # sequences per forward/backward on each process
    gradient_accumulation_steps: int = 8  # micro-batches per optimizer step on each process
    epochs: int = 1  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps to run; the data repeats (reshuffled) if it runs out
    lr: float = 2e-4  # AdamW peak learning rate
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.05  # fraction of steps with a linear warm-up from 0 to lr
    schedule: str = "linear"  # after warm-up: 'linear' (to 0), 'cosine' (to 0) or 'constant'
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    # --- loss
    temperature: float = 2.0  # T of KL(teacher || student) on softened logits; the KL is scaled by T^2
    hidden_loss_weight: float = 1.0  # weight of the MSE between student and teacher hidden states (0: off)
    hidden_loss_layer: int | None = None  # MSE on the hidden state entering this layer (None: the last layer)
    # --- run
    seed: int = 0  # data order and any randomness
    output_dir: str = "runs/distill"  # checkpoint/, model/, adapter/, metrics.jsonl, loss.png, eval.json
    save_interval: int = 100  # write a resumable checkpoint every N optimizer steps (and at the end)
    log_interval: int = 10  # append a metrics row every N optimizer steps
    distributed: str = "ddp"  # under torchrun: 'ddp' (replicas) or 'fsdp' (FSDP2 sharding for big models)
    save_full_checkpoint: bool = True  # write output_dir/model (Snowflake format) besides the adapter
    adapter_dtype: str = "bfloat16"  # dtype of the adapter tensors ('float32', 'bfloat16', 'float16')
    eval_data: list[str] = dataclasses.field(default_factory=list)  # held-out sources to evaluate at the end
    eval_max_examples: int | None = 200  # examples per eval source (None: the whole held-out part)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad value and what would be valid (model-dependent checks come later)."""
        positive = ("micro_batch_size", "gradient_accumulation_steps", "epochs", "max_length", "save_interval")
        for name in (*positive, "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: it must be >= 1.")
        for name in ("max_steps", "max_examples", "eval_max_examples", "threads", "init_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is invalid: it must be >= 1 (or null).")
        if not self.data:
            raise ValueError("data is empty: give at least one source (e.g. [chitchat] or a .jsonl path).")
        if isinstance(self.data, dict):
            self._validate_mixture()
        if self.split not in ("train", "all"):
            raise ValueError(f"split={self.split!r} is invalid: use 'train' or 'all' (never train on 'heldout').")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is invalid; choose one of {', '.join(SCHEDULES)}.")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is invalid; choose one of {', '.join(INITS)}.")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed={self.distributed!r} is invalid; choose one of {', '.join(DISTRIBUTED)}.")
        if self.weights not in FORMATS:
            raise ValueError(f"weights={self.weights!r} is invalid; choose one of {', '.join(FORMATS)}.")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; choose one of {', '.join(DTYPES)}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} is invalid; use 'auto', 'cpu' or 'cuda'.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} is invalid: give two numbers in [0, 1), e.g. [0.9, 0.999].")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr} must be > 0 and weight_decay={self.weight_decay} >= 0.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} is invalid: it must be in [0, 1).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} is invalid: it must be > 0 (the recipe uses 2).")
        if self.hidden_loss_weight < 0:
            raise ValueError(f"hidden_loss_weight={self.hidden_loss_weight} is invalid: it must be >= 0.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} is invalid: it must be > 0 (or null: off).")

    def _validate_mixture(self) -> None:
        for source, weight in self.data.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
                raise ValueError(f"data: the weight of {source!r} is {weight!r}; mixture weights must be numbers > 0.")
        if self.max_steps is None:
            raise ValueError(
                "data is a weighted mixture, which sets how tokens are drawn but not how many: set max_steps "
                "(tokens drawn = max_steps x micro_batch_size x gradient_accumulation_steps x processes x max_length)."
            )

    def validate_for_model(self, model_config) -> None:
        """Checks that need the base model: layout, hidden-loss layer, context length."""
        from swiftkv.config import validate_swiftkv_layout

        num_layers = model_config.num_hidden_layers
        validate_swiftkv_layout(num_layers, self.resolved_num_key_value_layers(num_layers), self.key_value_group_size)
        num_kv_layers = self.resolved_num_key_value_layers(num_layers)
        if num_kv_layers == num_layers:
            raise ValueError(
                f"num_key_value_layers={num_kv_layers} equals the number of layers: there is nothing to distill. "
                f"Use a value below {num_layers} (e.g. {num_layers // 2})."
            )
        layer = self.resolved_hidden_loss_layer(num_layers)
        if not num_kv_layers < layer < num_layers:
            raise ValueError(
                f"hidden_loss_layer={self.hidden_loss_layer} is invalid: the hidden state entering layer {layer} "
                f"is not produced by a SwiftKV layer; use a layer in {num_kv_layers + 1}..{num_layers - 1} (or null)."
            )
        context = getattr(model_config, "max_position_embeddings", None)
        if context is not None and self.max_length > context:
            raise ValueError(
                f"max_length={self.max_length} is longer than the model's context ({context} tokens, "
                f"max_position_embeddings); use max_length <= {context}."
            )

    def resolved_num_key_value_layers(self, num_layers: int) -> int:
        return num_layers // 2 if self.num_key_value_layers is None else self.num_key_value_layers

    def resolved_hidden_loss_layer(self, num_layers: int) -> int:
        return num_layers - 1 if self.hidden_loss_layer is None else self.hidden_loss_layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _unknown_key_error(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(FIELDS)}."
    return ValueError(f"Unknown config key {key!r} in {where}.{hint}")


def _coerce(name: str, value: Any) -> Any:
    """YAML already typed the value; accept ints and `1e-4` strings for floats, one string for a list."""
    kind = str(FIELDS[name].type)
    if value is None:
        return None
    if kind.startswith("list") and isinstance(value, str):
        return [value]
    if kind.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("float") and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _default(name: str) -> Any:
    """A field's default value, made by its default_factory where it has one (lists)."""
    field = FIELDS[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _check_type(name: str, value: Any) -> None:
    kind = str(FIELDS[name].type)
    if value is None:
        if "None" not in kind:
            raise ValueError(f"{name}=null is invalid: it needs a value (default {_default(name)!r}).")
        return
    if name == "data":
        if not isinstance(value, list | dict):
            raise ValueError(f"data={value!r} is invalid: give a list of sources or a mapping {{source: weight}}.")
        return
    expected = {"int": int, "float": float, "str": str, "bool": bool, "list": list}[kind.split()[0].split("[")[0]]
    if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
        raise ValueError(f"{name}={value!r} is invalid: expected {kind}.")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings; values are parsed as YAML (`lr=1e-4`, `data=[chitchat,gsm8k-test]`, `max_steps=null`)."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not key=value (e.g. lr=1e-4 or data=[chitchat]).")
        parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return parsed


def build_config(values: dict[str, Any], where: str = "config") -> DistillConfig:
    """A DistillConfig from a dict, with a suggestion for every misspelt key."""
    for key in values:
        if key not in FIELDS:
            raise _unknown_key_error(key, where)
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    for key, value in coerced.items():
        _check_type(key, value)
    return DistillConfig(**coerced)


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None) -> DistillConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist (see configs/*.yaml for examples).")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of key: value lines, got {type(loaded).__name__}.")
        for key in loaded:
            if key not in FIELDS:
                raise _unknown_key_error(key, str(path))
        values.update(loaded)
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key in extra:
        if key not in FIELDS:
            raise _unknown_key_error(key, "the overrides")
    values.update(extra)
    return build_config(values, str(path) if path else "config")
