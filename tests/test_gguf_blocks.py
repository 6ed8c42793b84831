"""GGUF weights as they are (gguf_blocks.py): Q8_0 tensors load into int8 and Q4_0 / Q4_1 into int4 byte for byte;
tiny GGUFs written here with gguf-py (llama.cpp's block rules and its converter's q/k row order), and the real
default model (Q4_1 layers, a Q8_0 embedding tied to the LM head)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_base
from test_bad_input import _fails

from swiftkv import embedded, gguf_blocks
from swiftkv.loading import load, load_model
from swiftkv.modeling import weights
from swiftkv.modeling.weights import BlockLinear, apply_format, block_linear

Q = gguf.GGMLQuantizationType
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)]  # the tiny models' 128 ids


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for `heads` heads (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, family: str, layers: Q, head: Q = Q.Q8_0) -> None:
    """A 2-layer tiny `family` model as llama.cpp writes it: Linear weights of type `layers`, the embedding (and the
    LM head, when untied) of type `head`, norms and biases F32; a tied model has no `output` tensor."""
    model = tiny_base(family, num_layers=2)
    config = model.config
    writer = gguf.GGUFWriter(path, family)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(WORDS)
    writer.add_token_scores([0.0] * len(WORDS))
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(WORDS) - 3))
    writer.add_token_merges([])
    names = gguf.get_tensor_name_map(ARCH[family], config.num_hidden_layers)
    for hf_name, param in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, suffix = hf_name.rsplit(".", 1)
        name, data = f"{names.get_name(module)}.{suffix}", param.numpy()
        if family == "llama" and ".attn_q." in name:
            data = _permute(data, config.num_attention_heads)
        elif family == "llama" and ".attn_k." in name:
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1:
            writer.add_tensor(name, data)
            continue
        qtype = head if name.split(".")[0] in ("token_embd", "output") else layers
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def quantized_again(monkeypatch) -> list[str]:
    """The formats of the layers apply_format quantizes from float weights (the file's blocks are taken, not made):
    Q4_1 and Q8_0 blocks quantized again from their own values mostly come out the same, so values alone cannot
    tell."""
    made: list[str] = []

    def spy(linear, fmt):
        made.append(fmt)
        return block_linear(linear, fmt)

    monkeypatch.setattr(weights, "block_linear", spy)
    return made


def _block_layers(model) -> dict[str, BlockLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BlockLinear)}


def assert_the_files_bytes(path: Path, model, arch: gguf.MODEL_ARCH) -> None:
    """Every layer of `model` with a Q8_0 / Q4_0 / Q4_1 tensor in the GGUF at `path` holds that tensor's bytes: its
    blocks written back as GGUF rows (each block: d, Q4_1's m, the quants; q/k rows in llama.cpp's order) are the
    file's rows."""
    config, reader = model.config, gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors if t.tensor_type in gguf_blocks.EXACT}
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    checked = 0
    for name, layer in _block_layers(model).items():
        gguf_name = "token_embd.weight" if name == "lm_head" and tied else f"{names.get_name(name)}.weight"
        if (tensor := tensors.get(gguf_name)) is None:
            continue
        out, blocks = layer.scales.shape
        parts = [layer.scales, *([layer.mins] if tensor.tensor_type == Q.Q4_1 else []), layer.qweight]
        rows = torch.cat([p.view(torch.uint8).reshape(out, blocks, -1) for p in parts], -1).reshape(out, -1).numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and ".attn_q." in gguf_name:
            rows = _permute(rows, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and ".attn_k." in gguf_name:
            rows = _permute(rows, config.num_key_value_heads)
        np.testing.assert_array_equal(rows, tensor.data, err_msg=name)
        checked += 1
    assert checked == len(tensors) - (0 if tied else 1)  # token_embd: the embedding, unless tied to the head


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_split_blocks_dequantize_as_gguf_py(qtype):
    """Our layout of a tensor's blocks stands for exactly the values gguf-py (llama.cpp's reference) dequantizes."""
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0)).numpy()
    raw = gguf.quants.quantize(w, qtype)  # [8, bytes per row]
    layer = BlockLinear(gguf_blocks.EXACT[qtype], *gguf_blocks.split_blocks(raw, qtype), None)
    assert torch.equal(layer.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, qtype)))
    if qtype == Q.Q4_0:  # w = d (q - 8) as int4's d q + m: m = -8 d, exactly
        assert torch.equal(layer.mins.float(), -8 * layer.scales.float())


