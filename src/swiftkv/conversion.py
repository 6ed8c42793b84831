"""Base model -> SwiftKV model, initialised by the reference recipe, and atomic checkpoint writing.

Recipe (the paper's reference initialisation, arXiv 2410.03960): `q_proj_swiftkv_i <- q_proj_i`; a group leader's
`k/v_proj_swiftkv <-` the mean of its group's `k/v_proj` (weights and biases); `norm_swiftkv <-
layers[L].input_layernorm`."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from swiftkv.config import swiftkv_config_class, validate_attention_types, validate_swiftkv_layout
from swiftkv.files import prepare_output_dir, staged
from swiftkv.modeling import MODEL_FOR_FAMILY
from swiftkv.modeling.weights import BlockLinear, float_weight

# Fields that describe the SwiftKV layout or the class, never copied from the base config.
_OWN_FIELDS = ("model_type", "architectures", "swiftkv", "num_key_value_layers", "key_value_group_size")


def resolve_num_key_value_layers(num_layers: int, num_key_value_layers: int | None, skip: float | None) -> int:
    """L from exactly one of `num_key_value_layers` (a layer count) or `skip` (fraction of layers to skip)."""
    if (num_key_value_layers is None) == (skip is None):
        raise ValueError("Give exactly one of num_key_value_layers (e.g. 15) or skip (a fraction, e.g. 0.5).")
    if skip is not None:
        if not 0.0 <= skip < 1.0:
            raise ValueError(f"skip={skip} is invalid: it is the fraction of layers to skip, in [0, 1).")
        num_key_value_layers = num_layers - round(skip * num_layers)
    return num_key_value_layers


def swiftkv_config_for(base_config, num_key_value_layers: int, key_value_group_size: int = 1):
    """The SwiftKV config of `base_config`'s family with the given layout and SwiftKV on."""
    config_class = swiftkv_config_class(base_config.model_type)
    validate_swiftkv_layout(base_config.num_hidden_layers, num_key_value_layers, key_value_group_size)
    validate_attention_types(base_config)
    fields = {k: v for k, v in base_config.to_dict().items() if k not in _OWN_FIELDS}
    config = config_class.from_dict(
        fields,
        swiftkv=True,
        num_key_value_layers=num_key_value_layers,
        key_value_group_size=key_value_group_size,
    )
    config.architectures = [MODEL_FOR_FAMILY[config_class.model_type.removesuffix("_swiftkv")].__name__]
    config._attn_implementation = base_config._attn_implementation
    return config


def convert(model: PreTrainedModel, num_key_value_layers: int, key_value_group_size: int = 1) -> PreTrainedModel:
    """A SwiftKV model that reuses `model`'s weight tensors (no copy) and adds recipe-initialised projections.

    `model` may be a stock model of a supported family or a SwiftKV model (its base weights are taken), its layers in
    any weight format (modeling/weights.py): a layer kept as blocks (BlockLinear) is shared as it is, and the recipe
    reads its dequantized values.
    """
    config = swiftkv_config_for(model.config, num_key_value_layers, key_value_group_size)
    causal_lm = MODEL_FOR_FAMILY[config.model_type.removesuffix("_swiftkv")]
    with torch.device("meta"):
        swift = causal_lm(config)
    for name, module in model.named_modules():
        if isinstance(module, BlockLinear) and "swiftkv" not in name:
            swift.set_submodule(name, module)
    base_state = {k: v for k, v in model.state_dict().items() if "swiftkv" not in k}
    missing, unexpected = swift.load_state_dict(base_state, strict=False, assign=True)
    if unexpected or any("swiftkv" not in k for k in missing):
        raise ValueError(f"Base weights do not fit the SwiftKV model: missing {missing}, unexpected {unexpected}")
    for (
        name,
        buffer,
    ) in model.named_buffers():  # non-persistent buffers (RoPE frequencies) are not in state_dict
        module_name, _, buffer_name = name.rpartition(".")
        swift.get_submodule(module_name)._buffers[buffer_name] = buffer
    init_swiftkv_parameters(swift)
    swift.tie_weights()
    swift.generation_config = copy.deepcopy(model.generation_config)
    return swift.eval() if not model.training else swift


@torch.no_grad()
def init_swiftkv_parameters(model: PreTrainedModel) -> None:
    """Set every `*_swiftkv` parameter of `model` from its base weights by the reference recipe."""
    config, decoder = model.config, model.model
    num_layers, num_kv_layers = config.num_hidden_layers, config.num_key_value_layers
    source_norm = decoder.layers[num_kv_layers].input_layernorm if num_kv_layers < num_layers else decoder.norm
    decoder.norm_swiftkv.weight = nn.Parameter(source_norm.weight.detach().clone())
    for idx in range(num_kv_layers, num_layers):
        attention = decoder.layers[idx].self_attn
        _set_linear(attention.q_proj_swiftkv, [attention.q_proj])
        if config.leader_of(idx) == idx:
            group = [decoder.layers[j].self_attn for j in range(idx, idx + config.key_value_group_size)]
            _set_linear(attention.k_proj_swiftkv, [a.k_proj for a in group])
            _set_linear(attention.v_proj_swiftkv, [a.v_proj for a in group])


def _set_linear(target: nn.Linear, sources: list[nn.Linear]) -> None:
    """target <- mean of sources (weights, a BlockLinear's dequantized; biases when present); works on meta-device
    targets."""
    weights = [float_weight(s) for s in sources]
    target.weight = nn.Parameter(torch.stack(weights).mean(0))
    if target.bias is not None:
        target.bias = nn.Parameter(torch.stack([s.bias.detach() for s in sources]).mean(0))


def save_atomic(out: str | os.PathLike, overwrite: bool, *savables) -> Path:
    """`save_pretrained` every object (model, tokenizer, ...) into `out`, atomically (see `files.staged`)."""
    out = prepare_output_dir(out, overwrite)
    with staged(out, replace=overwrite) as staging:
        for savable in savables:
            savable.save_pretrained(staging)
    return out
