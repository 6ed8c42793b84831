"""Each bundled adapter loads onto the default model and reproduces the logits recorded next to it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import swiftkv
from swiftkv.adapter import QUALITY_NAME, REFERENCE_NAME, reference_logits, resolve_adapter
from swiftkv.cli.commands import demo_adapter
from swiftkv.evaluate.scoring import MODES
from swiftkv.evaluate.text import MAX_PPL_INCREASE, quality_shortfalls, run_domains


@pytest.mark.parametrize("name", swiftkv.bundled_adapters())
def test_bundled_adapter_reproduces_its_reference_logits(name, default_model_dir):
    recorded = json.loads((resolve_adapter(name) / REFERENCE_NAME).read_text())
    model, tokenizer = swiftkv.load("default", adapter=name, weights="float32")  # references are float32 logits
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
    table = json.loads((resolve_adapter(demo_adapter()) / QUALITY_NAME).read_text())
    assert quality_shortfalls(table) == []


def test_the_demo_adapter_quality_recomputes(default_model_dir):
    """One row of the demo adapter's committed domains.json scored again: wikipedia, its source closest to the +3%
    target, 8 held-out texts (the table's own settings: 8 texts, 1024 tokens each).

    Same texts and tokens, so counts match exactly. Float32 on another CPU (AVX2 vs AVX-512 kernels) moves each
    log-probability by ~1e-5: perplexity = exp(mean NLL) by ~1e-5 relative, the KL (~0.03, a mean of log-probability
    differences) by up to ~1e-3 relative, and top-1 agreement only where two logits tie to 1e-5 (2 tokens allowed).
    Measured on this project's 2-core AMD EPYC machine: <= 1e-7 relative. A retrained adapter without a new table,
    a changed scorer, tokenizer or split moves them by far more.
    """
    if importlib.util.find_spec("evals") is None:
        pytest.skip("wikipedia's data package (evals) is not installed (scripts/setup.sh installs it)")
    name = demo_adapter()
    recorded = json.loads((resolve_adapter(name) / QUALITY_NAME).read_text())["sources"]["wikipedia"]
    model, tokenizer = swiftkv.load("default", adapter=name, weights="float32")  # quality.json was scored in float32
    table = run_domains(model, tokenizer, MODES, limit=8, max_tokens=1024, sources=["wikipedia"])
    found, counts = table["sources"]["wikipedia"], ("examples", "tokens", "split")
    assert [found[key] for key in counts] == [recorded[key] for key in counts]
    for mode in MODES:
        assert found[mode]["ppl"] == pytest.approx(recorded[mode]["ppl"], rel=1e-4), mode
    assert found["kl"] == pytest.approx(recorded["kl"], rel=1e-3)
    assert abs(found["agreement"] - recorded["agreement"]) * found["tokens"] <= 2
    assert found["ppl_ratio"] <= 1 + MAX_PPL_INCREASE  # the target the demo's choice rests on, recomputed
