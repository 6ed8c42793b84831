"""The CPU attention implementation (modeling/attention.py): bf16 flash attention in csrc/attention.cpp for causal
prefills of bf16 layers, transformers' SDPA for everything else."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, tiny_base

from swiftkv.conversion import convert
from swiftkv.modeling import attention, native
from swiftkv.modeling.weights import apply_format

needs_kernel = pytest.mark.skipif(
    not attention.bf16_kernel_available(), reason="the native build has no AVX512-BF16 (CPU or SWIFTKV_NATIVE_MARCH)"
)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def _reference(q, k, v, scale, shift: int = 0) -> torch.Tensor:
    """float64 attention of the kernel's bf16-rounded q * scale, k, v; query i sees keys <= Tk - Tq + i + shift.
    Output [B, Tq, H, Dh]."""
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq + shift)
    out = F.scaled_dot_product_attention(
        _bf16(q * scale), _bf16(k), _bf16(v), attn_mask=mask, scale=1.0, enable_gqa=True
    )
    return out.transpose(1, 2)


# (B, H, Hkv, Tq, Tk, Dh): GQA and MHA, lengths off the 64-key blocks and the row tiles, a cache ahead of the queries
SHAPES = [(1, 9, 3, 200, 200, 64), (2, 4, 2, 37, 50, 128), (1, 2, 2, 5, 5, 64), (1, 4, 1, 70, 130, 64)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_float64_attention_of_its_bf16_inputs(shape):
    """Only the softmax numerators' rounding to bf16 (relative 2^-9 each) separates the kernel from a float64
    attention of the same rounded inputs: the output error is below 2^-8 of the largest value. A mask off by one
    key (tried: `shift=1`) is ~100x further off."""
    b, h, hkv, tq, tk, dh = shape
    torch.manual_seed(0)
    q = torch.randn(b, tq, h, dh).transpose(1, 2)  # strided, as transformers' layers pass it
    k, v = torch.randn(b, hkv, tk, dh), torch.randn(b, hkv, tk, dh)
    out = native.extension().bf16_attention(q, k, v, dh**-0.5)
    bound = 2**-8 * v.abs().max().item()
    assert out.shape == (b, tq, h, dh)
    assert (out.double() - _reference(q, k, v, dh**-0.5)).abs().max().item() < bound
    assert (out.double() - _reference(q, k, v, dh**-0.5, shift=1)).abs().max().item() > 10 * bound


@needs_kernel
def test_kernel_refuses_shapes_it_has_no_code_for():
    ext = native.extension()
    q, k = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32)
    with pytest.raises(RuntimeError, match="head dim 64 or 128"):
        ext.bf16_attention(q, k, k, 1.0)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):
        ext.bf16_attention(torch.randn(1, 3, 4, 64), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64), 1.0)


def _tiny_swiftkv(fmt: str) -> torch.nn.Module:
    model = convert(tiny_base("llama", hidden=256), 3, 1)  # 4 heads of 64
    apply_format(model, fmt)
    model.generation_config.eos_token_id = None
    return model


def _logits(model, impl: str, ids, mask=None) -> torch.Tensor:
    model.config._attn_implementation = impl
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@needs_kernel
def test_bf16_model_runs_the_kernel_and_agrees_with_sdpa(monkeypatch):
    """A bf16 model's prefill through the kernel: logits within bf16 attention's rounding of SDPA's, same greedy
    tokens; the kernel really ran (counted)."""
    model = _tiny_swiftkv("bf16")
    calls = []
    kernel = native.extension().bf16_attention
    monkeypatch.setattr(attention, "_run_kernel", lambda *a: calls.append(1) or kernel(*a))
    ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    ours, sdpa = _logits(model, attention.NAME, ids), _logits(model, "sdpa", ids)
    assert calls, "the kernel did not run"
    assert (ours - sdpa).abs().max() < 0.05 * sdpa.abs().max()
    model.config._attn_implementation = attention.NAME
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    ours_tokens = model.generate(ids[:, :40], **kwargs)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(ours_tokens, model.generate(ids[:, :40], **kwargs))


@pytest.mark.parametrize("fmt", ["float32", "bf16"])
def test_sdpa_wherever_the_kernel_does_not_apply(fmt):
    """float32 layers (the reference format), and any padding mask, run transformers' SDPA itself: bit for bit."""
    model = _tiny_swiftkv(fmt)
    ids, mask = left_padded_batch()
    assert torch.equal(_logits(model, attention.NAME, ids, mask), _logits(model, "sdpa", ids, mask))
    if fmt == "float32":
        ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(2))
        assert torch.equal(_logits(model, attention.NAME, ids), _logits(model, "sdpa", ids))


def test_load_selects_it_on_cpu_and_checkpoints_do_not_keep_it(tmp_path):
    """`swiftkv.load` picks it for CPU models; it is a run-time choice, never written into a saved config."""
    model = _tiny_swiftkv("float32")
    model.config._attn_implementation = "sdpa"
    attention.use_cpu_attention(model)
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
