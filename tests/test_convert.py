"""Conversion initialisation, Snowflake-format checkpoints, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import left_padded_batch, tiny_base
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from swiftkv.config import LlamaSwiftKVConfig
from swiftkv.conversion import convert, resolve_num_key_value_layers, save_atomic


def test_initialisation_follows_the_recipe(family):
    base = tiny_base(family)
    model = convert(base, num_key_value_layers=2, key_value_group_size=2)
    layers, base_layers = model.model.layers, base.model.layers
    assert torch.equal(model.model.norm_swiftkv.weight, base_layers[2].input_layernorm.weight)
    for idx in range(2, 6):
        attention = layers[idx].self_attn
        assert torch.equal(attention.q_proj_swiftkv.weight, base_layers[idx].self_attn.q_proj.weight)
        leader = idx % 2 == 0
        assert hasattr(attention, "k_proj_swiftkv") == leader and hasattr(attention, "v_proj_swiftkv") == leader
        if leader:
            group = [base_layers[j].self_attn for j in (idx, idx + 1)]
            for name in ("k_proj", "v_proj"):
                mean = (getattr(group[0], name).weight + getattr(group[1], name).weight) / 2
                torch.testing.assert_close(getattr(attention, f"{name}_swiftkv").weight, mean, atol=0, rtol=0)
                if family == "qwen2":
                    mean_bias = (getattr(group[0], name).bias + getattr(group[1], name).bias) / 2
                    torch.testing.assert_close(getattr(attention, f"{name}_swiftkv").bias, mean_bias, atol=0, rtol=0)
    for idx in range(2):
        assert not hasattr(layers[idx].self_attn, "q_proj_swiftkv")


def expected_swiftkv_keys(num_layers: int, num_kv_layers: int, group: int, bias: bool) -> set[str]:
    """The extra weight names of Snowflake's checkpoint format (as in Snowflake's published checkpoints)."""
    keys = {"model.norm_swiftkv.weight"}
    suffixes = ("weight", "bias") if bias else ("weight",)
    for idx in range(num_kv_layers, num_layers):
        projections = ["q"] + (["k", "v"] if (idx - num_kv_layers) % group == 0 else [])
        keys |= {f"model.layers.{idx}.self_attn.{p}_proj_swiftkv.{s}" for p in projections for s in suffixes}
    return keys


def test_checkpoint_round_trip(family, tmp_path):
    base = tiny_base(family)
    model = convert(base, 3, 3)
    save_atomic(tmp_path / "ck", False, model)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == f"{family}_swiftkv"
    assert config["architectures"][0].endswith("SwiftKVForCausalLM")
    assert (config["swiftkv"], config["num_key_value_layers"], config["key_value_group_size"]) == (True, 3, 3)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert type(loaded) is type(model)
    added = {k for k in loaded.state_dict() if "swiftkv" in k}
    assert added == expected_swiftkv_keys(6, 3, 3, bias=family == "qwen2")
    ids, mask = left_padded_batch()
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_loads_a_checkpoint_written_by_hand_in_snowflakes_format(tmp_path):
    """No save_pretrained of ours: config.json and safetensors written from the published format only."""
    base = tiny_base("llama", seed=3)
    base.config.tie_word_embeddings = False
    state = {k: v.clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for key in expected_swiftkv_keys(6, 4, 2, bias=False):
        like = state[key.replace("_swiftkv", "")] if "proj" in key else state["model.norm.weight"]
        state[key] = torch.randn(like.shape, generator=gen)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = base.config.to_dict() | {
        "model_type": "llama_swiftkv",
        "architectures": ["LlamaSwiftKVForCausalLM"],
        "swiftkv": True,
        "num_key_value_layers": 4,
        "key_value_group_size": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # Same logits as a hand computation of layer 4's SwiftKV path would need the whole forward; instead check
    # the weights drive the output: perturbing a SwiftKV weight changes the logits.
    ids, _ = left_padded_batch(lengths=(7,))
    before = model(ids).logits
    with torch.no_grad():
        model.model.layers[4].self_attn.k_proj_swiftkv.weight.mul_(2)
    assert not torch.allclose(model(ids).logits, before)


def test_checkpoint_with_wrong_swiftkv_keys_is_refused(tmp_path):
    model = convert(tiny_base("llama"), 3, 3)
    save_atomic(tmp_path / "ck", False, model)
    config_path = tmp_path / "ck" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"key_value_group_size": 1}))
    with pytest.raises(ValueError, match=r"missing model.layers.4.self_attn.k_proj_swiftkv"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    model = convert(tiny_base("llama"), 3, 1)
    save_atomic(tmp_path / "ck", False, model)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ck" / "model.safetensors")
    state["model.layers.3.self_attn.q_proj_swiftkv.weight"] = torch.zeros(8, 32)
    save_file(state, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj_swiftkv.weight has shape \(8, 32\) in the checkpoint but \(32, 32\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize(
    ("num_kv_layers", "group", "message"),
    [
        (0, 1, r"num_key_value_layers=0 is invalid.*between 1 and 6"),
        (7, 1, r"num_key_value_layers=7 is invalid.*between 1 and 6"),
        (2, 3, r"key_value_group_size=3 does not divide the 4 SwiftKV layers.*\[1, 2, 4\]"),
        (2, 0, r"key_value_group_size=0 is invalid"),
    ],
)
def test_bad_layouts_name_the_value_and_the_valid_range(num_kv_layers, group, message):
    with pytest.raises(ValueError, match=message):
        convert(tiny_base("llama"), num_kv_layers, group)
    with pytest.raises(Exception, match=message):  # transformers wraps it in a strict-dataclass error
        LlamaSwiftKVConfig(num_hidden_layers=6, num_key_value_layers=num_kv_layers, key_value_group_size=group)


def test_unsupported_family_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"Unsupported model family 'gpt2'.*llama, mistral, qwen2, qwen3"):
        convert(gpt2, 1)


def test_mixed_sliding_layers_are_refused():
    base = tiny_base("qwen2")
    base.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * 3
    with pytest.raises(ValueError, match=r"layers \[3, 4, 5\] use sliding-window attention"):
        convert(base, 3)


def test_skip_fraction_and_layer_count_spellings():
    assert resolve_num_key_value_layers(30, None, 0.5) == 15
    assert resolve_num_key_value_layers(30, 20, None) == 20
    with pytest.raises(ValueError, match="exactly one"):
        resolve_num_key_value_layers(30, 15, 0.5)
    with pytest.raises(ValueError, match=r"skip=1.0 is invalid"):
        resolve_num_key_value_layers(30, None, 1.0)


def test_save_refuses_a_non_empty_directory_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    model = convert(tiny_base("llama"), 3)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_atomic(out, False, model)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    save_atomic(out, True, model)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    class Exploding:
        def save_pretrained(self, path):
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomic(tmp_path / "out", False, Exploding())
    assert list(tmp_path.iterdir()) == []
