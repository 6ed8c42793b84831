"""The layout, checkpoint-name and engine-config rules, without an engine (seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from swiftkv_vllm.configs import LlamaSwiftKVConfig, Qwen3SwiftKVConfig, SwiftKVLayout
from swiftkv_vllm.model import SwiftKVKeyValues, _check_quantized_storage, _skipped, _target
from swiftkv_vllm.plugin import _select_cudagraph_mode, fast_prefill_requested


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


def test_checkpoint_names_map_onto_the_stacked_swiftkv_key_values():
    """Each leader's k/v_proj_swiftkv is a shard of one stacked GEMM: keys of groups 0..G-1, then their values."""
    leaders = SwiftKVLayout(num_layers=6, num_key_value_layers=3, group_size=1).leaders  # 3, 4, 5: G = 3
    stacked = "model.key_values.kv_proj_swiftkv"
    assert _target("model.layers.3.self_attn.k_proj_swiftkv.weight", leaders) == (f"{stacked}.weight", 0)
    assert _target("model.layers.5.self_attn.k_proj_swiftkv.bias", leaders) == (f"{stacked}.bias", 2)
    assert _target("model.layers.4.self_attn.v_proj_swiftkv.weight", leaders) == (f"{stacked}.weight", 4)
    # a pipeline stage of layers 4 and 5 stacks only its own groups: layer 4 is its group 0
    assert _target("model.layers.4.self_attn.k_proj_swiftkv.weight", [4, 5]) == (f"{stacked}.weight", 0)
    assert _target("model.layers.5.self_attn.v_proj_swiftkv.weight", [4, 5]) == (f"{stacked}.weight", 3)
    assert _target("model.layers.4.self_attn.q_proj_swiftkv.weight", leaders) == (
        "model.layers.4.self_attn.q_proj_swiftkv.weight",
        None,
    )
    assert _target("model.layers.1.self_attn.k_proj.weight", leaders) == (
        "model.layers.1.self_attn.qkv_proj.weight",
        "k",
    )
    with pytest.raises(ValueError):  # not a leader under g=3: the loader reports it as unexpected
        _target("model.layers.4.self_attn.k_proj_swiftkv.weight", SwiftKVLayout(6, 3, 3).leaders)


def engine_config(name: str, **overrides):
    """The engine config vLLM would build for fixture `name` (no engine, no weights)."""
    from engines import FIXTURES
    from vllm.engine.arg_utils import EngineArgs

    args = dict(dtype="float32", max_model_len=256, block_size=32) | overrides
    return EngineArgs(str(FIXTURES / name), **args).create_engine_config()


def test_a_changed_layout_never_reuses_a_compile_cache(expected):
    """vLLM keys its compile cache on the config hash: every layout, the base mode and fast prefill off differ."""
    hashes = [
        engine_config("llama/g3").compute_hash(),
        engine_config("llama/g1").compute_hash(),
        engine_config("llama/g3", hf_overrides={"swiftkv": False}).compute_hash(),
        engine_config("llama/g3", hf_overrides={"swiftkv_fast_prefill": False}).compute_hash(),
        engine_config("llama/g3", hf_overrides={"num_key_value_layers": 4, "key_value_group_size": 2}).compute_hash(),
    ]
    assert len(set(hashes)) == len(hashes)
    assert engine_config("llama/g3").compute_hash() == hashes[0]  # and the same layout does reuse it


@pytest.mark.parametrize(
    ("asked", "runs"),
    [
        ("FULL", "FULL_AND_PIECEWISE"),  # a full graph of every row must not replay for prefill steps
        ("FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE"),
        ("FULL_DECODE_ONLY", "FULL_DECODE_ONLY"),
        ("PIECEWISE", "PIECEWISE"),
        ("NONE", "NONE"),
    ],
)
def test_cudagraph_mode_never_freezes_the_kept_rows(asked, runs, expected):
    """The config hook's choice, read before the CPU platform turns CUDA graphs off."""
    from vllm.config import CUDAGraphMode

    config = engine_config("llama/g3")
    config.compilation_config.cudagraph_mode = CUDAGraphMode[asked]
    _select_cudagraph_mode(config)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode[runs]


def test_a_float_tensor_for_quantized_storage_is_refused():
    """E.g. a config that leaves one leader's k_proj_swiftkv unquantized: the stacked int8 K/V would round it."""
    param = torch.zeros(4, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="model.layers.3.self_attn.k_proj_swiftkv.weight is torch.bfloat16"):
        _check_quantized_storage(
            "model.layers.3.self_attn.k_proj_swiftkv.weight",
            "model.key_values.kv_proj_swiftkv.weight",
            param,
            torch.zeros(4, 4, dtype=torch.bfloat16),
        )
    _check_quantized_storage("w", "w", param, torch.zeros(4, 4, dtype=torch.int8))  # int8 into int8: loads
    _check_quantized_storage("w", "w", torch.zeros(4), torch.zeros(4))  # unquantized parameters take floats


def test_replicated_kv_heads_repeat_every_per_row_tensor():
    """TP = 2 x Hkv: each K/V head's rows repeat along the parameter's output dim (weight, bias, per-channel scales,
    packed columns), so rank r's slice is head r // 2; per-tensor scales stay as they are; a tensor whose rows do not
    split into heads (a block scale wider than a head) is refused, naming it."""
    key_values = SimpleNamespace(shape=SimpleNamespace(kv_head_replicas=2, total_kv_heads=2))

    def replicate(tensor, param, name="t"):
        return SwiftKVKeyValues.replicate_kv_heads(key_values, name, tensor, param)

    rows, by_head = torch.arange(4.0), [0, 1, 0, 1, 2, 3, 2, 3]  # 2 heads of 2 rows
    assert replicate(rows[:, None].expand(4, 3), SimpleNamespace(output_dim=0))[:, 0].tolist() == by_head
    assert replicate(rows[None, :], SimpleNamespace(output_dim=1))[0].tolist() == by_head
    per_tensor = torch.tensor(0.5)
    assert replicate(per_tensor, SimpleNamespace()) is per_tensor  # no output dim: one value per shard
    name = "model.layers.3.self_attn.k_proj_swiftkv.weight_scale"
    with pytest.raises(ValueError, match=rf"{name} \(1, 2\)"):
        replicate(torch.ones(1, 2), SimpleNamespace(output_dim=0), name)
