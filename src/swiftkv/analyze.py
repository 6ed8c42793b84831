"""Rank candidate L before any training: residual-stream similarity, undistilled KL/agreement, prefill saving.

For a sample of held-out text the base model runs once, keeping the residual stream h_i entering every layer
(h_0 = embeddings, h_N = output of the last layer). Then, for each candidate L, the SwiftKV student of the
reference initialisation (no training) runs ONLY its layers L..N-1 from the base model's own h_L (layers < L
are shared), and is compared with the base logits. SwiftKV computes every later layer's K/V from h_L, so the
closer h_L is to the inputs h_i of the layers it replaces, the less there is for distillation to recover.

The recommendation for a quality budget is the candidate with the largest prefill saving among those within
the budget: a larger budget admits a superset of candidates, so the recommended saving never decreases.
Shapes: T tokens of one sample, D hidden size, V vocabulary, N layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swiftkv import theory
from swiftkv.conversion import convert
from swiftkv.evaluate.scoring import BASE, mode
from swiftkv.files import save_figure
from swiftkv.modeling.weights import apply_format


@torch.inference_mode()
def residual_streams(model: PreTrainedModel, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([h_0 .. h_N], each [1, T, D]; base logits [1, T, V]) from one base forward (hooks on every layer)."""
    captured: list[torch.Tensor] = []
    layers = model.model.layers
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, kw: captured.append(_hidden_arg(args, kw)), with_kwargs=True)
        for layer in layers
    ]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0])))
    try:
        with mode(model, BASE):
            logits = model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return captured, logits


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def cosine_matrix(streams: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N+1, N+1]: mean over tokens of cos(h_i, h_j). Position 0 is left out: its residual stream is dominated
    by a few huge "attention sink" features in most LLMs and says little about the others."""
    stacked = torch.stack([h[0, 1:] if h.shape[1] > 1 else h[0] for h in streams]).float()  # [N+1, T, D]
    unit = F.normalize(stacked, dim=-1)
    return torch.einsum("itd,jtd->ijt", unit, unit).mean(-1)


@torch.inference_mode()
def student_logits(student: PreTrainedModel, ids: torch.Tensor, h_L: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, V] of the SwiftKV student from the base model's h_L [1, T, D] (layers < L are shared)."""
    decoder = student.model
    _, inputs = decoder.prepare_layer_inputs(ids)
    hidden, _ = decoder.run_swiftkv_layers(h_L, inputs)
    return student.lm_head(decoder.norm(hidden))


def candidate_layers(num_layers: int, group_size: int = 1, min_fraction: float = 0.25) -> list[int]:
    """Default candidates: every L from ceil(N * min_fraction) to N-1 whose later layers split into groups of g."""
    start = max(1, math.ceil(num_layers * min_fraction))
    return [L for L in range(start, num_layers) if (num_layers - L) % group_size == 0]


def analyze(
    model: PreTrainedModel,
    samples: Sequence[torch.Tensor],
    candidates: Sequence[int] | None = None,
    group_size: int = 1,
    prompt_length: int = 2048,
    weights: str | None = None,
) -> dict[str, object]:
    """Per-layer similarities and, per candidate L, undistilled KL / agreement next to the prefill saving.

    `model` has float Linear weights (conversion reads them); `weights` ("int8" / "int4") then puts the base model and
    every candidate in that format (modeling/weights.py), each candidate its own blocks."""
    num_layers = model.config.num_hidden_layers
    candidates = sorted(candidates or candidate_layers(num_layers, group_size))
    students = {L: convert(model, L, group_size).eval() for L in candidates}  # shares the base weights
    if weights is not None:
        for m in (model, *students.values()):
            apply_format(m, weights)
    cos_sum = torch.zeros(num_layers + 1, num_layers + 1)
    sums = {L: {"kl": 0.0, "agree": 0.0} for L in candidates}
    tokens = 0
    for ids in tqdm(samples, desc="analyze", leave=False):
        ids = ids.to(model.device)
        streams, teacher = residual_streams(model, ids)
        scored = ids.shape[1] - 1  # positions that predict a next token, as in `swiftkv eval`
        cos_sum += cosine_matrix(streams) * scored
        log_t = F.log_softmax(teacher[0, :-1].float(), dim=-1)  # [T-1, V]
        for L, student in students.items():
            log_s = F.log_softmax(student_logits(student, ids, streams[L])[0, :-1].float(), dim=-1)
            sums[L]["kl"] += float((log_t.exp() * (log_t - log_s)).sum())
            sums[L]["agree"] += float((log_t.argmax(-1) == log_s.argmax(-1)).sum())
        tokens += scored
    cos = cos_sum / tokens
    rows = []
    for L, student in students.items():
        ratio = theory.theoretical_prefill_flops_ratio(student.config, prompt_length)
        rows.append(
            {
                "num_key_value_layers": L,
                "skipped_layers": num_layers - L,
                "prefill_saving": 1 - ratio,
                "kv_bytes_ratio": theory.kv_bytes_ratio(student.config),
                "kl": sums[L]["kl"] / tokens,
                "agreement": sums[L]["agree"] / tokens,
                # how well h_L stands in for the inputs of the layers it replaces
                "cos_h_L_later": float(cos[L, L:num_layers].mean()),
            }
        )
    return {
        "num_hidden_layers": num_layers,
        "key_value_group_size": group_size,
        "prompt_length": prompt_length,
        "samples": len(samples),
        "tokens": tokens,
        "layers": [
            {
                "layer": i,
                "cos_to_last_input": float(cos[i, num_layers - 1]),
                "cos_to_next": float(cos[i, i + 1]),
            }
            for i in range(num_layers)
        ],
        "cosine_matrix": cos.tolist(),
        "candidates": rows,
    }


