"""benchmarks/distill_step.py: the bf16 comparison runs the recipe's step in bf16 and measures the bf16 teacher."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import load_benchmark
from transformers import AutoTokenizer


@pytest.fixture
def prefix_chat_dir(chat_dir):
    """chat_dir with a chat template whose turns render as prefixes of the whole conversation (no generation
    prompt text), as the benchmark's assistant-only batch needs."""
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = "{% for m in messages %} w5 {{ m['content'] }} w6{% endfor %}"
    tokenizer.save_pretrained(chat_dir)
    return chat_dir


def test_bfloat16_column_and_teacher_fidelity(prefix_chat_dir, tmp_path, monkeypatch):
    bench = load_benchmark("distill_step")
    out = tmp_path / "step.json"
    argv = ["distill_step.py", "--model", str(prefix_chat_dir), "-L", "3", "--seq-len", "24", "--reps", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threads", "1", "--dtypes", "float32", "bfloat16", "--json", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert set(result["median_s"]) == {"naive", "shared_all_logits", "shared", "shared_bfloat16"}
    # Same loss up to bf16 rounding of the frozen weights and activations.
    assert abs(result["loss"]["shared_bfloat16"] - result["loss"]["shared"]) < 0.05 * result["loss"]["shared"]
    fidelity = result["teacher_vs_float32"]["bfloat16"]
    assert 0 < fidelity["kl"] < 0.01 and fidelity["agreement"] > 0.9
    assert abs(fidelity["swiftkv"]["ppl"] / fidelity["base"]["ppl"] - 1) < 0.02


def test_teacher_fidelity_of_a_model_with_itself_is_exact(prefix_chat_dir):
    bench = load_benchmark("distill_step")
    model, tokenizer = bench.student(str(prefix_chat_dir), "float32", 3, 1, "cpu")
    batch = bench.chat_batch(tokenizer, "chitchat", 24, 2)
    fidelity = bench.teacher_fidelity(model, model, batch)
    assert fidelity["tokens"] == int(batch.attention_mask[:, 1:].sum())
    assert fidelity["kl"] == 0 and fidelity["agreement"] == 1
    assert fidelity["swiftkv"]["ppl"] == fidelity["base"]["ppl"]
    assert all(p.requires_grad == ("swiftkv" in n) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "swiftkv" in n)
