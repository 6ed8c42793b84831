"""Weight formats of a model's Linear layers, chosen at load: `swiftkv.load(..., weights="bf16")`.

- `float32`: the checkpoint's weights as they are (the reference).
- `bf16`: every Linear weight rounded to bfloat16. Products run on bf16 kernels (oneDNN: AMX or AVX512-BF16 tiles),
  float32 accumulation; activations, norms, attention and the residual stream stay float32.
- `int8`: GGUF Q8_0's blocks. Each run of 32 inputs of a weight row has one float16 scale d: w = d * q, q int8 in
  [-127, 127] (symmetric, round to nearest). d is llama.cpp's max|w| / 127, except for a block whose values already
  lie on a uniform grid (the default model's Q4_1 layers): there a fraction of the grid's step, which keeps most of
  its points exact instead of rounding them a second time (`grid_scale`; docs/cpu.md, "int8 on the Q4_1 grid").
- `int4`: GGUF Q4_1's blocks. Each run of 32 inputs has a float16 scale d and minimum m: w = d * q + m, q in [0, 15]
  (Q4_0's w = d * (q - 8) is m = -8 d, exactly). The LM head stays int8, as llama.cpp keeps its output matrix at
  higher precision: it is ~20% of a small model's weights and the logits are what every token is read from. So do
  the SwiftKV projections (q/k/v_proj_swiftkv, ~8% of the default model's weights at L=15): distilled in float on
  the float base, at 4 bits they moved SwiftKV's perplexity by +5% (docs/cpu.md), at 8 bits by +0.1%.

Quantized layers keep only the blocks (`BlockLinear`: ~1.06 bytes per int8 weight, 0.63 per int4 weight). Prefill
dequantizes each layer's blocks to the product dtype on the fly ([out, in], a few hundred KB per layer, small next to
a prompt's product) and multiplies with the same kernel as float weights (PyTorch's own weight-only int8/int4 CPU
kernels measured far slower, at every row count: docs/cpu.md); the native decode step (csrc/
decode.cpp) reads the blocks themselves, which is where the bytes saved pay: decoding streams every weight per token.
There, as in llama.cpp, the few rows of x are rounded to 8-bit blocks of 32 too (d = max|x| / 127, float32) and each
block's product summed in integers (VNNI / AVX2 multiply-adds), then scaled by both blocks' d: the products cost
less than the memory they stream. bf16 and float32 weights multiply float32 x.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from swiftkv import cpu
from swiftkv.modeling.common import Switch

FORMATS = ("float32", "bf16", "int8", "int4")
BLOCK_FORMATS = ("int8", "int4")  # the formats kept as blocks (BlockLinear)
BLOCK = 32  # inputs per scale: GGUF's Q8_0 / Q4_0 / Q4_1 block
NATIVE_ROWS = 8  # up to this many rows, a quantized product reads the blocks natively instead of dequantizing


# ONEDNN_MAX_CPU_ISA values that stop oneDNN below its bf16 instructions (AVX512_CORE_BF16 is the first with them).
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def native_bf16() -> bool:
    """oneDNN multiplies bf16 in hardware here: the CPU has AVX512-BF16 or AMX and ONEDNN_MAX_CPU_ISA (as CI's AVX2
    pass sets it) does not cap oneDNN below them. Elsewhere oneDNN emulates bf16, slower than float32."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in ONEDNN_CAPS_WITHOUT_BF16
    return (cpu.has_avx512_bf16() or cpu.has_amx_tile()) and not capped


def default_format() -> str:
    """The fastest format whose quality holds here (docs/cpu.md, Weight formats): bf16 where the CPU multiplies
    bf16 in hardware; elsewhere int8 where the native step runs (its integer block products decode ~1.8x float32 at
    float32's prefill speed, within +0.5% perplexity), float32 where it cannot (int8 would then dequantize whole
    matrices for every decoded token)."""
    from swiftkv.modeling import native  # native's step reads this module's formats

    if native_bf16():
        return "bf16"
    return "int8" if native.usable() is not None else "float32"


