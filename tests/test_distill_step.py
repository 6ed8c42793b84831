"""benchmarks/distill_step.py: the bf16 and weight-format comparisons run the recipe's step and measure the teacher."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import load_benchmark
from transformers import AutoTokenizer

from swiftkv.modes import swiftkv_mode


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
    argv += ["--threads", "1", "--dtypes", "float32", "bfloat16", "--weights", "int8", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    result = json.loads(out.read_text())
    assert set(result["median_s"]) == {"naive", "shared_all_logits", "shared", "shared_bfloat16", "shared_weights_int8"}
    # int8 blocks: ~1.06 bytes per Linear weight instead of 4 (the float32 embedding and norms stay)
    assert result["frozen_bytes"]["shared_weights_int8"] < 0.8 * result["frozen_bytes"]["shared"]
    assert 0 < result["teacher_vs_float32"]["int8"]["kl"] < 0.01
    # Same loss up to bf16 rounding of the frozen weights and activations.
    assert abs(result["loss"]["shared_bfloat16"] - result["loss"]["shared"]) < 0.05 * result["loss"]["shared"]
    fidelity = result["teacher_vs_float32"]["bfloat16"]
    assert 0 < fidelity["kl"] < 0.01 and fidelity["agreement"] > 0.9
    assert abs(fidelity["swiftkv"]["ppl"] / fidelity["base"]["ppl"] - 1) < 0.02


def test_teacher_fidelity_compares_the_float32_and_bfloat16_teachers(prefix_chat_dir):
    """What the benchmark reports (fp32 teacher vs bf16 teacher) equals the same statistics computed here from the
    two models' own logits: every position with a next token, KL(fp32 || bf16), perplexities, top-1 agreement."""
    bench = load_benchmark("distill_step")
    model, tokenizer = bench.student(str(prefix_chat_dir), "float32", 3, 1, "cpu")
    other, _ = bench.student(str(prefix_chat_dir), "bfloat16", 3, 1, "cpu")
    batch = bench.chat_batch(tokenizer, "chitchat", 24, 2)
    fidelity = bench.teacher_fidelity(model, other, batch)

    keep = batch.attention_mask[:, 1:].bool()  # [B, T-1]: positions with a next token
    targets = batch.input_ids[:, 1:][keep]  # [tokens]
    log_probs = []
    for teacher in (model, other):
        with swiftkv_mode(teacher, False), torch.no_grad():  # the teacher is the base model
            logits = teacher(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][keep]
        log_probs.append(logits.float().log_softmax(-1))  # [tokens, V]
    fp32, bf16 = log_probs
    assert fidelity["tokens"] == targets.numel() == int(keep.sum())
    kl = (fp32.exp() * (fp32 - bf16)).sum(-1).mean().item()
    assert 0 < fidelity["kl"] == pytest.approx(kl, rel=1e-3)  # bf16 rounding is there, and measured as it is
    for name, log_p in (("base", fp32), ("swiftkv", bf16)):
        nll = -log_p.gather(-1, targets[:, None]).mean().item()
        assert fidelity[name]["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert fidelity["agreement"] == (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    # The recipe's trainable set in both: *_swiftkv float32 and trainable, every other weight frozen in its dtype.
    for student, dtype in ((model, torch.float32), (other, torch.bfloat16)):
        for name, param in student.named_parameters():
            assert param.requires_grad == ("swiftkv" in name), name
            assert param.dtype == (torch.float32 if "swiftkv" in name else dtype), name
