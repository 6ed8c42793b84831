"""One markdown table from several `swiftkv eval --json` results: a row per model, a column per metric.

    python -m swiftkv.evaluate.report --out docs/quality.md \\
        --row "base (teacher)" base results/quality_L15.json results/quality_base.json \\
        --row "L=15 undistilled" swiftkv results/quality_L15.json

Each row reads one mode ("base" = SwiftKV off, or "swiftkv") from the results files given (later files add
tasks the earlier ones lack). KL and agreement are properties of a SwiftKV model against its teacher: the
base row shows 0 and 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_COLUMNS = (("ppl", "ppl"), ("kl", "KL"), ("agreement", "agree"), ("acc", "acc"), ("exact_match", "EM"))


def merge(files: list[str | Path]) -> dict:
    """Tasks of several results files and the first file's model summary. A task in several files keeps the
    first file's entries and gains the modes the others add (teacher MC scores from a base-only run)."""
    merged: dict = {"tasks": {}}
    for file in files:
        result = json.loads(Path(file).read_text())
        merged.setdefault("model", result["model"])
        for task, value in result["tasks"].items():
            entry = merged["tasks"].setdefault(task, {})
            for key, item in value.items():
                entry.setdefault(key, item)
    return merged


def row_values(result: dict, mode: str) -> dict[tuple[str, str], tuple[float, int]]:
    """{(task, metric): (value, number of examples)} of one mode."""
    values = {}
    for task, res in result["tasks"].items():
        n = res["examples"]
        for key, _ in _COLUMNS:
            if key in ("kl", "agreement"):
                if key in res:
                    values[(task, key)] = (res[key] if mode != "base" else float(key == "agreement"), n)
            elif key in res.get(mode, {}):
                values[(task, key)] = (res[mode][key], n)
    return values


def layout(result: dict, mode: str) -> tuple[str, str, str, str]:
    """(L/N, g, prefill FLOPs ratio, KV bytes ratio) cells; the base model skips nothing."""
    model = result["model"]
    if mode == "base" or "num_key_value_layers" not in model:
        return f"{model['num_hidden_layers']}/{model['num_hidden_layers']}", "-", "1.00", "1.00"
    return (
        f"{model['num_key_value_layers']}/{model['num_hidden_layers']}",
        str(model["key_value_group_size"]),
        f"{model['prefill_flops_ratio']:.2f}",
        f"{model['kv_bytes_ratio']:.2f}",
    )


def _short(task: str) -> str:
    """Column label: 'ppl:chitchat' -> 'chitchat', 'bigbench:social_iqa' -> 'social_iqa'."""
    return task.partition(":")[2] if task.startswith(("ppl:", "bigbench:")) else task


def markdown(rows: list[tuple[str, str, dict]]) -> str:
    """rows: (label, mode, merged result) -> a markdown table."""
    table = [(label, layout(result, mode), row_values(result, mode)) for label, mode, result in rows]
    columns: list[tuple[str, str]] = []
    for _, _, values in table:
        columns += [key for key in values if key not in columns]
    order = {key: i for i, (key, _) in enumerate(_COLUMNS)}
    columns.sort(key=lambda c: (_task_rank(c[0]), c[0], order[c[1]]))
    labels = dict(_COLUMNS)
    header = ["model", "L/N", "g", "prefill FLOPs", "KV bytes"]
    header += [f"{_short(task)} {labels[metric]}" for task, metric in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells, values in table:
        formatted = [_format(metric, values.get((task, metric))) for task, metric in columns]
        lines.append("| " + " | ".join([label, *cells, *formatted]) + " |")
    sizes = {task: n for _, _, values in table for (task, _), (_, n) in values.items()}
    lines.append("")
    lines.append("Items per task: " + ", ".join(f"{task} {n}" for task, n in sizes.items()) + ".")
    lines.append("prefill FLOPs: theoretical ratio to the base model at the prompt length in the results (2048).")
    return "\n".join(lines)


def _task_rank(task: str) -> int:
    return 0 if task.startswith("ppl:") else 2 if task == "gsm8k" else 1


def _format(metric: str, value: tuple[float, int] | None) -> str:
    if value is None:
        return "-"
    number = value[0]
    return f"{number:.2f}" if metric == "ppl" else f"{number:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--row", nargs="+", action="append", required=True, metavar="LABEL MODE FILE", help="LABEL MODE FILE..."
    )
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.row:
        if len(spec) < 3 or spec[1] not in ("base", "swiftkv"):
            parser.error(f"--row needs LABEL MODE FILE... with MODE base or swiftkv; got {spec}")
        rows.append((spec[0], spec[1], merge(spec[2:])))
    text = markdown(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
