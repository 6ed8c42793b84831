"""SwiftKV adapters: only the distilled `*_swiftkv` weights, the layout, and the identity of the base model.

An adapter is a directory with
    adapter_config.json   {"format": "swiftkv-adapter", "num_key_value_layers", "key_value_group_size",
                           "base_model": {name, family, shapes, weight fingerprint}, ...}
    adapter.safetensors   model.norm_swiftkv.weight, model.layers.{i}.self_attn.{q,k,v}_proj_swiftkv.{weight,bias}
It is a few percent of the model (SmolLM2-135M at L=15, g=1: 8.3 M parameters, 16 MB in bf16). Applying it =
converting the base model to the adapter's layout (which shares the base tensors) and loading these weights.

The fingerprint is a few strided samples of base weights: applying an adapter to another model (or another
fine-tune of the same architecture) is an error instead of a silently wrong model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from swiftkv.config import DTYPES
from swiftkv.conversion import convert
from swiftkv.files import check_safetensors, prepare_output_dir, read_json_file, staged
from swiftkv.modeling.kernels import move_to_huge_pages
from swiftkv.modeling.weights import BlockLinear, float_weight

FORMAT = "swiftkv-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")
_SAMPLES = 16  # values sampled per fingerprinted tensor
# Relative tolerance of the fingerprint: a base loaded in bf16/fp16 instead of fp32 still matches.
_FINGERPRINT_RTOL = 2e-2


def _family(config) -> str:
    return config.model_type.removesuffix("_swiftkv")


def _fingerprint_names(config) -> list[str]:
    last = config.num_hidden_layers - 1
    return [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{last // 2}.self_attn.k_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.norm.weight",
    ]


@torch.no_grad()
def fingerprint(model: PreTrainedModel) -> dict[str, list[float]]:
    """{parameter name: `_SAMPLES` values at evenly spaced flat positions} of a few base weights."""
    samples = {}
    for name in _fingerprint_names(model.config):
        flat = float_weight(model.get_submodule(name.removesuffix(".weight"))).reshape(-1)  # blocks: their values
        index = (torch.arange(_SAMPLES) * (flat.numel() - 1) // (_SAMPLES - 1)).to(flat.device)
        samples[name] = [float(v) for v in flat[index].float().cpu()]
    return samples


def base_identity(model: PreTrainedModel, name_or_path: str | None = None) -> dict:
    """What an adapter records about the model it was distilled from."""
    config = model.config
    return {
        "name_or_path": str(name_or_path) if name_or_path is not None else getattr(config, "_name_or_path", ""),
        "family": _family(config),
        **{field: getattr(config, field) for field in _SHAPE_FIELDS},
        "fingerprint": fingerprint(model),
    }


def swiftkv_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors: every parameter whose name contains 'swiftkv', and the dequantized weight of such a
    layer kept as blocks (a model loaded in int8/int4)."""
    state = {name: p.detach() for name, p in model.named_parameters() if "swiftkv" in name}
    for name, module in model.named_modules():
        if "swiftkv" in name and isinstance(module, BlockLinear):
            state[f"{name}.weight"] = float_weight(module)
    return state


