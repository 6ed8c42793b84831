"""`swiftkv distill CONFIG.yaml [key=value ...]` and `swiftkv apply-adapter BASE ADAPTER OUT` (no math here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from swiftkv.cli.args import add_model_args


def cmd_distill(args: argparse.Namespace) -> None:
    from swiftkv.distill.config import load_config
    from swiftkv.distill.recipe import distill

    config = load_config(args.config, args.overrides)
    result = distill(config, resume=args.resume, overwrite=args.overwrite, export=args.export)
    if result.get("adapter"):
        print(f"wrote adapter {result['adapter']}" + (f" and checkpoint {result['model']}" if result["model"] else ""))


def cmd_apply_adapter(args: argparse.Namespace) -> None:
    """Base + adapter -> a full SwiftKV checkpoint in Snowflake's format."""
    from swiftkv.adapter import apply_adapter, read_adapter
    from swiftkv.conversion import save_atomic
    from swiftkv.files import prepare_output_dir
    from swiftkv.loading import load_model

    prepare_output_dir(args.out, args.overwrite)  # fail before the load, write nothing
    read_adapter(args.adapter)  # a missing or damaged adapter fails before the load too
    model, tokenizer = load_model(args.base, args.dtype)
    swift = apply_adapter(model, args.adapter, check_base_weights=not args.no_check_base)
    print(f"wrote {save_atomic(args.out, args.overwrite, swift, *([tokenizer] if tokenizer else []))}")


def register(sub) -> None:
    """Add the distillation subcommands to `swiftkv`'s subparsers."""
    p = sub.add_parser(
        "distill",
        help="distil a SwiftKV model from its own base weights (YAML config + key=value overrides)",
        description="Distil a SwiftKV model from its own base weights. Runs under torchrun for data parallelism.",
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 max_steps=100 data=[chitchat]")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty output_dir")
    p.add_argument(
        "--export",
        action="store_true",
        help="write the adapter (and checkpoint/eval per the config) from OUTPUT_DIR's latest checkpoint without "
        "training further, e.g. for a run stopped early",
    )
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "apply-adapter",
        help="base model + SwiftKV adapter -> full SwiftKV checkpoint",
        description="Apply a SwiftKV adapter to its base model and write a full SwiftKV checkpoint.",
    )
    p.add_argument("base", help="base checkpoint directory, .gguf file, or 'default'")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter.safetensors) or bundled name")
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    add_model_args(p, positional=False, weights=False)  # writes float weights
    p.add_argument("--no-check-base", action="store_true", help="skip the base-weights fingerprint check")
    p.set_defaults(func=cmd_apply_adapter)
