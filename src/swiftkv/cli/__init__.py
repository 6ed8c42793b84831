"""`swiftkv` command line: one entry point, a table of subcommands; each calls the library (no math here).

    convert | info | generate | demo | bench      swiftkv.cli.commands
    distill | apply-adapter                       swiftkv.cli.distill
    eval | analyze                                swiftkv.cli.evaluate

Every bad input is one line on stderr naming the value and what is valid, exit status 2, nothing written. A failure
of the system rather than of the input (disk full, permission denied, a read error) is one line naming what failed
and the path, exit status 74 (EX_IOERR).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

from swiftkv.calibration import add_arguments as add_calibration_arguments
from swiftkv.cli import commands
from swiftkv.cli import distill as distill_commands
from swiftkv.cli import evaluate as evaluate_commands
from swiftkv.cli.args import add_adapter_arg, add_layout_args, add_model_args, layout_arg, positive_int
from swiftkv.modeling.weights import FORMATS

# Bad input: what the user named is wrong (a value, a missing file, an output that exists, a missing package). Any
# other OSError is the system failing (ENOSPC, EACCES, EIO, ...), not the input: a different exit status.
USER_ERRORS = (
    ValueError,
    ModuleNotFoundError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
IO_FAILURE = os.EX_IOERR


def _add(sub, name: str, func, help_text: str, model_arg: bool = True, weights: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    add_model_args(p, positional=model_arg, weights=weights)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add(sub, "convert", commands.cmd_convert, "convert a base checkpoint (dir or .gguf) to SwiftKV", False, False)
    p.add_argument("src", help="base checkpoint directory, .gguf file, or 'default'")
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument(
        "--weights",
        choices=FORMATS,
        default="float32",
        help="format OUT stores its Linear layers in: float32 (default), bf16, or int8/int4 blocks (GGUF Q8_0/Q4_1, "
        "loaded as they are)",
    )
    add_calibration_arguments(p)
    add_layout_args(p)

    info = "layers, L, g, parameter counts and prefill-FLOPs / KV-bytes ratios"
    p = _add(sub, "info", commands.cmd_info, info, weights=False)
    p.add_argument("--prompt-length", type=positive_int, default=2048)
    add_layout_args(p, "for a base checkpoint: the conversion")

    p = _add(sub, "generate", commands.cmd_generate, "stream a completion; prints time to first token and tokens/s")
    p.add_argument("--prompt", help="one prompt, streamed to stdout")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--input", type=Path, help="batch mode: JSONL of {id?, prompt | messages}")
    p.add_argument("--output", type=Path, help="batch mode: JSONL results, appended; finished ids are skipped")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--skip-bad-lines", action="store_true", help="batch mode: skip malformed input lines")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    add_adapter_arg(p)
    p.add_argument("--no-swiftkv", action="store_true", help="run the base model (same weights, SwiftKV off)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads())

    p = _add(sub, "demo", commands.cmd_demo, "the main job: base vs SwiftKV on a long prompt, answers and speed")
    add_layout_args(p, "use the bundled adapter of this layout (or convert)")
    p.add_argument("--adapter", help="SwiftKV adapter dir or bundled name ('none': undistilled conversion)")
    p.add_argument("--prompt-tokens", type=positive_int, default=2048)
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=2)

    p = _add(sub, "bench", commands.cmd_bench, "interleaved base vs SwiftKV prefill/decode/KV benchmark, JSON + PNG")
    p.add_argument("--prompt-lengths", type=positive_int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--settings", type=layout_arg, nargs="+", default=[(15, 1), (15, 3)], help="layouts L:g")
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per decode run (0: skip decode)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench.json"), help="written after every layout; resumes")
    p.add_argument("--plot", type=Path, default=Path("bench.png"))

    distill_commands.register(sub)
    evaluate_commands.register(sub)
    return parser


def io_failure(error: OSError) -> str:
    """'input/output failure: <reason>: <path>' from the error's own fields (both paths of a failed rename)."""
    paths = " -> ".join(str(path) for path in (error.filename, error.filename2) if path is not None)
    reason = error.strerror or str(error)
    return f"input/output failure: {reason}: {paths or 'no path reported by the system'}"


def _terminate(signum, _frame) -> None:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP unwind the command once, so staging folders and partial outputs are
    cleaned up; that signal again meanwhile (a second Ctrl-C, or `timeout` passing its own on) is ignored, so the
    cleanup finishes."""
    signal.signal(signum, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _one_line_warnings(python_shows):
    """A `warnings.showwarning` that prints swiftkv's own warnings ("swiftkv: ...", each saying what runs instead) as
    that one line, without Python's file, line number and source line from inside the package; others as before."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message).startswith("swiftkv: "):
            print(message, file=sys.stderr if file is None else file)
        else:
            python_shows(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with warnings.catch_warnings():  # restores showwarning (and the filters) on the way out
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            args.func(args)
    except USER_ERRORS as error:
        print(f"swiftkv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"swiftkv {args.command}: error: {io_failure(error)}", file=sys.stderr)
        return IO_FAILURE
    except KeyboardInterrupt:
        print(f"swiftkv {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
