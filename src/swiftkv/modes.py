"""The one SwiftKV on/off switch. One model object has two modes: SwiftKV on (the student: later layers read the
SwiftKV K/V, prompt tokens skip them) and off (`config.swiftkv = False`: the exact base model, the teacher)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import PreTrainedModel


def is_swiftkv(model: PreTrainedModel) -> bool:
    return model.config.model_type.endswith("_swiftkv")


def set_swiftkv(model: PreTrainedModel, enabled: bool) -> bool:
    """Switch SwiftKV on or off for good; returns the previous mode. A base model only runs with it off."""
    if not is_swiftkv(model):
        if enabled:
            raise ValueError("This model is not a SwiftKV model: convert it (swiftkv.convert) or load an adapter.")
        return False
    previous, model.config.swiftkv = model.config.swiftkv, bool(enabled)
    return previous


@contextlib.contextmanager
def swiftkv_mode(model: PreTrainedModel, enabled: bool) -> Iterator[PreTrainedModel]:
    """Run the block with SwiftKV on or off, then restore the previous mode."""
    previous = set_swiftkv(model, enabled)
    try:
        yield model
    finally:
        set_swiftkv(model, previous)
