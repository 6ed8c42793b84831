"""`swiftkv convert | info | generate | demo | bench`: argument handling and printing (the work is in the library)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import TextStreamer

from swiftkv import batch, bench, theory
from swiftkv.adapter import CONFIG_NAME, QUALITY_NAME, bundled_adapters, resolve_adapter
from swiftkv.calibration import calibrate
from swiftkv.calibration import check_tokens as check_calibration_tokens
from swiftkv.cli.args import DEFAULT_SKIP, has_layout
from swiftkv.config import validate_swiftkv_layout
from swiftkv.conversion import convert, resolve_num_key_value_layers, save_atomic
from swiftkv.evaluate.scoring import SWIFTKV, variants_stats
from swiftkv.evaluate.text import MAX_PPL_INCREASE, MIN_AGREEMENT, format_interval, quality_shortfalls
from swiftkv.files import prepare_output_dir, read_json_file
from swiftkv.loading import DEFAULT_MODEL, load, load_model, load_model_config, resolve_model_path
from swiftkv.modeling.weights import resolve_format, store_format
from swiftkv.modes import is_swiftkv, set_swiftkv, swiftkv_mode

DEMO_QUESTION = "In two sentences: what changed in the valley after the railway arrived, and what do people remember?"
CONTINUATION_TOKENS = 8  # how much of each answer the demo shows from where they part


def _layout(args: argparse.Namespace, num_layers: int) -> int:
    """L from -L / --skip, or the documented default (DEFAULT_SKIP) when neither is given."""
    skip = DEFAULT_SKIP if not has_layout(args) else args.skip
    return resolve_num_key_value_layers(num_layers, args.num_key_value_layers, skip)


def cmd_convert(args: argparse.Namespace) -> None:
    prepare_output_dir(args.out, args.overwrite)  # fail before the (slow) load, write nothing
    if args.out.exists() and args.out.resolve() == resolve_model_path(args.src).resolve():
        raise ValueError(f"OUT {str(args.out)!r} is the source checkpoint itself; write the conversion elsewhere.")
    if args.calibrate:
        check_calibration_tokens(args.calibration_tokens)
    base_config = load_model_config(args.src)
    num_kv_layers = _layout(args, base_config.num_hidden_layers)
    validate_swiftkv_layout(base_config.num_hidden_layers, num_kv_layers, args.key_value_group_size)
    model, tokenizer = load_model(args.src, args.dtype)
    swift = convert(model, num_kv_layers, args.key_value_group_size)
    if args.calibrate:
        seen = calibrate(swift, tokenizer, args.calibrate, args.calibration_tokens)
        print(f"calibrated the K/V projections by least squares on {seen:,} tokens of {', '.join(args.calibrate)}")
    store_format(swift, args.weights)
    out = save_atomic(args.out, args.overwrite, swift, *([tokenizer] if tokenizer is not None else []))
    print(f"wrote {out}: {swift.config.model_type}, L={num_kv_layers}, g={args.key_value_group_size}, {args.weights}")


def cmd_info(args: argparse.Namespace) -> None:
    model, _ = load_model(args.model, args.dtype)
    if not is_swiftkv(model):  # a base checkpoint: show the layout it would get (-L / --skip, or the default)
        model = convert(model, _layout(args, model.config.num_hidden_layers), args.key_value_group_size)
    config = model.config
    added = sum(p.numel() for n, p in model.named_parameters() if "swiftkv" in n)
    total = sum(p.numel() for p in model.parameters())
    rows = [
        ("model type", config.model_type),
        ("layers N", config.num_hidden_layers),
        ("num_key_value_layers L", config.num_key_value_layers),
        ("key_value_group_size g", config.key_value_group_size),
        ("base parameters", f"{total - added:,}"),
        ("SwiftKV parameters added", f"{added:,} ({added / (total - added):.1%})"),
        (
            f"prefill FLOPs ratio @ {args.prompt_length} tokens",
            f"{theory.theoretical_prefill_flops_ratio(config, args.prompt_length):.3f}",
        ),
        ("KV-cache bytes ratio", f"{theory.kv_bytes_ratio(config):.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


class TimingStreamer(TextStreamer):
    """Prints tokens as they come and records when each arrives (the first `put` is the prompt)."""

    def __init__(self, tokenizer, quiet: bool = False):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.quiet, self.start, self.token_times = quiet, time.perf_counter(), []

    def put(self, value):
        if self.next_tokens_are_prompt:
            return super().put(value)
        self.token_times.append(time.perf_counter())
        return None if self.quiet else super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.quiet:
            super().on_finalized_text(text, stream_end)


def _encode(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.inference_mode()
def generate_text(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, quiet: bool = False) -> dict:
    """Greedy generation with streaming; returns text, time to first token and decode tokens/s."""
    streamer = TimingStreamer(tokenizer, quiet=quiet)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    times = streamer.token_times
    decode_s = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "ids": output[0, input_ids.shape[1] :].tolist(),
        "text": tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True),
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": len(times),
        "ttft_s": times[0] - streamer.start,
        "decode_tokens_per_s": (len(times) - 1) / decode_s if len(times) > 1 else float("nan"),
    }


def cmd_generate(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.input is None) or (args.input is None) != (args.output is None):
        raise ValueError("Give either --prompt TEXT, or --input PROMPTS.jsonl with --output RESULTS.jsonl.")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue (or --input PROMPTS.jsonl for a batch).")
    prompts = batch.read_prompts(args.input, args.skip_bad_lines) if args.input is not None else None
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, adapter=args.adapter, dtype=args.dtype, weights=args.weights)
    if is_swiftkv(model):
        set_swiftkv(model, not args.no_swiftkv)
    elif not args.no_swiftkv:
        print(
            f"note: {args.model} is not a SwiftKV checkpoint; running it as the base model (--adapter DIR applies a "
            f"distilled SwiftKV adapter; the default model's bundled ones: {', '.join(bundled_adapters())})",
            file=sys.stderr,
        )
    if prompts is not None:
        stats = batch.run(model, tokenizer, prompts, args.output, args.batch_size, args.max_new_tokens)
        print(json.dumps(stats), file=sys.stderr)
        return
    ids = _encode(tokenizer, args.prompt, args.chat)
    batch.check_length(model.config, ids.shape[1], args.max_new_tokens, "--prompt")
    result = generate_text(model, tokenizer, ids, args.max_new_tokens)
    print(timing_line(result), file=sys.stderr)


def timing_line(result: dict) -> str:
    """generate's closing line: the prompt and answer lengths, time to first token and the decode rate (none for a
    one-token answer, whose rate is NaN: no step after the first token)."""
    rate = result["decode_tokens_per_s"]
    decode = "no decode steps to time" if math.isnan(rate) else f"decode {rate:.1f} tokens/s"
    return (
        f"\n[{result['prompt_tokens']} prompt tokens, {result['new_tokens']} new] time to first token "
        f"{result['ttft_s'] * 1000:.0f} ms, {decode}"
    )


def _demo_prompt(tokenizer, target_tokens: int) -> torch.Tensor:
    """A long chat prompt: a document of about `target_tokens` tokens followed by a question about it."""
    per_copy = len(tokenizer(bench.PROMPT_TEXT)["input_ids"])
    document = bench.PROMPT_TEXT * max(1, target_tokens // per_copy)
    return _encode(tokenizer, f"{document}\n\n{DEMO_QUESTION}", chat=True)


def _measured_quality(adapter_dir: Path) -> dict | None:
    """The adapter's per-domain table (QUALITY_NAME, written by `benchmarks/domain_quality.py`), if measured."""
    measured = adapter_dir / QUALITY_NAME
    return read_json_file(measured, f"quality table of {adapter_dir}") if measured.is_file() else None


