"""Arguments every command spells the same way: the model, its dtype and weights, the SwiftKV layout, counts.

A layout is `-L/--num-key-value-layers L` or `--skip FRACTION`, plus `-g/--key-value-group-size g`; a list of
layouts (bench) is `L:g` items. Where a command needs a layout and none is given, L = N // 2 (DEFAULT_SKIP).
"""

from __future__ import annotations

import argparse

from swiftkv.config import DTYPES, parse_layout
from swiftkv.loading import DEFAULT_MODEL, EMBEDDED_MODELS
from swiftkv.modeling.weights import FORMATS

DEFAULT_SKIP = 0.5  # the paper's headline layout: prompt tokens skip the later half of the layers


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with the value in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be >= 1")
    return value


def layout_arg(text: str) -> tuple[int, int]:
    """argparse type: 'L:g' (or 'L') -> (L, g)."""
    try:
        return parse_layout(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_args(parser: argparse.ArgumentParser, positional: bool = True, weights: bool = True) -> None:
    """The model (positional unless `positional=False`), --dtype, and --weights for commands that run the model."""
    if positional:
        names = ", ".join(EMBEDDED_MODELS)
        parser.add_argument(
            "model", nargs="?", default=DEFAULT_MODEL, help=f"checkpoint dir, .gguf, or an embedded name ({names})"
        )
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    if weights:
        parser.add_argument(
            "--weights",
            choices=FORMATS,
            help="Linear weights' format (default: the fastest keeping quality on this CPU: bf16 with bf16 "
            "hardware, else int8 where the native step builds, else float32; the load line names it)",
        )


def add_layout_args(parser: argparse.ArgumentParser, what: str = "convert the model") -> None:
    """-L / --skip (one of them; neither: the command's default) and -g."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--num-key-value-layers", "-L", type=positive_int, help=f"{what} with L: layers 0..L-1 run for every token"
    )
    group.add_argument("--skip", type=float, help=f"{what} skipping this fraction of the layers (e.g. 0.5)")
    parser.add_argument(
        "--key-value-group-size", "-g", type=positive_int, default=1, help="AcrossKV group size (1: off)"
    )


def add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    """--adapter: a distilled adapter applied to MODEL at load (`swiftkv.load(adapter=...)`)."""
    parser.add_argument("--adapter", help="apply this distilled adapter (a directory or a bundled name) to MODEL")


def has_layout(args: argparse.Namespace) -> bool:
    return args.num_key_value_layers is not None or args.skip is not None
