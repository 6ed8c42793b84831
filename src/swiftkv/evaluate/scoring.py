"""Teacher and student forwards for scoring, and the per-token statistics built on them.

Two modes of ONE model object: "base" (`config.swiftkv = False`, the exact base model = the teacher) and
"swiftkv" (the student). Everything here is a full forward: every token runs every layer, so the log-prob of
every token is right (the skipping path would be silently wrong for prompt tokens). When both modes are wanted
on a SwiftKV model, layers < L run once and the stack branches (`run_base_layers` / `run_swiftkv_layers`).
Shapes: B batch, T tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from swiftkv.modes import is_swiftkv, swiftkv_mode

BASE, SWIFTKV = "base", "swiftkv"
MODES = (BASE, SWIFTKV)


def available_modes(model: PreTrainedModel) -> tuple[str, ...]:
    """("base", "swiftkv") for a SwiftKV model, ("base",) for any other model."""
    return MODES if is_swiftkv(model) else (BASE,)


@contextlib.contextmanager
def mode(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Run the block as the teacher ("base") or the student ("swiftkv"); restores the previous mode."""
    if name not in MODES:
        raise ValueError(f"mode={name!r} is invalid; choose one of {', '.join(MODES)}.")
    with swiftkv_mode(model, name == SWIFTKV):
        yield


@torch.inference_mode()
def final_hidden(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, modes: Sequence[str]
) -> dict[str, torch.Tensor]:
    """{mode: hidden states after the final norm [B, T, D]} of every token (full forward)."""
    if is_swiftkv(model) and set(modes) == set(MODES):
        base, finals = variants_hidden({SWIFTKV: model}, ids, mask)
        return {BASE: base, SWIFTKV: finals[SWIFTKV]}
    out = {}
    for name in modes:
        with mode(model, name):
            out[name] = model.model(ids, attention_mask=mask).last_hidden_state
    return out


def logits_of(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head on hidden states [..., D] -> float32 logits [..., V]."""
    return model.lm_head(hidden).float()


@torch.inference_mode()
def token_stats(teacher: torch.Tensor, student: torch.Tensor | None, targets: torch.Tensor) -> dict[str, float]:
    """Sums over positions of: teacher/student NLL of `targets`, KL(teacher || student), top-1 agreement.

    teacher, student: logits [T, V] (student may be None: base-only model); targets [T] token ids.
    """
    log_t = F.log_softmax(teacher.float(), dim=-1)  # [T, V]
    sums = {"tokens": targets.numel(), "nll_base": -log_t.gather(-1, targets[:, None]).sum().item()}
    if student is not None:
        log_s = F.log_softmax(student.float(), dim=-1)
        sums["nll_swiftkv"] = -log_s.gather(-1, targets[:, None]).sum().item()
        sums["kl"] = (log_t.exp() * (log_t - log_s)).sum().item()
        sums["agree"] = (log_t.argmax(-1) == log_s.argmax(-1)).sum().item()
    return sums


def add_sums(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


@torch.inference_mode()
def sequence_stats(
    model: PreTrainedModel, ids: torch.Tensor, modes: Sequence[str], chunk: int = 256
) -> dict[str, float]:
    """Token statistics (see `token_stats`) of one sequence ids [1, T]: each token scored given all before it.

    The lm_head runs `chunk` positions at a time so memory stays at a few [chunk, V] tensors.
    """
    if set(modes) == set(MODES) and is_swiftkv(model):
        return variants_stats({SWIFTKV: model}, ids, chunk)[SWIFTKV]
    hidden = final_hidden(model, ids, None, modes)
    targets = ids[0, 1:]  # position t predicts token t+1
    total: dict[str, float] = {}
    for start in range(0, targets.numel(), chunk):
        stop = min(start + chunk, targets.numel())
        teacher = logits_of(model, hidden[BASE][0, start:stop]) if BASE in hidden else None
        student = logits_of(model, hidden[SWIFTKV][0, start:stop]) if SWIFTKV in hidden else None
        if teacher is None:  # student only: report it under the student's name
            add_sums(total, _rename(token_stats(student, None, targets[start:stop])))
        else:
            add_sums(total, token_stats(teacher, student, targets[start:stop]))
    return total


@torch.inference_mode()
def variants_hidden(
    variants: dict[str, PreTrainedModel], ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(base model's, {name: each variant's}) hidden states after the final norm [B, T, D], full forward, for
    SwiftKV variants of ONE base model (built from the same base weights by `convert` / `apply_adapter`): the base
    branch runs once, and layers < L once per distinct L (h_L is what both branches start from)."""
    models = list(variants.values())
    hidden, inputs = models[0].model.prepare_layer_inputs(ids, attention_mask=mask)
    prefix: dict[int, torch.Tensor] = {}  # L -> h_L [B, T, D]
    for model in models:
        layers = model.config.num_key_value_layers
        if layers not in prefix:
            prefix[layers] = model.model.run_prefix_layers(hidden, inputs)
    deepest = max(models, key=lambda m: m.config.num_key_value_layers).model
    base = deepest.norm(deepest.run_base_layers(prefix[deepest.config.num_key_value_layers], inputs)[0])
    finals = {
        name: model.model.norm(model.model.run_swiftkv_layers(prefix[model.config.num_key_value_layers], inputs)[0])
        for name, model in variants.items()
    }
    return base, finals


@torch.inference_mode()
def variants_stats(
    variants: dict[str, PreTrainedModel], ids: torch.Tensor, chunk: int = 256, scored: torch.Tensor | None = None
) -> dict[str, dict]:
    """{name: `sequence_stats` sums} of several SwiftKV variants of ONE base model against it, for ids [1, T];
    `scored` [T-1] bool limits the sums to those positions (e.g. assistant tokens; default: every position).
    The base forward (`variants_hidden`) and its logits run once for all variants.
    """
    models = list(variants.values())
    base, finals = variants_hidden(variants, ids)
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)  # position t predicts token t+1
    if scored is not None:
        positions = positions[scored.to(ids.device)]
    totals: dict[str, dict] = {name: {} for name in variants}
    for start in range(0, positions.numel(), chunk):
        at = positions[start : start + chunk]
        teacher = logits_of(models[0], base[0, at])
        for name, final in finals.items():
            add_sums(totals[name], token_stats(teacher, logits_of(variants[name], final[0, at]), ids[0, at + 1]))
    return totals


def _rename(sums: dict[str, float]) -> dict[str, float]:
    return {("nll_swiftkv" if k == "nll_base" else k): v for k, v in sums.items()}


def summarize_text(sums: dict[str, float]) -> dict[str, object]:
    """Perplexities, mean KL per token (nats) and top-1 agreement from the sums of `sequence_stats`."""
    tokens = max(sums.get("tokens", 0), 1)
    out: dict[str, object] = {"tokens": int(sums.get("tokens", 0))}
    for name in MODES:
        if f"nll_{name}" in sums:
            out[name] = {"ppl": math.exp(sums[f"nll_{name}"] / tokens)}
    if "kl" in sums:
        out["kl"] = sums["kl"] / tokens
        out["agreement"] = sums["agree"] / tokens
    return out
