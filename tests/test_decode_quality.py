"""benchmarks/decode_quality.py: teacher forcing through the decode step, and the per-format comparison."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark, tiny_base

from swiftkv.conversion import convert
from swiftkv.modes import swiftkv_mode


@pytest.mark.parametrize("swift", [True, False], ids=["swiftkv", "base"])
def test_decoded_logits_are_the_full_forward_logits(swift):
    """Row i predicts token prompt + i: the same logits one forward over the whole text gives (float32 rounding)."""
    bench = load_benchmark("decode_quality")
    model = convert(tiny_base("llama", hidden=64), 3, 1)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), swiftkv_mode(model, swift):
        decoded = bench.decoded_logits(model, ids, prompt=5)
        full = model(ids).logits[0, 4:-1]
    assert decoded.shape == full.shape == (15, model.config.vocab_size)
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)


def test_compare_reads_increase_kl_and_agreement_against_float32():
    bench = load_benchmark("decode_quality")
    row = {"nll": 100.0, "tokens": 50, "kl": 0.5, "agree": 45}
    scores = {
        "wikipedia": {
            "float32": {m: dict(row, kl=0.0, agree=50) for m in ("base", "swiftkv")},
            "int8": {"base": dict(row, nll=101.0), "swiftkv": dict(row)},
        }
    }
    int8 = bench.compare(scores)["int8"]
    assert int8["increase"]["wikipedia"]["base"] == pytest.approx(math.exp(1 / 50) - 1)
    assert int8["increase"]["wikipedia"]["swiftkv"] == 0.0
    assert int8["kl"]["wikipedia"]["base"] == 0.01 and int8["agreement"]["wikipedia"]["base"] == 0.9
    assert int8["target"] == 0.005 and not int8["met"]  # +2.0% > +0.5%