def format_reason(fmt: str) -> str:
    """Why `default_format` picked `fmt` on this CPU, for the line `swiftkv.load` prints."""
    if fmt == "bf16":
        return "the default on a CPU with bf16 hardware: AVX512-BF16/AMX"
    if fmt == "int8":
        return "the default on a CPU without bf16 hardware: native int8 decoding, float32 prefill products"
    return "the default on a CPU without bf16 hardware where the native step cannot run"


def resolve_format(weights: str | None) -> str:
    """`weights` checked (None: the default for this CPU); bf16 on a CPU without bf16 hardware runs float32, with a
    warning saying so."""
    if weights is None:
        return default_format()
    if weights not in FORMATS:
        raise ValueError(f"weights={weights!r} is not a weight format; choose one of {', '.join(FORMATS)}.")
    if weights == "bf16" and not native_bf16():
        warnings.warn(
            "swiftkv: weights='bf16' asked, but this CPU has neither AVX512-BF16 nor AMX, so bf16 products would be "
            "emulated (slower than float32): running float32 weights instead (int8 saves memory here).",
            stacklevel=4,  # the caller of swiftkv.load (-> checked_format -> here)
        )
        return "float32"
    return weights


def resolve_formats(asked: list[str]) -> list[str]:
    """What each asked format runs as here (`resolve_format`: bf16 without bf16 hardware is float32, with a
    warning), in the order asked, once each: a benchmark names and times each configuration by what runs."""
    return list(dict.fromkeys(resolve_format(fmt) for fmt in asked))


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized layer's product runs in for input x: bf16 where the hardware has it (float32 inputs on
    CPU), else x's own."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and native_bf16():
        return torch.bfloat16
    return x.dtype