@pytest.mark.parametrize(
    ("family", "qtype"),
    [("llama", Q.Q8_0), ("llama", Q.Q4_0), ("llama", Q.Q4_1), ("qwen2", Q.Q4_1)],
    ids=lambda x: getattr(x, "name", x),
)
def test_layers_take_the_files_blocks(tmp_path, family, qtype, quantized_again):
    """Every base layer's blocks stand for exactly the weight transformers dequantized (llama's q/k rows in HF's
    order, qwen2's biases kept); the LM head (int8) takes the Q8_0 blocks of `output`, or of `token_embd` where the
    file ties them (llama); the SwiftKV projections, which the file has not, are quantized from the float weights."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, family, qtype)
    fmt = gguf_blocks.EXACT[qtype]
    floats = dict(load(path, weights="float32", skip=0.5)[0].named_modules())
    quantized = load(path, weights=fmt, skip=0.5)[0]
    blocks = _block_layers(quantized)
    assert len(quantized_again) == sum(1 for name in blocks if "swiftkv" in name)
    assert len(blocks) == sum(1 for m in floats.values() if isinstance(m, torch.nn.Linear))
    for name, layer in blocks.items():
        reference = floats[name]
        expected = block_linear(reference, layer.format).dequantize() if "swiftkv" in name else reference.weight
        assert torch.equal(layer.dequantize(), expected), name
        assert layer.bias is None or torch.equal(layer.bias, reference.bias), name
    assert blocks["lm_head"].format == "int8"
    assert_the_files_bytes(path, quantized, ARCH[family])


def test_a_file_in_the_other_format_is_quantized_from_its_values(tmp_path):
    """A Q8_0 file asked as int4 (or Q4_1 as int8) converts: each layer is quantized from the dequantized weight."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", Q.Q8_0)
    floats = dict(load_model(path)[0].named_modules())
    for name, layer in _block_layers(load(path, weights="int4")[0]).items():
        assert torch.equal(layer.dequantize(), block_linear(floats[name], layer.format).dequantize()), name


def test_a_q4_0_file_loads_into_int8_exactly(tmp_path):
    """Q4_0's values d (q - 8) lie on int8's grid at scale d (weights.grid_scale): asked as int8, every layer keeps
    the file's values exactly, where llama.cpp's own scale (max|w| / 127) would round them again."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", Q.Q4_0)
    floats = dict(load_model(path)[0].named_modules())
    for name, layer in _block_layers(load(path, weights="int8")[0]).items():
        assert layer.format == "int8" and torch.equal(layer.dequantize(), floats[name].weight.detach()), name


def test_a_type_no_format_holds_is_refused(tmp_path):
    """Q5_0 layers as int8/int4: one error naming a tensor, its type and the types that load, before loading;
    float32 loads the file dequantized."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", Q.Q5_0)
    for fmt in ("int8", "int4"):
        with pytest.raises(ValueError, match=r"14 weight tensors .* \(Q5_0; e\.g\. blk\.0\.\w+\.weight is Q5_0\)"):
            load(path, weights=fmt)
    assert load(path, weights="float32")[0].config.num_hidden_layers == 2


def test_the_lm_head_loads_from_any_type(tmp_path):
    """An untied LM head of a type no format holds (llama.cpp writes Q6_K there; Q5_0 here) is quantized to int8."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "qwen2", Q.Q4_0, head=Q.Q5_0)
    floats = dict(load_model(path)[0].named_modules())
    head = load(path, weights="int4")[0].lm_head
    assert torch.equal(head.dequantize(), block_linear(floats["lm_head"], "int8").dequantize())


def test_cli_refuses_a_type_no_format_holds(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", Q.Q5_0)
    _fails(["generate", path, "--prompt", "w5 w9", "--weights", "int4"], capsys, "Q5_0", "weights='float32'")


def test_default_model_int4_is_its_gguf_blocks(default_model_dir, quantized_again):
    """The default model at int4: its Q4_1 layers and its Q8_0 embedding (the tied, int8 LM head) as they are, so
    every layer's values are the float32 default model's, which were dequantized from those very blocks."""
    floats = dict(load_model("default")[0].named_modules())
    quantized = load("default", weights="int4")[0]
    blocks = _block_layers(quantized)
    assert not quantized_again
    assert {layer.format for layer in blocks.values()} == {"int4", "int8"} and blocks["lm_head"].format == "int8"
    for name, layer in blocks.items():
        assert torch.equal(layer.dequantize(), floats[name].weight), name
    assert_the_files_bytes(embedded.smollm2_gguf(), quantized, gguf.MODEL_ARCH.LLAMA)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_default_model_blocks_load_from_the_cache_as_the_gguf_gives_them(default_model_dir, fmt, monkeypatch):
    """The default model's blocks are written once as a block checkpoint in the cache; a load then reads that, not the
    GGUF (whose metadata parse cost ~7 s a load), and holds exactly the blocks the GGUF route makes."""
    model = load_model("default")[0]
    direct = _block_layers(apply_format(model, fmt, gguf_blocks.blocks_for(gguf_blocks.source("default", fmt), model)))
    load("default", weights=fmt)  # writes the checkpoint unless an earlier test did

    def no_gguf(*args, **kwargs):
        raise AssertionError("a load from the cache opened the GGUF")

    monkeypatch.setattr(gguf, "GGUFReader", no_gguf)
    cached = _block_layers(load("default", weights=fmt)[0])
    assert cached.keys() == direct.keys()
    for name, layer in cached.items():
        for buffer in ("qweight", "scales", "mins"):
            a, b = getattr(layer, buffer), getattr(direct[name], buffer)
            assert (a is None and b is None) or torch.equal(a, b), f"{name}.{buffer}"
