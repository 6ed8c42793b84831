"""The extension's block products alone, per format and row count, against an earlier build side by side.

    python benchmarks/native_products.py --baseline-rev 5ed1076 --threads 2
    python benchmarks/native_products.py --baseline-rev HEAD~1 --rows 9 16 32 64 128 2048 --formats int8

Every Linear layer of the default model at L=15 (30 layers: q, k, v, o, gate, up, down; the LM head, int8 under
int4 as weights.py keeps it) as random weights in each quantized format, x of --rows rows (default 1: a decode
step), through the extension's product for that many rows: `linear` up to weights.NATIVE_ROWS (what the decode
step's products run, plus one call's overhead), `prefill_linear` above (a prefill's panel products; one x per
input width, as a layer's products share theirs; no LM head, a prefill runs it for one row). --baseline-rev builds
csrc/ as it was at that git revision as a second extension in the same process; the two are timed in turns, medians
of --reps. Writes --json: per format and row count, milliseconds per pass over all products, the speed-up, and the
bytes of weights streamed per second.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from vs_openvino import paired

from swiftkv.bench import Run, machine_info, num_threads, rotated, timed
from swiftkv.files import write_json
from swiftkv.modeling import native
from swiftkv.modeling.weights import NATIVE_ROWS, block_linear

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


def products(fmt: str, rows: int = 1) -> list[tuple[tuple, torch.Tensor]]:
    """((data, scales, mins), x [rows, in]) of every product of one decode step (rows <= NATIVE_ROWS) or prefill
    (more, without the LM head) in format `fmt`; one x per input width."""
    torch.manual_seed(0)
    shapes = [*LAYER_SHAPES * 30, LM_HEAD] if rows <= NATIVE_ROWS else LAYER_SHAPES * 30
    xs = {cols: torch.randn(rows, cols) for _, cols in shapes}
    out = []
    for out_features, cols in shapes:
        fmt_here = "int8" if (out_features, cols) == LM_HEAD else fmt
        layer = block_linear(nn.Linear(cols, out_features, bias=False), fmt_here)
        out.append((layer.blocks, xs[cols]))
    return out


def product(ext, x: torch.Tensor, blocks: tuple) -> torch.Tensor:
    """x @ W^T by the extension's product for x's row count (the one weights.py routes that many rows to)."""
    return ext.linear(x, blocks, None) if x.shape[0] <= NATIVE_ROWS else ext.prefill_linear(x, *blocks, None)


def streamed_bytes(weights: list[tuple[tuple, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for args, _ in weights for t in args if t is not None)


def measure(extensions: dict, weights: list, reps: int) -> dict[str, list[float]]:
    """Seconds of each of --reps passes over `weights` per extension, the extensions in rotation (bench.rotated: the
    first goes first in turn, after a warm-up round)."""

    def one_pass(ext) -> Callable[[], Run]:
        return lambda: timed(lambda: [product(ext, x, args) for args, x in weights])

    times = rotated({name: one_pass(ext) for name, ext in extensions.items()}, reps)
    return {name: [run.wall_s for run in runs] for name, runs in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", help="git revision whose csrc/ to time beside today's")
    parser.add_argument("--formats", nargs="+", choices=("int8", "int4"), default=["int8", "int4"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x: 1 a decode step, > 8 a prefill")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "native_products.json")
    args = parser.parse_args()
    if min(args.rows) < 1 or args.reps < 1 or args.threads < 1:
        parser.error("--rows, --reps and --threads must be >= 1")
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
            result[fmt] = {}
            for rows in args.rows:
                weights = products(fmt, rows)
                times = measure(extensions, weights, args.reps)
                seconds = {name: statistics.median(t) for name, t in times.items()}
                row = {n: {"ms": 1e3 * s, "gb_per_s": streamed_bytes(weights) / s / 1e9} for n, s in seconds.items()}
                if args.baseline_rev:  # the median of per-round ratios: drift between rounds cancels
                    row["speedup"] = 1 / paired(times["current"], times[args.baseline_rev])
                result[fmt][str(rows)] = row
                speedup = f"speed-up {row['speedup']:.3f}" if args.baseline_rev else ""
                times_ms = {n: round(r["ms"], 2) for n, r in row.items() if n != "speedup"}
                print(fmt, f"{rows} rows", times_ms, speedup, flush=True)  # progress, also when piped
                write_json(result, args.json)  # what is finished survives an interrupt


if __name__ == "__main__":
    main()
