"""A copy of a checkpoint whose every matrix repeats its first row: the same architecture, compute and speed, but
files (and OpenVINO exports of it) that compress to a few MB, to carry a benchmark to a machine with no network.

    .venv/bin/python scripts/compressible_checkpoint.py default out/smollm2-rows
    zstd --long=31 -T0 -19  ...   # the safetensors and the exports then compress ~1000x

Speed does not depend on weight values (no kernel here skips zeros or equal rows), only on shapes and formats;
norm weights (1-D) stay as they are, so activations keep the real model's scale. The outputs are meaningless:
use such a checkpoint for timings only (benchmarks/vs_openvino.py --model), never for quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from swiftkv.files import prepare_output_dir, staged
from swiftkv.loading import load_model


def repeat_first_rows(model: torch.nn.Module) -> None:
    """In place: each 2-D weight [out, in] becomes its row 0 repeated out times (tied weights change once)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param[:1].expand_as(param))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint dir, .gguf or 'default'")
    parser.add_argument("out", type=Path, help="new checkpoint dir (must not exist, or be empty)")
    args = parser.parse_args()
    try:
        prepare_output_dir(args.out, overwrite=False)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    model, tokenizer = load_model(args.model)
    repeat_first_rows(model)
    with staged(args.out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
