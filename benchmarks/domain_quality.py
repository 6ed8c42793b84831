"""Per-domain quality of several SwiftKV variants of one base model: one `swiftkv eval --tasks domains` per
variant, collected into one JSON and one PNG (perplexity increase over the base model, per domain and variant).

A variant is `NAME=ADAPTER_DIR` (a distilled adapter) or `NAME=L:g` (converted on the fly: undistilled). Results
are written after every variant, and variants already in the JSON are skipped, so an interrupted run resumes.

    python benchmarks/domain_quality.py --json results/domains_smollm2.json --plot results/domains_smollm2.png \\
        --variants L22=smollm2-L22-g1 L22-undistilled=22:1 --limit 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swiftkv.adapter import resolve_adapter
from swiftkv.config import parse_layout
from swiftkv.evaluate.tasks import EvalOptions, evaluate
from swiftkv.evaluate.text import format_domains
from swiftkv.files import save_figure, write_json
from swiftkv.loading import load, origin


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME=DIR' -> (NAME, {adapter: DIR}); 'NAME=L:g' -> (NAME, {num_key_value_layers: L, ...})."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise SystemExit(f"--variants: {text!r} is not NAME=ADAPTER_DIR or NAME=L:g")
    try:
        layers, group = parse_layout(spec)
    except ValueError:
        try:
            return name, {"adapter": str(resolve_adapter(spec))}
        except FileNotFoundError as error:
            raise SystemExit(f"--variants {name}: {error}") from None
    return name, {"num_key_value_layers": layers, "key_value_group_size": group}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    domains = list(next(iter(results.values()))["sources"]) + ["overall"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, len(domains) * 0.9), 4))
    for i, name in enumerate(names):
        rows = results[name]["sources"] | {"overall": results[name]["overall"]}
        values = [100 * (rows[d]["ppl_ratio"] - 1) for d in domains]
        ax.bar([x + i * width for x in range(len(domains))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(domains))], domains, rotation=35, ha="right")
    ax.set_ylabel("SwiftKV perplexity vs base (%)")
    ax.set_yscale("symlog", linthresh=10)
    for goal in (3, 15, 25):
        ax.axhline(goal, color="grey", lw=0.6, ls="--")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--variants", nargs="+", required=True, help="NAME=ADAPTER_DIR or NAME=L:g")
    p.add_argument("--limit", type=int, default=32, help="texts per domain")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens scored per text")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, required=True)
    args = p.parse_args()
    variants = dict(parse_variant(v) for v in args.variants)  # validate all before any work
    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    for name, spec in variants.items():
        if name in results:
            continue
        model, tokenizer = load(args.model, **spec)
        notes = [origin(args.model, spec.get("adapter"), model, "adapter" not in spec)]
        options = EvalOptions(limit=args.limit, max_tokens=args.max_tokens)
        domains = evaluate(model, tokenizer, ["domains"], options, notes)["tasks"]["domains"]
        results[name] = domains | {"variant": {k: str(v) for k, v in spec.items()}}
        print(f"\n{name}\n" + "\n".join(format_domains(domains)), flush=True)
        write_json(results, args.json)
    plot(results, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
