"""Batched offline generation: equals one-by-one generation, resumes without duplicates or losses."""

from __future__ import annotations

import json
import random

import pytest
from conftest import tiny_base, tiny_tokenizer

from swiftkv import batch
from swiftkv.conversion import convert


@pytest.fixture
def model():
    swift = convert(tiny_base("llama"), 3, 3)
    swift.generation_config.eos_token_id = 2
    return swift


def write_prompts(path, count: int = 7) -> None:
    rng = random.Random(0)
    lines = []
    for i in range(count):
        words = " ".join(f"w{rng.randrange(8, 128)}" for _ in range(rng.randrange(3, 15)))
        record = (
            {"id": f"p{i}", "prompt": words}
            if i % 3
            else {"id": f"p{i}", "messages": [{"role": "user", "content": words}]}
        )
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def read_results(path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_batched_equals_one_by_one(model, tmp_path):
    write_prompts(tmp_path / "in.jsonl")
    tokenizer = tiny_tokenizer()
    batch.run(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "b3.jsonl", batch_size=3, max_new_tokens=6)
    batch.run(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "b1.jsonl", batch_size=1, max_new_tokens=6)
    batched, single = read_results(tmp_path / "b3.jsonl"), read_results(tmp_path / "b1.jsonl")
    assert sorted(batched) == [f"p{i}" for i in range(7)]
    for key in single:
        assert batched[key]["output"] == single[key]["output"]
        assert batched[key]["prompt_tokens"] == single[key]["prompt_tokens"]


def test_interrupted_run_resumes_without_duplicates_or_losses(model, tmp_path, monkeypatch):
    write_prompts(tmp_path / "in.jsonl")
    tokenizer = tiny_tokenizer()
    out = tmp_path / "out.jsonl"
    real_generate, calls = batch.generate_batch, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(batch, "generate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        batch.run(model, tokenizer, tmp_path / "in.jsonl", out, batch_size=2, max_new_tokens=4)
    with out.open("a") as f:
        f.write('{"id": "p9", "outp')  # a torn line, as after a kill mid-write
    monkeypatch.setattr(batch, "generate_batch", real_generate)
    stats = batch.run(model, tokenizer, tmp_path / "in.jsonl", out, batch_size=2, max_new_tokens=4)
    assert stats["skipped_already_done"] == 4 and stats["generated"] == 3
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == [f"p{i}" for i in range(7)]


def test_bad_line_is_named_or_skipped(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "w5 w6"}\n{"text": "no prompt"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2 needs a 'prompt' string or a 'messages' list"):
        batch.read_prompts(path)
    assert [r["id"] for r in batch.read_prompts(path, skip_bad=True)] == [1]
