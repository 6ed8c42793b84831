"""OpenVINO's own per-op time for one prefill (its PERF_COUNT profile), to compare with swiftkv's torch.profiler.

    bash scripts/setup.sh --openvino      # the runtime in .venv and the fp32 export, as for vs_openvino.py
    .venv/bin/python benchmarks/openvino_profile.py --threads 2

Compiles the fp32 export's raw IR with `ov.Core` at the CPU plugin's default precision and at
INFERENCE_PRECISION_HINT=f32, runs a --prompt-length prefill --reps times and keeps the last run's per-node times,
summed by (node type, kernel). Read only the shares: profiling slows the run, and the raw IR computes the LM head for
every position (LLMPipeline slices it to the last one), so FullyConnected's total is not the pipeline's.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

from swiftkv.bench import machine_info
from swiftkv.files import write_json

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "out" / "openvino" / "SmolLM2-135M-Instruct-fp32" / "openvino_model.xml"
PRECISIONS = {"default": {}, "f32": {"INFERENCE_PRECISION_HINT": "f32"}}


def profile(xml: Path, threads: int, length: int, reps: int, properties: dict) -> dict[str, float]:
    """Milliseconds per 'node type / kernel' of the last of `reps` prefills of `length` random tokens."""
    import openvino as ov  # noqa: PLC0415  (benchmark-only dependency)

    compiled = ov.Core().compile_model(
        str(xml), "CPU", {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads, **properties}
    )
    inputs = {
        "input_ids": np.random.default_rng(0).integers(100, 40000, (1, length)),
        "attention_mask": np.ones((1, length), np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, np.int32),
    }
    # A fresh request per run: a fresh KV state, so every run is a prefill from position 0; all but the last warm up.
    for _ in range(reps - 1):
        compiled.create_infer_request().infer(inputs)
    request = compiled.create_infer_request()
    request.infer(inputs)
    totals: collections.Counter = collections.Counter()
    for node in request.get_profiling_info():
        totals[f"{node.node_type} / {node.exec_type}"] += node.real_time.total_seconds() * 1e3
    return dict(totals.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--export", type=Path, default=EXPORT, help="the fp32 export's openvino_model.xml")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "openvino_profile.json")
    args = parser.parse_args()
    if not args.export.is_file():
        parser.error(f"{args.export} is missing: run `bash scripts/setup.sh --openvino`")
    if args.threads < 1 or args.reps < 1 or args.prompt_length < 1:
        parser.error("--threads, --reps and --prompt-length must be >= 1")
    result = {"prompt_length": args.prompt_length, "reps": args.reps, "machine": machine_info(args.threads)}
    for name, properties in PRECISIONS.items():
        ms = profile(args.export, args.threads, args.prompt_length, args.reps, properties)
        total = sum(ms.values())
        result[name] = {"properties": properties, "total_ms": total, "node_ms": ms}
        print(f"OpenVINO {name}: nodes sum to {total:.0f} ms")
        for node, t in list(ms.items())[:8]:
            print(f"  {node:60s} {t:8.1f} ms {100 * t / total:5.1f}%")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
