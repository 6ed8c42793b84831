"""README's Python API block runs as written (on a tiny checkpoint here; as written on the real model: -m slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_base, tiny_tokenizer

from swiftkv.adapter import WEIGHTS_NAME

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_python_api_block_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    tiny_base("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    code = python_block().replace('checkpoint = "default"', f"checkpoint = {str(model_dir)!r}", 1)
    code = code.replace("The valley changed when the railway came.", "w5 w9 w11 w13")  # the tiny vocabulary
    ns = _run(code, tmp_path, monkeypatch)
    assert ns["model"].config.num_key_value_layers == 3 and ns["fast"].shape == (1, 4 + 8)
    assert ns["undistilled"].config.num_key_value_layers == 4  # skip=0.25 of 6 layers: 6 - round(1.5)
    assert (tmp_path / "out/my-adapter" / WEIGHTS_NAME).is_file()  # the relative path, under the working directory
    for name, param in ns["distilled"].named_parameters():  # the saved adapter round-trips (bf16 storage)
        if "swiftkv" in name:
            torch.testing.assert_close(param, dict(ns["model"].named_parameters())[name], atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_python_api_block_runs_as_written(tmp_path, monkeypatch):
    ns = _run(python_block(), tmp_path, monkeypatch)
    assert ns["model"].config.num_key_value_layers == 15
