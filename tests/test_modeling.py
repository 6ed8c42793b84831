"""Parity tests of the three forward modes, cached decoding and generate, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_base
from transformers import DynamicCache

from swiftkv.conversion import convert
from swiftkv.modeling.cache import measured_kv_bytes
from swiftkv.modeling.kernels import onednn_linears
from swiftkv.modeling.native import native_decode

TIGHT = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture
def pair(family):
    """(stock base model, SwiftKV conversion of it with L=3, g=1)."""
    base = tiny_base(family)
    return base, convert(base, num_key_value_layers=3, key_value_group_size=1)


def test_swiftkv_off_is_bit_identical_to_stock(pair):
    base, model = pair
    ids, mask = left_padded_batch()
    model.config.swiftkv = False
    with onednn_linears(False):  # the stock kernels: bit for bit
        assert torch.equal(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)
    with torch.no_grad():  # oneDNN products (CPU, float32, no gradient): float32 rounding apart
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("layout", [(3, 1), (2, 2), (3, 3), (6, 1)])
def test_fast_prefill_equals_full_forward_on_kept_tokens(family, layout):
    model = convert(tiny_base(family), *layout)
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits
    for keep in (1, 3):
        fast = model(ids, attention_mask=mask, logits_to_keep=keep).logits
        torch.testing.assert_close(fast, full[:, -keep:], **TIGHT)


def test_skipping_really_skips(pair):
    """Prompt tokens must not enter layers >= L when only the last logit is asked for."""
    _, model = pair
    seen = []
    model.model.layers[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    ids, mask = left_padded_batch()
    model(ids, attention_mask=mask, logits_to_keep=1)
    model(ids, attention_mask=mask)  # full forward: every token
    assert seen == [1, ids.shape[1]]


@pytest.mark.parametrize("request_all", ["labels", "logits_to_keep=0", "tensor"])
def test_requests_for_all_logits_use_the_full_forward(pair, request_all):
    _, model = pair
    ids, _ = left_padded_batch(lengths=(10, 10))
    full = model(ids).logits
    kwargs = {
        "labels": {"labels": ids},
        "logits_to_keep=0": {"logits_to_keep": 0},
        "tensor": {"logits_to_keep": torch.arange(ids.shape[1])},
    }[request_all]
    out = model(ids, **kwargs)
    torch.testing.assert_close(out.logits, full, **TIGHT)
    if request_all == "labels":
        reference = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, reference, **TIGHT)


def test_swiftkv_equals_base_when_only_layer_L_is_converted(family):
    """L = N-1, g = 1: at initialisation layer L's SwiftKV K/V/Q are exactly its own projections of
    input_layernorm(h_L) (for Qwen3 with the layer's own q_norm/k_norm), so the model is the base model."""
    base = tiny_base(family)
    model = convert(base, num_key_value_layers=5, key_value_group_size=1)
    ids, mask = left_padded_batch()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits, **TIGHT)


@pytest.mark.parametrize("layout", [(3, 1), (2, 2)])
def test_cached_decoding_equals_full_recompute(family, layout):
    model = convert(tiny_base(family), *layout)
    ids, mask = left_padded_batch()
    cache = DynamicCache(config=model.config)
    step = model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    for _ in range(4):
        next_ids = step.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        step = model(next_ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(ids, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(step.logits[:, -1], full[:, -1], **TIGHT)


def reference_greedy(model, ids, mask, new_tokens: int) -> torch.Tensor:
    """No cache, full forward over the whole sequence at every step (the slow, obviously-right loop)."""
    for _ in range(new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        next_ids = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)
    return ids


@pytest.mark.parametrize("layout", [(3, 1), (3, 3)])
def test_greedy_generate_equals_reference_loop(family, layout):
    model = convert(tiny_base(family), *layout)
    model.generation_config.eos_token_id = None  # random weights: don't stop early
    ids, mask = left_padded_batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, reference_greedy(model, ids, mask, 8))


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": True, "top_k": 20, "temperature": 0.8},
        {"num_beams": 3, "do_sample": False},
        {"max_new_tokens": 1},
    ],
    ids=["sampling", "beam", "one_token"],
)
def test_generate_modes_match_the_uncached_path(pair, options):
    """With and without the KV cache (which skips prompt tokens) generate must pick the same tokens."""
    _, model = pair
    model.generation_config.eos_token_id = None
    ids, mask = left_padded_batch()
    options = {"max_new_tokens": 6, "pad_token_id": 0, **options}
    results = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        results.append(model.generate(ids, attention_mask=mask, use_cache=use_cache, **options))
    assert results[0].shape[1] == ids.shape[1] + options["max_new_tokens"]
    assert torch.equal(results[0], results[1])


def test_generate_continues_from_returned_cache_and_skips_the_new_chunk(pair):
    _, model = pair
    model.generation_config.eos_token_id = None
    ids, _ = left_padded_batch(lengths=(8,))
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    chunk = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    prompt = torch.cat([first.sequences, chunk], dim=1)
    seen = []
    hook = model.model.layers[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    with native_decode(False):  # the native step runs the kept token's later layers without calling the modules
        second = model.generate(prompt, cache=first.cache, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert seen[0] == 1, "the new prompt chunk must stop after layer L-1"
    assert torch.equal(second, model.generate(prompt, max_new_tokens=4, do_sample=False))
    assert torch.equal(second, reference_greedy(model, prompt, torch.ones_like(prompt), 4))


@pytest.mark.parametrize("layout", [(15, 3), (15, 1), (10, 5), (24, 2)])
def test_acrosskv_cache_holds_one_entry_per_group(layout):
    """N=30: the cache holds exactly (L + (N-L)/g)/N of the base model's KV bytes."""
    num_kv_layers, group = layout
    model = convert(tiny_base("llama", num_layers=30, hidden=16), num_kv_layers, group)
    ids, mask = left_padded_batch()
    swift_out = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    model.config.swiftkv = False
    base_out = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    ratio = measured_kv_bytes(swift_out.cache) / measured_kv_bytes(base_out.cache)
    assert ratio == (num_kv_layers + (30 - num_kv_layers) / group) / 30


def test_cache_from_swiftkv_mode_is_refused_by_the_base_mode(pair):
    _, model = pair
    ids, _ = left_padded_batch(lengths=(5,))
    out = model(ids, use_cache=True)
    model.config.swiftkv = False
    with pytest.raises(ValueError, match="new cache"):
        model(ids[:, -1:], cache=out.cache, use_cache=True)


def test_mistral_sliding_window_fast_equals_full():
    base = tiny_base("mistral")
    base.config.sliding_window = 4
    model = convert(base, 3, 1)
    ids, _ = left_padded_batch(lengths=(12, 12))
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=2).logits, full[:, -2:], **TIGHT)


def test_shared_prefix_api_gives_teacher_and_student_logits(pair):
    """Distillation runs layers < L once and branches: both branches must equal their own full forward."""
    _, model = pair
    ids, mask = left_padded_batch()
    decoder = model.model
    hidden, inputs = decoder.prepare_layer_inputs(ids, attention_mask=mask)
    prefix = decoder.run_prefix_layers(hidden, inputs)
    student, _ = decoder.run_swiftkv_layers(prefix, inputs)
    teacher, _ = decoder.run_base_layers(prefix, inputs)
    torch.testing.assert_close(model.lm_head(decoder.norm(student)), model(ids, attention_mask=mask).logits, **TIGHT)
    model.config.swiftkv = False
    assert torch.equal(model.lm_head(decoder.norm(teacher)), model(ids, attention_mask=mask).logits)
