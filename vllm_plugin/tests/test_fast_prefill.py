"""Prefill skipping is real, it can be turned off, and prompt logprobs are never silently wrong."""

from __future__ import annotations

import pytest
from engines import clear_rows, close_llm, generate_ids, hook_layers, make_llm, row_counts, unhook_layers
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
def compiled():
    """vLLM's default: the SwiftKV model compiled in two parts around the row gather."""
    llm = make_llm("llama/g3", enforce_eager=False)
    assert llm.llm_engine.vllm_config.compilation_config.mode.value != 0
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def full():
    """Fast prefill off through the environment variable (read while the engine's config is built); compiled, so
    fast prefill off is covered compiled here and eager by `test_engine_argument_turns_fast_prefill_off`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAST_PREFILL_ENV, "0")
        llm = make_llm("llama/g3", enforce_eager=False)
    yield llm
    close_llm(llm)


def test_layers_after_l_see_one_row_per_request_at_prefill(fast):
    clear_rows(fast)
    generate_ids(fast, prompts(), max_tokens=1)  # prefill only: each request samples once
    rows = row_counts(fast)
    assert sum(r[0] for r in rows) == sum(LENGTHS)  # every prompt token ran layers 0..L-1
    assert sum(r[1] for r in rows) == len(LENGTHS)  # one row per request ran layers L..N-1


def test_forward_hooks_on_layer_0_and_layer_l_see_the_skipping(fast):
    """The same figures from hooks on the layers themselves, not from the model's counter."""
    fast.apply_model(hook_layers)
    generate_ids(fast, prompts(), max_tokens=1)
    rows = fast.apply_model(unhook_layers)[0]
    assert sum(rows["0"]) == sum(LENGTHS) and sum(rows["L"]) == len(LENGTHS)


def test_compiled_model_skips_too(compiled, expected):
    """Compiled: prefill rows stop at layer L (the rows handed to the compiled suffix), decode rows run every layer,
    and the tokens of concurrent prompts of different lengths are the HF model's."""
    clear_rows(compiled)
    generate_ids(compiled, prompts(), max_tokens=1)
    rows = row_counts(compiled)
    assert sum(r[0] for r in rows) == sum(LENGTHS) and sum(r[1] for r in rows) == len(LENGTHS)
    clear_rows(compiled)
    assert (
        generate_ids(compiled, expected["prompts"], expected["new_tokens"]) == expected["models"]["llama/g3"]["tokens"]
    )
    rows = row_counts(compiled)
    assert sum(r[1] for r in rows) < sum(r[0] for r in rows)
    assert any(r[0] == r[1] == len(expected["prompts"]) for r in rows)  # a decode step of all 4: every row


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


def test_prompt_logprobs_with_fast_prefill_off(full, expected):
    """Served, and equal to the HF full forward's log p(token | prefix) (fp32 on both sides: 1e-4 is float noise)."""
    prompt = expected["logprob_prompt"]
    out = full.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=1))
    logprobs = out[0].prompt_logprobs
    assert len(logprobs) == len(prompt) and logprobs[0] is None
    got = [logprobs[i][token].logprob for i, token in enumerate(prompt) if i > 0]
    assert got == pytest.approx(expected["models"]["llama/g3"]["prompt_logprobs"], abs=1e-4)


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
