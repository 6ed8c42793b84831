"""Which matrix-multiply kernel the SwiftKV models' Linear layers use on CPU.

PyTorch's CPU `F.linear` goes through MKL. On this project's reference machine (AMD EPYC, AVX-512, 2 threads)
MKL reaches ~200 GFLOP/s on prefill-sized products and ~16 GB/s of weights on the matrix-vector products of
decoding, while oneDNN's `_linear_pointwise` (the kernel `torch.compile` uses for CPU linears) reaches
~420-450 GFLOP/s and ~40 GB/s: about 2x on both (benchmarks/vs_llamacpp.py, docs/decode.md). So in float32 on
CPU, wherever no gradient has to flow through the product, SwiftKV models multiply with oneDNN. Training
(distillation) still gets autograd: a Linear whose input or weight needs a gradient uses `F.linear`.

Results differ from MKL's only by float32 rounding (summation order, ~1e-6 relative).
(`with onednn_linears(False):`) restores the stock kernel, e.g. to compare bit for bit with a stock transformers model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = _AVAILABLE


@contextlib.contextmanager
def onednn_linears(enabled: bool) -> Iterator[None]:
    """Use oneDNN for CPU float32 linears inside the block (False: the stock MKL path), then restore."""
    global _enabled
    previous, _enabled = _enabled, enabled and _AVAILABLE
    try:
        yield
    finally:
        _enabled = previous


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def linear(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """proj(x) for x [..., in] -> [..., out] with the kernel chosen above, without the module call overhead."""
    if _onednn_applies(x, proj.weight):
        return torch.ops.mkldnn._linear_pointwise(x, proj.weight, proj.bias, "none", [], "")
    return F.linear(x, proj.weight, proj.bias)


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
