"""Two prefill paths of swiftkv timed in rotation in one process (model, weights and caches shared): whole prefills of
the default model per weight format and prompt length.

    python benchmarks/panel_products.py --prompts 32 128 512 2048 --formats float32 int8 int4 --threads 2 --reps 9
    python benchmarks/panel_products.py --compare kept-token --prompts 32 128 512 2048 --reps 15

--compare panel (default): panel products (csrc/products.cpp) against MKL's, the path before them (int8 / int4 blocks
dequantized for it), SwiftKV off and L=15 (`weights.native_panel_products` switches). Where panel products apply
(products in float32 on MKL: no bf16 hardware, ATen below AVX-512) the two paths differ in the products of more than
weights.NATIVE_ROWS rows; elsewhere both run the same code and the script says so and exits 2.
--compare kept-token: an L=15 prefill's kept token through layers >= L in the native decode step
(decode.kept_token_logits) against the Python layers (`native.native_decode(False)`), any CPU.
Per prompt length, mode and format: median ms of each path and the median of the per-round ratios (first path /
second, drift between rounds cancels). Writes --json and a PNG of the ratios by prompt length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from vs_openvino import paired

from swiftkv.bench import machine_info, num_threads, prefill, rotated, threads_label, timed
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.loading import load
from swiftkv.modeling import kernels, native, weights
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]
# --compare -> (its two paths, first / second: name -> the switch that selects it), the SwiftKV modes timed, the plot's
# y label)
COMPARISONS = {
    "panel": (
        {"panel": lambda: weights.native_panel_products(True), "mkl": lambda: weights.native_panel_products(False)},
        ("off", "L15"),
        "prefill time, panel products / MKL's",
    ),
    "kept-token": (
        {"native": lambda: native.native_decode(True), "python": lambda: native.native_decode(False)},
        ("L15",),
        "prefill time, kept token's later layers native / Python",
    ),
}


def measure(fmt: str, args) -> dict[str, dict]:
    """'<prompt>/<mode>' -> median ms per path, the paired ratio and every run, for one weight format."""
    paths, modes, _ = COMPARISONS[args.compare]
    first, second = paths
    model, _ = load("default", adapter="smollm2-L15-g1", weights=fmt)
    rows = {}
    for prompt in args.prompts:
        ids = torch.randint(100, 20000, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        for mode in modes:
            runs = {name: _prefill_run(model, ids, mode != "off", switch) for name, switch in paths.items()}
            times = rotated(runs, args.reps)
            ms = {name: [1e3 * r.wall_s for r in runs] for name, runs in times.items()}
            row = rows[f"{prompt}/{mode}"] = {
                "prompt": prompt,
                "mode": mode,
                "median_ms": {name: statistics.median(v) for name, v in ms.items()},
                "paired_ratio": paired(ms[first], ms[second]),
                "runs_ms": ms,
            }
            print(
                f"{fmt:7s} {prompt:5d} {mode:4s} {first} {row['median_ms'][first]:8.1f} ms  {second} "
                f"{row['median_ms'][second]:8.1f} ms  paired {row['paired_ratio']:.3f}",
                flush=True,
            )
    return rows


def _prefill_run(model, ids: torch.Tensor, swift: bool, switch):
    """One timed prefill of `ids` (the room for 16 new tokens `generate` would give), SwiftKV on or off, inside
    `switch()`."""

    def run():
        with switch(), swiftkv_mode(model, swift):
            return timed(lambda: prefill(model, ids, 16))

    return run


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    _, modes, label = COMPARISONS[result["compare"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    for fmt, rows in result["formats"].items():
        for mode in modes:
            points = [(r["prompt"], r["paired_ratio"]) for r in rows.values() if r["mode"] == mode]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{fmt}, SwiftKV {mode}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(label)
    ax.set_title(f"{result['compare']} ({threads_label(result['machine']['threads'])}, median per-round ratio)")
    ax.legend()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=COMPARISONS, default="panel")
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--formats", nargs="+", choices=("float32", *weights.BLOCK_FORMATS), default=["int8"])
    parser.add_argument("--reps", type=int, default=9, help="timed rounds per prompt length and mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "panel_products.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    if min(args.prompts) < 2 or args.reps < 1 or args.threads < 1:
        parser.error("--prompts must be >= 2, --reps and --threads >= 1")
    if args.compare == "panel" and (kernels.ONEDNN_PREFERRED or weights.native_bf16()):
        print("panel_products: panel products do not run on this CPU (bf16 hardware or AVX-512 ATen)", file=sys.stderr)
        sys.exit(2)
    result = {"compare": args.compare, "machine": machine_info(args.threads), "reps": args.reps, "formats": {}}
    with num_threads(args.threads), torch.inference_mode():
        for fmt in args.formats:
            result["formats"][fmt] = measure(fmt, args)
            write_json(result, args.json)  # what is finished survives an interrupt
    figure = plot(result, figure_beside(args.json, args.plot))
    result["json"], result["plot"] = portable_path(args.json), portable_path(figure)
    write_json(result, args.json)


if __name__ == "__main__":
    main()
