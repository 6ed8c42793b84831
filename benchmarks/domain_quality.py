"""Per-domain quality of several SwiftKV variants of one base model: one `swiftkv eval --tasks domains` per
variant, collected into one JSON and one PNG (perplexity increase over the base model, per domain and variant).

A variant is `NAME=ADAPTER_DIR` (a distilled adapter or bundled name) or `NAME=L:g` (converted on the fly:
undistilled). All variants are built on one loaded base model and scored in one pass (the base forward runs once
per text, `variants_stats`); variants already in the JSON are skipped, so a rerun adds only new ones.

    python benchmarks/domain_quality.py --json results/domains_smollm2.json --plot results/domains_smollm2.png \\
        --variants L22=smollm2-L22-g1 L22-undistilled=22:1 --limit 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swiftkv.adapter import QUALITY_NAME, apply_adapter, resolve_adapter
from swiftkv.config import parse_layout
from swiftkv.conversion import convert
from swiftkv.evaluate.text import format_domains, plot_domains, run_domains_variants
from swiftkv.files import portable_path, write_json
from swiftkv.loading import load_model


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME=DIR' -> (NAME, {adapter: DIR as given}); 'NAME=L:g' -> (NAME, {num_key_value_layers: L, ...})."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--variants: {text!r} is not NAME=ADAPTER_DIR or NAME=L:g")
    try:
        layers, group = parse_layout(spec)
    except ValueError:
        try:
            resolve_adapter(spec)  # fails now, before any scoring, if there is no such adapter
            return name, {"adapter": spec}
        except FileNotFoundError as error:
            raise ValueError(f"--variants {name}: {error}") from None
    return name, {"num_key_value_layers": layers, "key_value_group_size": group}


def recorded_variant(spec: dict) -> dict:
    """The variant as the JSON records it: the adapter as `portable_path` records paths, the layout as text."""
    return {key: portable_path(value) if key == "adapter" else str(value) for key, value in spec.items()}


def build_variant(base, spec: dict):
    """The SwiftKV variant of `base` (sharing its weights): a distilled adapter, or an undistilled conversion."""
    if "adapter" in spec:
        return apply_adapter(base, spec["adapter"]).eval()
    return convert(base, spec["num_key_value_layers"], spec["key_value_group_size"]).eval()


def markdown(results: dict) -> str:
    """One row per variant: perplexity vs base / top-1 agreement on every domain (the unseen one last), then the
    overall perplexity ratio, KL and agreement; the base perplexities in the first row."""
    first = next(iter(results.values()))
    domains = list(first["sources"])
    label = {d: f"{d} (unseen)" if first["sources"][d]["unseen"] else d for d in domains}
    lines = [
        "| model | " + " | ".join(label[d] for d in domains) + " | overall | KL | agreement |",
        "|---" * (len(domains) + 4) + "|",
        "| base ppl | "
        + " | ".join(f"{first['sources'][d]['base']['ppl']:.2f}" for d in domains)
        + f" | {first['overall']['base']['ppl']:.2f} | | |",
    ]
    for name, table in results.items():
        cells = [
            f"{table['sources'][d]['ppl_ratio'] - 1:+.1%} / {table['sources'][d]['agreement']:.0%}" for d in domains
        ]
        overall = table["overall"]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {overall['ppl_ratio'] - 1:+.1%} | {overall['kl']:.3f} | {overall['agreement']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--variants", nargs="+", required=True, help="NAME=ADAPTER_DIR or NAME=L:g")
    p.add_argument("--limit", type=int, default=32, help="texts per domain")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens scored per text")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, required=True)
    p.add_argument("--markdown", action="store_true", help="print the table for README / docs")
    p.add_argument(
        "--into-adapters", action="store_true", help="also write each adapter's table to ADAPTER/domains.json"
    )
    args = p.parse_args()
    if args.limit < 1:
        p.error(f"--limit {args.limit}: give at least 1 text per domain")
    try:  # validate every variant before any work
        variants = dict(parse_variant(v) for v in args.variants)
    except ValueError as error:
        p.error(str(error))
    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    todo = {name: spec for name, spec in variants.items() if name not in results}
    if todo:
        base, tokenizer = load_model(args.model)  # every variant shares these weights: one base forward for all
        models = {name: build_variant(base, spec) for name, spec in todo.items()}
        tables = run_domains_variants(models, tokenizer, args.limit, args.max_tokens)
        for name, spec in todo.items():
            results[name] = tables[name] | {"variant": recorded_variant(spec)}
            print(f"\n{name}\n" + "\n".join(format_domains(tables[name])), flush=True)
            if args.into_adapters and "adapter" in spec:
                write_json(tables[name], resolve_adapter(spec["adapter"]) / QUALITY_NAME)
        write_json(results, args.json)
    plot_domains(results, args.plot)
    if args.markdown:
        print(markdown(results))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
