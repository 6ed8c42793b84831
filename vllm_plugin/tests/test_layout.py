"""The layout and checkpoint-name rules, without an engine (milliseconds)."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from swiftkv_vllm.configs import LlamaSwiftKVConfig, Qwen3SwiftKVConfig, SwiftKVLayout
from swiftkv_vllm.model import _skipped
from swiftkv_vllm.plugin import fast_prefill_requested


def test_layout_groups_and_cache_entries():
    layout = SwiftKVLayout(num_layers=30, num_key_value_layers=15, group_size=3)
    assert layout.leaders == [15, 18, 21, 24, 27]
    assert [layout.leader_of(i) for i in (15, 16, 17, 18, 29)] == [15, 15, 15, 18, 27]
    assert layout.cache_entries == 20  # L + (N - L) / g


def test_base_mode_has_no_swiftkv_layer():
    config = LlamaSwiftKVConfig(num_hidden_layers=6, swiftkv=False, num_key_value_layers=3)
    assert not SwiftKVLayout.of(config).skips


@pytest.mark.parametrize(
    ("layers", "group", "message"),
    [(7, 1, "between 1 and 6"), (3, 2, "does not divide the 3 SwiftKV layers"), (3, 0, "must be >= 1")],
)
def test_bad_layouts_name_the_value(layers, group, message):
    with pytest.raises(ValueError, match=message):
        SwiftKVLayout(num_layers=6, num_key_value_layers=layers, group_size=group)


def test_configs_validate_when_read():
    with pytest.raises(StrictDataclassClassValidationError, match="does not divide"):
        Qwen3SwiftKVConfig(num_hidden_layers=6, swiftkv=True, num_key_value_layers=3, key_value_group_size=2)


def test_checkpoint_tensors_the_student_does_not_use():
    layout = SwiftKVLayout(num_layers=6, num_key_value_layers=3, group_size=3)
    assert _skipped("model.layers.4.self_attn.q_proj.weight", layout, tied=False)  # teacher projection
    assert not _skipped("model.layers.2.self_attn.q_proj.weight", layout, tied=False)  # layer < L
    assert not _skipped("model.layers.4.self_attn.q_proj_swiftkv.weight", layout, tied=False)
    assert _skipped("model.layers.4.self_attn.k_norm.weight", layout, tied=False)  # non-leader (qwen3)
    assert not _skipped("model.layers.3.self_attn.k_norm.weight", layout, tied=False)  # the leader's
    assert _skipped("lm_head.weight", layout, tied=True) and not _skipped("lm_head.weight", layout, tied=False)
    base = SwiftKVLayout(num_layers=6, num_key_value_layers=6, group_size=1)
    assert _skipped("model.norm_swiftkv.weight", base, tied=False)


def test_fast_prefill_switches(monkeypatch):
    config = LlamaSwiftKVConfig(num_hidden_layers=6, swiftkv=True, num_key_value_layers=3)
    assert fast_prefill_requested(config)
    monkeypatch.setenv("SWIFTKV_VLLM_FAST_PREFILL", "0")
    assert not fast_prefill_requested(config)
    monkeypatch.setenv("SWIFTKV_VLLM_FAST_PREFILL", "maybe")
    with pytest.raises(ValueError, match="use 1"):
        fast_prefill_requested(config)
    monkeypatch.delenv("SWIFTKV_VLLM_FAST_PREFILL")
    config.swiftkv_fast_prefill = False  # what --hf-overrides '{"swiftkv_fast_prefill": false}' sets
    assert not fast_prefill_requested(config)
