"""The CPU attention implementation (modeling/attention.py): swiftkv's flash attention (csrc/attention.cpp) for
causal prefills, in float32 or, for layers that multiply in bf16, bf16; transformers' SDPA for everything else."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, load_benchmark, refused, tiny_base

from swiftkv.conversion import convert
from swiftkv.modeling import attention, native
from swiftkv.modeling.weights import apply_format, native_bf16
from swiftkv.modes import swiftkv_mode

needs_kernel = pytest.mark.skipif(not attention.kernel_available(), reason="the native extension does not build here")
ARITHMETICS = [
    False,
    pytest.param(
        True,
        marks=pytest.mark.skipif(
            not attention.bf16_kernel_available(), reason="no AVX512-BF16 in this build (CPU or SWIFTKV_NATIVE_MARCH)"
        ),
    ),
]


def _reference(q, k, v, scale, bf16: bool, shift: int = 0) -> torch.Tensor:
    """float64 attention of q * scale, k, v (rounded to bf16 first, as the kernel does, when `bf16`); query i sees
    keys <= Tk - Tq + i + shift. Output [B, Tq, H, Dh]."""
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq + shift)
    rounded = [t.to(torch.bfloat16) if bf16 else t for t in (q * scale, k, v)]
    out = F.scaled_dot_product_attention(*(t.double() for t in rounded), attn_mask=mask, scale=1.0, enable_gqa=True)
    return out.transpose(1, 2)


# (B, H, Hkv, Tq, Tk, Dh): GQA and MHA, lengths off the key blocks, the row tiles (6) and their groups (48 rows), a
# cache ahead of the queries
SHAPES = [
    (1, 9, 3, 200, 200, 64),
    (2, 4, 2, 37, 50, 128),
    (1, 2, 2, 5, 5, 64),
    (1, 4, 1, 70, 130, 64),
    (1, 2, 1, 101, 230, 128),
]


@needs_kernel
@pytest.mark.parametrize("bf16", ARITHMETICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_float64_attention(shape, bf16):
    """float32: SDPA's formula summed in another order, within 1e-5. bf16: only the softmax numerators' rounding to
    bf16 (relative 2^-9 each) separates it from a float64 attention of the same rounded q, k, v, so the error is
    below 2^-8 of the largest value. A mask off by one key (`shift=1`) is >10x further off in both."""
    b, h, hkv, tq, tk, dh = shape
    torch.manual_seed(0)
    q = torch.randn(b, tq, h, dh).transpose(1, 2)  # strided, as transformers' layers pass it
    k, v = torch.randn(b, hkv, tk, dh), torch.randn(b, hkv, tk, dh)
    out = native.extension().prefill_attention(q, k, v, dh**-0.5, bf16)
    bound = (2**-8 if bf16 else 1e-5) * v.abs().max().item()
    assert out.shape == (b, tq, h, dh)
    assert (out.double() - _reference(q, k, v, dh**-0.5, bf16)).abs().max().item() < bound
    assert (out.double() - _reference(q, k, v, dh**-0.5, bf16, shift=1)).abs().max().item() > 10 * bound


@needs_kernel
def test_kernel_masks_exactly_and_survives_scores_far_apart():
    """Masked keys weigh exactly 0: the first query, which sees only the first key, returns that key's value bit for
    bit. Scores hundreds apart (a one-hot softmax, weights underflowing far below float32's range) stay finite and
    return the top key's value."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 70, 64), torch.randn(1, 1, 70, 64), torch.randn(1, 1, 70, 64)
    out = native.extension().prefill_attention(q, k, v, 0.125, False)
    assert torch.equal(out[0, 0], v[0, 0, :1].expand(2, 64))
    sharp = native.extension().prefill_attention(q, k, v, 1000.0, False)  # [1, 70, 2, 64]
    top = (q @ k.transpose(2, 3)).tril().masked_fill(torch.ones(70, 70).triu(1).bool(), -torch.inf).argmax(-1)
    assert torch.isfinite(sharp).all()
    assert torch.allclose(sharp[0].transpose(0, 1), v[0, 0][top[0]], atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("slope", [0.02, 0.2, -0.2])
def test_kernel_follows_a_maximum_that_moves_across_blocks(slope):
    """Scores that rise along the keys by `slope` per key: by ~1.3 per 64-key block (below the lazy threshold of
    8 / log2(e), so a row keeps an old maximum for blocks and weighs keys up to 2^8) or by ~13 (a new maximum and a
    rescale of the row's sum and output every block), or fall. Each within the float32 bound of a float64 attention."""
    torch.manual_seed(0)
    tokens = 700
    q = torch.zeros(1, 2, tokens, 64)
    q[..., 0] = 1.0
    k = torch.randn(1, 1, tokens, 64) * 0.1
    k[..., 0] = slope * torch.arange(tokens) / 0.125  # the score of key t: ~slope * t
    v = torch.randn(1, 1, tokens, 64)
    out = native.extension().prefill_attention(q, k, v, 0.125, False)
    assert (out.double() - _reference(q, k, v, 0.125, False)).abs().max().item() < 1e-5 * v.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_kernel_output_does_not_depend_on_the_thread_count(threads):
    """Threads take row groups round-robin, and groups shrink as threads grow (8 per thread, tiles of 6 rows); each
    row is still one thread's work in one order, so any thread count (uneven shares) gives the single thread's output
    bit for bit, every row written."""
    torch.manual_seed(0)
    q = torch.randn(2, 100, 4, 64).transpose(1, 2)  # 2 x 4 heads of 100 rows: 1 group of 102 at 1 thread, 5 of 24 at 5
    k, v = torch.randn(2, 2, 130, 64), torch.randn(2, 2, 130, 64)
    ext, previous = native.extension(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.prefill_attention(q, k, v, 0.125, False)
        torch.set_num_threads(threads)
        assert torch.equal(ext.prefill_attention(q, k, v, 0.125, False), one)
    finally:
        torch.set_num_threads(previous)
    assert torch.allclose(one.double(), _reference(q, k, v, 0.125, False), atol=1e-5)


@needs_kernel
def test_kernel_refuses_shapes_it_has_no_code_for():
    ext = native.extension()
    q = torch.randn(1, 2, 4, 32)
    with pytest.raises(RuntimeError, match="head dim 64 or 128"):
        ext.prefill_attention(q, q, q, 1.0, False)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):
        ext.prefill_attention(torch.randn(1, 3, 4, 64), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64), 1.0, False)


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
@pytest.mark.parametrize("fmt", ["float32", "bf16"])
def test_model_prefill_runs_the_kernel_and_agrees_with_sdpa(fmt, monkeypatch):
    """A prefill through the kernel (counted, in the layer's arithmetic): logits within float32 rounding of SDPA's
    (float32) or within bf16 attention's (bf16), and the same greedy tokens."""
    model = _tiny_swiftkv(fmt)
    calls = []
    run = attention._run_kernel
    monkeypatch.setattr(attention, "_run_kernel", lambda *args: calls.append(args[-1]) or run(*args))
    ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    ours, sdpa = _logits(model, attention.NAME, ids), _logits(model, "sdpa", ids)
    assert calls and set(calls) == {fmt == "bf16" and attention.bf16_kernel_available()}
    assert (ours - sdpa).abs().max() < (0.05 if fmt == "bf16" else 1e-4) * sdpa.abs().max()
    model.config._attn_implementation = attention.NAME
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    ours_tokens = model.generate(ids[:, :40], **kwargs)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(ours_tokens, model.generate(ids[:, :40], **kwargs))


@needs_kernel
def test_sdpa_for_bf16_layers_runs_pytorchs_flash_attention_on_bf16(monkeypatch):
    """`sdpa_for_bf16_layers(True)`: a bf16 model's causal prefill runs SDPA on bf16 q/k/v (counted) in every layer
    that attends over the whole prompt (with SwiftKV on and one row's logits kept, only those below L: the later
    layers' row keeps its mask and SDPA itself), the kernel nowhere; logits within bf16 attention's rounding of the
    kernel's, and not equal (bf16 ran). A float32 model's layers keep the kernel, bit for bit."""
    calls, kernel_calls = [], []
    sdpa, run = attention._sdpa_bf16_attention, attention._run_kernel
    monkeypatch.setattr(attention, "_sdpa_bf16_attention", lambda *args: calls.append(args[0].shape[2]) or sdpa(*args))
    monkeypatch.setattr(attention, "_run_kernel", lambda *args: kernel_calls.append(1) or run(*args))
    ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    model = _tiny_swiftkv("bf16")
    kernel = _logits(model, attention.NAME, ids)
    kernel_calls.clear()
    with attention.sdpa_for_bf16_layers(True):
        ours = _logits(model, attention.NAME, ids)
        assert calls == [90] * model.config.num_hidden_layers and not kernel_calls
        calls.clear()
        with swiftkv_mode(model, True), torch.no_grad():
            model(ids, logits_to_keep=1)  # the last row's logits: the later layers run that row alone
        assert calls == [90] * model.config.num_key_value_layers and not kernel_calls
    assert not torch.equal(ours, kernel) and (ours - kernel).abs().max() < 0.05 * kernel.abs().max()
    float32 = _tiny_swiftkv("float32")
    reference = _logits(float32, attention.NAME, ids)
    calls.clear()
    with attention.sdpa_for_bf16_layers(True):
        assert torch.equal(_logits(float32, attention.NAME, ids), reference) and not calls


@pytest.mark.parametrize("fmt", ["float32", "bf16"])
def test_sdpa_itself_wherever_the_kernel_does_not_apply(fmt):
    """A padding mask, or a gradient to compute, runs transformers' SDPA itself: bit for bit."""
    if fmt == "bf16" and not native_bf16():
        pytest.skip("bf16 weights multiply in bf16 only on bf16 hardware")
    model = _tiny_swiftkv(fmt)
    ids, mask = left_padded_batch()
    assert torch.equal(_logits(model, attention.NAME, ids, mask), _logits(model, "sdpa", ids, mask))
    if fmt == "float32":
        with torch.enable_grad():
            model.config._attn_implementation = attention.NAME
            ours = model(ids).logits
            model.config._attn_implementation = "sdpa"
            assert torch.equal(ours, model(ids).logits)


def test_load_selects_it_on_cpu_and_checkpoints_do_not_keep_it(tmp_path):
    """`swiftkv.load`'s choice for CPU models; a run-time choice, never written into a saved config."""
    model = _tiny_swiftkv("float32")
    model.config._attn_implementation = "sdpa"
    attention.use_cpu_attention(model)
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


@needs_kernel
def test_attention_benchmark_end_to_end(tmp_path, monkeypatch):
    """benchmarks/attention_kernel.py on a short prompt: every call timed, ratios against SDPA, JSON written; a
    prompt the benchmark cannot time is refused (exit 2) before anything runs."""
    bench = load_benchmark("attention_kernel")
    out = tmp_path / "attention.json"
    argv = ["attention_kernel.py", "--reps", "1", "--threads", "1", "--json", str(out)]
    refused(bench.main, monkeypatch, [*argv, "--prompt", "1"], out)
    monkeypatch.setattr(sys, "argv", [*argv, "--prompt", "70"])
    monkeypatch.setattr(bench, "native_bf16", lambda: True)  # SDPA's bf16 runs (emulated) on any CPU
    bench.main()
    result = json.loads(out.read_text())
    timed = set(result["median_ms"])
    assert {"kernel_float32", "sdpa_float32", "sdpa_bf16"} <= timed and result["vs_sdpa"]["sdpa_float32"] == 1
    assert all(rate > 0 for rate in result["gflops"].values())


@needs_kernel
def test_attention_benchmark_times_a_baseline_revision(tmp_path, monkeypatch):
    """--baseline-rev: a name that is no commit is refused (exit 2) before anything is built; a commit's kernel runs
    in the rotation and today's time over it is reported. (Building the revision's csrc/ takes a minute, so the
    extension already built stands in for it here; `commit_of` and the git plumbing are real.) The commit is recorded
    by its hash: a name such as HEAD moves."""
    bench = load_benchmark("attention_kernel")
    out = tmp_path / "attention.json"
    argv = ["attention_kernel.py", "--reps", "3", "--threads", "1", "--prompt", "70", "--json", str(out)]
    refused(bench.main, monkeypatch, [*argv, "--baseline-rev", "no-such-revision"], out)
    head = load_benchmark("native_products").commit_of("HEAD")
    assert head and len(head) == 40
    built = []
    monkeypatch.setattr(bench, "baseline_extension", lambda rev: built.append(rev) or native.extension())
    monkeypatch.setattr(sys, "argv", [*argv, "--baseline-rev", "HEAD"])
    bench.main()
    result = json.loads(out.read_text())
    assert built == ["HEAD"] and result["baseline_rev"] == "HEAD" and result["baseline_commit"] == head
    assert len(result["runs_ms"]["kernel_float32_baseline"]) == 3 and result["vs_baseline"] > 0
