"""`swiftkv eval` and `swiftkv analyze`: argument handling and printing (the work is in the library)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from swiftkv import analyze as layer_analysis
from swiftkv.calibration import add_arguments as add_calibration_arguments
from swiftkv.calibration import calibrate
from swiftkv.calibration import check_tokens as check_calibration_tokens
from swiftkv.cli.args import add_adapter_arg, add_layout_args, add_model_args, has_layout, positive_int
from swiftkv.evaluate.scoring import MODES
from swiftkv.evaluate.tasks import DEFAULT_TASKS, EvalOptions, check_task, evaluate, format_table, valid_task_names
from swiftkv.evaluate.text import plot_domains, token_samples
from swiftkv.files import figure_beside, portable_path, write_json
from swiftkv.loading import load, origin
from swiftkv.modeling.weights import BLOCK_FORMATS, resolve_format

BUDGET_LADDER = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # KL budgets (nats/token) shown next to the recommendation


def _write_json(result: dict, path: Path) -> None:
    write_json(result, path)
    print(f"wrote {path}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    for name in args.tasks:  # bad names fail before the model loads
        check_task(name)
    if args.calibrate and not has_layout(args):
        raise ValueError("--calibrate fits the projections of an on-the-fly conversion: give -L or --skip too.")
    if args.calibrate:
        check_calibration_tokens(args.calibration_tokens)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(
        args.model,
        adapter=args.adapter,
        num_key_value_layers=args.num_key_value_layers,
        skip=args.skip,
        key_value_group_size=args.key_value_group_size,
        dtype=args.dtype,
        weights=args.weights,
    )
    notes = [origin(args.model, args.adapter, model, has_layout(args))]
    if args.calibrate:
        seen = calibrate(model, tokenizer, args.calibrate, args.calibration_tokens)
        notes.append(f"K/V projections fitted by least squares on {seen:,} tokens of {', '.join(args.calibrate)}")
    options = EvalOptions(
        limit=args.limit,
        modes=tuple(args.modes),
        max_tokens=args.max_tokens,
        gsm8k_shots=args.gsm8k_shots,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        bigbench_dir=args.bigbench_dir,
    )
    try:
        result = evaluate(model, tokenizer, args.tasks, options, notes)
    except (ModuleNotFoundError, RuntimeError) as error:
        raise SystemExit(f"swiftkv eval: error: {error}") from error
    result["model"]["name"] = portable_path(args.model)
    if args.adapter:
        result["model"]["adapter"] = portable_path(args.adapter)
    print(format_table(result))
    if args.json:
        _write_json(result, args.json)
        _plot_domains(result, args.json)


def _plot_domains(result: dict, json_path: Path) -> None:
    """The per-domain table as a PNG beside the JSON (same name, .png) when the domains task scored both modes."""
    domains = result["tasks"].get("domains")
    if domains is None or "ppl_ratio" not in domains["overall"]:
        return
    model = result["model"]
    layout = f"L={model['num_key_value_layers']}, g={model['key_value_group_size']}"
    label = f"{model.get('adapter') or model['name']} ({layout})"
    print(f"wrote {plot_domains({label: domains}, figure_beside(json_path))}", file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    # the candidates are converted from float Linear weights: int8/int4 blocks are made after (analyze's `weights`)
    blocks = resolve_format(args.weights) in BLOCK_FORMATS
    model, tokenizer = load(args.model, dtype=args.dtype, weights="float32" if blocks else args.weights)
    samples = token_samples(tokenizer, args.text, args.samples, args.max_tokens)
    result = layer_analysis.analyze(
        model,
        samples,
        args.candidates,
        args.key_value_group_size,
        args.prompt_length,
        weights=args.weights if blocks else None,
    )
    chosen = layer_analysis.recommend(result["candidates"], args.max_kl, args.min_agreement)
    result.update(
        model=str(args.model),
        text=args.text,
        budget={"max_kl": args.max_kl, "min_agreement": args.min_agreement},
        recommended=chosen and chosen["num_key_value_layers"],
        ladder={str(kl): _l(layer_analysis.recommend(result["candidates"], kl)) for kl in BUDGET_LADDER},
    )
    print(layer_analysis.format_layers(result) + "\n")
    print(layer_analysis.format_table(result, chosen) + "\n")
    budget = " and ".join(
        text
        for text in (
            args.max_kl is not None and f"KL <= {args.max_kl:g} nats/token",
            args.min_agreement is not None and f"agreement >= {args.min_agreement:g}",
        )
        if text
    )
    if chosen is None:
        print(f"no candidate meets {budget} undistilled: keep all layers, or distil a candidate and measure it")
    else:
        print(
            f"recommended for {budget}: L={chosen['num_key_value_layers']} "
            f"(skips {chosen['skipped_layers']} of {result['num_hidden_layers']} layers, "
            f"prefill saving {chosen['prefill_saving']:.1%}); this is the undistilled KL: "
            "distillation is expected to lower it"
        )
    print("by KL budget: " + ", ".join(f"<= {kl:g}: L={result['ladder'][str(kl)]}" for kl in BUDGET_LADDER))
    print(f"wrote {layer_analysis.plot(result, args.plot, chosen, args.max_kl)}", file=sys.stderr)
    if args.json:
        _write_json(result, args.json)


def _l(row: dict | None) -> int | None:
    return row["num_key_value_layers"] if row else None


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` and `analyze` to the `swiftkv` subcommands."""
    threads = torch.get_num_threads()

    p = sub.add_parser(
        "eval",
        help="quality of a SwiftKV model against its teacher (SwiftKV off): perplexity, KL, MMLU, BIG-bench, GSM8K",
        description=f"Tasks: {valid_task_names()}. SwiftKV models are scored in both modes of one model object "
        "(base = SwiftKV off = the teacher); any other model is scored as the base model only, unless -L/--skip "
        "converts it on the fly (undistilled) or --adapter applies a distilled adapter.",
    )
    add_model_args(p)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task names (see above)")
    p.add_argument("--limit", type=positive_int, help="at most N items per task, from each task's fixed order")
    p.add_argument("--json", type=Path, help="write the full results (with GSM8K predictions) here")
    add_layout_args(p, "convert a base MODEL on the fly (undistilled)")
    add_adapter_arg(p)
    add_calibration_arguments(p)
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="modes for multiple-choice and GSM8K (text tasks always run both: KL needs the teacher)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="text tasks: tokens scored per example")
    p.add_argument("--gsm8k-shots", type=int, default=4, help="worked examples before each problem (0: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="GSM8K generation budget")
    p.add_argument("--batch-size", type=positive_int, default=8, help="GSM8K generation batch size")
    p.add_argument("--bigbench-dir", help="an extracted bigbench-1.0.0 sdist (default: fetched once into the cache)")
    p.add_argument("--threads", type=positive_int, default=threads)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "analyze",
        help="rank candidate L before training: layer similarity, undistilled KL/agreement vs prefill saving",
        description="For every candidate L: KL(base || undistilled SwiftKV) and top-1 agreement on a held-out "
        "sample, the prefill-FLOPs saving and the KV bytes; per layer: cosine similarity of the residual streams. "
        "Recommends the L with the largest saving within the budget; writes a PNG (and JSON).",
    )
    add_model_args(p)
    p.add_argument("--text", default="chitchat", help="text source: chitchat, gsm8k-test, or a local file")
    p.add_argument("--samples", type=positive_int, default=32, help="examples from the source's held-out split")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="tokens per example")
    p.add_argument("--candidates", type=positive_int, nargs="+", help="L values (default: every L from N/4 to N-1)")
    p.add_argument(
        "--key-value-group-size", "-g", type=positive_int, default=1, help="AcrossKV group size of the candidates"
    )
    p.add_argument("--prompt-length", type=positive_int, default=2048, help="prompt length for the FLOPs saving")
    p.add_argument("--max-kl", type=float, default=0.5, help="budget: undistilled KL, nats/token")
    p.add_argument("--min-agreement", type=float, help="budget: undistilled top-1 agreement with the base model")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, default=Path("analyze.png"))
    p.add_argument("--threads", type=positive_int, default=threads)
    p.set_defaults(func=cmd_analyze)
