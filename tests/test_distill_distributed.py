"""Real processes: torchrun data parallelism (gloo, CPU) equals one process; a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distill_helpers import chat_file, tiny_config, tiny_model_dir

import swiftkv
from swiftkv.adapter import read_adapter
from swiftkv.distill.checkpoint import latest_checkpoint
from swiftkv.distill.recipe import DistillRecipe
from swiftkv.modeling.weights import quantize_int8, weight_format


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return tiny_model_dir(root / "base"), chat_file(root / "chats.jsonl", conversations=48)


def _yaml(config, path):
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _weights(out):
    return load_file(latest_checkpoint(out) / "trainable.safetensors")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(setup, tmp_path, mode):
    model_dir, chats = setup
    common = dict(micro_batch_size=1, max_steps=3, split="all", distributed=mode, adapter_dtype="float32")
    common |= dict(init="least_squares", init_tokens=2000)  # each process fits on its share: sums all-reduced
    one = tiny_config(model_dir, chats, tmp_path / "one", gradient_accumulation_steps=4, **common)
    DistillRecipe(one, quiet=True).run()
    two = tiny_config(model_dir, chats, tmp_path / "two", gradient_accumulation_steps=2, **common)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "swiftkv.cli", "distill", str(_yaml(two, tmp_path / "two.yaml"))]
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((latest_checkpoint(tmp_path / "two") / "state.json").read_text())["world_size"] == 2
    single, double = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], atol=1e-6, rtol=1e-5)
    history = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(history, reference, strict=True):
        # The KL of two nearly equal distributions (~6e-5 here) is a cancellation: compare it in absolute terms too
        # (the per-process micro-batches have other shapes, so the kernels round differently).
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6) and a["tokens_seen"] == b["tokens_seen"]
    if mode == "fsdp":  # resuming loads full weights and optimizer state into the shards; nothing is left to run
        run = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=_env(), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        _, adapter = read_adapter(tmp_path / "two" / "adapter")
        for name in double:
            torch.testing.assert_close(adapter[name], double[name], atol=0, rtol=0)


def test_fsdp_against_int8_weights_saves_the_model_in_int8(setup, tmp_path):
    """FSDP2 shards the float parameters; the int8 blocks (buffers) stay whole in every process. The full checkpoint
    is rebuilt from the base weights with the trained projections, in int8, as one process would save it."""
    model_dir, chats = setup
    settings = dict(micro_batch_size=1, max_steps=1, split="all", distributed="fsdp", weights="int8")
    config = tiny_config(model_dir, chats, tmp_path / "run", save_full_checkpoint=True, **settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "swiftkv.cli", "distill", str(_yaml(config, tmp_path / "c.yaml"))]
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    model, _ = swiftkv.load(tmp_path / "run" / "model")
    assert weight_format(model) == "int8"
    trained = _weights(tmp_path / "run")
    projection = model.model.layers[3].self_attn.k_proj_swiftkv  # stored as int8 blocks of the trained weight
    expected = quantize_int8(trained["model.layers.3.self_attn.k_proj_swiftkv.weight"])
    assert torch.equal(projection.qweight, expected[0]) and torch.equal(projection.scales, expected[1])


def test_killed_run_resumes_to_the_same_weights(setup, tmp_path):
    model_dir, chats = setup
    settings = dict(micro_batch_size=1, gradient_accumulation_steps=1, max_steps=150, save_interval=3, split="all")
    config = tiny_config(model_dir, chats, tmp_path / "killed", **settings)
    command = [sys.executable, "-m", "swiftkv.cli", "distill", str(_yaml(config, tmp_path / "c.yaml"))]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "killed" / "checkpoint"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:  # kill once the step-6 checkpoint is complete
        if any(int(p.name.removeprefix("step-")) >= 6 for p in checkpoints.glob("step-*")):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {stderr[-2000:]}"
    saved = json.loads((latest_checkpoint(tmp_path / "killed") / "state.json").read_text())["step"]
    assert 6 <= saved < 150

    resumed = DistillRecipe(config, resume=True, quiet=True)
    resumed.run()
    assert resumed.history[0]["step"] == saved + 1 and resumed.step == 150
    uninterrupted = tiny_config(model_dir, chats, tmp_path / "straight", **settings)
    DistillRecipe(uninterrupted, quiet=True).run()
    a, b = _weights(tmp_path / "killed"), _weights(tmp_path / "straight")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))  # rows logged after the checkpoint were dropped, then rewritten


def test_resume_refuses_a_changed_config(setup, tmp_path):
    model_dir, chats = setup
    config = tiny_config(model_dir, chats, tmp_path / "run", max_steps=2)
    DistillRecipe(config, quiet=True).run()
    changed = tiny_config(model_dir, chats, tmp_path / "run", max_steps=2, lr=5e-4)
    with pytest.raises(ValueError, match=r"differs from the checkpoint's .*lr: 0.001 -> 0.0005"):
        DistillRecipe(changed, resume=True, quiet=True).setup()
