"""One SmolLM2 layer's float32 products at prefill size: MKL (`F.linear`), oneDNN (`_linear_pointwise`) and, where
installed, OpenVINO's CPU plugin (each product compiled as an f32 MatMul with constant weights), side by side.

    python benchmarks/products_vs_openvino.py --threads 2 --reps 21 --json results/products_vs_openvino.json

Which float32 kernel swiftkv's prefill should use on this CPU (`kernels.ONEDNN_PREFERRED`), and whether OpenVINO's
products are any faster than it. The engines run in rotation (`bench.rotated`, drift cancels), every product of a
layer (q, k, v, o, gate, up, down) per call; medians of --reps. OpenVINO's time includes copying its input in and
its output out (~5% of it). Writes --json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from swiftkv.bench import machine_info, num_threads, rates, rotated, timed
from swiftkv.files import write_json
from swiftkv.modeling import kernels

# SmolLM2-135M's products: name -> (out, in) features
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
          "up": (1536, 576), "down": (576, 1536)}  # fmt: skip


def openvino_products(xs: dict, ws: dict, threads: int) -> Callable[[], None] | None:
    """One compiled f32 MatMul per product, run in turn; None where OpenVINO is not installed."""
    try:
        import openvino as ov  # noqa: PLC0415  (benchmark-only dependency: scripts/setup.sh --openvino)
        import openvino.opset13 as ops  # noqa: PLC0415
    except ImportError:
        return None
    core, requests = ov.Core(), []
    for name, x in xs.items():
        param = ops.parameter(list(x.shape), np.float32)
        model = ov.Model([ops.matmul(param, ops.constant(ws[name].numpy()), False, True)], [param])
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
        requests.append((core.compile_model(model, "CPU", config).create_infer_request(), x.numpy()))
    return lambda: [request.infer({0: x}) for request, x in requests]


def engines(rows: int, threads: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    ws = {name: torch.randn(out, inp) for name, (out, inp) in SHAPES.items()}
    xs = {name: torch.randn(rows, inp) for name, (_, inp) in SHAPES.items()}
    calls = {"mkl": lambda: [F.linear(xs[n], ws[n]) for n in SHAPES]}
    if kernels._AVAILABLE:
        calls["onednn"] = lambda: [kernels._onednn(xs[n], ws[n], None) for n in SHAPES]
    if (openvino := openvino_products(xs, ws, threads)) is not None:
        calls["openvino"] = openvino
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="results/products_vs_openvino.json")
    args = parser.parse_args()
    if args.rows < 1 or args.reps < 1 or args.threads < 1:
        parser.error(f"--rows, --reps and --threads must be >= 1 (got {args.rows}, {args.reps}, {args.threads})")
    with num_threads(args.threads), torch.inference_mode():
        calls = engines(args.rows, args.threads)
        times = rotated({name: (lambda call=call: timed(call)) for name, call in calls.items()}, args.reps)
    flop = sum(2 * args.rows * out * inp for out, inp in SHAPES.values())
    result = {
        "machine": machine_info(args.threads),
        "rows": args.rows,
        "reps": args.reps,
        "onednn_preferred": kernels.ONEDNN_PREFERRED,
        **rates(times, flop, "mkl", "mkl"),
    }
    write_json(result, args.json)
    for name, ms in result["median_ms"].items():
        print(
            f"{name}: {ms:.1f} ms per layer, {result['gflops'][name]:.0f} GFLOP/s, {result['vs_mkl'][name]:.2f}x MKL's"
        )


if __name__ == "__main__":
    main()
