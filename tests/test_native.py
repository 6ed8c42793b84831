"""The native decode step (csrc/decode.cpp): same logits and tokens as the Python step, and a clean fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_base

from swiftkv.conversion import convert
from swiftkv.modeling import native
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modeling.native import native_decode
from swiftkv.modes import swiftkv_mode

# Sums run in another order than oneDNN's: float32 rounding differences only.
CLOSE = {"atol": 1e-4, "rtol": 1e-4}

pytestmark = pytest.mark.skipif(native.extension() is None, reason="the native extension cannot be built here")


def _decode(model, ids, mask, steps, use_native, capacity=0, attention="sdpa"):
    """Logits [B, 1, V] of `steps` greedy decode steps after a left-padded prompt, and the cache."""
    model.config._attn_implementation = attention
    cache, logits = SwiftKVCache(model.config, max_cache_len=capacity), []
    with torch.no_grad(), native_decode(use_native):
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            next_ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            position_ids = mask.sum(-1, keepdim=True) - 1
            out = model(next_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("hidden", [32, 256], ids=["head_dim8", "head_dim64"])
@pytest.mark.parametrize("swift", [True, False], ids=["swiftkv", "base"])
@pytest.mark.parametrize("layout", [(3, 1), (2, 2)])
def test_native_step_equals_the_python_step(family, layout, swift, hidden):
    model = convert(tiny_base(family, hidden=hidden), *layout)
    ids, mask = left_padded_batch()
    with swiftkv_mode(model, swift):
        fast, cache = _decode(model, ids, mask, 5, use_native=True)
        slow, python_cache = _decode(model, ids, mask, 5, use_native=False)
    assert cache.native and not python_cache.native
    torch.testing.assert_close(fast, slow, **CLOSE)
    for layer, python_layer in zip(cache.layers, python_cache.layers, strict=True):  # same K/V written
        torch.testing.assert_close(layer.keys, python_layer.keys, **CLOSE)


@pytest.mark.parametrize("swift", [True, False], ids=["swiftkv", "base"])
def test_native_step_on_long_padded_prompts(swift):
    """Dozens of positions: attention's vectorised exp runs on full 16-lane blocks, padded positions among them."""
    model = convert(tiny_base("qwen2", hidden=256), 3, 1)
    ids, mask = left_padded_batch(lengths=(40, 23, 57))
    with swiftkv_mode(model, swift):
        fast, _ = _decode(model, ids, mask, 4, use_native=True)
        slow, _ = _decode(model, ids, mask, 4, use_native=False)
    torch.testing.assert_close(fast, slow, **CLOSE)