class BlockLinear(nn.Module):
    """A Linear layer whose weight [out, in] is kept as int8 or int4 blocks of BLOCK inputs (module doc).

    Buffers: `qweight` int8 [out, in] (int8) or uint8 [out, in / 2] (int4: per block, byte j holds input j in its
    low nibble and input j + 16 in its high nibble, GGUF's order); `scales` float16 [out, in / BLOCK]; `mins`
    float16 [out, in / BLOCK] (int4) or None.
    """

    def __init__(self, fmt: str, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bias):
        super().__init__()
        self.format = fmt
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * BLOCK
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bias = bias

    @property
    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, mins): the weight as the extension's products take it (native_product, panel_product).
        Read from `_buffers` itself: through nn.Module.__getattr__ the three cost ~2.8 us, once per product."""
        buffers = self._buffers
        return buffers["qweight"], buffers["scales"], buffers["mins"]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the blocks stand for, computed in float32 (exact: d * q + m has few bits), then cast:
        on CPU by the native extension in one pass (the same values bit for bit; a prefill dequantizes every
        quantized layer it runs, ~1-2% of an int8 prefill in PyTorch's ops), else by PyTorch's."""
        from swiftkv.modeling import native  # native's step reads this module's formats

        if self.qweight.device.type == "cpu" and (extension := native.usable()) is not None:
            return extension.dequantize_blocks(*self.blocks).to(dtype)
        out, blocks = self.scales.shape
        if self.format == "int8":
            q = self.qweight.view(out, blocks, BLOCK).float()
        else:
            q = unpack_int4(self.qweight.view(out, blocks, BLOCK // 2)).float()  # [out, blocks, 32]
        w = q * self.scales.float().unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.float().unsqueeze(-1)
        return w.view(out, self.in_features).to(dtype)

    def quantize_from(self, weight: torch.Tensor) -> None:
        """Replace the blocks by `weight` [out, in] quantized in this layer's format (a weight fitted after load:
        calibration)."""
        parts = quantize_int8(weight) if self.format == "int8" else quantize_int4(weight)
        for name, part in zip(BLOCK_BUFFERS, parts, strict=False):  # int8 has no mins
            setattr(self, name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: `native_product` for a few rows, else `panel_product` where it runs, else the
        dequantized weight times x in `product_dtype`, the bias added in x's dtype. With a gradient to pass back to
        x (distillation trains through frozen blocks), `_BlockProduct`: the same product, the weight dequantized
        again in backward."""
        blocks = self.blocks
        if (y := native_product(x, blocks, self.bias)) is not None:
            return y
        if torch.is_grad_enabled() and x.requires_grad:
            return _BlockProduct.apply(x, self)
        if (y := panel_product(x, blocks, self.bias)) is not None:
            return y
        return rounded_product(x, product_weight(self, x), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class _BlockProduct(torch.autograd.Function):
    """A BlockLinear's product of x [..., in] for training through it: backward gives x's gradient only, grad
    [..., out] @ W [out, in], with W dequantized again there instead of kept from forward. So between forward and
    backward every frozen layer holds its blocks, not a float copy of its weight (the float copies of all layers
    together would be the float model)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: BlockLinear) -> torch.Tensor:
        ctx.layer = layer
        return rounded_product(x, product_weight(layer, x), layer.bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return rounded_product(grad, product_weight(ctx.layer, grad).t(), None), None


def layer_product_dtype(proj: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a prefill product of x by `proj` runs in: a Linear layer's weight's (float32 or bf16), a
    BlockLinear's `product_dtype(x)`."""
    return product_dtype(x) if isinstance(proj, BlockLinear) else proj.weight.dtype


def float_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight values without gradient (a Linear's [out, in]): its parameter, or a BlockLinear's blocks
    dequantized to float32 (exact)."""
    return layer.dequantize() if isinstance(layer, BlockLinear) else layer.weight.detach()


def product_weight(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] a prefill product of x multiplies by, in `layer_product_dtype`: a Linear layer's own,
    a BlockLinear's dequantized."""
    return proj.dequantize(product_dtype(x)) if isinstance(proj, BlockLinear) else proj.weight


def rounded_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight^T with x rounded to weight's dtype (bf16: oneDNN's bf16 kernel), the output and the bias
    in x's dtype: the product of every layer whose weight is not in x's dtype, bf16 or dequantized blocks."""
    y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def native_product(x: torch.Tensor, weight: tuple, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [..., in] @ W^T (+ bias) by the native extension, which reads `weight` ((data, scales, mins), any format) as
    it is stored (int8/int4: x rounded to 8-bit blocks, module doc): for at most NATIVE_ROWS float32 rows on CPU
    without autograd (the LM head after prefill, a decode step), where dequantizing or rounding x to bf16 for a
    whole-matrix product would cost more than the product.
    None where it does not apply (then the caller's product runs)."""
    from swiftkv.modeling import native  # native's step reads this module's formats

    rows = x.numel() // x.shape[-1]
    if rows > NATIVE_ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if (torch.is_grad_enabled() and x.requires_grad) or (extension := native.usable()) is None:
        return None
    return extension.linear(x.reshape(rows, -1), weight, bias).view(*x.shape[:-1], -1)


_panel_products = Switch(True)


def native_panel_products(enabled: bool) -> contextlib.AbstractContextManager:
    """Let `panel_product` run inside the block (False: MKL's products, blocks dequantized for them), then restore."""
    return _panel_products(enabled)


def panel_product(x: torch.Tensor, weight: tuple, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [..., in] @ W^T (+ bias) by the extension's `prefill_linear` for `weight` = (float32 [out, in], None, None)
    or a BlockLinear's (data, scales, mins): csrc/products.cpp takes the weight into cache a panel of columns at a
    time (blocks dequantized there), the float32 product up to summation order. For float32 rows on CPU that need
    no gradient, of a contiguous weight that needs none, where products run in float32 (no bf16 hardware) on MKL
    (ATen below AVX-512) and `in` is a multiple of BLOCK: there it measured level with MKL on long prompts and well
    ahead on short ones, where MKL's 2-thread products and the blocks' whole-weight dequantization cost most
    (docs/cpu.md, "Panel products"). Where ATen runs AVX-512 (oneDNN's products) it is not measured and not used.
    None where it does not apply (then the caller's product runs)."""
    from swiftkv.modeling import kernels, native  # both import this module

    data, scales, mins = weight
    if not _panel_products.on or kernels.ONEDNN_PREFERRED or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or data.requires_grad):  # autograd's products run instead
        return None
    float_weight = scales is None
    if (float_weight and data.dtype != torch.float32) or (not float_weight and native_bf16()):
        return None  # bf16 weights, or blocks multiplied in bf16 (product_dtype)
    if x.shape[-1] % BLOCK or not data.is_contiguous() or (extension := native.usable()) is None:
        return None
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    bias = None if bias is None else bias.detach().float().contiguous()
    y = extension.prefill_linear(rows, data.detach() if float_weight else data, scales, mins, bias)
    return y.view(*x.shape[:-1], -1)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], d float16 [out, in / BLOCK]) of `weight` [out, in]: GGUF Q8_0 blocks, q = round(w / d) in
    [-127, 127]. Each block's d is llama.cpp's Q8_0 rule, max|w| / 127, unless `grid_scale`'s (for a block already
    on a uniform grid) leaves a smaller squared error; both rounded to float16. The grids are searched only in a
    weight whose first row has one: a dequantized checkpoint's tensor is on grids throughout, a float one nowhere
    (the search costs ~10x the rest)."""
    out, blocks = weight.shape[0], weight.shape[1] // BLOCK
    w = weight.detach().float().view(out, blocks, BLOCK)
    amax = w.abs().amax(-1)
    d = (amax / 127).half()
    q, error = _int8_blocks(w, d)
    if not grid_scale(w[:1], amax[:1]).any():  # a float weight: its first row has no grid, so none is searched
        return q.view(out, -1), d
    grid = grid_scale(w, amax).half()
    q_grid, error_grid = _int8_blocks(w, grid)
    better = error_grid < error  # [out, blocks]; a block without a grid has d = 0, q = 0: never better
    q, d = torch.where(better.unsqueeze(-1), q_grid, q), torch.where(better, grid, d)
    return q.view(out, -1), d


def _int8_blocks(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, blocks, BLOCK], squared error [out, blocks]) of blocks w [out, blocks, BLOCK] at float16 scales
    d [out, blocks] (0: q = 0)."""
    scale = d.float().unsqueeze(-1)
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros(()))
    q = (w * inverse).round().clamp(-127, 127)
    return q.to(torch.int8), (q * scale - w).square().sum(-1)


GRID_MULTIPLES = 32  # the finest int8 step tried for a grid block: its own step / 32


def grid_scale(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """The int8 scale [out, blocks] for blocks w [out, blocks, BLOCK] (amax: max|w| per block) whose values lie on
    a uniform grid origin + step * n: a block dequantized from an int4 or any other affine format (every layer of
    the default model is Q4_1, w = m + d4 * n), which absmax's scale would round a second time. 0 where none fits.

    A scale step / k puts every grid point on int8's grid shifted by one amount, frac(k * origin / step) of the new
    step: the k with the least shift is taken, among those keeping |q| <= 127 (k <= 127 step / max|w|). Q4_0's grid
    (origin -8 d4) fits exactly at k = 1. The step is the block's smallest gap between distinct values (gaps under
    2^-12 max|w| are equal values apart by float32 rounding); float weights' gaps are far below max|w| / 127, so no k
    fits them. Sorting through numpy: its vectorised sort is ~8x torch's for these 32-value rows."""
    s = torch.from_numpy(np.sort(w.cpu().numpy(), axis=-1)).to(w.device)  # [out, blocks, BLOCK]
    gaps = s.diff(dim=-1)
    step = torch.where(gaps > amax.unsqueeze(-1) * 2**-12, gaps, torch.inf).amin(-1)  # [out, blocks]
    multiples = torch.where(step.isfinite(), 127 * step / amax, 0).floor().clamp(max=GRID_MULTIPLES)  # largest k
    if (top := int(multiples.max())) < 1:
        return torch.zeros_like(amax)
    k = torch.arange(1, top + 1, dtype=w.dtype, device=w.device)
    shift = (s[..., :1] / step.unsqueeze(-1)) * k  # [out, blocks, top]: the origin in units of step / k
    error = torch.where(k <= multiples.unsqueeze(-1), (shift - shift.round()).abs() / k, torch.inf)  # in steps
    best, index = error.min(-1)
    return torch.where(best.isfinite(), step / (index + 1), torch.zeros(()))


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in / 2], d float16, m float16 [out, in / BLOCK]) of `weight` [out, in]: llama.cpp's Q4_1 rule,
    m = min, d = (max - min) / 15 (both rounded to float16), q = round((w - m) / d) in [0, 15]."""
    out, blocks = weight.shape[0], weight.shape[1] // BLOCK
    w = weight.detach().float().view(out, blocks, BLOCK)
    m = w.amin(-1).half()
    d = ((w.amax(-1) - m.float()) / 15).half()
    inverse = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(()))
    q = ((w - m.float().unsqueeze(-1)) * inverse.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    return pack_int4(q).view(out, -1), d, m


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4`'s inverse: bytes [..., BLOCK / 2] -> values [..., BLOCK] in [0, 15] (uint8)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., BLOCK] values in [0, 15] -> [..., BLOCK / 2] bytes, GGUF's order (low nibbles: inputs 0-15)."""
    half = BLOCK // 2
    return q[..., :half] | (q[..., half:] << 4)


def frozen_bias(linear: nn.Module | None) -> nn.Parameter | None:
    """The bias a BlockLinear takes over from the layer it replaces: float32, no gradient (None without one)."""
    bias = getattr(linear, "bias", None)
    return None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)


