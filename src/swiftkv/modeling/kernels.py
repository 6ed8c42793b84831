"""Which matrix-multiply kernel the SwiftKV models' Linear layers use on CPU.

PyTorch's CPU `F.linear` goes through MKL; oneDNN's `_linear_pointwise` (the kernel `torch.compile` uses for CPU
linears) measured about 2x its throughput on an AVX-512 AMD CPU (Zen 4), on prefill-sized products and on decoding's
matrix-vector products (docs/decode.md): oneDNN runs AVX-512 there, this PyTorch's MKL does not. So where ATen's
kernels run AVX-512, SwiftKV models multiply in float32 with oneDNN wherever the weight needs no gradient:
inference, and in distillation the frozen layers, whose input gradient is one more oneDNN product. Trainable weights
use `F.linear`. Where ATen tops out at AVX2 (an AVX2-only CPU, or CI's AVX2 environment) MKL's products measured
faster than oneDNN's (docs/cpu.md, benchmarks/products_vs_openvino.py), and swiftkv's own panel products
(`weights.panel_product`, csrc/products.cpp) level with MKL's on long prompts and faster on short ones: those run a
prefill's products there, `F.linear` everything else.

Results differ from MKL's only by float32 rounding (summation order, ~1e-6 relative).
(`with onednn_linears(False):`) restores the stock kernel, e.g. to compare bit for bit with a stock transformers model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from swiftkv.modeling import native
from swiftkv.modeling.common import Switch
from swiftkv.modeling.weights import (
    NATIVE_ROWS,
    BlockLinear,
    native_product,
    panel_product,
    product_weight,
    rounded_product,
)

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# float32 CPU products through oneDNN (else MKL's F.linear): where it is there and ATen runs AVX-512 (module doc)
ONEDNN_PREFERRED = _AVAILABLE and torch.backends.cpu.get_cpu_capability() == "AVX512"
_onednn_switch = Switch(True)


def onednn_linears(enabled: bool) -> contextlib.AbstractContextManager:
    """Allow oneDNN for CPU float32 linears inside the block where it is the faster kernel (False: the stock MKL
    path everywhere), then restore."""
    return _onednn_switch(enabled)


def _use_onednn() -> bool:
    return _onednn_switch.on and ONEDNN_PREFERRED


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenWeightLinear(torch.autograd.Function):
    """x @ W^T + b on oneDNN for a weight and bias that need no gradient: backward gives x's gradient only,
    grad [.., out] @ W [out, in], also on oneDNN (W^T as a strided view, no copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return _onednn(grad.contiguous(), weight.t(), None), None, None


def linear(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """proj(x) for x [..., in] -> [..., out] with the kernel chosen above, without the module call overhead.

    bf16 weights (weights.py): a few rows through `native_product` (float32 x), more as a bf16 product (x rounded to
    bf16, the output back in x's dtype, the bias added in x's dtype).

    float32 weights: a prefill's rows through `panel_product` where it runs (MKL's place: ATen below AVX-512), else
    oneDNN when nothing needs a gradient, oneDNN forward and input-gradient when only x does (frozen layers in
    distillation), `F.linear` when the weight or bias trains (or off CPU / float32).
    """
    if not isinstance(proj, nn.Linear):  # weights.BlockLinear: int8/int4 blocks, its own product
        return proj(x)
    weight, bias = proj.weight, proj.bias
    if weight.dtype != x.dtype:  # bf16 weights (weights.py), float32 activations: the product in bf16
        if (y := native_product(x, (weight, None, None), bias)) is not None:
            return y
        return rounded_product(x, weight, bias)
    if prefill_rows(x) and (y := panel_product(x, (weight, None, None), bias)) is not None:
        return y
    if not _use_onednn() or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled():
        return _onednn(x, weight, bias)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    return _FrozenWeightLinear.apply(x, weight, bias) if x.requires_grad else _onednn(x, weight, bias)


def prefill_rows(x: torch.Tensor) -> bool:
    """x [..., n] is a CPU float32 prefill's activation that needs no gradient: more rows than the decode step's
    products take natively (weights.NATIVE_ROWS), and the extension is there to fuse its elementwise work (these
    modules, RoPE: common.apply_rope)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and rows > NATIVE_ROWS
        and not (torch.is_grad_enabled() and x.requires_grad)
        and native.usable() is not None
    )


class FusedRMSNorm:
    """Mixed into a family's RMSNorm (weight * x / sqrt(mean(x^2) + eps) over the last dim): a prefill's norm in one
    native pass (csrc/decode.cpp's rms_norm, rows in parallel) instead of eager PyTorch's five."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = torch.is_grad_enabled() and self.weight.requires_grad
        if prefill_rows(x) and self.weight.dtype == torch.float32 and not trains:
            return native.extension().rms_norm(x, self.weight, float(self.variance_epsilon))
        return super().forward(x)


class FusedMLP:
    """Mixed into a family's gated MLP (down(silu(gate(x)) * up(x)), no biases): a prefill's SiLU and multiply in
    one native pass in the products' own dtype (csrc/elementwise.cpp), so bf16 products feed each other without
    float32 round trips (the same rounding: gate and up come out of the product in bf16 either way). Where
    `panel_product` runs, the products are its, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not (prefill_rows(x) and all(p.bias is None for p in projections) and _is_silu(self.act_fn)):
            return super().forward(x)
        gate = panel_product(x, _panel_weight(self.gate_proj), None)
        up = None if gate is None else panel_product(x, _panel_weight(self.up_proj), None)
        if up is not None:
            return linear(native.extension().silu_mul(gate, up), self.down_proj)
        gate, up, down = (product_weight(p, x) for p in projections)
        if torch.is_grad_enabled() and any(w.requires_grad for w in (gate, up, down)):
            return super().forward(x)
        xin = x.to(gate.dtype)
        act = native.extension().silu_mul(_product(xin, gate), _product(xin, up))
        return _product(act.to(down.dtype), down).to(x.dtype)


def _panel_weight(proj: nn.Module) -> tuple:
    """A projection's weight as `panel_product` takes it: (float weight, None, None) or a BlockLinear's blocks."""
    return proj.blocks if isinstance(proj, BlockLinear) else (proj.weight, None, None)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, (nn.SiLU, SiLUActivation))


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in their common dtype: float32 by the kernel `linear` picks (module doc), bf16 by F.linear."""
    if weight.dtype == torch.float32 and _use_onednn():
        return _onednn(x, weight, None)
    return F.linear(x, weight)


def use_fused_elementwise(model: nn.Module) -> nn.Module:
    """Give every RMSNorm and gated MLP of `model` the fused prefill forward above, in place (state dict, parameters
    and every other path unchanged)."""
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.__class__ = _fused_class(FusedRMSNorm, type(module))
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.__class__ = _fused_class(FusedMLP, type(module))
    return model


@functools.cache
def _fused_class(mixin: type, base: type) -> type:
    """`mixin` over `base` (kept as its `stock_class`), made once, and findable here by name (so pickling a whole
    model finds it)."""
    if issubclass(base, mixin):
        return base
    name = f"{mixin.__name__[:5]}{base.__name__}"
    cls = globals()[name] = type(name, (mixin, base), {"__module__": __name__, "stock_class": base})
    return cls


class FastLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose forward picks the kernel with `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


def use_fast_linears(model: nn.Module) -> nn.Module:
    """Turn every plain `nn.Linear` of `model` into a `FastLinear` in place (parameters untouched)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
    return model


def copy_weights_to_process_memory(model: nn.Module) -> nn.Module:
    """Move every CPU parameter into process memory backed by transparent huge pages (tied parameters stay tied).

    `from_pretrained` leaves float32 safetensors weights as memory-mapped file pages, which matrix-vector products
    stream more slowly than process memory (measured in docs/decode.md, benchmarks/decode_ablation.py), so loaders
    copy them once. The copies are packed into one anonymous mapping advised for 2 MiB pages: the hardware
    prefetcher stops at every 4 KiB page boundary. Each parameter still owns a separate storage (a disjoint slice
    of the mapping), so saving, tying and `torch.save` see ordinary tensors.
    """
    move_to_huge_pages(model.parameters())
    return model


def move_to_huge_pages(parameters: Iterable[nn.Parameter]) -> None:
    """Give each CPU parameter its own slice of one new huge-page mapping (see copy_weights_to_process_memory)."""
    params = [p for p in dict.fromkeys(parameters) if p.device.type == "cpu" and p.numel()]
    offsets, end = [], 0
    for param in params:
        offsets.append(end)
        end += -(-param.numel() * param.element_size() // _ALIGN) * _ALIGN
    if not params:
        return
    arena, start = _huge_page_arena(end)
    with torch.no_grad():
        for param, offset in zip(params, offsets, strict=True):
            data = torch.frombuffer(arena, dtype=param.dtype, count=param.numel(), offset=start + offset)
            param.data = data.view(param.shape).copy_(param.data)


_ALIGN = 64  # bytes: each parameter starts on a cache line
_HUGE_PAGE = 2 << 20


def _huge_page_arena(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous mapping with room for `nbytes` from a 2 MiB-aligned offset (returned), advised for huge pages
    where the OS offers them (Linux; elsewhere, or with THP off, ordinary pages)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)  # private: THP skips shared memory
    arena = mmap.mmap(-1, nbytes + _HUGE_PAGE, **({"flags": flags} if flags else {}))
    probe = torch.frombuffer(arena, dtype=torch.uint8, count=1)
    start = -probe.data_ptr() % _HUGE_PAGE
    del probe
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            arena.madvise(mmap.MADV_HUGEPAGE, start, nbytes + _HUGE_PAGE - start)
    return arena, start


# glibc's mallopt parameters (malloc.h) and its ceiling on the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
_KEEP_FREED = 1 << 30  # bytes of freed heap top kept before returning memory to the OS
MALLOC_TUNING_ENV = "SWIFTKV_MALLOC_TUNING"


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from its heap and keep up to 1 GiB of freed memory; True when
    applied (once per process; Linux with glibc; `SWIFTKV_MALLOC_TUNING=0` leaves malloc as it is).

    Why: eager PyTorch allocates every op's output anew ([T, intermediate] float32 is 12 MiB at 2048 tokens). Above
    its mmap threshold glibc maps fresh pages for each and unmaps them when freed, so every op of a prefill paid
    the kernel's page faults and page zeroing: 20-23% of a 2048-token prefill (docs/cpu.md). PyTorch's CPU tuning
    guide prescribes the same cure as a preloaded jemalloc/tcmalloc. The cost: freed memory stays with the process.
    """
    off = os.environ.get(MALLOC_TUNING_ENV, "1").strip().lower() in ("0", "false", "off", "no")
    if off or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no effect here either)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) & bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED))
