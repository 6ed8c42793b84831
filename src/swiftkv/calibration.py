"""Least-squares initialisation of the SwiftKV K/V projections: one calibration pass, no gradients.

The recipe's initialisation copies each layer's own `k/v_proj`, which were trained for that layer's input, not for
x = norm_swiftkv(h_L). Here every group leader's `k/v_proj_swiftkv` is instead the ridge-regression fit from x to
the base model's own K/V of its group's layers on real tokens: for AcrossKV the fit targets the group's mean, which
minimises the squared error summed over the group's layers. Why plain least squares is the right target: the map
is an unconstrained linear one, so the same fit minimises ANY positive-definite weighting of the output error (for
instance by the covariance of the queries that will read these keys); RoPE is a rotation applied after the
projection, so the pre-RoPE error equals the post-RoPE one; and a family's per-head `k_norm` (Qwen3) follows the
projection on both paths, so fitting the projection's output fits its input too.
"""

from __future__ import annotations

import argparse
import functools
import random
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from swiftkv.modeling.weights import BlockLinear

PROJECTIONS = ("k_proj", "v_proj")
MAX_LENGTH = 2048  # tokens per calibration sequence (the model's context if shorter)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--calibrate / --calibration-tokens, shared by `swiftkv convert` and `swiftkv eval`."""
    parser.add_argument(
        "--calibrate",
        nargs="+",
        metavar="DATA",
        help="fit the new K/V projections by least squares on these sources (named, e.g. chitchat, or local files; "
        "their training split) instead of the recipe's copies: much closer to the base model before any distillation",
    )
    parser.add_argument("--calibration-tokens", type=int, default=100_000, help="tokens used by --calibrate")


def check_tokens(tokens: int) -> None:
    """Callers check before loading a model, so that a bad count fails fast."""
    if tokens < 1:
        raise ValueError(f"--calibration-tokens={tokens} is invalid: it must be >= 1 (default 100000).")


def calibrate(model: nn.Module, tokenizer, sources: Sequence[str], tokens: int = 100_000, seed: int = 0) -> int:
    """`fit_key_value_projections` on ~`tokens` tokens of the sources' training split; returns the tokens used."""
    from swiftkv.sequences import build_sequences  # the distillation's data loading (chats, text, files)

    if tokenizer is None:
        raise ValueError("Calibration needs the model's tokenizer, and this checkpoint has none.")
    check_tokens(tokens)
    length = min(getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH, MAX_LENGTH)
    sequences, _ = build_sequences(tokenizer, list(sources), length, assistant_only=False, split="train")
    return fit_key_value_projections(model, sample_tokens(sequences, tokens, seed))


def sample_tokens(sequences: Sequence, tokens: int, seed: int = 0) -> list[list[int]]:
    """A fixed, seeded random choice of whole sequences (objects with `input_ids`) holding >= `tokens` tokens."""
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for index in order:
        if total >= tokens:
            break
        chosen.append(list(sequences[index].input_ids))
        total += len(chosen[-1])
    return chosen


@torch.no_grad()
def fit_key_value_projections(
    model: nn.Module, sequences: Sequence[Sequence[int]], ridge: float = 1e-4, progress: bool = True
) -> int:
    """Set every leader's `k/v_proj_swiftkv` (weight, and bias where the family has one) by least squares.

    `sequences`: token ids, each run on its own (no padding). `ridge`: Tikhonov term relative to the mean input
    energy. Under torch.distributed every process passes its own share of the sequences and all get the same
    fit (the normal-equation sums are all-reduced). Returns the number of calibration tokens seen (all ranks).
    """
    decoder, config = model.model, model.config
    device = decoder.norm_swiftkv.weight.device
    dim = config.hidden_size + 1  # + a constant 1 for the bias
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum x x^T
    cross: dict[tuple[int, str], torch.Tensor] = {}  # (leader, proj) -> sum x y^T / g   [dim, out]
    current: list[torch.Tensor] = []  # the sequence's x with the constant column [T, dim]

    def accumulate(leader: int, name: str, _module, _inputs, output: torch.Tensor) -> None:
        y = output.reshape(-1, output.shape[-1]).double()  # [T, out]: pre-RoPE, pre-k_norm K (or V)
        term = current[0].T @ y / config.key_value_group_size
        cross[(leader, name)] = cross[(leader, name)] + term if (leader, name) in cross else term

    hooks = [
        getattr(decoder.layers[idx].self_attn, name).register_forward_hook(
            functools.partial(accumulate, config.leader_of(idx), name)
        )
        for idx in range(config.num_key_value_layers, config.num_hidden_layers)
        for name in PROJECTIONS
    ]
    tokens = 0
    try:
        for ids in tqdm(sequences, desc="calibrate K/V", unit="seq", disable=not progress):
            hidden, inputs = decoder.prepare_layer_inputs(torch.tensor([list(ids)], device=device))
            h_L = decoder.run_prefix_layers(hidden, inputs)  # [1, T, D]
            x = decoder.norm_swiftkv(h_L)[0].double()  # [T, D]
            current[:] = [torch.cat([x, x.new_ones(len(x), 1)], dim=1)]
            gram += current[0].T @ current[0]
            tokens += len(x)
            decoder.run_base_layers(h_L, inputs)  # the hooks collect the teacher's K/V of layers >= L
    finally:
        for hook in hooks:
            hook.remove()
    if dist.is_available() and dist.is_initialized():
        for total in (gram, *cross.values()):
            dist.all_reduce(total)
        tokens_t = torch.tensor(tokens, device=device)
        dist.all_reduce(tokens_t)
        tokens = int(tokens_t)
    if tokens == 0:
        raise ValueError("Least-squares calibration got no tokens; give it at least one non-empty sequence.")
    _solve_into(decoder, gram, cross, ridge)
    return tokens


def _solve_into(decoder: nn.Module, gram: torch.Tensor, cross: dict, ridge: float) -> None:
    """W = (X^T X + ridge * mean diag * I)^-1 X^T Y for every (leader, projection), written into the model."""
    dim = gram.shape[0]
    for (leader, name), xty in cross.items():
        linear = getattr(decoder.layers[leader].self_attn, f"{name}_swiftkv")
        keep = dim if linear.bias is not None else dim - 1  # no bias: drop the constant column
        a = gram[:keep, :keep]
        a = a + ridge * a.diagonal().mean() * torch.eye(keep, dtype=a.dtype, device=a.device)
        solution = torch.linalg.solve(a, xty[:keep])  # [keep, out]
        fitted = solution[: dim - 1].T  # [out, in]
        if isinstance(linear, BlockLinear):  # a model loaded in int8/int4: the fit stored in the layer's format
            linear.quantize_from(fitted)
        else:
            linear.weight.copy_(fitted)
        if linear.bias is not None:
            linear.bias.copy_(solution[dim - 1])