def block_linear(linear: nn.Module, fmt: str) -> BlockLinear:
    """`linear` (nn.Linear or one of its subclasses) quantized to `fmt` ("int8" or "int4")."""
    weight = linear.weight
    if weight.shape[1] % BLOCK:
        raise ValueError(
            f"weights={fmt!r} needs every Linear layer's input width to be a multiple of {BLOCK}; a layer of this "
            f"model has {weight.shape[1]} inputs: use weights='bf16' or 'float32' for it."
        )
    bias = frozen_bias(linear)
    if fmt == "int8":
        return BlockLinear(fmt, *quantize_int8(weight), None, bias)
    return BlockLinear(fmt, *quantize_int4(weight), bias)


def apply_format(
    model: nn.Module, fmt: str, blocks: Mapping[str, BlockLinear] | None = None, train_swiftkv: bool = False
) -> nn.Module:
    """Put every Linear layer of `model` (SwiftKV projections and LM head included) in format `fmt`, in place.

    Quantized layers keep no float weight to train. A tied LM head is untied, and the config says so (the embedding
    keeps its float32 rows; a token's lookup reads one row, so it costs no speed). `blocks`: layers already in
    blocks, by weight name (a GGUF file's: gguf_blocks.blocks_for); a layer takes its own as they are where they are
    in the format it gets, instead of quantizing its float weight. `train_swiftkv`: the `*_swiftkv` projections stay
    as they are (distillation trains them in float32 against the other layers in `fmt`).
    """
    from swiftkv.modeling.kernels import move_to_huge_pages, use_fast_linears  # kernels dispatches on BlockLinear

    if fmt == "float32":
        return model
    use_fast_linears(model)  # stock nn.Linear -> FastLinear, whose product handles bf16 weights
    lm_head = model.get_output_embeddings()
    new: list[torch.Tensor] = []
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or (train_swiftkv and name.endswith("_swiftkv")):
                continue
            if fmt == "bf16":
                child.weight = nn.Parameter(child.weight.detach().bfloat16(), requires_grad=False)
                new.append(child.weight)
            else:
                target = "int8" if child is lm_head or name.endswith("_swiftkv") else fmt
                given = (blocks or {}).get(f"{prefix}.{name}.weight".lstrip("."))
                quantized = given if given is not None and given.format == target else block_linear(child, target)
                setattr(parent, name, quantized)
                new += [t for t in quantized.blocks if t is not None]
    move_to_huge_pages(new)  # streamed per decoded token, like float weights (kernels.copy_weights_to_process_memory)
    if lm_head is not None:  # its own tensors now: a later `tie_weights` (conversion, saving) must not re-tie it
        model.config.tie_word_embeddings = False
    return model