def demo_adapter(group: int = 1) -> str | None:
    """The bundled adapter of AcrossKV group `group` the demo runs by default: of those whose measured quality meets
    the targets (`quality_shortfalls`), the one whose prompt tokens skip the most layers; if none does, the one
    closest to the base; None when no bundled adapter of that group is measured."""
    measured = {}  # name -> (L, quality table)
    for name in bundled_adapters():
        path = resolve_adapter(name)
        config, table = read_json_file(path / CONFIG_NAME, f"adapter {path}"), _measured_quality(path)
        if table is not None and config["key_value_group_size"] == group:
            measured[name] = (config["num_key_value_layers"], table)
    meeting = [name for name, (_, table) in measured.items() if not quality_shortfalls(table)]
    if meeting:
        return min(meeting, key=lambda name: measured[name][0])
    return min(measured, key=lambda name: measured[name][1]["overall"]["ppl_ratio"], default=None)


def _demo_model(args: argparse.Namespace):
    """(model, tokenizer, adapter dir or None, origin): --adapter; else for the default model the bundled adapter of
    the layout -L/--skip/-g, or without -L/--skip `demo_adapter(g)`; else the SwiftKV checkpoint as it is or an
    undistilled conversion at L = N // 2 ('--adapter none' forces the conversion)."""
    num_layers = load_model_config(args.model).num_hidden_layers
    layers = _layout(args, num_layers) if has_layout(args) else num_layers // 2
    adapter = args.adapter
    if adapter is None and args.model == DEFAULT_MODEL and has_layout(args):
        bundled = f"smollm2-L{layers}-g{args.key_value_group_size}"
        adapter = bundled if bundled in bundled_adapters() else None
    elif adapter is None and args.model == DEFAULT_MODEL:
        adapter = demo_adapter(args.key_value_group_size)
    if adapter not in (None, "none"):
        model, tokenizer = load(args.model, adapter=adapter, dtype=args.dtype, weights=args.weights)
        return model, tokenizer, resolve_adapter(adapter), f"distilled adapter {adapter}"
    if load_model_config(args.model).model_type.endswith("_swiftkv"):
        model, tokenizer = load(args.model, dtype=args.dtype, weights=args.weights)
        return model, tokenizer, None, "SwiftKV checkpoint"
    # converted inside `load`, before the weight format: conversion reads float Linear weights, not int8/int4 blocks
    model, tokenizer = load(
        args.model,
        num_key_value_layers=layers,
        key_value_group_size=args.key_value_group_size,
        dtype=args.dtype,
        weights=args.weights,
    )
    return model, tokenizer, None, "converted, undistilled"


