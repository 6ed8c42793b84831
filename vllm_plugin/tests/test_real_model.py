"""SmolLM2-135M-Instruct converted with the bundled smollm2-L15-g1: vLLM's greedy tokens against swiftkv's HF path.

Needs `make_fixtures.py OUT --real` (main venv: writes the checkpoint and the HF tokens in float32 and bfloat16).
float32: the greedy tokens are equal, compiled and eager. bfloat16 (what vLLM runs by default): two implementations
round differently, so a free-running greedy path parts at the first near tie and never meets again; what can be
checked is each step on the same prefix: vLLM's next token after the prompt + the first k HF tokens must equal
HF's token k wherever HF's top-1 / top-2 logit gap exceeds BF16_TIE. The agreement on all steps is printed.
Slow: ~1 min per engine on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engines import clear_rows, close_llm, generate_ids, make_llm, row_counts

BF16_TIE = 0.5  # logits: gaps below this are within what bf16 rounding moves over 30 layers (docs/vllm.md)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["compiled", "eager"])
def test_smollm2_l15_g1_greedy_tokens_against_hf(expected, dtype, mode):
    real = expected.get("real")
    if real is None or "runs" not in real or not (Path(real["path"]) / "config.json").exists():
        pytest.fail("no real-model fixture: run `.venv/bin/python vllm_plugin/tests/make_fixtures.py OUT --real`")
    prompt, want, gaps = real["prompt_ids"], real["runs"][dtype]["tokens"], real["runs"][dtype]["gaps"]
    llm = make_llm(
        real["path"],
        dtype=dtype,
        enforce_eager=mode == "eager",
        max_model_len=512,
        max_num_batched_tokens=512,
        kv_cache_memory_bytes=64 << 20,
    )
    try:
        assert llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill
        clear_rows(llm)
        got = generate_ids(llm, [prompt], len(want))[0]
        assert row_counts(llm)[0] == (len(prompt), 1)  # 30 layers, prompt tokens stopped after layer 15
        # Each step on HF's own prefix (teacher forcing): one request per step, all in one batch.
        steps = [ids[0] for ids in generate_ids(llm, [prompt + want[:k] for k in range(len(want))], 1)]
    finally:
        close_llm(llm)
    agree = sum(s == w for s, w in zip(steps, want, strict=True))
    print(
        f"{dtype} {mode}: free-running, first {common_prefix(got, want)} of {len(want)} tokens equal; "
        f"on HF's prefix, {agree} of {len(want)} steps agree (smallest HF gap where not: "
        f"{min((g for s, w, g in zip(steps, want, gaps, strict=True) if s != w), default=None)})"
    )
    if dtype == "float32":
        assert got == want and steps == want
    else:
        wrong = [(k, gaps[k]) for k in range(len(want)) if steps[k] != want[k] and gaps[k] >= BF16_TIE]
        assert not wrong, f"steps whose HF token led by >= {BF16_TIE} logits, and vLLM chose another: {wrong}"
