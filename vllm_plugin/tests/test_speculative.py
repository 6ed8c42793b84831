"""n-gram speculative decoding with fast prefill on: the greedy tokens of speculation, prefill still skipped.

Per checkpoint, one engine with n-gram speculation and one without (the reference for generations longer than the
HF fixture's 8 tokens): the HF prompts give the HF tokens, and 40-token generations from repetitive prompts (where
n-gram proposes, and the tiny random models fall into loops it predicts) give the same tokens as without
speculation. The spec-decode counters prove drafts were proposed and accepted, so no test passes without
speculation. The engines are started once per checkpoint (about four starts in all).
"""

from __future__ import annotations

import pytest
from engines import clear_rows, close_llm, counter, generate_ids, make_llm, row_counts

NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
LONG_TOKENS = 40
DRAFTS, ACCEPTED = "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"


def repetitive(prompts: list[list[int]]) -> list[list[int]]:
    """Prompts whose n-grams recur: one repeated 6 times, a 10-token piece 5 times, and two plain ones."""
    return [prompts[0] * 6, prompts[1][:10] * 5, prompts[2][:40], prompts[3]]


@pytest.fixture(scope="module", params=["llama/g3", "qwen3/g1"])
def runs(request, expected) -> dict:
    """Everything the tests read, from both engines (one engine alive at a time)."""
    name, long_prompts = request.param, repetitive(expected["prompts"])
    llm = make_llm(name, speculative_config=NGRAM)
    try:
        run = {"name": name, "fast_prefill": llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill}
        clear_rows(llm)
        run["hf_prompts"] = generate_ids(llm, expected["prompts"], expected["new_tokens"])
        run["hf_prompts_drafts"] = counter(llm, DRAFTS)
        run["hf_prompts_rows"] = row_counts(llm)
        run["long"] = generate_ids(llm, long_prompts, LONG_TOKENS)
        run["drafts"], run["accepted"] = counter(llm, DRAFTS), counter(llm, ACCEPTED)
    finally:
        close_llm(llm)
    reference = make_llm(name)
    try:
        run["long_without_speculation"] = generate_ids(reference, long_prompts, LONG_TOKENS)
    finally:
        close_llm(reference)
    return run


def test_fast_prefill_stays_on_with_ngram(runs):
    assert runs["fast_prefill"]


def test_greedy_tokens_equal_hf_while_ngram_drafts(runs, expected):
    assert runs["hf_prompts_drafts"] > 0
    assert runs["hf_prompts"] == expected["models"][runs["name"]]["tokens"]


def test_long_generations_equal_no_speculation_with_accepted_drafts(runs):
    assert runs["accepted"] > 0, (runs["drafts"], runs["accepted"])
    assert runs["long"] == runs["long_without_speculation"]


def test_prefill_still_skips_layers_after_l(runs, expected):
    """Fewer rows through layer L than through layer 0, and prefill steps where each request sent one row (its
    logits row) through layer L while all its scheduled prompt tokens ran layers 0..L-1."""
    rows, requests = runs["hf_prompts_rows"], len(expected["prompts"])
    assert sum(r[1] for r in rows) < sum(r[0] for r in rows)
    assert any(r[0] > 8 * requests and r[1] <= requests for r in rows), rows
