"""Quality per weight format: `swiftkv eval default --adapter A --tasks domains@8 --weights W` for every adapter A and
format W, then each source's perplexity against float32's, base and SwiftKV modes alike, in one JSON and one PNG.

    python benchmarks/weights_quality.py --adapters smollm2-L15-g1 smollm2-L22-g1 \\
        --json results/weights_quality.json --plot results/weights_quality.png

One `swiftkv eval` process per (adapter, format), its JSON kept in --runs: an interrupted run resumes where it stopped.
Targets (issue 33): bf16 and int8 within +0.5% of float32's perplexity on every source, int4 within +3%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from swiftkv.evaluate.scoring import MODES
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.modeling.weights import FORMATS, resolve_formats

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"bf16": 0.005, "int8": 0.005, "int4": 0.03}  # largest perplexity increase over float32, every source


def run_eval(adapter: str, fmt: str, runs: Path, limit: int, threads: int) -> dict:
    """The eval JSON of (adapter, fmt), computed once (swiftkv's CLI, a process of its own) and kept in `runs`."""
    out = runs / f"{adapter}_{fmt}.json"
    if not out.exists():
        command = [sys.executable, "-m", "swiftkv.cli", "eval", "default", "--adapter", adapter]
        command += ["--tasks", f"domains@{limit}", "--weights", fmt, "--threads", str(threads), "--json", str(out)]
        print(f"weights_quality: {adapter} {fmt} ...", file=sys.stderr, flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["tasks"]["domains"]


def compare(tables: dict[str, dict]) -> dict:
    """Per format, source and mode: perplexity / float32's perplexity - 1, and whether the format's target holds."""
    reference = tables["float32"]["sources"]
    out = {}
    for fmt, table in tables.items():
        if fmt == "float32":
            continue
        rows = {
            source: {mode: row[mode]["ppl"] / reference[source][mode]["ppl"] - 1 for mode in MODES}
            for source, row in table["sources"].items()
        }
        worst = max(value for row in rows.values() for value in row.values())
        out[fmt] = {"increase": rows, "worst": worst, "target": TARGETS[fmt], "met": worst <= TARGETS[fmt]}
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = list(result["adapters"])
    fig, axes = plt.subplots(1, len(adapters), figsize=(7 * len(adapters), 4.5), squeeze=False)
    for ax, adapter in zip(axes[0], adapters, strict=True):
        formats = result["adapters"][adapter]
        sources = list(next(iter(formats.values()))["increase"])
        series = [(fmt, mode) for fmt in formats for mode in MODES]
        width = 0.8 / len(series)
        for i, (fmt, mode) in enumerate(series):
            xs = [j + (i - len(series) / 2 + 0.5) * width for j in range(len(sources))]
            ax.bar(xs, [100 * formats[fmt]["increase"][s][mode] for s in sources], width, label=f"{fmt} {mode}")
        for fmt, target in TARGETS.items():
            if fmt in formats:
                ax.axhline(100 * target, linestyle="--", linewidth=0.8, color="grey")
        ax.set_xticks(range(len(sources)), sources, rotation=60, ha="right")
        ax.set_ylabel("perplexity vs float32 (%)")
        ax.set_title(adapter)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", default=["smollm2-L15-g1", "smollm2-L22-g1"])
    parser.add_argument("--formats", nargs="+", choices=FORMATS[1:], default=list(FORMATS[1:]))
    parser.add_argument("--limit", type=int, default=8, help="texts per source (domains@N)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=ROOT / "out" / "weights_quality", help="one eval JSON per run")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "weights_quality.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    if args.limit < 1 or args.threads < 1:
        parser.error("--limit and --threads must be >= 1")
    args.runs.mkdir(parents=True, exist_ok=True)
    result = {"limit": args.limit, "runs": portable_path(args.runs), "targets": TARGETS, "adapters": {}}
    formats = resolve_formats(["float32", *args.formats])  # bf16 without bf16 hardware: float32, not measured twice
    for adapter in args.adapters:
        tables = {fmt: run_eval(adapter, fmt, args.runs, args.limit, args.threads) for fmt in formats}
        result["adapters"][adapter] = compare(tables)
        write_json(result, args.json)  # after every adapter: what is measured is kept
    plot(result, figure_beside(args.json, args.plot))
    for adapter, formats in result["adapters"].items():
        for fmt, row in formats.items():
            worst, target = 100 * row["worst"], 100 * row["target"]
            print(f"{adapter:16s} {fmt:5s} worst source {worst:+.2f}% (target <= +{target:.1f}%)")


if __name__ == "__main__":
    main()