def weight_format(model: nn.Module) -> str:
    """The format of `model`'s Linear layers, read from its first decoder layer's query projection."""
    proj = model.get_decoder().layers[0].self_attn.q_proj
    if isinstance(proj, BlockLinear):
        return proj.format
    return "bf16" if proj.weight.dtype == torch.bfloat16 else "float32"


# A checkpoint written by `swiftkv convert --weights F` records F in its config under this key. For int8/int4 its
# quantized layers are stored as BlockLinear's buffers (`P.qweight`, `P.scales`, `P.mins`, as `state_dict` names them)
# instead of `P.weight`: the file keeps the blocks (~1.06 / 0.63 bytes per weight), and loading reuses them as they are.
SAVED_FORMAT_KEY = "swiftkv_weights"
BLOCK_BUFFERS = ("qweight", "scales", "mins")


def store_format(model: nn.Module, fmt: str, blocks: Mapping[str, BlockLinear] | None = None) -> nn.Module:
    """`model` put in format `fmt` for saving (`swiftkv convert --weights`), its config recording it: bf16 Linear
    weights, or int8/int4 blocks (SAVED_FORMAT_KEY above), the LM head untied (`apply_format`, which takes `blocks`
    too). float32: unchanged."""
    if fmt == "float32":
        return model
    apply_format(model, fmt, blocks)
    setattr(model.config, SAVED_FORMAT_KEY, fmt)
    return model


