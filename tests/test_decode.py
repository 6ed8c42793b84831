"""The preallocated SwiftKVCache and the decode step: same values as transformers' DynamicCache path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, tiny_base
from transformers import DynamicCache

from swiftkv.conversion import convert
from swiftkv.modeling import decode, kernels
from swiftkv.modeling.cache import PreallocatedLayer, SwiftKVCache, measured_kv_bytes
from swiftkv.modeling.kernels import FastLinear, onednn_linears
from swiftkv.modes import swiftkv_mode

# The decode step changes only the GEMV kernel (oneDNN instead of MKL on CPU): float32 rounding differences.
CLOSE = {"atol": 1e-4, "rtol": 1e-4}


def _kv(batch=2, tokens=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, tokens, 4, generator=gen), torch.randn(batch, 2, tokens, 4, generator=gen)


def test_preallocated_layer_writes_in_place_and_matches_concatenation():
    layer, chunks = PreallocatedLayer(capacity=8), [_kv(tokens=t, seed=t) for t in (3, 1, 1)]
    for keys, values in chunks:
        out_keys, out_values = layer.update(keys, values)
    assert out_keys.data_ptr() == layer._buffers[0].data_ptr()  # a view of the buffer, no copy per step
    assert torch.equal(out_keys, torch.cat([k for k, _ in chunks], dim=-2))
    assert torch.equal(out_values, torch.cat([v for _, v in chunks], dim=-2))
    assert layer.get_seq_length() == 5 and layer._buffers[0].shape[-2] == 8


def test_preallocated_layer_grows_crops_and_reorders():
    layer = PreallocatedLayer(capacity=2)
    first, second, third = _kv(tokens=3, seed=1), _kv(tokens=2, seed=2), _kv(tokens=1, seed=3)
    layer.update(*first)  # more than the capacity: grows
    layer.crop(-1)  # a shorter view of the same buffer
    layer.update(*second)
    expected = torch.cat([first[0][:, :, :2], second[0]], dim=-2)
    assert torch.equal(layer.keys, expected)
    layer.reorder_cache(torch.tensor([1, 0]))  # beam search swaps rows: keys become a new tensor
    keys, _ = layer.update(*third)
    assert torch.equal(keys, torch.cat([expected.flip(0), third[0]], dim=-2))
    assert keys.data_ptr() == layer._buffers[0].data_ptr()


def test_reset_layer_takes_another_batch_size():
    layer = PreallocatedLayer(capacity=8)
    layer.update(*_kv(batch=2))
    layer.reset()
    keys, values = _kv(batch=1, seed=5)
    assert torch.equal(layer.update(keys, values)[0], keys)


@pytest.mark.parametrize("layout", [(3, 1), (3, 3), (2, 2)])
def test_swiftkv_cache_keeps_one_buffer_per_acrosskv_group(layout):
    """Distinct storages counted in the cache itself against what the layout says, from the numbers alone: each of
    layers 0..L-1 and each group of g later layers has ONE K and ONE V buffer [B, Hkv, T, Dh] (held by the group's
    layers, or by its first layer alone)."""
    num_kv_layers, group = layout
    model = convert(tiny_base("llama"), num_kv_layers, group)  # N=6, Hkv=2, Dh=32/4=8
    ids, mask = left_padded_batch()  # [B=3, T=12]
    cache = SwiftKVCache(model.config)  # no max_cache_len: buffers of exactly T positions
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
    assert cache.preallocated

    def entry(idx: int) -> int:  # the cache entry a layer reads: its own below L, its group's first layer above
        return idx if idx < num_kv_layers else num_kv_layers + (idx - num_kv_layers) // group * group

    storages = {}  # data_ptr -> (bytes, the entries of the layers holding it)
    for idx, layer in enumerate(cache.layers):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                storages.setdefault(storage.data_ptr(), (storage.nbytes(), set()))[1].add(entry(idx))
    entries = [*range(num_kv_layers), *range(num_kv_layers, 6, group)]
    assert all(len(held) == 1 for _, held in storages.values())  # no buffer shared across entries
    assert sorted(next(iter(held)) for _, held in storages.values()) == sorted(2 * entries)  # a K and a V each
    expected_bytes = 2 * len(entries) * 3 * 2 * 12 * 8 * 4  # K and V, B, Hkv, T, Dh, float32
    assert sum(nbytes for nbytes, _ in storages.values()) == measured_kv_bytes(cache) == expected_bytes


@pytest.mark.parametrize("swift", [True, False], ids=["swiftkv", "base"])
@pytest.mark.parametrize("layout", [(3, 1), (2, 2)])
def test_decode_step_equals_the_stock_path(family, layout, swift):
    model = convert(tiny_base(family), *layout)
    ids, mask = left_padded_batch()
    with swiftkv_mode(model, swift), torch.no_grad():
        caches = [DynamicCache(config=model.config), SwiftKVCache(model.config)]
        steps = [model(ids, attention_mask=mask, cache=c, use_cache=True, logits_to_keep=1) for c in caches]
        for _ in range(4):
            next_ids = steps[0].logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            position_ids = mask.sum(-1, keepdim=True) - 1
            assert decode.applies(model, next_ids, caches[1], None, 1, {})
            steps = [
                model(next_ids, attention_mask=mask, position_ids=position_ids, cache=c, use_cache=True) for c in caches
            ]
            torch.testing.assert_close(steps[1].logits, steps[0].logits, **CLOSE)


def test_decode_step_is_not_used_where_it_does_not_apply():
    model = convert(tiny_base("llama"), 3, 1)
    cache, ids = SwiftKVCache(model.config), torch.tensor([[5]])
    assert not decode.applies(model, ids, cache, None, 1, {})  # gradients enabled: training
    with torch.no_grad():
        assert decode.applies(model, ids, cache, None, 1, {})
        assert not decode.applies(model, ids, DynamicCache(config=model.config), None, 1, {})
        assert not decode.applies(model, torch.tensor([[5, 6]]), cache, None, 1, {})  # a prompt chunk
        assert not decode.applies(model, ids, cache, ids, 1, {})  # labels
        assert not decode.applies(model, ids, cache, None, 1, {"output_hidden_states": True})


@pytest.mark.parametrize("layout", [(3, 1), (3, 3)])
def test_generate_uses_the_fast_step_and_picks_the_same_tokens(family, layout, monkeypatch):
    model = convert(tiny_base(family), *layout)
    model.generation_config.eos_token_id = None
    ids, mask = left_padded_batch()
    calls = []
    step = decode.decode_logits
    monkeypatch.setattr(decode, "decode_logits", lambda *a: calls.append(1) or step(*a))
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    fast = model.generate(ids, return_dict_in_generate=True, **options)
    assert isinstance(fast.cache, SwiftKVCache) and len(calls) == 7  # every token after the first
    stock = model.generate(ids, cache_implementation="dynamic", **options)
    assert len(calls) == 7
    assert torch.equal(fast.sequences, stock)


def test_onednn_products_only_where_aten_runs_avx512(monkeypatch):
    """oneDNN's float32 products beat MKL's where oneDNN runs AVX-512 (this MKL does not use it on AMD CPUs); on an
    AVX2-only CPU (or CI's AVX2 environment) MKL's are faster, so `linear` keeps to F.linear there."""
    assert kernels.ONEDNN_PREFERRED == (kernels._AVAILABLE and torch.backends.cpu.get_cpu_capability() == "AVX512")
    proj = convert(tiny_base("llama"), 3, 1).requires_grad_(False).model.layers[0].self_attn.q_proj
    calls = []
    monkeypatch.setattr(kernels, "_onednn", lambda *args: calls.append(1) or F.linear(*args))
    for preferred in (False, True):
        monkeypatch.setattr(kernels, "ONEDNN_PREFERRED", preferred)
        with torch.no_grad():
            proj(torch.randn(2, 5, proj.in_features))
        assert len(calls) == preferred


def test_linears_use_onednn_only_where_no_gradient_flows(monkeypatch):
    if not kernels._AVAILABLE:
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(kernels, "ONEDNN_PREFERRED", True)  # the AVX-512 choice, on any CPU
    model = convert(tiny_base("llama"), 3, 1).requires_grad_(False)
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, FastLinear) and set(dict(model.named_parameters())) == set(model.state_dict()) - {
        "lm_head.weight"
    }
    x = torch.randn(2, 5, proj.in_features)
    with torch.no_grad():
        fast = proj(x)
        with onednn_linears(False):
            stock = proj(x)
    torch.testing.assert_close(fast, stock)
    grads = []
    for enabled in (True, False):  # frozen weight, gradient through the input: oneDNN both ways vs stock
        trainable = x.clone().requires_grad_()
        with onednn_linears(enabled):
            (proj(trainable) * torch.arange(proj.out_features)).sum().backward()
        grads.append(trainable.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[1], (proj.weight * torch.arange(proj.out_features)[:, None]).sum(0).expand_as(x))
    proj.weight.requires_grad_(True)  # a trainable weight gets its gradient from the stock kernel
    proj(x).sum().backward()
    torch.testing.assert_close(proj.weight.grad, x.sum((0, 1)).expand_as(proj.weight))


def test_loaders_copy_weights_out_of_the_file_once_and_keep_ties(tmp_path, monkeypatch):
    from swiftkv import loading
    from swiftkv.modeling import base, kernels

    calls = []

    def counted(model):
        calls.append(model.config.model_type)
        return kernels.copy_weights_to_process_memory(model)

    monkeypatch.setattr(base, "copy_weights_to_process_memory", counted)
    monkeypatch.setattr(loading, "copy_weights_to_process_memory", counted)
    stock = tiny_base("llama")
    stock.save_pretrained(tmp_path / "base")
    convert(stock, 3, 1).save_pretrained(tmp_path / "swiftkv")
    for name in ("base", "swiftkv"):
        model, _ = loading.load_model(tmp_path / name)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(model.model.embed_tokens.weight, stock.model.embed_tokens.weight, rtol=0, atol=0)
    assert calls == ["llama", "llama_swiftkv"]  # one copy per load


def test_weights_copied_to_process_memory_stay_ordinary_tensors(tmp_path):
    """One huge-page mapping behind all weights, but each parameter its own storage: values, ties, training,
    safetensors saving (which refuses tensors that share memory) and reloading all behave as before."""
    from safetensors.torch import save_file

    from swiftkv.modeling.kernels import copy_weights_to_process_memory

    model = convert(tiny_base("qwen2"), 3, 1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    copy_weights_to_process_memory(model)
    params = dict(model.named_parameters())
    for name, value in before.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0)
        assert params[name].data_ptr() % 64 == 0
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == len(params)
    save_file({name: p.detach() for name, p in params.items()}, tmp_path / "weights.safetensors")
    model.save_pretrained(tmp_path / "model")
    reloaded = type(model).from_pretrained(tmp_path / "model")
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0)
    param = model.model.norm_swiftkv.weight  # still trainable in place
    param.grad = torch.ones_like(param)
    torch.optim.SGD([param], lr=0.5).step()
    torch.testing.assert_close(param, before["model.norm_swiftkv.weight"] - 0.5)
