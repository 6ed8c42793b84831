"""Least-squares K/V initialisation: the fit equals an independent lstsq on explicitly built inputs and targets."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_base
from torch import nn

from swiftkv.calibration import fit_key_value_projections
from swiftkv.conversion import convert
from swiftkv.modeling.weights import apply_format, block_linear

L = 3  # of 6 layers


def _sequences(count=6, length=20, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length + i,), generator=gen).tolist() for i in range(count)]


def _inputs_and_targets(model, sequences) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """X = norm_swiftkv(h_L) [tokens, D] and each layer's own k/v_proj(input_layernorm(h_l)) [tokens, out],
    from the stock forward's hidden states (no hooks, no shared code with the fit)."""
    xs, ys = [], {}
    with torch.no_grad():
        for ids in sequences:
            hidden_states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # h_l = [l]
            xs.append(model.model.norm_swiftkv(hidden_states[L])[0].double())
            for idx in range(L, model.config.num_hidden_layers):
                layer = model.model.layers[idx]
                normed = layer.input_layernorm(hidden_states[idx])[0]
                for name in ("k_proj", "v_proj"):
                    ys.setdefault((idx, name), []).append(getattr(layer.self_attn, name)(normed).double())
    return torch.cat(xs), {key: torch.cat(value) for key, value in ys.items()}


def _lstsq(x: torch.Tensor, y: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if bias:
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
    solution = torch.linalg.lstsq(x, y).solution  # [D(+1), out]
    return solution[: x.shape[1] - bias].T, solution[-1] if bias else None


@pytest.mark.parametrize("group", [1, 3])
def test_fit_equals_lstsq_on_the_teachers_key_values(family, group):
    base = tiny_base(family)
    model = convert(base, L, group)
    model.config.swiftkv = False  # the teacher's forward for the reference inputs/targets
    sequences = _sequences()
    x, targets = _inputs_and_targets(model, sequences)
    model.config.swiftkv = True
    assert fit_key_value_projections(model, sequences, ridge=0.0, progress=False) == len(x)
    for leader in range(L, model.config.num_hidden_layers, group):
        attention = model.model.layers[leader].self_attn
        for name in ("k_proj", "v_proj"):
            linear = getattr(attention, f"{name}_swiftkv")
            # AcrossKV: one projection for the group, fitted to the mean of its layers' targets.
            y = torch.stack([targets[(j, name)] for j in range(leader, leader + group)]).mean(0)
            weight, bias = _lstsq(x, y, linear.bias is not None)
            torch.testing.assert_close(linear.weight.double(), weight, atol=2e-5, rtol=1e-4)
            if bias is not None:
                torch.testing.assert_close(linear.bias.double(), bias, atol=2e-5, rtol=1e-4)


def test_fit_lowers_the_key_value_error_below_the_recipe_init():
    model = convert(tiny_base("llama"), L)
    model.config.swiftkv = False
    x, targets = _inputs_and_targets(model, _sequences(seed=1))
    model.config.swiftkv = True

    def error() -> float:
        with torch.no_grad():
            return sum(
                (getattr(model.model.layers[idx].self_attn, f"{name}_swiftkv")(x.float()).double() - y).pow(2).sum()
                for (idx, name), y in targets.items()
            ).item()

    recipe = error()
    fit_key_value_projections(model, _sequences(count=40, seed=2), progress=False)  # held-out check data
    assert error() < 0.8 * recipe


def test_no_tokens_is_an_error():
    model = convert(tiny_base("llama"), L)
    with pytest.raises(ValueError, match="no tokens"):
        fit_key_value_projections(model, [], progress=False)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_model_in_blocks_gets_the_fit_in_its_format(fmt):
    """A model loaded in int8/int4 (the default without bf16 hardware) keeps its projections as blocks: the fit is
    quantized into them, as a float copy of the same model fits them and quantization rounds that fit."""
    blocks = apply_format(convert(tiny_base("llama"), L, 1), fmt)
    floats = copy.deepcopy(blocks)
    for layer in floats.model.layers[L:]:  # the same int8/int4 base, float projections
        for name in ("k_proj_swiftkv", "v_proj_swiftkv"):
            proj = getattr(layer.self_attn, name)
            linear = nn.Linear(proj.in_features, proj.out_features, bias=False)
            linear.weight.data = proj.dequantize()
            setattr(layer.self_attn, name, linear)
    for model in (blocks, floats):
        fit_key_value_projections(model, _sequences())
    for fitted, reference in zip(blocks.model.layers[L:], floats.model.layers[L:], strict=True):
        for name in ("k_proj_swiftkv", "v_proj_swiftkv"):
            layer = getattr(fitted.self_attn, name)  # int8 in both formats (int4 keeps the projections at int8)
            expected = block_linear(getattr(reference.self_attn, name), layer.format)
            assert torch.equal(layer.qweight, expected.qweight) and torch.equal(layer.scales, expected.scales), name
