"""Would PyTorch's own weight-only int8/int4 CPU kernels beat swiftkv's products? Speed per row count, side by side.

    python benchmarks/torch_quantized_kernels.py --rows 1 2048 --threads 2 --reps 7

Issue 33 asks for the prefill's products "through a well-kept GEMM per format (oneDNN through torch, or torch's own
int8/int4 CPU kernels) wherever it beats dequantize-then-fp32". PyTorch's CPU has two weight-only kernels (what
torchao's int8/int4 weight-only layouts call on CPU):
- `aten._weight_int4pack_mm_for_cpu`: 4-bit groups of 32 inputs, each with a scale and a zero, w = (q - 8) * scale +
  zero. That is GGUF Q4_1 (w = d * q + m) with scale = d, zero = m + 8 d: the very weight values of swiftkv's int4,
  so its output is checked against the dequantized product (`max_abs_error` in the JSON).
- `aten._weight_int8pack_mm`: int8 with one scale per output channel. swiftkv's int8 has one per 32 inputs (Q8_0),
  which that layout cannot hold, so it runs the same weight quantized per channel: its speed only.
swiftkv's side is what a model runs for those rows (`BlockLinear`): the native product for up to NATIVE_ROWS rows (a
decode step), above that (a prefill) `weights.panel_product` where it runs, else the blocks dequantized then
`F.linear`. The kernels get x in the dtype
swiftkv's product runs in (`product_dtype`: bf16 on bf16 hardware, else float32). Every product of one decoder layer
of the default model (random weights: the speed does not depend on them), the engines in rotation, medians of --reps.
Writes --json (milliseconds per layer's products, per engine and row count) and --plot.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from int8_activations import quantize_rows
from native_products import LAYER_SHAPES
from torch import nn

from swiftkv.bench import machine_info, num_threads, rotated, timed
from swiftkv.files import figure_beside, save_figure, write_json
from swiftkv.modeling.weights import BLOCK, BlockLinear, block_linear, product_dtype, unpack_int4

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("swiftkv_int8", "torch_int8_per_channel", "swiftkv_int4", "torch_int4")


def torch_int4(layer: BlockLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_1 BlockLinear's blocks in `_weight_int4pack_mm_for_cpu`'s layout: (packed weight, scales and zeros
    [in / 32, out, 2] in `dtype`), w = (q - 8) * scale + zero = d * q + m."""
    out, blocks = layer.scales.shape
    q = unpack_int4(layer.qweight.view(out, blocks, BLOCK // 2)).view(out, -1).to(torch.int32)  # [out, in]
    d, m = layer.scales.float(), layer.mins.float()
    scales_zeros = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(dtype).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def layer_products(rows: int) -> tuple[dict, float]:
    """(the timed calls by engine, each running one decoder layer's products of x [rows, in]; the largest error of
    torch's int4 against the dequantized product, relative to that product's largest value)."""
    torch.manual_seed(0)
    calls: dict[str, list] = {name: [] for name in ENGINES}
    error = 0.0
    for out, inputs in LAYER_SHAPES:
        x = torch.randn(1, rows, inputs)
        dtype = product_dtype(x)
        linear = nn.Linear(inputs, out, bias=False)
        int8, int4 = block_linear(linear, "int8"), block_linear(linear, "int4")
        q8, s8 = quantize_rows(linear.weight.detach())  # per output channel: q int8 [out, in], scale [out, 1]
        packed, scales_zeros = torch_int4(int4, dtype)
        x2, s8 = x.view(rows, inputs).to(dtype), s8.view(-1).to(dtype)

        def int4_call(x=x2, p=packed, sz=scales_zeros):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, BLOCK, sz)

        calls["swiftkv_int8"].append(lambda x=x, layer=int8: layer(x))
        calls["torch_int8_per_channel"].append(lambda x=x2, q=q8, s=s8: torch.ops.aten._weight_int8pack_mm(x, q, s))
        calls["swiftkv_int4"].append(lambda x=x, layer=int4: layer(x))
        calls["torch_int4"].append(int4_call)
        reference = x2.float() @ int4.dequantize().t()
        error = max(error, ((int4_call().float() - reference).abs().max() / reference.abs().max()).item())
    return {name: (lambda fns=fns: timed(lambda: [fn() for fn in fns])) for name, fns in calls.items()}, error


def measure(rows: int, reps: int) -> dict:
    with torch.inference_mode():
        runs, error = layer_products(rows)
        times = rotated(runs, reps)
    median = {name: statistics.median(r.wall_s for r in runs) * 1e3 for name, runs in times.items()}
    return {
        "rows": rows,
        "median_ms": median,
        "torch_vs_swiftkv": {
            "int8": median["torch_int8_per_channel"] / median["swiftkv_int8"],
            "int4": median["torch_int4"] / median["swiftkv_int4"],
        },
        "torch_int4_max_relative_error": error,
        "runs_ms": {name: [r.wall_s * 1e3 for r in runs] for name, runs in times.items()},
    }


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    entries = result["rows"]
    fig, axes = plt.subplots(1, len(entries), figsize=(4.5 * len(entries), 4), squeeze=False)
    for ax, entry in zip(axes[0], entries, strict=True):
        ms = [entry["median_ms"][name] for name in ENGINES]
        ax.bar(range(len(ENGINES)), ms, color=["tab:blue", "tab:gray", "tab:green", "tab:gray"])
        ax.set_xticks(range(len(ENGINES)), [n.replace("_", "\n", 1) for n in ENGINES], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per layer's 7 products (log)")
        ax.set_title(f"{entry['rows']} row(s)")
    fig.suptitle(f"swiftkv's products vs PyTorch's weight-only CPU kernels, {result['machine']['threads']} thread(s)")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2048], help="rows of x (1: a decode step)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "torch_quantized_kernels.json")
    parser.add_argument("--plot", type=Path, help="PNG path (default: beside --json)")
    args = parser.parse_args()
    if min(args.rows) < 1 or args.reps < 1 or args.threads < 1:
        parser.error(f"--rows, --reps and --threads must be >= 1 (got {args.rows}, {args.reps}, {args.threads})")
    result = {"machine": machine_info(args.threads), "reps": args.reps, "rows": []}
    with num_threads(args.threads):
        for rows in args.rows:
            entry = measure(rows, args.reps)
            result["rows"].append(entry)
            write_json(result, args.json)  # a long run keeps the row counts it finished
            ratios = ", ".join(f"{fmt} {r:.1f}x" for fmt, r in entry["torch_vs_swiftkv"].items())
            print(f"{rows} row(s): " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in entry["median_ms"].items()))
            error = entry["torch_int4_max_relative_error"]
            print(f"  torch's time / swiftkv's: {ratios}; torch int4's relative error {error:.1e}")
    plot(result, figure_beside(args.json, args.plot))


if __name__ == "__main__":
    main()
