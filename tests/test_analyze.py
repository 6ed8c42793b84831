"""`swiftkv analyze` on tiny random models: similarities, undistilled KL per L, and a monotone recommendation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_base
from test_evaluate import TEXT, char_tokenizer

from swiftkv import analyze as an
from swiftkv.cli import main
from swiftkv.conversion import convert
from swiftkv.evaluate.scoring import MODES, add_sums, sequence_stats, summarize_text


@pytest.fixture(scope="module")
def samples():
    tok = char_tokenizer()
    return [tok(text, return_tensors="pt")["input_ids"] for text in (TEXT, TEXT.upper(), TEXT[10:60])]


@pytest.fixture(scope="module")
def result(samples):
    return an.analyze(tiny_base("llama", num_layers=8), samples, candidates=None, group_size=1)


def test_candidates_and_shapes(result):
    assert [row["num_key_value_layers"] for row in result["candidates"]] == list(range(2, 8))
    assert len(result["layers"]) == 8
    cos = torch.tensor(result["cosine_matrix"])
    assert cos.shape == (9, 9)
    torch.testing.assert_close(cos.diagonal(), torch.ones(9))
    torch.testing.assert_close(cos, cos.T)
    savings = [row["prefill_saving"] for row in result["candidates"]]
    assert savings == sorted(savings, reverse=True)  # smaller L skips more


def test_kl_matches_a_full_evaluation_of_each_candidate(samples, result):
    """Student from the base model's own h_L == the converted model's full teacher/student forward."""
    base = tiny_base("llama", num_layers=8)
    for row in result["candidates"]:
        model = convert(base, row["num_key_value_layers"], 1)
        sums = {}
        for ids in samples:
            add_sums(sums, sequence_stats(model, ids, MODES))
        expected = summarize_text(sums)
        assert row["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-7)
        assert row["agreement"] == pytest.approx(expected["agreement"])
    last = result["candidates"][-1]  # L = N-1, g = 1: the student is the teacher at the reference init
    assert abs(last["kl"]) < 1e-6 and last["agreement"] == 1.0
    assert result["candidates"][0]["kl"] > last["kl"]


def test_recommendation_is_monotone_in_the_budget(result):
    budgets = sorted({row["kl"] for row in result["candidates"]} | {0.0, 1e-9, 1e9})
    picks = [an.recommend(result["candidates"], max_kl=b) for b in budgets]
    savings = [p["prefill_saving"] if p else -1.0 for p in picks]
    assert savings == sorted(savings)
    assert picks[-1]["num_key_value_layers"] == 2  # unlimited budget: the largest saving
    for budget, pick in zip(budgets, picks, strict=True):
        assert pick is None or pick["kl"] <= budget


def test_recommendation_is_monotone_even_when_kl_is_not_monotone_in_L():
    rows = [
        {"num_key_value_layers": L, "prefill_saving": (10 - L) / 10, "kl": kl, "agreement": 1 - kl}
        for L, kl in [(4, 0.9), (5, 0.3), (6, 0.5), (7, 0.1), (8, 0.2), (9, 0.0)]
    ]
    chosen = [an.recommend(rows, max_kl=b)["num_key_value_layers"] for b in (0.0, 0.1, 0.2, 0.3, 0.5, 0.9)]
    assert chosen == [9, 7, 7, 5, 5, 4]
    assert an.recommend(rows, min_agreement=0.75)["num_key_value_layers"] == 7
    assert an.recommend(rows, max_kl=-1.0) is None


def test_acrosskv_candidates_respect_group_size():
    assert an.candidate_layers(12, group_size=3) == [3, 6, 9]
    assert an.candidate_layers(30, group_size=1)[0] == 8


def test_tables_and_plot(result, tmp_path):
    chosen = an.recommend(result["candidates"], max_kl=1e9)
    table = an.format_table(result, chosen)
    assert "<- recommended" in table and len(table.splitlines()) == 1 + len(result["candidates"])
    assert len(an.format_layers(result).splitlines()) == 9
    png = an.plot(result, tmp_path / "a.png", chosen, max_kl=0.1)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_analyze(tmp_path, capsys):
    checkpoint = tmp_path / "base"
    tiny_base("qwen3", num_layers=4).save_pretrained(checkpoint)
    char_tokenizer().save_pretrained(checkpoint)
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in (TEXT, TEXT[::-1])))
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    args = ["analyze", str(checkpoint), "--text", str(text), "--json", str(out), "--plot", str(png)]
    assert main([*args, "--max-kl", "1e9", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "recommended for KL <= 1e+09" in printed and "L=1" in printed
    saved = json.loads(out.read_text())
    assert saved["recommended"] == 1 and saved["samples"] == 2 and png.exists()


def test_cli_analyze_in_a_block_format(tmp_path, capsys):
    """--weights int8: the candidates are converted from the float weights, then the base and each candidate take
    int8 blocks (conversion cannot read blocks)."""
    checkpoint = tmp_path / "base"
    tiny_base("qwen3", num_layers=4).save_pretrained(checkpoint)
    char_tokenizer().save_pretrained(checkpoint)
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": TEXT}))
    args = ["analyze", str(checkpoint), "--text", str(text), "--weights", "int8", "--threads", "1"]
    assert main([*args, "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["candidates"]