def recommend(
    candidates: Sequence[dict], max_kl: float | None = None, min_agreement: float | None = None
) -> dict | None:
    """The candidate with the largest prefill saving whose KL <= max_kl and agreement >= min_agreement.

    None when no candidate fits (then: do not use SwiftKV, or distil and measure). Ties: the larger L.
    """
    fits = [
        row
        for row in candidates
        if (max_kl is None or row["kl"] <= max_kl) and (min_agreement is None or row["agreement"] >= min_agreement)
    ]
    return max(fits, key=lambda row: (row["prefill_saving"], row["num_key_value_layers"]), default=None)


def format_table(result: dict, recommended: dict | None = None) -> str:
    lines = [
        f"{'L':>3} {'skip':>4} {'prefill saving':>14} {'KV bytes':>8} {'KL nats/tok':>11} {'agreement':>9} "
        f"{'cos(h_L, later)':>15}"
    ]
    for row in result["candidates"]:
        mark = "  <- recommended" if recommended is not None and row is recommended else ""
        lines.append(
            f"{row['num_key_value_layers']:>3} {row['skipped_layers']:>4} {row['prefill_saving']:>14.1%} "
            f"{row['kv_bytes_ratio']:>8.3f} {row['kl']:>11.4f} {row['agreement']:>9.3f} "
            f"{row['cos_h_L_later']:>15.3f}{mark}"
        )
    return "\n".join(lines)


def format_layers(result: dict) -> str:
    lines = [f"{'layer':>5} {'cos(h_i, h_N-1)':>15} {'cos(h_i, h_i+1)':>15}"]
    lines += [
        f"{row['layer']:>5} {row['cos_to_last_input']:>15.3f} {row['cos_to_next']:>15.3f}" for row in result["layers"]
    ]
    return "\n".join(lines)


def plot(result: dict, path: str | Path, recommended: dict | None = None, max_kl: float | None = None) -> Path:
    """Left: prefill saving vs undistilled KL per candidate L. Right: per-layer residual-stream similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = result["candidates"]
    left.plot([r["prefill_saving"] * 100 for r in rows], [r["kl"] for r in rows], "o-")
    for r in rows:
        left.annotate(
            str(r["num_key_value_layers"]),
            (r["prefill_saving"] * 100, r["kl"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    if recommended is not None:
        left.plot([recommended["prefill_saving"] * 100], [recommended["kl"]], "r*", markersize=14, label="recommended")
    if max_kl is not None:
        left.axhline(max_kl, color="gray", linestyle="--", label=f"budget KL <= {max_kl:g}")
    left.set_yscale("symlog", linthresh=1e-3)  # log-like, but KL = 0 (L = N-1 at init) stays visible
    left.set_ylim(bottom=0)
    left.set_xlabel(f"prefill FLOPs saved (%) at {result['prompt_length']} tokens")
    left.set_ylabel("undistilled KL(base || SwiftKV), nats/token")
    left.set_title(f"candidates L (labels), g={result['key_value_group_size']}")
    if recommended is not None or max_kl is not None:
        left.legend(fontsize=8)
    layers = result["layers"]
    right.plot([r["layer"] for r in layers], [r["cos_to_last_input"] for r in layers], "o-", label="cos(h_i, h_N-1)")
    right.plot([r["layer"] for r in layers], [r["cos_to_next"] for r in layers], "s-", label="cos(h_i, h_i+1)")
    right.set_xlabel("layer i (h_i = residual stream entering layer i)")
    right.set_ylabel("mean cosine similarity")
    right.legend(fontsize=8)
    return save_figure(fig, path)
