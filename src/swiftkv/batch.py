"""Batched offline generation: prompts JSONL in, one result line per prompt out, resumable.

Prompts are sorted by length and batched (little padding), left-padded, and generated with the fast
prefill path. Each finished batch is appended and flushed to the output, so an interrupted run loses at most
the batch in flight; a rerun skips the ids already written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def read_prompts(path: str | os.PathLike, skip_bad: bool = False) -> list[dict]:
    """Records {"id", "prompt"} or {"id", "messages"}; `id` defaults to the line number (1-based)."""
    prompts, seen = [], set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(_parse_prompt(line, number, seen))
        except ValueError as error:
            if not skip_bad:
                raise ValueError(f"{path}: {error} (pass --skip-bad-lines to skip such lines)") from None
            print(f"swiftkv: skipping {path}: {error}", file=sys.stderr)
    return prompts


def _parse_prompt(line: str, number: int, seen: set) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {number} is not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not (
        isinstance(record.get("prompt"), str) or isinstance(record.get("messages"), list)
    ):
        raise ValueError(f"line {number} needs a 'prompt' string or a 'messages' list")
    if not (record.get("prompt") or "").strip() and not record.get("messages"):
        raise ValueError(f"line {number} has an empty prompt (a 'prompt' with text or a non-empty 'messages' list)")
    record.setdefault("id", number)
    if record["id"] in seen:
        raise ValueError(f"line {number} repeats id {record['id']!r}")
    seen.add(record["id"])
    return record


def finished_ids(output: Path) -> set:
    """Ids already in `output`; a torn last line (killed mid-write) is cut off so appending stays valid JSONL."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with output.open("r+b") as f:
            f.truncate(end)
    return {json.loads(line)["id"] for line in data[:end].decode().splitlines() if line.strip()}


def check_length(config, prompt_tokens: int, max_new_tokens: int, where: str) -> None:
    """A prompt (plus the tokens to generate) must fit the model's positions; transformers only warns."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ValueError(
            f"{where}: the prompt has {prompt_tokens:,} tokens; with --max-new-tokens {max_new_tokens} that is more "
            f"than the model's context of {context:,} positions (max_position_embeddings). Shorten the prompt."
        )


def encode(tokenizer: PreTrainedTokenizerBase, record: dict) -> list[int]:
    if "messages" in record:
        rendered = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, return_dict=True)
        return list(rendered["input_ids"])
    return tokenizer(record["prompt"])["input_ids"]


def length_sorted_batches(encoded: list[tuple[dict, list[int]]], batch_size: int) -> Iterator[list]:
    """Batches of similar prompt length, longest first (the slowest batch is seen, and timed, early)."""
    ordered = sorted(encoded, key=lambda item: -len(item[1]))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T_max], left-padded so every prompt ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: list, max_new_tokens: int
) -> list[dict]:
    """Greedy generation for one batch; a result per prompt with token counts and the batch's timing."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([seq for _, seq in batch], pad_id)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    results = []
    for (record, seq), row in zip(batch, out[:, ids.shape[1] :], strict=True):
        tokens = _until_eos(row.tolist(), tokenizer.eos_token_id, pad_id)
        results.append(
            {
                "id": record["id"],
                "output": tokenizer.decode(tokens, skip_special_tokens=True),
                "prompt_tokens": len(seq),
                "output_tokens": len(tokens),
                "batch_size": len(batch),
                "batch_seconds": seconds,
            }
        )
    return results


def _until_eos(tokens: list[int], eos_id, pad_id: int) -> list[int]:
    stops = set(eos_id if isinstance(eos_id, list) else [eos_id]) | {pad_id}
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | os.PathLike | list[dict],
    output_path: str | os.PathLike,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    skip_bad: bool = False,
) -> dict:
    """Generate for every prompt (a JSONL path, or records from `read_prompts`) not yet in `output_path`; returns
    counts and total tokens/s of this run. Every prompt is encoded and checked before anything is written."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be >= 1.")
    records = prompts if isinstance(prompts, list) else read_prompts(prompts, skip_bad)
    output = Path(output_path)
    done = finished_ids(output)
    todo = [(r, encode(tokenizer, r)) for r in records if r["id"] not in done]
    for record, ids in todo:
        check_length(model.config, len(ids), max_new_tokens, f"prompt id {record['id']!r}")
    stats = {"skipped_already_done": len(done), "generated": 0, "prompt_tokens": 0, "output_tokens": 0}
    start = time.perf_counter()
    with output.open("a") as sink, tqdm(total=len(todo), desc="generate", unit="prompt") as bar:
        for batch in length_sorted_batches(todo, batch_size):
            results = generate_batch(model, tokenizer, batch, max_new_tokens)
            sink.write("".join(json.dumps(r) + "\n" for r in results))
            sink.flush()
            os.fsync(sink.fileno())
            stats["generated"] += len(results)
            stats["prompt_tokens"] += sum(r["prompt_tokens"] for r in results)
            stats["output_tokens"] += sum(r["output_tokens"] for r in results)
            bar.update(len(results))
    stats["seconds"] = time.perf_counter() - start
    stats["tokens_per_s"] = (stats["prompt_tokens"] + stats["output_tokens"]) / max(stats["seconds"], 1e-9)
    return stats