def first_difference(base: list[int], swift: list[int]) -> int | None:
    """Index of the first token where two greedy answers differ (one ending before the other counts), else None."""
    for at, (a, b) in enumerate(zip(base, swift, strict=False)):  # the answers may end at different lengths
        if a != b:
            return at
    return None if len(base) == len(swift) else min(len(base), len(swift))


def answer_agreement(model, prompt: torch.Tensor, base: list[int], swift: list[int]) -> dict:
    """Where the SwiftKV answer parts from the base's, and SwiftKV's top-1 agreement with the base on the base's
    answer: at each of its tokens, given the prompt [1, P] and the base's answer so far, do both modes predict the
    same next token. That is the quality tables' agreement (teacher-forced, `variants_stats`), so the demo's
    answers and the figures measure one thing: one differing token is enough for a greedy answer to part."""
    text = torch.cat([prompt, torch.tensor([base], dtype=prompt.dtype)], dim=1)  # [1, P + n]
    scored = torch.arange(text.shape[1] - 1) >= prompt.shape[1] - 1  # the positions that predict the answer
    sums = variants_stats({SWIFTKV: model}, text, scored=scored)[SWIFTKV]
    return {
        "base": base,
        "swiftkv": swift,
        "first_difference": first_difference(base, swift),
        "tokens": int(sums["tokens"]),
        "agree": int(sums["agree"]),
    }


def _answer_lines(tokenizer, agreement: dict) -> list[str]:
    """Where the two answers part (token position, a few tokens of each from there) and the answer's agreement."""
    base, swift, at = agreement["base"], agreement["swiftkv"], agreement["first_difference"]

    def shown(ids: list[int]) -> str:
        text = tokenizer.decode(ids[at : at + CONTINUATION_TOKENS], skip_special_tokens=True)
        return json.dumps(text + ("..." if len(ids) > at + CONTINUATION_TOKENS else ""))

    if at is None:
        parted = f"the answers are the same {len(base)} tokens"
    else:
        parted = f"the answers part at token {at + 1} (the first {at} are the same): base {shown(base)}, "
        parted += f"SwiftKV {shown(swift)}"
    tokens, agree = agreement["tokens"], agreement["agree"]
    return [
        parted,
        f"top-1 agreement on the base answer (both modes' next token given the base's text so far, as in the quality "
        f"figures below): {agree} of {tokens} tokens ({agree / max(tokens, 1):.1%})",
    ]


