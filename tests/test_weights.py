"""Weight formats (modeling/weights.py): blocks as llama.cpp makes them, products against a float reference of the
same dequantized weights, the native step against the Python step, and the errors a user can hit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import left_padded_batch, load_benchmark, refused, tiny_base, tiny_tokenizer
from test_native import _decode
from torch import nn

from swiftkv import cpu
from swiftkv.bench import num_threads
from swiftkv.cli import main
from swiftkv.conversion import convert
from swiftkv.modeling import native, weights
from swiftkv.modeling.weights import BLOCK, BlockLinear, apply_format, block_linear, resolve_format, weight_format
from swiftkv.modes import swiftkv_mode

needs_native = pytest.mark.skipif(native.extension() is None, reason="the native extension cannot be built here")
QUANTIZED = ("int8", "int4")
GGUF_TYPE = {"int8": gguf.GGMLQuantizationType.Q8_0, "int4": gguf.GGMLQuantizationType.Q4_1}


def _linear(out: int = 40, inputs: int = 96, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inputs, out)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_blocks_dequantize_like_llama_cpp(fmt):
    """Our blocks' values are gguf-py's (llama.cpp's reference) quantize-then-dequantize of the same weight: the same
    rule (Q8_0, Q4_1), float16 scales, same rounding; at most one quantization step apart on rounding ties."""
    lin = _linear()
    ours = block_linear(lin, fmt).dequantize()
    w = lin.weight.detach().numpy()
    reference = gguf.quants.dequantize(gguf.quants.quantize(w, GGUF_TYPE[fmt]), GGUF_TYPE[fmt])
    step = block_linear(lin, fmt).scales.float().repeat_interleave(BLOCK, dim=1)
    assert (ours - torch.from_numpy(np.asarray(reference))).abs().le(step * 1.001).all()
    assert (ours - lin.weight).abs().le(step * (0.5 if fmt == "int8" else 0.501) + 1e-6).all()


@needs_native
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_native_dequantize_equals_pytorchs_ops(fmt, monkeypatch):
    """BlockLinear.dequantize on CPU runs the extension's one-pass `dequantize_blocks`: bit for bit PyTorch's ops
    (the path without the extension), for widths of one block to many and both of int4's nibbles; bad operands
    are refused with the layouts it takes."""
    layers = [block_linear(_linear(out, inputs, seed=out), fmt) for out, inputs in ((3, 32), (40, 96), (192, 1536))]
    native_values = [layer.dequantize() for layer in layers]
    monkeypatch.setattr(native, "allowed", lambda: False)
    for layer, value in zip(layers, native_values, strict=True):
        assert torch.equal(value, layer.dequantize())
        assert torch.equal(layer.dequantize(torch.bfloat16), value.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="int8 data"):
        native.extension().dequantize_blocks(layers[0].qweight.float(), layers[0].scales, layers[0].mins)


def _int8_error(weight: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Squared error per block [out, blocks] of int8 blocks (q, d) against `weight` [out, in]."""
    values = q.view(q.shape[0], -1, BLOCK).float() * d.float().unsqueeze(-1)
    return (values - weight.view_as(values)).square().sum(-1)


def _absmax_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q8_0 rule alone, d = max|w| / 127 rounded to float16, q = round(w / d): what grid blocks must beat
    (`test_blocks_dequantize_like_llama_cpp` checks this rule against gguf-py's)."""
    blocks = weight.view(weight.shape[0], -1, BLOCK)
    d = (blocks.abs().amax(-1) / 127).half()
    q = (blocks / d.float().clamp_min(1e-30).unsqueeze(-1)).round().clamp(-127, 127)
    return q.to(torch.int8).view(weight.shape[0], -1), d


def _grid_weight(fmt: str, out: int = 64, inputs: int = 256, seed: int = 0) -> torch.Tensor:
    """A weight dequantized from random Q4_0 or Q4_1 blocks, float16 d and m as GGUF stores them: [out, inputs]."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(out, inputs // BLOCK, 1, generator=g) * 0.01 + 1e-3).half().float()
    # Q4_1's minimum sits near -7.5 d for a block of weights centred on 0, as in real checkpoints
    offsets = 8.0 if fmt == "q4_0" else torch.rand(out, inputs // BLOCK, 1, generator=g) * 3 + 6
    m = (-offsets * d).half().float()
    q = torch.randint(0, 16, (out, inputs // BLOCK, BLOCK), generator=g).float()
    return (d * q + m).view(out, inputs)


def test_int8_of_a_q4_0_weight_is_exact():
    """Q4_0's values d (q - 8) are int8's at scale d: re-quantizing them adds no error (absmax's d = 8d / 127 would)."""
    weight = _grid_weight("q4_0")
    q, d = weights.quantize_int8(weight)
    assert _int8_error(weight, q, d).max() == 0
    assert _int8_error(weight, *_absmax_int8(weight)).min() > 0


def test_int8_of_a_q4_1_weight_keeps_its_grid():
    """Q4_1's values m + d q: each block's error is at most absmax's (the better of the two scales is kept), and the
    whole weight's is a fraction of it (measured 0.17 of absmax's squared error; the default model's 210 Q4_1
    layers: 0.17 too). Fails with absmax's scale alone (ratio 1)."""
    weight = _grid_weight("q4_1")
    ours, absmax = _int8_error(weight, *weights.quantize_int8(weight)), _int8_error(weight, *_absmax_int8(weight))
    assert (ours <= absmax).all()
    assert ours.sum() < 0.3 * absmax.sum()


def test_int8_of_float_weights_is_llama_cpps_q8_0():
    """Float weights lie on no grid: every block takes llama.cpp's scale and values. A zero block stays exact, a
    constant block exact up to its float16 scale's rounding."""
    weight = _linear(out=64, inputs=256).weight.detach().clone()
    weight[0, :BLOCK], weight[1, :BLOCK] = 0.0, 0.37
    q, d = weights.quantize_int8(weight)
    q_ref, d_ref = _absmax_int8(weight)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    error = _int8_error(weight, q, d)
    assert error[0, 0] == 0 and (error[1, 0] / BLOCK).sqrt() < 0.37 * 2**-11 and d.isfinite().all()


def test_int4_packing_is_ggufs_nibble_order():
    """Byte j of a block holds input j (low nibble) and input j + 16 (high): GGUF's layout, which decode.cpp reads."""
    q = torch.arange(BLOCK, dtype=torch.uint8).remainder(16).view(1, 1, BLOCK)
    packed = weights.pack_int4(q)
    assert packed.shape == (1, 1, BLOCK // 2)
    assert torch.equal(packed & 0xF, q[..., : BLOCK // 2]) and torch.equal(packed >> 4, q[..., BLOCK // 2 :])


def _rounded_input(x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] as the native int8/int4 products round it: 8-bit blocks of 32, llama.cpp's Q8_0 rule (d = max|x| /
    127, q = round(x / d), half to even), d kept in float32."""
    blocks = x.view(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros(()))
    return ((blocks * inverse).round() * d).view_as(x)


@needs_native
@pytest.mark.parametrize("fmt", ("bf16", *QUANTIZED))
@pytest.mark.parametrize("rows", [1, 3, weights.NATIVE_ROWS])
def test_native_product_equals_float_reference(fmt, rows):
    """Few rows: the native product of the stored weight. bf16 multiplies x itself; int8/int4 multiply x rounded to
    8-bit blocks, in integers (exact; int4's minimums times the rounded x's block sums). Scaling and summing in
    float32 put the result within ~1e-6 of float64's on the same values (96 inputs: 3 blocks, so the odd last block
    is covered)."""
    lin = _linear()
    x = torch.randn(rows, lin.in_features)
    if fmt == "bf16":
        w = lin.weight.detach().bfloat16()
        y, x = weights.native_product(x, (w, None, None), lin.bias.detach()), x.double()
    else:
        layer = block_linear(lin, fmt)
        y, w, x = layer(x), layer.dequantize(), _rounded_input(x).double()
    reference = x @ w.double().T + lin.bias.double()
    torch.testing.assert_close(y, reference.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_many_rows_multiply_the_dequantized_weight(fmt):
    """Prefill-sized inputs: dequantize, then one product in `product_dtype` (bf16 where the CPU has it: x rounded to
    8 bits of mantissa, so |error| <= ~2^-8 of sum |x w|)."""
    layer = block_linear(_linear(), fmt)
    x = torch.randn(weights.NATIVE_ROWS + 13, layer.in_features)
    w = layer.dequantize()
    reference = x.double() @ w.double().T + layer.bias.double()
    bound = (x.double().abs() @ w.double().abs().T) * (2**-7 if weights.product_dtype(x) == torch.bfloat16 else 1e-6)
    assert ((layer(x).double() - reference).abs() <= bound + 1e-6).all()


@needs_native
@pytest.mark.parametrize("fmt", ("float32", *QUANTIZED))
def test_panel_products_equal_the_float_product(fmt):
    """csrc/products.cpp's `prefill_linear` (prefill products of float32 rows by a float32 weight or int8/int4
    blocks): float32 sums of the weight's exact values, so within float32 rounding of a float64 product of the
    (dequantized) weight, for row counts around its 6-row tiles (13 and 32 dealt to tiles of 4-6 rows) and outputs
    around its panels (3 and 40: part of one; 200: several, the last partial; 1536 inputs: the down projection's
    width), with and without a bias. Each output is summed by one thread in one order, so 1 and 2 threads give the
    same bits. Operands it does not take are refused, naming what it takes."""
    product = native.extension().prefill_linear
    for out, inputs, rows in ((3, 32, 1), (40, 96, 6), (200, 64, 13), (24, 64, 32), (17, 1536, 7)):
        lin = _linear(out, inputs, seed=out)
        weight = _panel_weight(lin, fmt)
        dense = weight[0] if fmt == "float32" else block_linear(lin, fmt).dequantize()
        x = torch.randn(rows, inputs)
        exact = x.double() @ dense.double().T
        bound = (x.double().abs() @ dense.double().abs().T) * 2e-6
        for bias in (lin.bias.detach(), None):
            with num_threads(2):
                y = product(x, *weight, bias)
            reference = exact if bias is None else exact + bias.double()
            assert ((y.double() - reference).abs() <= bound + 1e-6).all()
            with num_threads(1):
                assert torch.equal(product(x, *weight, bias), y)
    with pytest.raises(RuntimeError, match=r"float32 x \[rows, 1536\]"):
        product(torch.randn(2, 64), *weight, None)
    with pytest.raises(RuntimeError, match="prefill_linear: (int8 data|a float32 weight)"):
        product(x, weight[0].double(), *weight[1:], None)


def _panel_weight(lin: nn.Linear, fmt: str) -> tuple:
    """lin's weight as `panel_product` takes it in format `fmt`."""
    if fmt == "float32":
        return lin.weight.detach(), None, None
    return block_linear(lin, fmt).blocks


@needs_native
@pytest.mark.parametrize("fmt", ("float32", *QUANTIZED))
def test_prefill_products_run_the_panel_kernel_where_it_applies(fmt, monkeypatch):
    """A prefill's product (more than NATIVE_ROWS float32 rows on CPU, by kernels.linear or a BlockLinear) is
    `panel_product` where products run in float32 on MKL (no bf16 hardware, ATen below AVX-512), else MKL's (blocks
    dequantized for it) as before; both are the weight's float32 product, so they agree to float32 rounding, with
    the batch dimensions kept. Few rows, a weight that trains and an input width off the block do not take it."""
    from swiftkv.modeling import kernels

    lin = _linear()
    layer = lin if fmt == "float32" else block_linear(lin, fmt)
    x = torch.randn(2, weights.NATIVE_ROWS + 5, layer.in_features)
    calls = []
    monkeypatch.setattr(weights, "native_bf16", lambda: False)  # as on a CPU without bf16 hardware
    monkeypatch.setattr(kernels, "ONEDNN_PREFERRED", False)
    extension = native.extension()
    monkeypatch.setattr(native, "extension", lambda: _Recording(extension, calls))
    with torch.no_grad():
        ours = kernels.linear(x, layer)
        with weights.native_panel_products(False):
            mkl = kernels.linear(x, layer)
        assert calls == ["prefill_linear"] and ours.shape == (2, weights.NATIVE_ROWS + 5, layer.out_features)
        kernels.linear(x[:, :2], layer)  # few rows: the native product (blocks) or F.linear
        monkeypatch.setattr(kernels, "ONEDNN_PREFERRED", True)
        kernels.linear(x, layer)  # AVX-512 ATen: oneDNN's products, panel products not measured there, not used
    assert calls == ["prefill_linear"]
    torch.testing.assert_close(ours, mkl, atol=1e-5, rtol=1e-5)
    assert weights.panel_product(x, (lin.weight, None, None), None) is None  # trains: autograd's product
    assert weights.panel_product(x[..., :40], (lin.weight.detach()[:, :40], None, None), None) is None  # 40 inputs
    assert weights.panel_product(x[..., :32], (lin.weight.detach()[:, :32], None, None), None) is None  # a view


class _Recording:
    """The extension, recording which of its products were called."""

    def __init__(self, extension, calls: list[str]):
        self.extension, self.calls = extension, calls

    def __getattr__(self, name: str):
        if name == "prefill_linear":
            self.calls.append(name)
        return getattr(self.extension, name)


@needs_native
@pytest.mark.parametrize("fmt", ("bf16", *QUANTIZED))
@pytest.mark.parametrize("swift", [True, False], ids=["swiftkv", "base"])
def test_native_step_equals_the_python_step_per_format(family, fmt, swift):
    """The Python step's products of a decode batch run natively too, so the steps differ by the order of float32
    sums only. int8/int4 products round their input to 8-bit blocks: an input that differs by float32 rounding can
    land one quantum apart, and random tiny models amplify that layer after layer. Two layers keep int8 exact here
    (measured <= 3e-7, native and AVX2 builds; ~1% with six). int4 is not: d dx sum(q qx) + m dx sum(qx) are two
    terms that cancel, which carries float32 differences into the next rounding (measured up to 1.7% of the logits'
    largest value). The step's int8 and int4 code is the same but for row_dot, which the product test above checks
    exactly; int4 is held to the same greedy tokens and 5%."""
    model = apply_format(convert(tiny_base(family, hidden=64, num_layers=2), 1, 1), fmt)
    assert weight_format(model) == fmt
    ids, mask = left_padded_batch()
    with torch.no_grad(), swiftkv_mode(model, swift):
        fast, cache = _decode(model, ids, mask, 4, use_native=True)
        slow, python_cache = _decode(model, ids, mask, 4, use_native=False)
    assert cache.native and not python_cache.native
    if fmt == "int4":
        assert torch.equal(fast.argmax(-1), slow.argmax(-1))
        torch.testing.assert_close(fast, slow, atol=0.05 * slow.abs().max().item(), rtol=0)
    else:
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_training_through_blocks_keeps_no_float_weight(fmt):
    """With a gradient to pass back to x (distillation through frozen blocks): the forward's product, x's gradient
    grad @ W of the same dequantized W in the same product dtype, and no [out, in] tensor kept for backward."""
    layer = block_linear(_linear(), fmt)
    x = torch.randn(weights.NATIVE_ROWS + 13, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert torch.equal(y, layer(x.detach())) and layer.out_features * layer.in_features not in saved  # W or W^T
    grad = torch.randn_like(y)
    y.backward(grad)
    w = layer.dequantize(weights.product_dtype(x))
    assert torch.equal(x.grad, (grad.to(w.dtype) @ w).to(x.dtype))


@pytest.mark.parametrize("fmt", ("bf16", *QUANTIZED))
def test_every_linear_takes_the_format(fmt):
    """The SwiftKV projections and the LM head too (int4 keeps both at int8); the embedding stays float32."""
    model = apply_format(convert(tiny_base("llama", hidden=64), 3, 1), fmt)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, BlockLinear))]
    swiftkv = [m for name, m in model.named_modules() if name.endswith("proj_swiftkv")]
    assert swiftkv and all(m in linears for m in swiftkv)
    for module in linears:
        if fmt == "bf16":
            assert module.weight.dtype == torch.bfloat16
        else:
            assert isinstance(module, BlockLinear)
            assert module.format == ("int8" if module is model.lm_head or module in swiftkv else fmt)
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_greedy_tokens_agree_with_float32():
    """Teacher-forced top-1 of every format against float32 on a tiny random model (64 positions), counted where
    float32's top-1 leads its runner-up by more than 0.1 (half the positions: a random model's logits are near-ties
    elsewhere). Measured: bf16 100% / int8 100% / int4 93% there; 100% / 92% / 75% over all positions."""
    base = tiny_base("llama", hidden=256, num_layers=4, seed=3)
    ids = torch.randint(0, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = base(ids).logits
        top2 = logits.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 0.1
        for fmt, floor in {"bf16": 1.0, "int8": 1.0, "int4": 0.9}.items():
            model = apply_format(tiny_base("llama", hidden=256, num_layers=4, seed=3), fmt)
            agree = model(ids).logits.argmax(-1) == logits.argmax(-1)
            assert agree[clear].float().mean().item() >= floor, fmt


def test_bad_format_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"weights='int5' is not a weight format; choose one of float32, bf16"):
        resolve_format("int5")


def test_int4_on_a_width_that_is_not_a_multiple_of_the_block():
    with pytest.raises(ValueError, match=r"multiple of 32; a layer of this model has 48 inputs"):
        block_linear(nn.Linear(48, 8), "int4")


def test_bf16_on_a_cpu_without_bf16_hardware_runs_float32(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.warns(UserWarning, match="neither AVX512-BF16 nor AMX.*running float32 weights instead"):
        assert resolve_format("bf16") == "float32"


@pytest.mark.parametrize("native_step", [True, False])
def test_the_default_without_bf16_hardware_is_int8_where_the_native_step_runs(monkeypatch, native_step):
    """int8 decodes natively (integer block products); without the native step it would dequantize whole matrices
    per token, so float32 is the default there."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(native, "usable", lambda: object() if native_step else None)
    fmt = weights.default_format()
    assert fmt == ("int8" if native_step else "float32")
    assert "without bf16 hardware" in weights.format_reason(fmt)


def test_onednn_capped_below_bf16_counts_as_no_bf16_hardware(monkeypatch):
    """CI's AVX2 pass (ONEDNN_MAX_CPU_ISA=AVX2) stands for an AVX2-only CPU: it gets that CPU's default."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_tile"}))
    monkeypatch.setattr(native, "usable", lambda: object())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not weights.native_bf16() and weights.default_format() == "int8"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert weights.native_bf16() and weights.default_format() == "bf16"


