"""Small vLLM engines and the helpers the plugin's tests share.

Engines are small on purpose (fp32, eager, 256-token context, 16 MiB of KV cache, 64-token steps so prompts over
64 tokens are prefilled in chunks); tests share one per module where they can.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("SWIFTKV_VLLM_FIXTURES", REPO / "out" / "vllm_fixtures"))
KV_CACHE_BYTES = 16 << 20
BLOCK_SIZE = 32  # vLLM's CPU attention needs multiples of 32


def load_expected() -> dict:
    path = FIXTURES / "expected.json"
    if not path.exists():
        pytest.fail(
            f"{path} is missing: write the fixtures with the main venv first:\n"
            f"  .venv/bin/python vllm_plugin/tests/make_fixtures.py {FIXTURES}",
            pytrace=False,
        )
    return json.loads(path.read_text())


def make_llm(name: str, **overrides):
    """A small engine for fixture checkpoint `name` ("llama/g3", ...)."""
    from vllm import LLM

    args = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
    )
    return LLM(str(FIXTURES / name), **(args | overrides))


def cores_in_turn(ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` workers of one core each, round-robin over this process's cores."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[rank % len(cores)]) for rank in range(ranks))


def close_llm(llm) -> None:
    """Stop the engine's processes now rather than at interpreter exit (one engine alive at a time)."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def generate_ids(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids for each prompt, submitted together (concurrent requests of different lengths)."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def row_counts(llm) -> list[tuple[int, int]]:
    """(rows into layer 0, rows into layer L) of each forward since the last `clear_rows`."""
    from swiftkv_vllm.model import row_counts as read

    return [tuple(r) for r in llm.apply_model(read)[0]]


def clear_rows(llm) -> None:
    from swiftkv_vllm.model import clear_row_counts

    llm.apply_model(clear_row_counts)


def hook_layers(model) -> None:
    """For `apply_model`: forward pre-hooks on layer 0 and layer L that record the rows entering each.

    Evidence of the skipping independent of the model's own counter. Eager engines only: a compiled part runs its
    traced graph, not the hooks.
    """
    inner = model.model
    inner.hooked_rows = {"0": [], "L": []}
    inner.row_hooks = [
        inner.layers[index].register_forward_pre_hook(
            lambda module, args, key=key: inner.hooked_rows[key].append(args[1].shape[0])
        )
        for key, index in (("0", 0), ("L", inner.layout.num_key_value_layers))
    ]


def unhook_layers(model) -> dict[str, list[int]]:
    """For `apply_model`: remove the hooks of `hook_layers`; the rows they saw."""
    for handle in model.model.row_hooks:
        handle.remove()
    return model.model.hooked_rows


def counter(llm, name: str) -> float:
    """A vLLM counter metric summed over its label sets (e.g. "vllm:prefix_cache_hits")."""
    return sum(m.value for m in llm.get_metrics() if m.name == name)
