"""SwiftKV adapters: base + adapter == the full distilled checkpoint; wrong bases are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import left_padded_batch, tiny_base
from test_distill_helpers import chat_file, tiny_config, tiny_model_dir
from transformers import AutoModelForCausalLM

from swiftkv import adapter as adapters
from swiftkv.cli import main
from swiftkv.conversion import convert
from swiftkv.distill.recipe import DistillRecipe
from swiftkv.loading import load
from swiftkv.modeling.weights import BlockLinear


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(base model dir, distill output dir) of a short tiny run with a float32 adapter and a full checkpoint."""
    root = tmp_path_factory.mktemp("adapter")
    model_dir = tiny_model_dir(root / "base")
    config = _l2g2_config(model_dir, root, "run", save_full_checkpoint=True, adapter_dtype="float32")
    DistillRecipe(config, quiet=True).run()
    return model_dir, root / "run"


def _l2g2_config(model_dir, root, out: str, **overrides):
    """The tiny recipe at L=2, g=2 on a chat file in `root`, writing to root/out."""
    data = chat_file(root / "chats.jsonl")
    return tiny_config(model_dir, data, root / out, num_key_value_layers=2, key_value_group_size=2, **overrides)


def _logits(model):
    ids, mask = left_padded_batch()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_base_plus_adapter_equals_full_checkpoint(distilled):
    base_dir, run = distilled
    full, _ = load(run / "model", weights="float32")  # bit for bit: loaded the same way, the same format and kernels
    applied, tokenizer = load(base_dir, adapter=run / "adapter", weights="float32")
    assert type(applied) is type(full) and applied.config.num_key_value_layers == 2
    assert torch.equal(_logits(applied), _logits(full))
    assert tokenizer.chat_template is not None
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert not torch.allclose(_logits(applied), _logits(convert(base, 2, 2)))  # the adapter carries the training


def test_adapter_holds_only_swiftkv_weights_and_the_layout(distilled):
    _, run = distilled
    config, tensors = adapters.read_adapter(run / "adapter")
    assert set(tensors) == {
        n for n in AutoModelForCausalLM.from_pretrained(run / "model").state_dict() if "swiftkv" in n
    }
    assert (config["num_key_value_layers"], config["key_value_group_size"], config["model_type"]) == (
        2,
        2,
        "llama_swiftkv",
    )
    assert config["base_model"]["family"] == "llama" and config["base_model"]["fingerprint"]
    assert config["distill"]["steps"] == 4 and config["num_parameters"] == sum(t.numel() for t in tensors.values())


def test_apply_adapter_cli_writes_a_snowflake_checkpoint(distilled, tmp_path):
    base_dir, run = distilled
    assert main(["apply-adapter", str(base_dir), str(run / "adapter"), str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["model_type"], written["swiftkv"], written["num_key_value_layers"]) == ("llama_swiftkv", True, 2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(loaded), _logits(AutoModelForCausalLM.from_pretrained(run / "model").eval()))
    assert main(["apply-adapter", str(base_dir), str(run / "adapter"), str(tmp_path / "out")]) == 2  # no overwrite


def test_bf16_adapter_is_half_the_size_and_close(distilled, tmp_path):
    base_dir, run = distilled
    full = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    config, _ = adapters.read_adapter(run / "adapter")
    adapters.write_adapter(
        tmp_path / "bf16", adapters.swiftkv_state(full), full.config, config["base_model"], dtype="bfloat16"
    )
    size = (tmp_path / "bf16" / adapters.WEIGHTS_NAME).stat().st_size
    assert size < 0.6 * (run / "adapter" / adapters.WEIGHTS_NAME).stat().st_size
    applied, _ = load(base_dir, adapter=tmp_path / "bf16", weights="float32")
    torch.testing.assert_close(_logits(applied), _logits(full), atol=1e-2, rtol=1e-2)


def test_adapter_refuses_another_base_model(distilled):
    _, run = distilled
    other = tiny_base("llama", seed=1)  # same architecture, different weights
    with pytest.raises(ValueError, match="weights differ"):
        adapters.apply_adapter(other, run / "adapter")
    adapters.apply_adapter(other, run / "adapter", check_base_weights=False)  # the user insists
    with pytest.raises(ValueError, match="different architecture: family=qwen2"):
        adapters.apply_adapter(tiny_base("qwen2"), run / "adapter")
    with pytest.raises(FileNotFoundError, match="is not a SwiftKV adapter"):
        adapters.apply_adapter(other, run)


def test_distillation_can_start_from_an_adapter(distilled, tmp_path):
    base_dir, run = distilled
    # init_adapter takes precedence over `init` (the example configs set init: least_squares)
    config = _l2g2_config(base_dir, tmp_path, "more", init_adapter=str(run / "adapter"), init="least_squares")
    recipe = DistillRecipe(config, quiet=True).setup()
    _, tensors = adapters.read_adapter(run / "adapter")
    for name, param in recipe.model.named_parameters():
        if "swiftkv" in name:
            assert torch.equal(param, tensors[name]), f"{name} does not start from the adapter"
    mismatched = dataclasses.replace(config, key_value_group_size=1, output_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="key_value_group_size=2, but this run trains L=2, g=1"):
        DistillRecipe(mismatched, quiet=True).setup()


def test_an_adapter_saved_from_a_model_in_blocks_applies_to_the_float_base(distilled, tmp_path):
    """A model loaded in int8 (the default without bf16 hardware) holds its base and SwiftKV layers as blocks: its
    adapter carries the projections' values, and its base fingerprint matches the float base it came from."""
    base_dir, run = distilled
    blocks, _ = load(base_dir, adapter=run / "adapter", weights="int8")
    saved = adapters.save_adapter(blocks, tmp_path / "a", dtype="float32")
    again, _ = load(base_dir, adapter=saved, weights="float32")
    projections = {n: m for n, m in blocks.named_modules() if "swiftkv" in n and isinstance(m, BlockLinear)}
    assert projections
    for name, layer in projections.items():
        assert torch.equal(again.get_submodule(name).weight, layer.dequantize()), name
