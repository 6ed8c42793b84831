"""Distillation checkpoints: `OUTPUT_DIR/checkpoint/step-XXXXXXXX/` directories, each complete or absent.

A checkpoint holds the trainable weights (`trainable.safetensors`), the optimizer, scheduler and every process's
RNG state (`trainer.pt`) and the step, token count and config (`state.json`). The data position is the step
itself (`sequences.BatchPlan`), so nothing else is needed to resume exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from swiftkv.files import staged

CHECKPOINT_DIR = "checkpoint"  # holds step-XXXXXXXX/ directories; the highest-numbered one is the latest


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `out/checkpoint` (each appears by one atomic rename), or None."""
    steps = sorted((Path(out) / CHECKPOINT_DIR).glob("step-*"))
    return steps[-1] if steps else None


# Config fields a resumed run must share with the checkpoint (they fix the model, the data order and the schedule).
RESUME_KEYS = (
    "model",
    "num_key_value_layers",
    "key_value_group_size",
    "dtype",
    "data",
    "split",
    "assistant_only",
    "max_length",
    "max_examples",
    "micro_batch_size",
    "epochs",
    "max_steps",
    "lr",
    "betas",
    "weight_decay",
    "warmup_ratio",
    "schedule",
    "max_grad_norm",
    "temperature",
    "hidden_loss_weight",
    "hidden_loss_layer",
    "seed",
)


def write_checkpoint(out: Path, step: int, weights: dict, trainer: dict, state: dict) -> Path:
    """A new directory per checkpoint, renamed into place when complete, then older ones removed: a kill at any
    moment leaves at least one complete checkpoint (replacing one directory in place cannot)."""
    folder = out / CHECKPOINT_DIR / f"step-{step:08d}"
    with staged(folder, replace=True) as staging:
        staging.mkdir()
        save_file(weights, staging / "trainable.safetensors")
        torch.save(trainer, staging / "trainer.pt")
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for old in sorted((out / CHECKPOINT_DIR).glob("step-*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_checkpoint(out: Path, config: dict, global_batch: int) -> tuple[Path, dict, dict, dict]:
    """(where, state, trainable weights, trainer state) of the latest checkpoint, after checking that `config`
    and `global_batch` match the ones it was written with (RESUME_KEYS)."""
    where = latest_checkpoint(out)
    state = json.loads((where / "state.json").read_text())
    saved = state["config"]
    changed = [f"{k}: {saved.get(k)!r} -> {config[k]!r}" for k in RESUME_KEYS if saved.get(k) != config[k]]
    if state["global_batch"] != global_batch:
        changed.append(f"global batch: {state['global_batch']} -> {global_batch}")
    if changed:
        raise ValueError(
            f"--resume: the config differs from the checkpoint's in {where} ({'; '.join(changed)}); "
            "resume with the same settings, or start a new output_dir."
        )
    trainer = torch.load(where / "trainer.pt", weights_only=False)
    return where, state, load_file(where / "trainable.safetensors"), trainer


def trim_metrics(metrics: Path, step: int) -> None:
    """Drop metrics rows logged after the checkpoint's step: those steps run again."""
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
