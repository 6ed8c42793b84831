"""SmolLM2-135M-Instruct converted with adapters/smollm2-L15-g1: vLLM's greedy tokens equal swiftkv's HF path.

Needs `make_fixtures.py OUT --real` (main venv: writes the checkpoint and the HF tokens). Slow: ~1 min on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engines import clear_rows, close_llm, generate_ids, make_llm, row_counts


@pytest.mark.slow
def test_smollm2_l15_g1_greedy_tokens_equal_hf(expected):
    real = expected.get("real")
    if real is None or not (Path(real["path"]) / "config.json").exists():
        pytest.fail("no real-model fixture: run `.venv/bin/python vllm_plugin/tests/make_fixtures.py OUT --real`")
    llm = make_llm(real["path"], max_model_len=512, max_num_batched_tokens=512, kv_cache_memory_bytes=64 << 20)
    try:
        assert llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill
        clear_rows(llm)
        assert generate_ids(llm, [real["prompt_ids"]], len(real["tokens"])) == [real["tokens"]]
        prefill = row_counts(llm)[0]
        assert prefill == (len(real["prompt_ids"]), 1)  # 30 layers, prompt tokens stopped after layer 15
    finally:
        close_llm(llm)
