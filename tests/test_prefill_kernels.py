"""The prefill's fused elementwise work (kernels.FusedRMSNorm / FusedMLP, csrc/elementwise.cpp) and the allocator
setting `swiftkv.load` applies (kernels.reuse_freed_memory)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, load_benchmark, tiny_base
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from swiftkv.conversion import convert
from swiftkv.modeling import base, kernels, native
from swiftkv.modeling.common import apply_rope
from swiftkv.modeling.weights import apply_format, native_bf16

needs_extension = pytest.mark.skipif(native.extension() is None, reason="the native extension does not build here")


@needs_extension
@pytest.mark.parametrize("shape", [(300, 96), (7, 37)])  # many vectors; a tail shorter than one
def test_silu_mul_is_silu_times_u_rounded_once(shape):
    """float32: SiLU times u to float32 rounding. bf16: the float32 result rounded to bf16 once, so at most one bf16
    step (2^-8 relative) from PyTorch's float32 computation rounded the same way."""
    torch.manual_seed(0)
    g, u = 3 * torch.randn(shape), torch.randn(shape)
    reference = F.silu(g.double()) * u.double()
    assert torch.allclose(native.extension().silu_mul(g, u).double(), reference, rtol=1e-6, atol=1e-7)
    gb, ub = g.bfloat16(), u.bfloat16()
    out = native.extension().silu_mul(gb, ub)
    rounded = (F.silu(gb.double()) * ub.double()).bfloat16()
    assert out.dtype == torch.bfloat16
    assert ((out.double() - rounded.double()).abs() <= 2**-8 * rounded.double().abs()).all()


@needs_extension
def test_rms_norm_equals_the_stock_norm():
    norm = tiny_base("llama").model.norm
    x = torch.randn(3, 50, norm.weight.shape[0])
    with torch.no_grad():
        assert torch.allclose(native.extension().rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), atol=1e-6)


def _unfused(model: torch.nn.Module) -> dict:
    """Every fused module of `model` -> its fused class; the modules get their stock class back."""
    fused = {m: type(m) for m in model.modules() if issubclass(type(m), (kernels.FusedRMSNorm, kernels.FusedMLP))}
    for module, cls in fused.items():
        module.__class__ = cls.stock_class
    return fused


@needs_extension
@pytest.mark.parametrize("fmt", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_prefill_equals_the_stock_modules(family, fmt, monkeypatch):
    """Every RMSNorm and MLP fused (counted: the native SiLU ran), logits as the stock modules': to float32
    rounding, and for bf16 products within a bf16 step of the activations (the same rounding points; only exp's
    last bits differ)."""
    if fmt == "bf16" and not native_bf16():
        pytest.skip("bf16 weights multiply in bf16 only on bf16 hardware")
    model = apply_format(convert(tiny_base(family), 3, 1), fmt)
    kernels.use_fused_elementwise(model)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(isinstance(m, kernels.FusedRMSNorm) for m in norms)
    assert all(isinstance(layer.mlp, kernels.FusedMLP) for layer in model.model.layers)
    calls, norm_calls = _count_calls(monkeypatch, "silu_mul"), _count_calls(monkeypatch, "rms_norm")
    prefill_norms = []
    for norm in norms:  # every norm call on prefill rows, whatever runs it
        norm.register_forward_hook(lambda m, args, out: prefill_norms.append(args[0][..., 0].numel() > 8))
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the parameters still require gradients, as a loaded model's do
        fused = model(ids).logits
        assert len(calls) == model.config.num_hidden_layers
        assert len(norm_calls) == sum(prefill_norms) > 2 * model.config.num_hidden_layers
        _unfused(model)
        stock = model(ids).logits
    tolerance = 1e-5 if fmt == "float32" or not native_bf16() else 2e-2
    assert (fused - stock).abs().max() <= tolerance * stock.abs().max()


@needs_extension
def test_stock_forward_wherever_fusion_does_not_apply():
    """Training (inputs that need gradients) and the few rows of a decode step run the stock modules: bit for bit."""
    model = convert(tiny_base("llama"), 3, 1)
    kernels.use_fused_elementwise(model)
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    x = torch.randn(2, 30, 32, requires_grad=True)
    few = torch.randn(1, 1, 32)
    fused = [norm(x), mlp(x), norm(few), mlp(few)]
    _unfused(model)
    assert all(torch.equal(a, b) for a, b in zip(fused, [norm(x), mlp(x), norm(few), mlp(few)], strict=True))
    assert fused[0].requires_grad


def test_fused_models_pickle():
    """The fused classes are importable by name: a whole model saved with torch.save loads back."""
    model = kernels.use_fused_elementwise(convert(tiny_base("llama"), 3, 1))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.model.norm) is type(model.model.norm)


