"""The model `swiftkv eval` scores: a SwiftKV checkpoint, a base model converted on the fly, or base + adapter."""

from __future__ import annotations

import os

from transformers import PreTrainedModel

from swiftkv.convert import convert, resolve_num_key_value_layers
from swiftkv.loading import is_swiftkv, load_model


def load_for_eval(
    name: str | os.PathLike,
    dtype: str = "float32",
    num_key_value_layers: int | None = None,
    skip: float | None = None,
    key_value_group_size: int = 1,
    adapter: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, object, list[str]]:
    """(model in eval mode, tokenizer, notes for the report).

    `adapter`: apply a distilled adapter (its own layout) to the base weights of `name`. A layout (L or skip):
    convert the base weights with the reference init, i.e. the UNDISTILLED model. Neither: `name` as it is.
    """
    if adapter is not None and (num_key_value_layers is not None or skip is not None):
        raise ValueError("Give either --adapter (its layout is in the adapter) or -L/--skip, not both.")
    model, tokenizer = load_model(name, dtype)
    notes = []
    if adapter is not None:
        from swiftkv.adapter import apply_adapter

        model = apply_adapter(model, adapter).eval()
        notes.append(f"distilled adapter {adapter} applied to {name}")
    elif num_key_value_layers is not None or skip is not None:
        if is_swiftkv(model):
            notes.append(f"{name} is a SwiftKV checkpoint; re-converted from its base weights (undistilled)")
        layers = resolve_num_key_value_layers(model.config.num_hidden_layers, num_key_value_layers, skip)
        model = convert(model, layers, key_value_group_size).eval()
        notes.append(f"converted on the fly (L={layers}, g={key_value_group_size}): undistilled, reference init")
    return model, tokenizer, notes
