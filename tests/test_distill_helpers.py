"""Shared pieces of the distillation tests: a tiny character tokenizer with a chat template, a tiny model
directory that `load_model` accepts, and a small chat data file. (No tests here.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import tiny_base
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

# The SmolLM2 template, with a shorter default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "the cat sat on a mat we ran to see sun and rain it was fun yes no maybe why how".split()


def char_tokenizer(template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character (ids 4..99) plus <pad>=0, <|im_start|>=1, <|im_end|>=2 (eos), <unk>=3."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = template
    return tokenizer


def tiny_model_dir(path: Path, family: str = "llama", num_layers: int = 6) -> Path:
    """A stock tiny random model + the char tokenizer, saved where `load_model(path)` finds them."""
    model = tiny_base(family, num_layers=num_layers)
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def sentence(rng: random.Random, low: int = 3, high: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def chat_file(path: Path, conversations: int = 40, seed: int = 0) -> Path:
    """JSONL of short user/assistant conversations (1-3 exchanges)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(conversations):
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages += [
                    {"role": "user", "content": sentence(rng)},
                    {"role": "assistant", "content": sentence(rng)},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def tiny_config(model_dir: Path, data: Path, out: Path, **overrides):
    """A DistillConfig for the tiny model: seconds per run on CPU."""
    from swiftkv.distill.config import build_config

    values = dict(
        model=str(model_dir),
        num_key_value_layers=3,
        key_value_group_size=1,
        data=[str(data)],
        max_length=64,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        lr=1e-3,
        output_dir=str(out),
        save_interval=2,
        log_interval=1,
        threads=1,
        device="cpu",  # the CPU paths (gloo); tests/test_cuda.py runs the recipe on a GPU
        save_full_checkpoint=False,
    )
    return build_config(values | overrides)
