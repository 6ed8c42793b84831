"""Time to first tokens of a cold process, with and without the native decode step's one-off build.

    python benchmarks/cold_start.py --reps 3

Each run is a new Python process that imports swiftkv, loads the default model with the committed L=15 adapter and
generates 2 greedy tokens after a 512-token prompt (token 1 = the prefill, token 2 = the first decode step, where
the native step is loaded or built). Variants: "python" (SWIFTKV_NATIVE=0), "native" (extension already built:
the normal case after the first use on a machine), "native-build" (built from scratch in an empty directory).
Medians over --reps; writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swiftkv.bench import machine_info
from swiftkv.files import portable_path, write_json

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
from swiftkv.adapter import apply_adapter
from swiftkv.loading import load_model
from swiftkv.modeling import native
if sys.argv[2]:  # build into this empty directory instead of the user's cache
    native.build_root = lambda: __import__("pathlib").Path(sys.argv[2])
torch.set_num_threads(2)
model = apply_adapter(load_model("default")[0], sys.argv[1]).eval()
loaded = time.perf_counter()
ids = torch.randint(100, 20000, (1, 512), generator=torch.Generator().manual_seed(0))
model.generation_config.eos_token_id = None
times = []
streamer = type("S", (), {"put": lambda self, x: times.append(time.perf_counter()), "end": lambda self: None})()
model.generate(ids, max_new_tokens=2, do_sample=False, streamer=streamer)
print(json.dumps({"load_s": loaded - start, "first_token_s": times[1] - start, "second_token_s": times[2] - start}))
"""


def run_child(variant: str, adapter: str) -> dict:
    env = dict(os.environ, SWIFTKV_NATIVE="0" if variant == "python" else "1")
    with tempfile.TemporaryDirectory() as build_dir:
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, adapter, build_dir if variant == "native-build" else ""],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - began
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="smollm2-L15-g1", help="adapter dir or bundled name")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "cold_start.json")
    args = parser.parse_args()
    run_child("native", args.adapter)  # make sure the user's build exists before timing the "native" variant
    runs: dict[str, list[dict]] = {"python": [], "native": [], "native-build": []}
    for _ in range(args.reps):
        for variant in runs:
            runs[variant].append(run_child(variant, args.adapter))
    result = {
        "machine": machine_info(2),
        "reps": args.reps,
        "adapter": portable_path(args.adapter),
        "median_s": {},
        "runs": runs,
    }
    for variant, rows in runs.items():
        medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        result["median_s"][variant] = medians
        print(f"{variant:13s} " + "  ".join(f"{key} {value:6.2f}" for key, value in medians.items()))
    write_json(result, args.json)


if __name__ == "__main__":
    main()