def test_cli_rejects_a_bad_width_before_running(tmp_path, capsys):
    """A model whose Linear inputs are 48 wide cannot be int4: exit 2, one line naming the width."""
    tiny_base("llama", hidden=48).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "w1 w2", "--weights", "int4"]) == 2
    assert "has 48 inputs" in capsys.readouterr().err


@needs_native
@pytest.mark.skipif(native.target_isa("x86-64") is None, reason="no x86-64 C++ compiler to build the baseline with")
def test_baseline_x86_64_build_multiplies_every_format():
    """test_native_product_equals_float_reference and test_native_dequantize_equals_pytorchs_ops again, in a process
    whose native step is built for plain x86-64 (SSE2 only: the portable code of every format's product and
    widening, no AVX2/AVX-512, no F16C), as a CPU without AVX2 runs it. ~55 s to build on 2 cores, once per
    checkout (kept with the other builds in SWIFTKV_NATIVE_DIR)."""
    env = {**os.environ, "SWIFTKV_NATIVE_MARCH": "x86-64"}
    tests = [
        f"{__file__}::{name}"
        for name in (
            "test_native_product_equals_float_reference",
            "test_native_dequantize_equals_pytorchs_ops",
            "test_panel_products_equal_the_float_product",
        )
    ]
    command = [sys.executable, "-m", "pytest", "-q", "-rs", *tests]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\b14 passed\b", done.stdout) and "skipped" not in done.stdout, done.stdout[-2000:]


