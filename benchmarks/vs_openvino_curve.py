"""Time to first token against OpenVINO by prompt length: benchmarks/vs_openvino.py runs at several lengths, one curve.

    python benchmarks/vs_openvino_curve.py results/vs_openvino_avx2cpu_prompt{32,128,512,1024}.json \\
        results/vs_openvino_avx2cpu_rr_2threads_11reps_b.json --json results/vs_openvino_avx2cpu_curve.json

Reads runs of vs_openvino.py (one --prompt-length each, same machine and threads) and gives, per prompt length, each
swiftkv engine's TTFT against OpenVINO's default (the ratio of medians and the median of per-repetition ratios,
`paired_ttft`), so where SwiftKV's skip starts paying against the engine CPU users run shows as one curve. Measures
nothing itself. Writes --json and --plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from swiftkv.files import figure_beside, read_json_file, save_figure, write_json

REFERENCE = "openvino/default"


def curve(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """{swiftkv engine: {prompt length: ratios to OpenVINO's default}} over `runs`, lengths in increasing order."""
    out: dict[str, dict[int, dict]] = {}
    for run in sorted(runs, key=lambda r: r["prompt_length"]):
        for engine, against in run["ratios"].items():
            if REFERENCE in against:
                ratio = against[REFERENCE]
                out.setdefault(engine, {})[run["prompt_length"]] = {
                    "ttft": ratio["ttft"],
                    "paired_ttft": ratio["paired_ttft"],
                }
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for engine, points in result["curve"].items():
        lengths = sorted(points, key=int)
        ax.plot([int(n) for n in lengths], [points[n]["paired_ttft"] for n in lengths], marker="o", label=engine)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    for target in (0.5, 0.75):  # issue 33's TTFT targets for L=15 and L=22 (2048 tokens)
        ax.axhline(target, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(f"TTFT / {REFERENCE}'s (paired by repetition)")
    ax.set_title(f"swiftkv against OpenVINO GenAI by prompt length, {result['threads']} thread(s)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="vs_openvino.py JSONs, one prompt length each")
    parser.add_argument("--json", type=Path, default=Path("results/vs_openvino_curve.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        try:
            runs.append(read_json_file(path, "a vs_openvino.py result"))
        except (OSError, ValueError) as error:
            parser.error(f"{path}: {error}")
        if not {"prompt_length", "ratios", "machine"} <= set(runs[-1]):
            parser.error(f"{path} is not a vs_openvino.py result (no prompt_length / ratios / machine)")
    lengths = [run["prompt_length"] for run in runs]
    if len(set(lengths)) != len(lengths):
        parser.error(f"one run per prompt length (got lengths {lengths})")
    threads = {run["machine"]["threads"] for run in runs}
    if len(threads) != 1:
        parser.error(f"the runs must share a thread count (got {sorted(threads)})")
    result = {"threads": threads.pop(), "runs": [str(path) for path in args.runs], "curve": curve(runs)}
    write_json(result, args.json)
    plot(result, figure_beside(args.json, args.plot))
    for engine, points in result["curve"].items():
        print(f"{engine:22s} " + "  ".join(f"{n}: {p['paired_ttft']:.2f}" for n, p in points.items()))


if __name__ == "__main__":
    main()
