"""The distillation step's forward and loss: teacher and student share layers 0..L-1, then branch.

Teacher = the SwiftKV model's own base weights with the stock attention in layers >= L (what `swiftkv=False`
runs), under no_grad. Student = the SwiftKV layers. Layers < L have the same frozen weights and the same input
in both, so `h_L` is computed once. Shapes: B batch, T tokens, D hidden, V vocab, n target positions.

Loss (summed here, normalised by the GLOBAL batch's counts so that gradient accumulation and any number of
data-parallel processes give the same gradient as one big batch):
    T^2 * sum_targets KL(softmax(z_t / T) || softmax(z_s / T)) / n_targets
    + w * sum_tokens mean_D (h_s - h_t)^2 / n_tokens        (h = hidden state entering `hidden_layer`)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from swiftkv.modes import swiftkv_mode
from swiftkv.sequences import IGNORE, MicroBatch


@dataclasses.dataclass
class LossTerms:
    total: torch.Tensor  # scalar with grad: what backward() runs on
    kl: torch.Tensor  # scalar, detached: the normalised KL term (x T^2)
    hidden: torch.Tensor  # scalar, detached: the normalised hidden MSE term (unweighted)


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * sum over positions of KL(teacher || student) at temperature T; logits [n, V], computed in float32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2


def hidden_sq_sum(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of the mean over D of (h_s - h_t)^2; hidden [B, T, D], token_mask [B, T] bool."""
    diff = (student.float() - teacher.float())[token_mask]  # [tokens, D]
    return diff.pow(2).mean(-1).sum()


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: logits at t are scored when token t+1 is a target (the last position never is)."""
    targets = torch.zeros_like(labels, dtype=torch.bool)
    targets[:, :-1] = labels[:, 1:] != IGNORE
    return targets


@contextlib.contextmanager
def capture_input(layer: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the hidden state [B, T, D] entering `layer` on each call (teacher and student both call it)."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(hidden))


def shared_prefix_forward(model, batch: MicroBatch, hidden_layer: int | None, all_logits: bool = False):
    """(student logits [n, V], teacher logits [n, V], student hidden, teacher hidden) with layers < L run once.

    Only target positions go through the final norm and the LM head (a [n, V] matmul, not [B*T, V]);
    `all_logits=True` computes every position's logits first (the benchmark separates the two savings).
    Hidden states are None when `hidden_layer` is None.
    """
    decoder = model.model
    targets = target_positions(batch.labels)
    layer = decoder.layers[hidden_layer] if hidden_layer is not None else torch.nn.Identity()
    with capture_input(layer) as seen:
        with torch.no_grad():  # nothing trainable before layer L, and the teacher is frozen
            hidden, inputs = decoder.prepare_layer_inputs(batch.input_ids, attention_mask=batch.attention_mask)
            h_L = decoder.run_prefix_layers(hidden, inputs)  # [B, T, D]
            teacher_out, _ = decoder.run_base_layers(h_L, inputs)
            teacher_logits = (
                _logits(model, teacher_out)[targets] if all_logits else _logits(model, teacher_out[targets])
            )
        student_out, _ = decoder.run_swiftkv_layers(h_L, inputs)
        student_logits = _logits(model, student_out)[targets] if all_logits else _logits(model, student_out[targets])
    hiddens = (seen[1], seen[0]) if hidden_layer is not None else (None, None)
    return student_logits, teacher_logits, *hiddens


def naive_forward(model, batch: MicroBatch, hidden_layer: int | None):
    """The same quantities from two whole-model forwards (teacher: swiftkv off; student: on), full logits.

    The reference for `shared_prefix_forward` (tests) and the baseline of the step-time benchmark.
    """
    targets = target_positions(batch.labels)
    layer = model.model.layers[hidden_layer] if hidden_layer is not None else torch.nn.Identity()
    with capture_input(layer) as seen:
        with swiftkv_mode(model, False), torch.no_grad():
            teacher_logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
        with swiftkv_mode(model, True):
            student_logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    hiddens = (seen[1], seen[0]) if hidden_layer is not None else (None, None)
    return student_logits[targets], teacher_logits[targets], *hiddens


def distill_loss(
    model,
    batch: MicroBatch,
    *,
    temperature: float,
    hidden_weight: float,
    hidden_layer: int,
    num_targets: int,
    num_tokens: int,
    shared_prefix: bool = True,
) -> LossTerms:
    """Loss of one micro-batch, normalised by the global batch's `num_targets` and `num_tokens`."""
    forward = shared_prefix_forward if shared_prefix else naive_forward
    student, teacher, h_student, h_teacher = forward(model, batch, hidden_layer if hidden_weight > 0 else None)
    kl = kl_sum(student, teacher, temperature) / max(num_targets, 1)
    if hidden_weight > 0:
        hidden = hidden_sq_sum(h_student, h_teacher, batch.attention_mask.bool()) / max(num_tokens, 1)
    else:
        hidden = kl.new_zeros(())
    return LossTerms(total=kl + hidden_weight * hidden, kl=kl.detach(), hidden=hidden.detach())
