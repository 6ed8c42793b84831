"""Integration on real weights (slow: minutes). Run with `python -m pytest -m slow`."""

from __future__ import annotations

import pytest
import torch
from test_modeling import reference_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftkv import embedded
from swiftkv.conversion import convert
from swiftkv.modeling.cache import measured_kv_bytes
from swiftkv.modeling.kernels import onednn_linears

pytestmark = pytest.mark.slow

PROMPT = "Summarise in one sentence: the railway reached the valley, the village grew toward the station. " * 20


def _real(model_dir_fn):
    try:
        path = model_dir_fn()
    except ModuleNotFoundError as missing:
        pytest.skip(str(missing))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-coder"])
def real(request):
    fn = {"smollm2": embedded.default_model_dir, "qwen2.5-coder": embedded.qwen_coder_dir}[request.param]
    return _real(fn)


@torch.inference_mode()
def test_real_model_parity_and_generation(real):
    base, tokenizer = real
    layers = base.config.num_hidden_layers
    model = convert(base, layers // 2, 1)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :400]
    mask = torch.ones_like(ids)
    model.config.swiftkv = False
    with onednn_linears(False):
        assert torch.equal(model(ids).logits, base(ids).logits)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-3, rtol=1e-4)  # oneDNN kernels
    model.config.swiftkv = True
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-4, rtol=1e-4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out, reference_greedy(model, ids, mask, 6))


@torch.inference_mode()
def test_real_model_acrosskv_bytes(real):
    base, tokenizer = real
    layers = base.config.num_hidden_layers
    num_kv, group = layers // 2, 3 if (layers - layers // 2) % 3 == 0 else 2
    model = convert(base, num_kv, group)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :200]
    swift = measured_kv_bytes(model(ids, use_cache=True, logits_to_keep=1).cache)
    model.config.swiftkv = False
    full = measured_kv_bytes(model(ids, use_cache=True, logits_to_keep=1).cache)
    assert swift / full == (num_kv + (layers - num_kv) / group) / layers


@torch.inference_mode()
@pytest.mark.parametrize("group", [1, 3])
def test_real_model_fast_decode_picks_the_stock_tokens(real, group):
    """generate's fast decode step (SwiftKVCache, oneDNN GEMVs) == transformers' DynamicCache path, 32 tokens."""
    base, tokenizer = real
    layers = base.config.num_hidden_layers
    model = convert(base, layers // 2, group)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :300]
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    for swift in (True, False):
        model.config.swiftkv = swift
        fast = model.generate(ids, **options)
        assert torch.equal(fast, model.generate(ids, cache_implementation="dynamic", **options))


def test_model_config_comes_from_a_gguf_or_the_default_dir_without_the_weights():
    from swiftkv.loading import load_model_config

    try:
        gguf = embedded.smollm2_gguf()
    except ModuleNotFoundError as missing:
        pytest.skip(str(missing))
    from_gguf, from_dir = load_model_config(gguf), load_model_config("default")
    assert from_gguf.model_type == from_dir.model_type == "llama"
    assert from_gguf.num_hidden_layers == from_dir.num_hidden_layers == 30
