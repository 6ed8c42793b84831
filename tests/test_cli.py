"""The `swiftkv` command line on a tiny checkpoint: conversion, info, and bad input."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import tiny_base

from swiftkv.adapter import CONFIG_NAME, QUALITY_NAME
from swiftkv.cli import main
from swiftkv.loading import load
from swiftkv.modeling.weights import native_bf16, weight_format
from swiftkv.modes import swiftkv_mode


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_base("qwen2").save_pretrained(path)
    return path


def test_convert_then_info(base_dir, tmp_path, capsys):
    out = tmp_path / "swift"
    assert main(["convert", str(base_dir), str(out), "-L", "2", "-g", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_layers"], config["key_value_group_size"]) == (
        "qwen2_swiftkv",
        2,
        2,
    )
    assert main(["info", str(out), "--prompt-length", "64"]) == 0
    rows = dict(line.rsplit("  ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    rows = {name.strip(): value.strip() for name, value in rows.items()}
    assert rows["num_key_value_layers L"] == "2" and rows["key_value_group_size g"] == "2"
    assert rows["KV-cache bytes ratio"] == "0.667"  # (2 + 4/2) / 6


def test_skip_fraction(base_dir, tmp_path):
    assert main(["convert", str(base_dir), str(tmp_path / "s"), "--skip", "0.5"]) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_key_value_layers"] == 3


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["-L", "9"], "num_key_value_layers=9 is invalid: the model has 6 layers"),
        (["-L", "2", "-g", "3"], "key_value_group_size=3 does not divide the 4 SwiftKV layers"),
    ],
)
def test_bad_layout_writes_nothing(base_dir, tmp_path, capsys, argv_tail, message):
    out = tmp_path / "swift"
    assert main(["convert", str(base_dir), str(out), *argv_tail]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_non_empty_output_is_refused_unless_overwrite(base_dir, tmp_path, capsys):
    out = tmp_path / "swift"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["convert", str(base_dir), str(out), "-L", "3"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["convert", str(base_dir), str(out), "-L", "3", "--overwrite"]) == 0
    assert (out / "config.json").exists() and not (out / "notes.txt").exists()


def test_missing_gguf_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.gguf"
    assert main(["convert", str(missing), str(tmp_path / "out"), "-L", "3"]) == 2
    assert f"Model {str(missing)!r} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_family(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out"), "-L", "1"]) == 2
    assert "supports llama, mistral, qwen2, qwen3" in capsys.readouterr().err


def test_demo_and_generate_smoke(chat_dir, capsys):
    argv = ["demo", str(chat_dir), "-L", "3", "-g", "3", "--adapter", "none", "--prompt-tokens", "64"]
    assert main([*argv, "--max-new-tokens", "3", "--reps", "1", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(converted, undistilled)" in printed and "--- SwiftKV answer" in printed
    assert "KV-cache bytes SwiftKV/base: 0.667 (theory 0.667)" in printed
    assert "top-1 agreement on the base answer" in printed and " of 3 tokens (" in printed
    assert "the answers part at token" in printed or "the answers are the same 3 tokens" in printed
    assert main(["generate", str(chat_dir), "--prompt", "w5 w9 w11", "--max-new-tokens", "3", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "time to first token" in err and "the default model's bundled ones: smollm2-L15-g1, " in err


def test_generate_applies_an_adapter_as_apply_adapter_does(chat_dir, tmp_path, capsys):
    from swiftkv.adapter import save_adapter
    from swiftkv.conversion import convert
    from swiftkv.loading import load_model

    model, _ = load_model(chat_dir)
    save_adapter(convert(model, 3, 1), tmp_path / "adapter", base_name=str(chat_dir))
    assert main(["apply-adapter", str(chat_dir), str(tmp_path / "adapter"), str(tmp_path / "applied")]) == 0
    argv = ["--prompt", "w5 w9 w11", "--max-new-tokens", "4", "--threads", "1", "--weights", "float32"]
    capsys.readouterr()
    assert main(["generate", str(chat_dir), "--adapter", str(tmp_path / "adapter"), *argv]) == 0
    with_adapter = capsys.readouterr()
    assert main(["generate", str(tmp_path / "applied"), *argv]) == 0
    assert "not a SwiftKV checkpoint" not in with_adapter.err
    assert with_adapter.out == capsys.readouterr().out


def test_swiftkvs_warnings_are_one_line_in_the_cli(chat_dir, capsys, monkeypatch):
    """The bf16 fallback's warning printed Python's 'loading.py:92: UserWarning:' and a source line of swiftkv's."""
    import warnings

    from swiftkv.modeling import weights

    monkeypatch.setattr(weights, "native_bf16", lambda: False)  # as on a CPU without bf16 hardware
    shown = warnings.showwarning
    argv = ["generate", str(chat_dir), "--weights", "bf16", "--prompt", "w5 w9", "--max-new-tokens", "2"]
    assert main([*argv, "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "\nswiftkv: weights='bf16' asked, but this CPU has neither AVX512-BF16 nor AMX" in "\n" + err
    assert "UserWarning" not in err and "checked_format" not in err
    assert warnings.showwarning is shown  # the library's callers get Python's warnings again


def test_the_bf16_fallback_warning_points_at_the_callers_load(chat_dir, monkeypatch):
    from swiftkv.modeling import weights

    monkeypatch.setattr(weights, "native_bf16", lambda: False)  # as on a CPU without bf16 hardware
    with pytest.warns(UserWarning, match="running float32 weights instead") as caught:
        model, _ = load(chat_dir, weights="bf16")
    [fallback] = [w for w in caught if "running float32 weights instead" in str(w.message)]
    assert weight_format(model) == "float32" and fallback.filename == __file__


def test_generate_names_no_decode_rate_for_a_one_token_answer():
    """A one-token answer (EOS first, or --max-new-tokens 1) has no decode step to time: the line said 'nan'."""
    from swiftkv.cli.commands import timing_line

    one = {"prompt_tokens": 7, "new_tokens": 1, "ttft_s": 0.1, "decode_tokens_per_s": float("nan")}
    assert timing_line(one).endswith("time to first token 100 ms, no decode steps to time")
    assert timing_line({**one, "new_tokens": 3, "decode_tokens_per_s": 12.34}).endswith("decode 12.3 tokens/s")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_demo_converts_a_base_model_before_its_weights_become_blocks(chat_dir, capsys, fmt):
    """--adapter none converts the base model on the fly; with --weights int8/int4 the conversion must read the float
    weights first (it failed with 'Base weights do not fit the SwiftKV model' when it ran after the format)."""
    argv = ["demo", str(chat_dir), "-L", "3", "--adapter", "none", "--prompt-tokens", "64", "--weights", fmt]
    assert main([*argv, "--max-new-tokens", "3", "--reps", "1", "--threads", "1"]) == 0
    assert "(converted, undistilled)" in capsys.readouterr().out


def test_demo_finds_where_two_answers_part():
    from swiftkv.cli.commands import first_difference

    assert first_difference([5, 6, 7], [5, 6, 7]) is None
    assert first_difference([5, 6, 7], [5, 9, 7]) == 1
    assert first_difference([5, 6, 7], [5, 6]) == 2  # one answer ended (EOS) where the other went on
    assert first_difference([], [4]) == 0


@pytest.mark.parametrize("exact", [True, False])
def test_demo_answer_agreement_is_the_quality_tables_measure(chat_dir, exact):
    # Recomputed here from the model's own full forward in each mode, not from the scorer the demo calls.
    from swiftkv.cli.commands import answer_agreement
    from swiftkv.loading import load
    from swiftkv.modes import swiftkv_mode

    model, _ = load(chat_dir, num_key_value_layers=5 if exact else 3, weights="float32")  # its float weights move
    if not exact:  # the tiny model copies its input whatever L: move the SwiftKV weights so some predictions differ
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "swiftkv" in name:
                    param.add_(torch.randn_like(param) * param.std() * 2)
    prompt, base, swift = torch.tensor([[5, 9, 11, 14, 20, 33]]), [7, 8, 9, 30, 31, 2, 50, 60, 70, 80, 90, 100], [7, 8]
    result = answer_agreement(model, prompt, base, swift)
    text = torch.cat([prompt, torch.tensor([base])], dim=1)
    predicted = {}
    for enabled in (False, True):
        with swiftkv_mode(model, enabled), torch.no_grad():  # rows P-1 .. T-2 predict the answer's tokens
            predicted[enabled] = model(text, logits_to_keep=0).logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    agree = int((predicted[False] == predicted[True]).sum())
    assert result == {"base": base, "swiftkv": swift, "first_difference": 2, "tokens": 12, "agree": agree}
    assert (agree == 12) == exact  # L = N-1 is exact at conversion: every token agrees


def test_convert_calibrate_fits_the_key_values(tmp_path, capsys):
    from safetensors.torch import load_file
    from test_distill_helpers import char_tokenizer, chat_file, tiny_model_dir

    from swiftkv.corpora import as_text, load_examples
    from swiftkv.loading import load

    base, chats = tiny_model_dir(tmp_path / "base"), chat_file(tmp_path / "chats.jsonl")
    assert main(["convert", str(base), str(tmp_path / "plain"), "-L", "3"]) == 0
    argv = ["convert", str(base), str(tmp_path / "fit"), "-L", "3", "--calibrate", str(chats)]
    assert main([*argv, "--calibration-tokens", "500"]) == 0
    assert "least squares on" in capsys.readouterr().out
    plain, fit = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "fit" / "model.safetensors")
    for name in plain:  # only the leaders' K/V projections differ from the recipe's conversion
        assert torch.equal(plain[name], fit[name]) != ("k_proj_swiftkv" in name or "v_proj_swiftkv" in name), name
    # ... and they bring the student closer to its teacher on chats it was not fitted on: KL(teacher || student) per
    # token, every position, measured 3e-4 (recipe) vs 3e-6 (fitted) here.
    tokenizer = char_tokenizer()
    other_chats = load_examples(str(chat_file(tmp_path / "other.jsonl", conversations=8, seed=1)), split="all")
    texts = [tokenizer(as_text(chat, tokenizer), return_tensors="pt").input_ids for chat in other_chats]  # [1, T]
    kl = {name: _kl_to_teacher(load(tmp_path / name)[0], texts) for name in ("plain", "fit")}
    assert kl["fit"] < 0.1 * kl["plain"], kl


def _kl_to_teacher(model, texts: list[torch.Tensor]) -> float:
    """Mean over every position of KL(base model || SwiftKV model) on the next-token distributions."""
    total, tokens = 0.0, 0
    for ids in texts:
        with torch.no_grad():
            student = model(ids).logits.log_softmax(-1)  # [1, T, V], the full SwiftKV forward
            with swiftkv_mode(model, False):
                teacher = model(ids).logits.log_softmax(-1)
        total += (teacher.exp() * (teacher - student)).sum().item()
        tokens += ids.shape[1]
    return total / tokens


def test_convert_calibrate_bad_input_writes_nothing(base_dir, tmp_path, capsys):
    argv = ["convert", str(base_dir), str(tmp_path / "a"), "-L", "3", "--calibrate", "chitchat"]
    assert main([*argv, "--calibration-tokens", "0"]) == 2
    assert "--calibration-tokens=0 is invalid: it must be >= 1" in capsys.readouterr().err
    assert main(argv) == 2  # weights only (no tokenizer files): nothing to tokenize the calibration chats with
    assert "needs the model's tokenizer, and this checkpoint has none" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_eval_calibrate_needs_an_on_the_fly_conversion(base_dir, capsys):
    assert main(["eval", str(base_dir), "--tasks", "ppl:chitchat@2", "--calibrate", "chitchat"]) == 2
    assert "give -L or --skip too" in capsys.readouterr().err


def test_eval_calibrate_scores_the_fitted_model(tmp_path, capsys):
    from test_distill_helpers import chat_file, tiny_model_dir

    base, chats = tiny_model_dir(tmp_path / "base"), chat_file(tmp_path / "chats.jsonl")
    argv = ["eval", str(base), "-L", "3", "--tasks", f"ppl:{chats}@4", "--json", str(tmp_path / "r.json")]
    assert main([*argv, "--calibrate", str(chats), "--calibration-tokens", "400"]) == 0
    fitted = json.loads((tmp_path / "r.json").read_text())
    assert any("least squares" in note for note in fitted["notes"]), fitted["notes"]
    assert main(argv) == 0
    plain = json.loads((tmp_path / "r.json").read_text())
    assert fitted["tasks"] != plain["tasks"]


def test_eval_of_the_domains_writes_their_plot_beside_the_json(chat_dir, tmp_path, capsys):
    out = tmp_path / "quality.json"
    argv = ["eval", str(chat_dir), "-L", "3", "--tasks", "domains@1", "--max-tokens", "24", "--json", str(out)]
    assert main([*argv, "--threads", "1"]) == 0
    assert f"wrote {out.with_suffix('.png')}" in capsys.readouterr().err
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = tmp_path / "base.json"  # a base model without -L scores no SwiftKV: no ratios to plot
    assert main(["eval", str(chat_dir), "--tasks", "domains@1", "--max-tokens", "24", "--json", str(base)]) == 0
    assert base.exists() and not base.with_suffix(".png").exists()


def _bundle(root, name: str, layers: int, group: int, ratios: dict[str, float], agreement: float) -> None:
    folder = root / name
    folder.mkdir()
    config = {"num_key_value_layers": layers, "key_value_group_size": group}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    rows = {source: {"ppl_ratio": ratio} for source, ratio in ratios.items()}
    overall = {"agreement": agreement, "ppl_ratio": max(ratios.values())}
    (folder / QUALITY_NAME).write_text(json.dumps({"sources": rows, "overall": overall}))


def test_demo_runs_the_deepest_bundled_layout_whose_quality_holds(tmp_path, monkeypatch):
    from swiftkv.cli.commands import demo_adapter

    monkeypatch.setattr("swiftkv.adapter.BUNDLED_DIR", tmp_path)
    _bundle(tmp_path, "L15", 15, 1, {"a": 1.30, "b": 1.0}, 0.72)  # most skip, misses the targets
    _bundle(tmp_path, "L22", 22, 1, {"a": 1.06, "b": 1.0}, 0.898)  # closest of the misses
    assert demo_adapter() == "L22"  # none meets the targets: the closest to the base
    _bundle(tmp_path, "L25", 25, 1, {"a": 1.01, "b": 1.0}, 0.95)
    _bundle(tmp_path, "L24", 24, 1, {"a": 1.029, "b": 0.99}, 0.91)
    assert demo_adapter() == "L24"  # the most skip among those that meet them
    _bundle(tmp_path, "L15g3", 15, 3, {"a": 2.0}, 0.6)
    assert demo_adapter(group=3) == "L15g3" and demo_adapter(group=2) is None  # -g picks among its own group


def test_demo_quality_lines_name_the_worst_domain_its_interval_and_the_misses(tmp_path):
    from swiftkv.cli.commands import _quality_lines

    _bundle(tmp_path, "L22", 22, 1, {"wiki": 1.054, "chat": 1.01}, 0.905)
    first, verdict = _quality_lines(tmp_path / "L22")
    assert "worst wiki +5.4%;" in first and "interval" not in first  # tables measured before intervals existed
    assert verdict.endswith("misses them: wiki +5.4%")
    table = json.loads((tmp_path / "L22" / QUALITY_NAME).read_text())
    table["sources"]["wiki"]["ppl_ratio_ci"] = [1.021, 1.093]
    (tmp_path / "L22" / QUALITY_NAME).write_text(json.dumps(table))
    assert "worst wiki +5.4% (95% interval +2.1% .. +9.3%);" in _quality_lines(tmp_path / "L22")[0]


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_convert_stores_the_weight_format_and_load_reads_it_back(base_dir, tmp_path, capsys, fmt):
    """`convert --weights F` writes F (bf16 weights, or int8/int4 blocks as BlockLinear's buffers, smaller than the
    float32 file) and records it; `load` then gives, without being told F, the model converting in memory and
    loading with weights=F gives: the same blocks bit for bit and the same logits (qwen2: biases too)."""
    out, floats = tmp_path / "ck", tmp_path / "float"
    assert main(["convert", str(base_dir), str(out), "-L", "3", "--weights", fmt]) == 0
    assert main(["convert", str(base_dir), str(floats), "-L", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["swiftkv_weights"] == fmt
    stored = safetensors.torch.load_file(out / "model.safetensors")
    if fmt == "bf16":
        assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
        if not native_bf16():  # loads in float32 here (with a warning): the bf16 values, widened
            return
    else:
        assert "model.layers.0.self_attn.q_proj.qweight" in stored and "lm_head.qweight" in stored
        size = (out / "model.safetensors").stat().st_size
        assert size < 0.6 * (floats / "model.safetensors").stat().st_size
    capsys.readouterr()
    loaded, _ = load(out)
    assert f"weights {fmt} (as the checkpoint stores them" in capsys.readouterr().err
    reference, _ = load(floats, weights=fmt)
    assert weight_format(loaded) == weight_format(reference) == fmt
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_a_block_checkpoint_loads_dequantized_but_not_requantized(base_dir, tmp_path, capsys):
    """An int8 checkpoint loads as float32 (its blocks' exact values) but refuses int4 (rounding rounded weights):
    one line naming the value and what is valid, exit 2, before the model loads."""
    out = tmp_path / "ck"
    assert main(["convert", str(base_dir), str(out), "-L", "3", "--weights", "int8"]) == 0
    floats, _ = load(out, weights="float32")
    blocks, _ = load(out)
    q_proj = blocks.model.layers[0].self_attn.q_proj
    assert torch.equal(floats.model.layers[0].self_attn.q_proj.weight, q_proj.dequantize())
    with pytest.raises(ValueError, match="stores int8 blocks; load it as 'int8'"):
        load(out, weights="int4")
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w5 w6", "--weights", "int4", "--max-new-tokens", "2"]) == 2
    assert "weights='int4': this checkpoint stores int8 blocks" in capsys.readouterr().err
