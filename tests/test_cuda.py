"""The CUDA paths on tiny random models: parity on the GPU, GPU == CPU, distillation in fp32 and bf16, memory.

Skipped without a GPU (CI has none); run on one with `python -m pytest tests/test_cuda.py`.
`SWIFTKV_TEST_DEVICE=cpu` runs the same checks on the CPU (a dry run of this file where no GPU is at hand).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import left_padded_batch, tiny_base
from test_distill import GOLDEN_LOSSES
from test_distill_helpers import chat_file, tiny_config, tiny_model_dir
from test_modeling import reference_greedy

from swiftkv.bench import measure_peak_memory, prefill
from swiftkv.conversion import convert
from swiftkv.distill.recipe import DistillRecipe
from swiftkv.modeling.cache import measured_kv_bytes

DEVICE = torch.device(os.environ.get("SWIFTKV_TEST_DEVICE", "cuda"))
needs_gpu = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32 = {"atol": 1e-4, "rtol": 1e-4}  # GPU vs CPU float32: other kernels, other rounding


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls would round to 10 mantissa bits: keep float32 float32 for the comparisons."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _on_gpu(family: str, layout: tuple[int, int]):
    """(stock base model on the GPU, its SwiftKV conversion made there, the same conversion on the CPU)."""
    cpu = convert(tiny_base(family), *layout)
    base = tiny_base(family).to(DEVICE)
    return base, convert(base, *layout), cpu


@needs_gpu
def test_swiftkv_off_equals_stock_on_gpu(family):
    base, model, _ = _on_gpu(family, (3, 1))
    # Converted on the GPU: the new projections are made there too.
    assert all(p.device.type == DEVICE.type for p in model.parameters())
    ids, mask = (t.to(DEVICE) for t in left_padded_batch())
    model.config.swiftkv = False
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)


@needs_gpu
@pytest.mark.parametrize("layout", [(3, 1), (2, 2), (3, 3)])
def test_fast_prefill_on_gpu_equals_full_forward_and_cpu(family, layout):
    _, model, cpu = _on_gpu(family, layout)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        reference = cpu(ids, attention_mask=mask, logits_to_keep=1).logits
        fast = model(ids.to(DEVICE), attention_mask=mask.to(DEVICE), logits_to_keep=1).logits
        full = model(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
    torch.testing.assert_close(fast, full[:, -1:], **FP32)
    torch.testing.assert_close(fast.cpu(), reference, **FP32)


@needs_gpu
@pytest.mark.parametrize("layout", [(3, 1), (3, 3)])
def test_greedy_generate_on_gpu_equals_reference_loop_and_cpu(family, layout):
    _, model, cpu = _on_gpu(family, layout)
    for m in (model, cpu):
        m.generation_config.eos_token_id = None  # random weights: don't stop early
    ids, mask = left_padded_batch()
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), **options)
    assert torch.equal(out, reference_greedy(model, ids.to(DEVICE), mask.to(DEVICE), 8))
    assert torch.equal(out.cpu(), cpu.generate(ids, attention_mask=mask, **options))


@needs_gpu
def test_bfloat16_generate_on_gpu_keeps_the_cache_in_bfloat16():
    _, model, _ = _on_gpu("llama", (3, 3))
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    ids, mask = (t.to(DEVICE) for t in left_padded_batch())
    with torch.no_grad():
        cache = prefill(model, ids, new_tokens=4).cache
    tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    assert {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.numel()} == {torch.bfloat16}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (ids.shape[0], ids.shape[1] + 4) and out.device.type == DEVICE.type


@needs_gpu
def test_acrosskv_saves_gpu_memory():
    """AcrossKV g=3 holds fewer cache bytes, and the GPU allocator's peak during prefill + decode is lower."""
    model = convert(tiny_base("llama", num_layers=6, hidden=256), 3, 3).to(DEVICE)
    ids = torch.randint(3, 128, (4, 512), device=DEVICE)
    with torch.no_grad():
        model.config.swiftkv = False
        base_bytes = measured_kv_bytes(prefill(model, ids).cache)
        model.config.swiftkv = True
        swift_bytes = measured_kv_bytes(prefill(model, ids).cache)
    assert swift_bytes / base_bytes == pytest.approx(4 / 6)  # layers 0..2 own + one shared entry for 3..5
    peak = measure_peak_memory(model, ids, new_tokens=4)
    assert peak["swiftkv"] < peak["base"]


@pytest.fixture
def distill_files(tmp_path) -> tuple:
    """(tiny model dir, training chats, held-out chats): one set for every run of a test, since the held-out part
    of a local file depends on its path."""
    eval_file = chat_file(tmp_path / "eval.jsonl", conversations=300, seed=1)
    return tiny_model_dir(tmp_path / "llama"), chat_file(tmp_path / "chats.jsonl"), eval_file


def _distilled(files: tuple, out, device: str, dtype: str) -> tuple[DistillRecipe, dict, dict]:
    """The golden-loss run (tests/test_distill.py) on `device`: (recipe, initial weights, held-out eval row)."""
    model_dir, chats, eval_file = files
    layout = dict(num_key_value_layers=2, key_value_group_size=2, split="all")
    config = tiny_config(model_dir, chats, out, device=device, dtype=dtype, eval_data=[str(eval_file)], **layout)
    recipe = DistillRecipe(config, quiet=True)
    recipe.setup()
    initial = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    recipe.train()
    return recipe, initial, recipe.finish()["eval"][str(eval_file)]


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distillation_on_gpu(distill_files, tmp_path, dtype):
    """The recipe on device=cuda: float32 reproduces the CPU golden losses and held-out evaluation; bf16 frozen
    weights train and evaluate within bf16 rounding; only SwiftKV parameters move; the adapter is written."""
    recipe, initial, row = _distilled(distill_files, tmp_path / "run", str(DEVICE), dtype)
    assert recipe.device.type == DEVICE.type
    for name, param in recipe.model.named_parameters():
        assert param.device.type == DEVICE.type
        assert torch.equal(param, initial[name]) != ("swiftkv" in name), name
    losses = [entry["loss"] for entry in recipe.history]
    _, _, reference = _distilled(distill_files, tmp_path / "reference", "cpu", "float32")
    if dtype == "float32":
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN_LOSSES), rtol=1e-3, atol=0)
    else:
        assert all(math.isfinite(x) for x in losses)
    rel = 1e-4 if dtype == "float32" else 0.05
    for key in ("base_ppl", "undistilled_ppl", "distilled_ppl"):
        assert math.isclose(row[key], reference[key], rel_tol=rel), key
    assert (recipe.out / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_asked_for_without_a_gpu_is_a_clear_error(tmp_path):
    model_dir, chats = tiny_model_dir(tmp_path / "llama"), chat_file(tmp_path / "chats.jsonl")
    recipe = DistillRecipe(tiny_config(model_dir, chats, tmp_path / "run", device="cuda"), quiet=True)
    with pytest.raises(RuntimeError, match="sees no CUDA GPU; use device=cpu"):
        recipe.setup()