def _quality_lines(adapter_dir: Path | None) -> list[str]:
    """The adapter's measured per-domain quality against the targets, unseen domains apart."""
    table = _measured_quality(adapter_dir) if adapter_dir is not None else None
    if table is None:
        return ["quality: not measured for this model (swiftkv eval MODEL --tasks domains measures it)"]
    rows = {name: row for name, row in table["sources"].items() if not row.get("unseen")}
    unseen = [f"{name} {row['ppl_ratio'] - 1:+.1%}" for name, row in table["sources"].items() if row.get("unseen")]
    worst = max(rows, key=lambda name: rows[name]["ppl_ratio"])
    misses = quality_shortfalls(table)
    verdict = "misses them: " + ", ".join(misses) if misses else "meets them"
    spread = f" (95% interval {format_interval(rows[worst]['ppl_ratio_ci'])})" if "ppl_ratio_ci" in rows[worst] else ""
    return [
        f"quality (held-out text of {len(rows)} domains, {adapter_dir.name}/domains.json): perplexity "
        f"{table['overall']['ppl_ratio'] - 1:+.1%} vs base overall, worst {worst} {rows[worst]['ppl_ratio'] - 1:+.1%}"
        f"{spread}; "
        f"top-1 agreement {table['overall']['agreement']:.1%}; unseen {', '.join(unseen) or 'none measured'}",
        f"targets (every domain within {MAX_PPL_INCREASE:+.0%}, agreement >= {MIN_AGREEMENT:.0%}): {verdict}",
    ]


def cmd_demo(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, adapter_dir, origin = _demo_model(args)
    loaded = time.perf_counter() - started
    ids = _demo_prompt(tokenizer, args.prompt_tokens)
    config = model.config
    print(
        f"model: {args.model} ({config.num_hidden_layers} layers), SwiftKV L={config.num_key_value_layers}, "
        f"g={config.key_value_group_size} ({origin}); prompt: {ids.shape[1]} tokens; "
        f"{bench.threads_label(args.threads)}"
    )
    answers, tokens = time.perf_counter(), {}
    for enabled in (False, True):  # answers only: the figures below are warm medians
        with swiftkv_mode(model, enabled):
            result = generate_text(model, tokenizer, ids, args.max_new_tokens, quiet=True)
        tokens[enabled] = result["ids"]
        print(f"\n--- {'SwiftKV' if enabled else 'base'} answer:\n{result['text'].strip()}")
    answers = time.perf_counter() - answers
    print("\n" + "\n".join(_answer_lines(tokenizer, answer_agreement(model, ids, tokens[False], tokens[True]))))
    times = bench.measure_prefill(model, ids, reps=args.reps, threads=args.threads)
    base, swift = (bench.summary(times[mode])["median_s"] for mode in ("base", "swiftkv"))
    kv = bench.measure_kv_bytes(model, ids)
    flops = theory.theoretical_prefill_flops_ratio(config, ids.shape[1])
    print(
        f"\ntime to first token (prefill), median of {args.reps} warm interleaved runs: base {base * 1000:.0f} ms, "
        f"SwiftKV {swift * 1000:.0f} ms = {swift / base:.2f} of the base (FLOPs theory {flops:.2f})"
    )
    print(f"KV-cache bytes SwiftKV/base: {kv['measured_ratio']:.3f} (theory {kv['theoretical_ratio']:.3f})")
    print("\n".join(_quality_lines(adapter_dir)))
    print(f"cold start, stated apart (not speed figures): load {loaded:.1f} s, both answers {answers:.1f} s")


def cmd_bench(args: argparse.Namespace) -> None:
    result = bench.run_benchmark(
        args.model,  # a name, so the result records `default` rather than one machine's cache path
        prompt_lengths=args.prompt_lengths,
        settings=args.settings,
        reps=args.reps,
        decode_tokens=args.decode_tokens,
        json_path=args.json,
        plot_path=args.plot,
        threads=args.threads,
        weights=resolve_format(args.weights),
    )
    print("\n".join(bench.summary_lines(result)))
