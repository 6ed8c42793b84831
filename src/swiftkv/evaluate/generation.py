"""GSM8K exact match through the real `model.generate` (in SwiftKV mode: the fast-prefill, skipping path).

Problems: the fixed held-out split of `gsm8k-test` (about 66 of 1,319; the same split every run and never
used for distillation). Few-shot exemplars: the first `shots` problems of the other split, worked answers with
the calculator annotations `<<48/2=24>>` removed. Greedy decoding, left-padded batches, stop at "Question:".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swiftkv.corpora import load_examples
from swiftkv.evaluate.scoring import MODES, mode

STOP = "Question:"
_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def _question_answer(example: dict) -> tuple[str, str]:
    messages = example["messages"]
    return messages[0]["content"].strip(), messages[1]["content"].strip()


def clean_answer(answer: str) -> str:
    """Worked answer without calculator annotations: 'half <<48/2=24>>24' -> 'half 24'."""
    return re.sub(r"<<[^>]*>>", "", answer)


def normalize_number(text: str | None) -> str | None:
    """'1,234.50' / '$1234.5' -> '1234.5'; None when `text` is not a number."""
    if text is None:
        return None
    try:
        value = Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f")


def extract_answer(generation: str) -> str | None:
    """The final number: after '####' (the format the exemplars teach), else the last number in the text."""
    generation = generation.split(STOP)[0]
    if "####" in generation:
        numbers = _NUMBER.findall(generation.split("####", 1)[1])
        return normalize_number(numbers[0]) if numbers else None
    numbers = _NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_prompts(shots: int = 4, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(prompts, gold answers) for the held-out problems, each prompt `shots` worked examples + the question."""
    exemplars = [_question_answer(ex) for ex in load_examples("gsm8k-test", split="train")[:shots]]
    header = "".join(f"Question: {q}\nAnswer: {clean_answer(a)}\n\n" for q, a in exemplars)
    problems = [_question_answer(ex) for ex in load_examples("gsm8k-test", split="heldout")][:limit]
    prompts = [f"{header}Question: {q}\nAnswer:" for q, _ in problems]
    gold = [normalize_number(a.split("####")[-1].strip()) for _, a in problems]
    return prompts, gold


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of a left-padded batch (stops once every row has produced 'Question:')."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=[STOP],
        tokenizer=tokenizer,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def run_gsm8k(
    model: PreTrainedModel,
    tokenizer,
    modes: Sequence[str],
    limit: int | None = None,
    shots: int = 4,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> dict[str, object]:
    """{examples, <mode>: {exact_match}, answer_agreement, predictions: [{gold, <mode>: answer}]}."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts, gold = gsm8k_prompts(shots, limit)
    answers: dict[str, list[str | None]] = {}
    for name in modes:
        answers[name] = []
        with mode(model, name):
            for start in tqdm(range(0, len(prompts), batch_size), desc=f"gsm8k ({name})", leave=False):
                completions = generate_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens)
                answers[name] += [extract_answer(text) for text in completions]
    n = max(len(prompts), 1)
    result: dict[str, object] = {"examples": len(prompts), "shots": shots}
    for name in MODES:
        if name in answers:
            result[name] = {
                "exact_match": sum(a is not None and a == g for a, g in zip(answers[name], gold, strict=True)) / n
            }
    if len(answers) == 2:
        result["answer_agreement"] = sum(a == b for a, b in zip(*answers.values(), strict=True)) / n
    result["predictions"] = [{"gold": g, **{name: answers[name][i] for name in answers}} for i, g in enumerate(gold)]
    return result