def save_adapter(
    model: PreTrainedModel,
    out: str | os.PathLike,
    base_name: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Write the `*_swiftkv` weights of a SwiftKV `model` (e.g. after distillation) as an adapter of its base
    weights; `base_name` is recorded as where the base model came from."""
    return write_adapter(out, swiftkv_state(model), model.config, base_identity(model, base_name), dtype, overwrite)


def write_adapter(
    out: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    swiftkv_config,
    identity: dict,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write an adapter directory atomically. `tensors`: the `*_swiftkv` weights (see `swiftkv_state`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for adapters; choose one of {', '.join(DTYPES)}.")
    bad = [name for name in tensors if "swiftkv" not in name]
    if bad:
        raise ValueError(f"An adapter holds only *_swiftkv parameters; got {bad[:4]}.")
    out = prepare_output_dir(out, overwrite)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": f"{identity['family']}_swiftkv",
        "swiftkv": True,
        "num_key_value_layers": swiftkv_config.num_key_value_layers,
        "key_value_group_size": swiftkv_config.key_value_group_size,
        "dtype": dtype,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "base_model": identity,
        **(extra or {}),
    }
    cast = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in sorted(tensors.items())}
    with staged(out, replace=overwrite) as staging:
        staging.mkdir()
        save_file(cast, staging / WEIGHTS_NAME, metadata={"format": "pt", "swiftkv_adapter": str(FORMAT_VERSION)})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


BUNDLED_DIR = Path(__file__).resolve().parent / "adapters"  # package data: distilled adapters of the default model


def bundled_adapters() -> list[str]:
    """Names of the adapters shipped inside the package (usable as `adapter="smollm2-L15-g1"`)."""
    return sorted(p.parent.name for p in BUNDLED_DIR.glob(f"*/{CONFIG_NAME}"))


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """An adapter directory, or the bundled adapter of that name (works from an installed wheel)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if (BUNDLED_DIR / str(name_or_path) / CONFIG_NAME).is_file():
        return BUNDLED_DIR / str(name_or_path)
    raise FileNotFoundError(
        f"Adapter {str(name_or_path)!r} is neither a directory nor a bundled adapter "
        f"({', '.join(bundled_adapters()) or 'none installed'})."
    )


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter config, tensors) with a clear error for anything that is not an adapter directory."""
    path = resolve_adapter(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a SwiftKV adapter: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(written by `swiftkv distill` into OUTPUT_DIR/adapter)."
        )
    config = read_json_file(config_file, f"adapter {path}")
    check_safetensors(weights_file, f"adapter {path}")
    config = config if isinstance(config, dict) else {}
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_file}: format {config.get('format')!r} version {config.get('format_version')!r} is not "
            f"{FORMAT!r} version {FORMAT_VERSION}."
        )
    return config, load_file(weights_file)


def check_base(model: PreTrainedModel, adapter_config: dict, fingerprint_check: bool = True) -> None:
    """Raise ValueError when `model` is not the base model the adapter was distilled from."""
    expected, config = adapter_config["base_model"], model.config
    found = {"family": _family(config), **{field: getattr(config, field) for field in _SHAPE_FIELDS}}
    wrong = [f"{k}={found[k]} (adapter: {expected[k]})" for k in found if found[k] != expected.get(k)]
    if wrong:
        raise ValueError(
            f"This adapter was distilled from {expected.get('name_or_path')!r}, a different architecture: "
            + ", ".join(wrong)
            + "."
        )
    if not fingerprint_check:
        return
    ours = fingerprint(model)
    for name, values in expected.get("fingerprint", {}).items():
        mine, theirs = torch.tensor(ours[name]), torch.tensor(values)
        scale = theirs.abs().max().clamp_min(1e-6)
        if not torch.allclose(mine, theirs, rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_RTOL * scale.item()):
            raise ValueError(
                f"This adapter was distilled from {expected.get('name_or_path')!r}, but the base model's weights "
                f"differ ({name}: sampled values do not match). Apply it to that model, or pass "
                "check_base=False (--no-check-base) if you know the weights are equivalent."
            )


def apply_adapter(
    model: PreTrainedModel, adapter: str | os.PathLike, check_base_weights: bool = True
) -> PreTrainedModel:
    """The SwiftKV model of `model` (base or SwiftKV) with the adapter's weights; shares `model`'s base tensors."""
    config, tensors = read_adapter(adapter)
    check_base(model, config, fingerprint_check=check_base_weights)
    swift = convert(model, config["num_key_value_layers"], config["key_value_group_size"])
    params = dict(swift.named_parameters())
    expected = {name for name in params if "swiftkv" in name}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{adapter}: adapter does not fit its own layout: missing {missing[:4]}, unexpected {unexpected[:4]}."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{adapter}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(param.shape)}."
                )
            param.copy_(tensor.to(param.dtype))
    move_to_huge_pages(params[name] for name in tensors)  # the base weights already are (loaders)
    return swift


REFERENCE_NAME = "reference.json"  # logits of base + adapter on a fixed prompt, recorded when the adapter is made
QUALITY_NAME = "domains.json"  # its per-domain quality table (`benchmarks/domain_quality.py --into-adapters`)
REFERENCE_PROMPT = "The river valley had been farmed for centuries before the railway arrived. Each spring the water"


@torch.no_grad()
def reference_logits(model: PreTrainedModel, tokenizer, positions: int = 4, top: int = 5) -> dict:
    """Top-`top` logits (ids and float32 values) at the last `positions` prompt positions of REFERENCE_PROMPT,
    from the full SwiftKV forward: what `check_reference` compares a freshly loaded base + adapter against."""
    ids = tokenizer(REFERENCE_PROMPT, return_tensors="pt")["input_ids"]  # [1, T]
    logits = model(ids.to(model.device), logits_to_keep=0).logits[0, -positions:].float().cpu()  # [positions, V]
    values, indices = logits.topk(top, dim=-1)
    return {"prompt": REFERENCE_PROMPT, "top_ids": indices.tolist(), "top_logits": values.tolist()}


def write_reference(adapter_dir: str | os.PathLike, model: PreTrainedModel, tokenizer) -> Path:
    path = resolve_adapter(adapter_dir) / REFERENCE_NAME
    path.write_text(json.dumps(reference_logits(model, tokenizer), indent=2) + "\n")
    return path
