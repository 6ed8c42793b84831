"""Prefill skipping is real, it can be turned off, and prompt logprobs are never silently wrong."""

from __future__ import annotations

import pytest
from engines import clear_rows, close_llm, generate_ids, make_llm, row_counts
from swiftkv_vllm.plugin import FAST_PREFILL_ENV
from vllm import SamplingParams

LENGTHS = (5, 20, 30)  # 55 tokens: one 64-token step when admitted together


def prompts() -> list[list[int]]:
    return [list(range(3, 3 + n)) for n in LENGTHS]


@pytest.fixture(scope="module")
def fast():
    llm = make_llm("llama/g3")
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def full():
    """Fast prefill off through the environment variable (read while the engine's config is built)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAST_PREFILL_ENV, "0")
        llm = make_llm("llama/g3")
    yield llm
    close_llm(llm)


def test_layers_after_l_see_one_row_per_request_at_prefill(fast):
    clear_rows(fast)
    generate_ids(fast, prompts(), max_tokens=1)  # prefill only: each request samples once
    rows = row_counts(fast)
    assert sum(r[0] for r in rows) == sum(LENGTHS)  # every prompt token ran layers 0..L-1
    assert sum(r[1] for r in rows) == len(LENGTHS)  # one row per request ran layers L..N-1


def test_decode_rows_run_every_layer(fast):
    clear_rows(fast)
    generate_ids(fast, [list(range(3, 40))], max_tokens=4)
    decode_steps = [r for r in row_counts(fast) if r[0] == 1]
    assert decode_steps == [(1, 1)] * 3


def test_prompt_logprobs_refused_with_an_actionable_error(fast):
    with pytest.raises(Exception, match=f"SwiftKV.*{FAST_PREFILL_ENV}=0"):
        fast.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1, prompt_logprobs=1))


def test_environment_variable_turns_fast_prefill_off(full, expected):
    assert not full.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill
    clear_rows(full)
    assert generate_ids(full, expected["prompts"], expected["new_tokens"]) == expected["models"]["llama/g3"]["tokens"]
    rows = row_counts(full)
    assert rows and all(r[0] == r[1] for r in rows)  # every token ran every layer


def test_prompt_logprobs_with_fast_prefill_off(full):
    out = full.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(max_tokens=1, prompt_logprobs=1))
    logprobs = out[0].prompt_logprobs
    assert len(logprobs) == 4 and logprobs[0] is None and all(lp for lp in logprobs[1:])


def test_engine_argument_turns_fast_prefill_off(expected):
    llm = make_llm("qwen3/g1", hf_overrides={"swiftkv_fast_prefill": False})
    try:
        assert not llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill
        got = generate_ids(llm, expected["prompts"], expected["new_tokens"])
        assert got == expected["models"]["qwen3/g1"]["tokens"]
    finally:
        close_llm(llm)


def test_swiftkv_false_serves_the_base_model(expected):
    """`swiftkv: false` (here through hf_overrides) is the teacher: the base model's tokens, no fast prefill."""
    llm = make_llm("llama/g3", hf_overrides={"swiftkv": False})
    try:
        assert not llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill
        got = generate_ids(llm, expected["prompts"], expected["new_tokens"])
        assert got == expected["models"]["llama/base"]["tokens"]
    finally:
        close_llm(llm)