MMAPPED_BYTES = """
import ctypes, sys
import torch
from swiftkv.modeling import kernels

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert kernels.reuse_freed_memory()
before = mallinfo2().hblkhd
x = torch.empty(3 << 20)  # 12 MiB: a [2048, 1536] float32 activation
print(mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_freed_memory_serves_prefill_tensors_from_the_heap():
    """Measured by glibc itself (mallinfo2's mmapped bytes), each in a fresh process (the setting is per process):
    a 12 MiB tensor is a fresh mapping by default, heap memory once tuned."""
    mapped = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", MMAPPED_BYTES, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "tuned")
    }
    assert mapped["default"] >= 12 << 20
    assert mapped["tuned"] == 0


def test_reuse_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(kernels.MALLOC_TUNING_ENV, "0")
    kernels.reuse_freed_memory.cache_clear()
    try:
        assert kernels.reuse_freed_memory() is False
    finally:
        kernels.reuse_freed_memory.cache_clear()


@needs_extension
def test_prefill_ablation_benchmark_end_to_end(tmp_path, monkeypatch, default_model_dir):
    """benchmarks/prefill_ablation.py on a short prompt: every variant +/- malloc timed in child processes, the
    pieces really switched (the child's model runs SDPA and stock modules for "stock"), JSON and PNG written.
    The children load the default model: skipped where its package is not installed (it once failed there)."""
    bench = load_benchmark("prefill_ablation")
    model = convert(tiny_base("llama"), 3, 1)
    kernels.use_fused_elementwise(model)
    fused = {m: type(m) for m in model.modules() if isinstance(m, (kernels.FusedRMSNorm, kernels.FusedMLP))}
    bench.set_pieces(model, fused, kernel=False, fuse=False)
    assert model.config._attn_implementation == "sdpa" and not any(isinstance(m, kernels.FusedMLP) for m in fused)
    out = tmp_path / "ablation.json"
    argv = ["prefill_ablation.py", "--prompt", "16", "--reps", "1", "--threads", "1", "--formats", "float32"]
    monkeypatch.setattr(sys, "argv", argv + ["--json", str(out), "--plot", str(tmp_path / "ablation.png")])
    bench.main()
    result = json.loads(out.read_text())["formats"]["float32"]
    names = {f"{v}{m}malloc" for v in bench.VARIANTS for m in "+-"}
    assert set(result["median_ms"]) == names and all(ms > 0 for ms in result["median_ms"].values())
    assert (tmp_path / "ablation.png").stat().st_size > 0


@needs_extension
@pytest.mark.parametrize(
    ("compare", "rows", "paths"),
    [("panel", {"12/off", "12/L15"}, {"panel", "mkl"}), ("kept-token", {"12/L15"}, {"native", "python"})],
)
def test_panel_products_benchmark_end_to_end(tmp_path, monkeypatch, default_model_dir, compare, rows, paths):
    """benchmarks/panel_products.py on a short prompt: both paths timed per mode, JSON and PNG written; where panel
    products do not run (bf16 hardware, AVX-512 ATen) it says so and exits 2 instead of timing one path twice."""
    bench = load_benchmark("panel_products")
    out = tmp_path / "panels.json"
    argv = ["panel_products.py", "--compare", compare, "--prompts", "12", "--reps", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    if compare == "panel" and (kernels.ONEDNN_PREFERRED or native_bf16()):
        with pytest.raises(SystemExit) as exited:
            bench.main()
        assert exited.value.code == 2
        return
    bench.main()
    result = json.loads(out.read_text())["formats"]["int8"]
    assert set(result) == rows
    assert all(ms > 0 for row in result.values() for ms in row["median_ms"].values())
    assert all(set(row["median_ms"]) == paths for row in result.values())
    assert out.with_suffix(".png").stat().st_size > 0


@needs_extension
def test_native_products_benchmark_times_decode_and_prefill_rows(tmp_path, monkeypatch):
    """benchmarks/native_products.py --rows: a decode step's row (the extension's `linear`) and a prefill's rows
    (`prefill_linear`), one JSON row each per format; a row count below 1 is refused before anything is built
    (exit 2)."""
    bench = load_benchmark("native_products")
    out = tmp_path / "products.json"
    argv = ["native_products.py", "--rows", "1", "9", "--formats", "int8", "--reps", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["int8"]
    assert set(rows) == {"1", "9"} and all(row["current"]["ms"] > 0 for row in rows.values())
    monkeypatch.setattr(sys, "argv", [*argv[:2], "0", "--json", str(out)])
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code == 2


@needs_extension
@pytest.mark.parametrize("batch", [1, 2])
def test_native_rope_is_the_families_rope_bit_for_bit(batch, monkeypatch):
    """Queries as the attention forward hands them over (a transposed view of the product), cos/sin for one or every
    sequence: apply_rope's native pass equals transformers' apply_rotary_pos_emb exactly."""
    torch.manual_seed(0)
    q = torch.randn(2, 37, 5 * 64).view(2, 37, 5, 64).transpose(1, 2)  # [B, H, T, Dh], strided
    cos, sin = torch.randn(batch, 37, 64), torch.randn(batch, 37, 64)
    calls = _count_calls(monkeypatch, "prefill_rope")
    with torch.no_grad():
        ours = apply_rope(q, (cos, sin))
    stock, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert calls and ours.is_contiguous() and torch.equal(ours, stock)


@needs_extension
@pytest.mark.parametrize("family", FAMILIES)
def test_own_key_value_layers_prefill_as_the_stock_forward(family, monkeypatch):
    """A CPU prefill through layers with their own K/V (SwiftKV off: all of them) runs swiftkv's forward with the
    native RoPE, and gives the stock forward's logits and cache bit for bit."""
    model = convert(tiny_base(family), 3, 1)
    model.config.swiftkv = False
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    calls = _count_calls(monkeypatch, "prefill_rope")
    with torch.no_grad():
        ours = model(ids, use_cache=True)
        assert len(calls) == 2 * model.config.num_hidden_layers
        monkeypatch.setattr(base, "prefill_rows", lambda x: False)
        stock = model(ids, use_cache=True)
    assert torch.equal(ours.logits, stock.logits)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(ours.cache.layers[layer].keys, stock.cache.layers[layer].keys)


def _count_calls(monkeypatch, name: str) -> list:
    """Calls to the native extension's function `name` from now on (the function still runs)."""
    calls, ext = [], native.extension()
    function = getattr(ext, name)
    monkeypatch.setattr(ext, name, lambda *args: calls.append(1) or function(*args))
    return calls


def test_int8_activation_probe_computes_what_integer_products_would(tmp_path):
    """benchmarks/int8_activations.py: its fake-quantized layer (float arithmetic on the int8 values) equals the
    int8 product it stands for (torch._int_mm's int32 sums, rescaled) to float32 rounding; every decoder Linear but
    the LM head and the skipped ones is replaced."""
    bench = load_benchmark("int8_activations")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    x = 3 * torch.randn(40, 64)
    wq, scale = bench.quantize_rows(linear.weight.detach())
    xq, x_scale = bench.quantize_rows(x)
    integer = (xq.double() @ wq.double().t()) * x_scale.double() * scale.double().view(-1)  # exact int sums, scaled
    with torch.no_grad():
        fake = bench.FakeW8A8(linear)(x)
    assert torch.allclose(fake.double(), integer, rtol=1e-5, atol=1e-5)
    if bench.int_mm_exact():  # VNNI: torch._int_mm is the integer product (without it its int16 pair sums saturate)
        assert torch.allclose(bench.int8_product(x, wq.t(), scale.view(-1)).double(), integer, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fake, linear(x), rtol=1e-3, atol=1e-3)  # it does round
    with torch.no_grad():  # weight-only: x as it is, the weight per output channel
        weight_only = bench.FakeW8A8(linear, round_x=False)(x)
    assert torch.equal(weight_only, torch.nn.functional.linear(x, wq.float() * scale))
    errors = bench.weight_errors(tiny_base("llama", hidden=64))  # 64 inputs: a row's scale spans two blocks
    assert 0 < errors["blocks_of_32"] < errors["per_channel"]
    increase = {"chitchat": dict.fromkeys(("base", "swiftkv"), 0.01)}
    for speed in ({}, {"k/v": bench.time_shape(32, 64, 48, 1)}):  # --weights-only times nothing: one panel
        result = {"speed": speed, "increase": increase, "activations": "float32", "skip": [], "adapter": "a"}
        assert bench.plot(result | {"prompt": 32}, tmp_path / f"{len(speed)}.png").stat().st_size > 0
    model = convert(tiny_base("llama"), 3, 1)
    kernels.use_fused_elementwise(model)
    replaced = bench.fake_w8a8(model, {"down_proj"})
    layers = model.config.num_hidden_layers
    assert replaced == sum(isinstance(m, bench.FakeW8A8) for m in model.modules()) == 6 * layers + 3 * (layers - 3)
    assert not isinstance(model.get_output_embeddings(), bench.FakeW8A8)
    assert set(bench.time_shape(32, 64, 48, 1)) >= {"bf16_ms", "int_mm_ms", "int8_with_quantize_ms"}
