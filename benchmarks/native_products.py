"""The native step's matrix-vector products alone, per format, against an earlier decode.cpp side by side.

    python benchmarks/native_products.py --baseline-rev 5ed1076 --threads 2

Every Linear layer of the default model at L=15 (30 layers: q, k, v, o, gate, up, down; the LM head, int8 under
int4 as weights.py keeps it) as random weights in each quantized format, one row of x each, through the extension's
`linear` (what the decode step's products run, plus one call's overhead). --baseline-rev builds csrc/decode.cpp as it
was at that git revision as a second extension in the same process; the two are timed in turns, medians of --reps.
Writes --json: milliseconds per pass over all products, the speed-up, and the bytes streamed per second.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from swiftkv.bench import machine_info, num_threads
from swiftkv.files import write_json
from swiftkv.modeling import native
from swiftkv.modeling.weights import block_linear

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2-135M: hidden 576, intermediate 1536, 9 query and 3 key/value heads of 64, vocabulary 49152.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def commit_of(rev: str) -> str | None:
    """The full hash of the commit `rev` names in this repository (checked before anything is built; recorded, since
    a name such as HEAD moves), or None."""
    verify = ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"]
    found = subprocess.run(verify, capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def checked_commit(parser: argparse.ArgumentParser, rev: str | None) -> str | None:
    """--baseline-rev's commit hash (None without one); a name that is no commit ends the run (exit 2) before
    anything is built."""
    if rev is None:
        return None
    if (commit := commit_of(rev)) is None:
        parser.error(f"--baseline-rev {rev!r} is not a commit of this repository (e.g. HEAD~1, e40ded3)")
    return commit


def baseline_extension(rev: str):
    """csrc/ at git revision `rev` (decode.cpp and whatever it builds with), built like today's (native.FLAGS) under
    its own name."""
    build = Path(tempfile.mkdtemp(prefix="swiftkv_baseline_"))
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "src/swiftkv/csrc/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in listing:
        show = ["git", "-C", str(ROOT), "show", f"{rev}:{path}"]
        (build / Path(path).name).write_text(subprocess.run(show, capture_output=True, text=True, check=True).stdout)
    from torch.utils.cpp_extension import load

    name = f"swiftkv_baseline_{rev[:12]}"
    return load(
        name=name,
        sources=[str(path) for path in sorted(build.glob("*.cpp"))],
        extra_cflags=native.FLAGS,
        extra_ldflags=native.OPENMP,
        build_directory=str(build),
    )


def products(fmt: str) -> list[tuple[tuple, torch.Tensor]]:
    """((data, scales, mins), x [1, in]) of every product of one decode step in format `fmt`."""
    torch.manual_seed(0)
    out = []
    for rows, cols in [*LAYER_SHAPES * 30, LM_HEAD]:
        layer = block_linear(nn.Linear(cols, rows, bias=False), "int8" if (rows, cols) == LM_HEAD else fmt)
        out.append(((layer.qweight, layer.scales, layer.mins), torch.randn(1, cols)))
    return out


def streamed_bytes(weights: list[tuple[tuple, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for args, _ in weights for t in args if t is not None)


def measure(extensions: dict, weights: list, reps: int) -> dict[str, float]:
    """Median seconds of one pass over `weights` per extension, the extensions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in extensions}
    for rep in range(reps + 1):  # the first round warms up
        for name, ext in extensions.items():
            start = time.perf_counter()
            for args, x in weights:
                ext.linear(x, args, None)
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", help="git revision whose decode.cpp to time beside today's")
    parser.add_argument("--formats", nargs="+", choices=("int8", "int4"), default=["int8", "int4"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "native_products.json")
    args = parser.parse_args()
    baseline_commit = checked_commit(parser, args.baseline_rev)
    extensions = {"current": native.extension()}
    if extensions["current"] is None:
        parser.error("the native extension cannot be built here (see the warning above)")
    if args.baseline_rev:
        extensions[args.baseline_rev] = baseline_extension(args.baseline_rev)
    result = {
        "baseline_rev": args.baseline_rev,
        "baseline_commit": baseline_commit,
        "reps": args.reps,
        "machine": machine_info(args.threads),
    }
    with num_threads(args.threads):
        for fmt in args.formats:
            weights = products(fmt)
            seconds = measure(extensions, weights, args.reps)
            row = {name: {"ms": 1e3 * s, "gb_per_s": streamed_bytes(weights) / s / 1e9} for name, s in seconds.items()}
            if args.baseline_rev:
                row["speedup"] = seconds[args.baseline_rev] / seconds["current"]
            result[fmt] = row
            print(
                fmt, {k: v if isinstance(v, float) else {a: round(b, 2) for a, b in v.items()} for k, v in row.items()}
            )
    write_json(result, args.json)


if __name__ == "__main__":
    main()
