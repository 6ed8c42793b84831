"""What each of swiftkv's CPU prefill pieces gives: ms per prefill, SwiftKV off, batch 1, per weight format.

    python benchmarks/prefill_ablation.py --prompt 2048 --reps 5 --formats float32 bf16

Variants of the model `swiftkv.load` gives on CPU, one piece taken away at a time: "swiftkv" (everything),
"sdpa" (transformers' SDPA instead of the attention kernel, csrc/attention.cpp), "unfused" (the stock RMSNorm and
MLP modules instead of kernels.FusedRMSNorm / FusedMLP), "stock" (both), each of them with the allocator setting
(kernels.reuse_freed_memory) and without it ("+malloc" / "-malloc"). That setting holds for a whole process, so each
round runs two fresh processes, one per setting, in alternating order; inside each the four variants are timed in
rotation after one untimed round. Writes --json (medians, every run, ratios to "swiftkv+malloc") and --plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from swiftkv.bench import machine_info, num_threads, prefill, rotated, timed
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.loading import load
from swiftkv.modeling import attention, kernels
from swiftkv.modeling.weights import FORMATS, resolve_formats
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"swiftkv": (True, True), "sdpa": (False, True), "unfused": (True, False), "stock": (False, False)}


def set_pieces(model, fused: dict, kernel: bool, fuse: bool) -> None:
    """The attention implementation (swiftkv's or SDPA) and the fused modules (on, or their stock classes)."""
    model.config._attn_implementation = attention.NAME if kernel else "sdpa"
    for module, cls in fused.items():
        module.__class__ = cls if fuse else cls.stock_class


def child(fmt: str, prompt: int, threads: int) -> dict[str, float]:
    """One process: seconds of one prefill per variant (after an untimed round), malloc as the environment says."""
    model, _ = load("default", adapter="smollm2-L15-g1", weights=fmt)
    fused = {m: type(m) for m in model.modules() if isinstance(m, (kernels.FusedRMSNorm, kernels.FusedMLP))}
    ids = torch.randint(100, 20000, (1, prompt), generator=torch.Generator().manual_seed(0))

    def run(kernel: bool, fuse: bool):
        set_pieces(model, fused, kernel, fuse)
        return timed(lambda: prefill(model, ids))

    with num_threads(threads), torch.inference_mode(), swiftkv_mode(model, False):
        times = rotated({name: lambda p=pieces: run(*p) for name, pieces in VARIANTS.items()}, reps=1)
    return {name: runs[0].wall_s for name, runs in times.items()}


def measure(fmt: str, args) -> dict[str, list[float]]:
    """ms per prefill for every variant +/- malloc, --reps rounds of two processes in alternating order."""
    runs: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for malloc in (True, False) if rep % 2 == 0 else (False, True):
            env = os.environ | {kernels.MALLOC_TUNING_ENV: "1" if malloc else "0"}
            command = [sys.executable, __file__, "--child", fmt, "--prompt", str(args.prompt)]
            out = subprocess.run(command + ["--threads", str(args.threads)], env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"prefill_ablation child ({fmt}, malloc={malloc}) failed:\n{out.stderr[-2000:]}")
            for name, seconds in json.loads(out.stdout.strip().splitlines()[-1]).items():
                runs.setdefault(f"{name}{'+' if malloc else '-'}malloc", []).append(1e3 * seconds)
        print(f"prefill_ablation: {fmt} round {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    return runs


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    formats = list(result["formats"])
    names = list(result["formats"][formats[0]]["median_ms"])
    width = 0.8 / len(formats)
    for i, fmt in enumerate(formats):
        medians = result["formats"][fmt]["median_ms"]
        ax.bar([x + i * width for x in range(len(names))], [medians[n] for n in names], width, label=fmt)
    ax.set_xticks([x + width * (len(formats) - 1) / 2 for x in range(len(names))], names, rotation=20)
    ax.set_ylabel(f"ms per {result['prompt']}-token prefill (median)")
    ax.set_title("swiftkv CPU prefill: each piece taken away (SwiftKV off)")
    ax.legend()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5, help="rounds (two processes each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["float32", "bf16"])
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "prefill_ablation.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    parser.add_argument("--child", choices=FORMATS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.prompt, args.threads)))
        return
    if args.prompt < 2 or args.reps < 1 or args.threads < 1:
        parser.error("--prompt must be >= 2, --reps and --threads >= 1")
    result = {"machine": machine_info(args.threads), "prompt": args.prompt, "reps": args.reps, "formats": {}}
    for fmt in resolve_formats(args.formats):  # bf16 without bf16 hardware runs float32: named and timed so, once
        runs = measure(fmt, args)
        medians = {name: statistics.median(ms) for name, ms in runs.items()}
        base = medians["swiftkv+malloc"]
        result["formats"][fmt] = {
            "median_ms": medians,
            "vs_swiftkv": {name: ms / base for name, ms in medians.items()},
            "runs_ms": runs,
        }
        for name, ms in medians.items():
            print(f"{fmt:8s} {name:16s} {ms:7.0f} ms  x{ms / base:.2f}")
    figure = plot(result, figure_beside(args.json, args.plot))
    result["json"], result["plot"] = portable_path(args.json), portable_path(figure)
    write_json(result, args.json)


if __name__ == "__main__":
    main()