def _prefill(model, ids, mask, use_native, cache=None, embeds=False):
    """The last token's logits [B, 1, V] of a prefill into `cache` (a new one by default), and the cache."""
    cache = SwiftKVCache(model.config) if cache is None else cache
    inputs = {"inputs_embeds": model.model.embed_tokens(ids)} if embeds else {"input_ids": ids}
    with torch.no_grad(), native_decode(use_native):
        return model(**inputs, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits, cache


@pytest.mark.parametrize("embeds", [False, True], ids=["ids", "embeds"])
@pytest.mark.parametrize("layout", [(3, 1), (2, 2)])
def test_a_swiftkv_prefills_kept_token_runs_the_later_layers_in_the_native_step(family, layout, embeds, monkeypatch):
    """The prompt's K/V come from the prefill's products (bit for bit the Python path's); only the last token runs
    layers >= L, in one native step (decode.kept_token_logits), with the Python layers' logits. A second prompt
    appended to the same cache (P > 0) too."""
    model = convert(tiny_base(family), *layout)  # SwiftKV on
    ids, mask = left_padded_batch()
    firsts = []
    step = native.step
    monkeypatch.setattr(native, "step", lambda *args, first=0: firsts.append(first) or step(*args, first=first))
    fast, cache = _prefill(model, ids, mask, use_native=True, embeds=embeds)
    slow, python_cache = _prefill(model, ids, mask, use_native=False, embeds=embeds)
    assert firsts == [layout[0]]
    torch.testing.assert_close(fast, slow, **CLOSE)
    for layer, python_layer in zip(cache.layers, python_cache.layers, strict=True):  # AcrossKV non-leaders: None
        for tensors in ((layer.keys, python_layer.keys), (layer.values, python_layer.values)):
            assert tensors[0] is tensors[1] is None or torch.equal(*tensors)
    more, more_mask = left_padded_batch(seed=1, lengths=(5, 5, 5))
    mask = torch.cat([mask, more_mask], 1)
    fast, _ = _prefill(model, more, mask, use_native=True, cache=cache, embeds=embeds)
    slow, _ = _prefill(model, more, mask, use_native=False, cache=python_cache, embeds=embeds)
    assert firsts == [layout[0]] * 2
    torch.testing.assert_close(fast, slow, **CLOSE)


def test_the_native_model_is_built_once_per_model_and_again_when_what_it_reads_changes():
    """Each prompt's new cache takes the model's NativeModel as built (`native._native_model`), which sees weights
    written in place; a mode switch, a replaced module or parameter, or a new activation builds another. The
    native logits follow every change."""
    model = convert(tiny_base("llama"), 3, 1)
    ids, mask = left_padded_batch()

    def native_model_and_logits():  # a prefill and one decode step (base mode builds it for the step)
        fast, cache = _decode(model, ids, mask, 1, use_native=True)
        slow, _ = _decode(model, ids, mask, 1, use_native=False)
        torch.testing.assert_close(fast, slow, **CLOSE)
        return cache.native

    first = native_model_and_logits()
    assert native_model_and_logits() is first
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # the same memory, written
    assert native_model_and_logits() is first
    changes = [
        lambda: model.config.__setattr__("swiftkv", False),
        lambda: model.config.__setattr__("swiftkv", True),
        lambda: model.model.layers[4].mlp.__setattr__("down_proj", torch.nn.Linear(64, 32, bias=False)),
        lambda: model.model.norm_swiftkv.__setattr__("weight", torch.nn.Parameter(torch.full((32,), 0.5))),
        lambda: model.model.layers[0].self_attn.q_proj.to(torch.bfloat16),  # `param.data` swapped: other memory
    ]
    built = [first]
    for change in changes:
        change()
        built.append(native_model_and_logits())
        assert built[-1] is not built[-2] and native_model_and_logits() is built[-1]
    model.config.hidden_act = "gelu"  # not what csrc/decode.cpp implements: the Python layers run
    assert native.runtime(model, SwiftKVCache(model.config), torch.zeros(1, 1, 32)) is None


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
def test_the_extension_runs_on_torchs_threads():
    """Built without -fopenmp, ATen's header-only parallel_for silently runs serial (it did: 1 thread of 2)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.extension().parallel_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_native_step_grows_the_cache_and_takes_additive_masks():
    """Past the preallocated capacity the buffers double; the eager attention's float mask works like sdpa's."""
    model = convert(tiny_base("llama"), 3, 3)
    ids, mask = left_padded_batch()
    fast, cache = _decode(model, ids, mask, 8, use_native=True, capacity=ids.shape[1] + 2, attention="eager")
    slow, _ = _decode(model, ids, mask, 8, use_native=False, attention="eager")
    assert cache.layers[0]._buffers[0].shape[-2] >= ids.shape[1] + 8
    torch.testing.assert_close(fast, slow, **CLOSE)


@pytest.mark.parametrize("layout", [(3, 1), (3, 3)])
def test_generate_picks_the_same_tokens_with_and_without_the_native_step(family, layout):
    model = convert(tiny_base(family), *layout)
    model.generation_config.eos_token_id = None
    ids, mask = left_padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with native_decode(True):
        fast = model.generate(ids, return_dict_in_generate=True, **options)
    with native_decode(False):
        slow = model.generate(ids, **options)
    assert fast.cache.native
    assert torch.equal(fast.sequences, slow)


def test_a_cache_continued_by_another_model_uses_that_models_weights():
    first, second = (convert(tiny_base("llama", seed=seed), 3, 1) for seed in (0, 1))
    ids, mask = left_padded_batch()
    results = []  # the second model's logits, native then Python step
    for use_native in (True, False):
        cache = SwiftKVCache(first.config)
        with torch.no_grad(), native_decode(use_native):
            first(ids, attention_mask=mask, cache=cache, use_cache=True)
            first(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), cache=cache, use_cache=True)
            mask2 = torch.cat([mask, mask[:, -2:]], 1)
            logits = second(ids[:, -1:], attention_mask=mask2, cache=cache, use_cache=True).logits
        results.append(logits)
    torch.testing.assert_close(results[0], results[1], **CLOSE)


def test_native_step_is_skipped_where_it_does_not_apply(monkeypatch):
    model = convert(tiny_base("llama"), 3, 1)
    cache, hidden = SwiftKVCache(model.config), torch.zeros(1, 1, 32)
    monkeypatch.setenv("SWIFTKV_NATIVE", "0")
    assert native.runtime(model, cache, hidden) is None
    monkeypatch.delenv("SWIFTKV_NATIVE")
    assert native.runtime(model, cache, hidden.double()) is None
    model.config.hidden_act = "gelu"  # not what csrc/decode.cpp implements: the Python step runs
    assert native.runtime(model, cache, hidden) is None and cache.native is False


def test_builds_live_in_the_swiftkv_cache_unless_swiftkv_native_dir_says(tmp_path, monkeypatch):
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(native.NATIVE_DIR_ENV, "")
    assert native.build_root().parent == tmp_path / "cache" / "native"
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path / "builds"))
    assert native.build_root().parent == tmp_path / "builds"


def test_a_failed_build_warns_once_and_leaves_the_python_step(tmp_path, monkeypatch):
    broken = tmp_path / "decode.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path / "native"))  # not next to the suite's shared builds
    native.extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match="native decode step could not be built"):
            assert native.extension() is None
        model = convert(tiny_base("llama"), 3, 1)
        model.generation_config.eos_token_id = None
        ids, mask = left_padded_batch()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + 3
    finally:
        native.extension.cache_clear()