def test_torch_quantized_kernels_benchmark(tmp_path, monkeypatch):
    """benchmarks/torch_quantized_kernels.py: a Q4_1 BlockLinear in `_weight_int4pack_mm_for_cpu`'s layout multiplies
    as its dequantized weight (so the benchmark times the same values); a run on both sides of NATIVE_ROWS times
    every engine and writes JSON and PNG; a row count of 0 is refused (exit 2) before anything is written."""
    bench = load_benchmark("torch_quantized_kernels")
    torch.manual_seed(0)
    layer = block_linear(nn.Linear(96, 48, bias=False), "int4")  # the packing takes 16 outputs at a time
    x = torch.randn(5, 96)
    packed, scales_zeros = bench.torch_int4(layer, torch.float32)
    product = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, BLOCK, scales_zeros)
    torch.testing.assert_close(product, x @ layer.dequantize().t(), rtol=1e-5, atol=1e-5)
    out = tmp_path / "kernels.json"
    argv = ["torch_quantized_kernels.py", "--reps", "1", "--threads", "1", "--json", str(out)]
    refused(bench.main, monkeypatch, [*argv, "--rows", "0"], out, out.with_suffix(".png"))
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "1", str(weights.NATIVE_ROWS + 1)])
    bench.main()
    result = json.loads(out.read_text())
    assert [entry["rows"] for entry in result["rows"]] == [1, weights.NATIVE_ROWS + 1]
    for entry in result["rows"]:
        assert set(entry["median_ms"]) == set(bench.ENGINES) and all(ms > 0 for ms in entry["median_ms"].values())
        assert entry["torch_int4_max_relative_error"] < 1e-5
    assert out.with_suffix(".png").stat().st_size > 0