def stored_blocks(state: Mapping[str, torch.Tensor]) -> dict[str, BlockLinear]:
    """{"P.weight": BlockLinear without bias} for every `P.qweight` of a block checkpoint's tensors; the format
    follows the buffers: int4 (uint8 nibbles, with minimums) or int8."""
    blocks = {}
    for name in state:
        if not name.endswith(".qweight"):
            continue
        prefix = name.removesuffix(".qweight")
        qweight, scales, mins = (state.get(f"{prefix}.{buffer}") for buffer in BLOCK_BUFFERS)
        if scales is None:
            raise ValueError(f"block checkpoint: {prefix}.qweight has no {prefix}.scales; the file is damaged.")
        blocks[f"{prefix}.weight"] = BlockLinear("int4" if mins is not None else "int8", qweight, scales, mins, None)
    return blocks


def dequantized_state(state: Mapping[str, torch.Tensor], blocks: Mapping[str, BlockLinear]) -> dict[str, torch.Tensor]:
    """A block checkpoint's tensors with every block layer's `P.weight` (`blocks`, its `stored_blocks`, dequantized
    to float32: exact) in place of its buffers: what the model is built from before `apply_format` takes the blocks."""
    buffers = {f"{name.removesuffix('.weight')}.{buffer}" for name in blocks for buffer in BLOCK_BUFFERS}
    return {name: t for name, t in state.items() if name not in buffers} | {
        name: block.dequantize() for name, block in blocks.items()
    }


def with_model_biases(blocks: dict[str, BlockLinear], model: nn.Module) -> dict[str, BlockLinear]:
    """`blocks` ({"P.weight": BlockLinear}), each given the bias of `model`'s layer P, as `apply_format` takes them."""
    layers = dict(model.named_modules())
    for name, block in blocks.items():
        block.bias = frozen_bias(layers.get(name.removesuffix(".weight")))
    return blocks
