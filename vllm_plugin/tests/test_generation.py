"""vLLM's greedy tokens equal swiftkv's HF model's, for every family and layout, with fast prefill on, compiled
(vLLM's default: the two compiled parts around the row gather) and eager.

One engine per checkpoint and mode serves every test here: 4 concurrent prompts of 5..101 tokens (the ones over 64
are prefilled in 64-token chunks), a repeated prompt served from the prefix cache, and the KV-cache block count.
"""

from __future__ import annotations

import pytest
from engines import close_llm, counter, generate_ids, make_llm

CHECKPOINTS = [f"{family}/{layout}" for family in ("llama", "mistral", "qwen2", "qwen3") for layout in ("g1", "g3")]
MODES = {"compiled": False, "eager": True}  # mode -> enforce_eager


@pytest.fixture(scope="module", params=[(c, m) for m in MODES for c in CHECKPOINTS], ids="-".join)
def engine(request):
    name, mode = request.param
    llm = make_llm(name, enforce_eager=MODES[mode])
    assert (llm.llm_engine.vllm_config.compilation_config.mode.value != 0) == (mode == "compiled")
    yield name, llm
    close_llm(llm)


@pytest.fixture(scope="module")
def base_blocks(expected) -> int:
    """KV-cache blocks of the base model (vLLM's stock LlamaForCausalLM) in the same memory; its greedy tokens
    must equal transformers' too, or the comparisons here would measure float noise rather than the plugin."""
    llm = make_llm("llama/base")
    try:
        assert (
            generate_ids(llm, expected["prompts"], expected["new_tokens"]) == expected["models"]["llama/base"]["tokens"]
        )
        return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        close_llm(llm)


def test_fast_prefill_is_on(engine):
    _, llm = engine
    assert llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill


def test_greedy_tokens_equal_hf(engine, expected):
    name, llm = engine
    got = generate_ids(llm, expected["prompts"], expected["new_tokens"])
    assert got == expected["models"][name]["tokens"]


def test_prefix_cache_hit_gives_the_same_tokens(engine, expected):
    name, llm = engine
    prompt, want = expected["prompts"][-1], expected["models"][name]["tokens"][-1]  # 101 tokens: 3 full blocks
    assert generate_ids(llm, [prompt], expected["new_tokens"]) == [want]
    hits = counter(llm, "vllm:prefix_cache_hits")
    assert generate_ids(llm, [prompt], expected["new_tokens"]) == [want]
    assert counter(llm, "vllm:prefix_cache_hits") - hits >= 96


def test_kv_cache_blocks_follow_acrosskv(engine, expected, base_blocks):
    """Same KV memory: blocks(SwiftKV) / blocks(base) = N / (L + (N - L) / g), within one block.

    Every fixture model has the same per-layer K/V size (1 K/V head of 32), so llama's base count serves all.
    """
    name, llm = engine
    n, kv_layers, group = expected["layers"], expected["kv_layers"], int(name[-1])
    ratio = n / (kv_layers + (n - kv_layers) / group)
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert abs(blocks - ratio * base_blocks) <= 1, (blocks, base_blocks, ratio)
