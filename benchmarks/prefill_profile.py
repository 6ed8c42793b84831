"""Where one prefill's time goes, by kind of work: torch.profiler's self CPU time of every op, grouped.

    python benchmarks/prefill_profile.py --prompt 2048 --threads 2 --weights bf16 --json results/prefill_profile.json

The engines of benchmarks/vs_openvino.py: its L=15 model with SwiftKV off (the base model's prefill, the one
OpenVINO's is compared with) or --swiftkv L15 / L22 on; --reps profiled prefills after one untimed. ATen ops are
timed by the profiler and swiftkv's native kernels (csrc/, pybind functions) by its Python tracer; both self times,
summed per prefill into GROUPS, and what neither sees (Python, the profiler's own cost) is the `rest` of the
prefill's wall time. --attention sdpa-bf16 runs bf16 layers' causal prefills through PyTorch's flash attention on
bf16 q/k/v in place of swiftkv's kernel (`attention.sdpa_for_bf16_layers`: AMX tiles where the CPU has them): what
that path would give a bf16 prefill, SwiftKV off or on. The profiler slows a prefill (~10-30%, most of it in
`rest`): read the shares and the groups against each other, not the absolute times. Writes --json and --plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from vs_openvino import ADAPTERS, swiftkv_model

from swiftkv.bench import machine_info, num_threads, prefill, threads_label
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.loading import DEFAULT_MODEL
from swiftkv.modeling.attention import sdpa_for_bf16_layers
from swiftkv.modeling.weights import FORMATS, default_format, weight_format
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]
# group -> the op names it holds (ATen ops as the profiler names them; native kernels by their pybind name)
GROUPS = {
    "products": (
        "aten::mm",
        "aten::addmm",
        "aten::linear",
        "aten::_int_mm",
        "mkldnn::_linear_pointwise",
        "prefill_linear",
    ),
    "attention": ("prefill_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "norms": ("rms_norm",),
    "rope": ("prefill_rope",),
    "mlp activation": ("silu_mul",),
    "casts": ("aten::to", "aten::_to_copy", "aten::copy_"),
}


def op_name(key: str) -> str | None:
    """An ATen op's name, a native kernel's pybind name ('<built-in method rms_norm of pybind11...>' -> 'rms_norm'),
    or None for Python frames and everything else the tracer records."""
    if key.startswith(("aten::", "mkldnn::")):
        return key
    if key.startswith("<built-in method ") and "pybind11" in key:
        return key.removeprefix("<built-in method ").split(" ", 1)[0]
    return None


def grouped(self_ms: dict[str, float]) -> dict[str, float]:
    """Self ms per op name -> ms per GROUPS entry, the rest of the ATen and native ops as 'other ops'."""
    groups = {group: sum(self_ms.get(name, 0.0) for name in names) for group, names in GROUPS.items()}
    named = {name for names in GROUPS.values() for name in names}
    groups["other ops"] = sum(ms for name, ms in self_ms.items() if name not in named)
    return groups


def profile(model, ids: torch.Tensor, reps: int) -> tuple[dict[str, float], float]:
    """(self ms per op name, wall ms), each per prefill, over `reps` profiled prefills after one untimed."""
    prefill(model, ids)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            prefill(model, ids)
        wall_ms = (time.perf_counter() - start) * 1e3 / reps
    self_ms: dict[str, float] = {}
    for event in prof.key_averages():
        if (name := op_name(event.key)) is not None:
            self_ms[name] = self_ms.get(name, 0.0) + event.self_cpu_time_total / 1e3 / reps
    return self_ms, wall_ms


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    parts = {**result["groups_ms"], "rest (Python, profiler)": result["rest_ms"]}
    ax.barh(list(parts), list(parts.values()), color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("ms per prefill (profiled)")
    ax.set_title(
        f"{result['weights']} prefill of {result['prompt']} tokens, SwiftKV {result['swiftkv']}, "
        f"{threads_label(result['machine']['threads'])}"
    )
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--swiftkv", choices=["off", *ADAPTERS], default="off", help="SwiftKV off, or its layout on")
    parser.add_argument("--attention", choices=["swiftkv", "sdpa-bf16"], default="swiftkv")
    parser.add_argument("--weights", choices=FORMATS, default=None, help="default: this CPU's default format")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "prefill_profile.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    if args.prompt < 2 or args.reps < 1 or args.threads < 1:
        parser.error(f"--prompt >= 2, --reps >= 1, --threads >= 1 (got {args.prompt}, {args.reps}, {args.threads})")
    weights = args.weights or default_format()
    try:
        model = swiftkv_model(args.model, "L15" if args.swiftkv == "off" else args.swiftkv, weights)
    except (OSError, ValueError) as error:  # no such checkpoint, or too few layers for the layout
        parser.error(f"--model {args.model!r}: {error}")
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with num_threads(args.threads), torch.inference_mode(), swiftkv_mode(model, args.swiftkv != "off"):
        with sdpa_for_bf16_layers(args.attention == "sdpa-bf16"):
            self_ms, wall_ms = profile(model, ids, args.reps)
    groups = grouped(self_ms)
    result = {
        "model": portable_path(args.model),  # 'default' and relative paths as given
        "swiftkv": args.swiftkv,
        "attention": args.attention,
        "weights": weight_format(model),  # what ran (bf16 asked without bf16 hardware runs float32)
        "prompt": args.prompt,
        "reps": args.reps,
        "machine": machine_info(args.threads),
        "wall_ms": wall_ms,
        "groups_ms": groups,
        "rest_ms": wall_ms - sum(groups.values()),
        "ops_ms": dict(sorted(self_ms.items(), key=lambda item: -item[1])),
    }
    write_json(result, args.json)
    plot(result, figure_beside(args.json, args.plot))
    for group, ms in [*groups.items(), ("rest", result["rest_ms"])]:
        print(f"{group:<16} {ms:8.1f} ms  {100 * ms / wall_ms:5.1f}%")
    print(f"{'prefill':<16} {wall_ms:8.1f} ms (profiled)")


if __name__ == "__main__":
    main()
