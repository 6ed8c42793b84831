"""End-to-end throughput of a batched 10:1 prompt:output workload: transformers vs base vs SwiftKV, interleaved.

    python benchmarks/workload.py --prompts 8 --prompt-len 1024 --batch-size 4 --reps 3 --json results/workload.json

Prompts are distinct windows of a natural-English token stream, all of the same length (no padding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swiftkv import bench
from swiftkv.conversion import convert
from swiftkv.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--settings", nargs="+", default=["15:1", "15:3"], help="L:g layouts")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=10.0, help="prompt tokens per output token")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("out/bench/workload.json"))
    args = parser.parse_args()

    base, tokenizer = load_model(args.model)
    stream = bench.prompt_ids(tokenizer, base.config.vocab_size, args.prompt_len + 7 * args.prompts)[0]
    prompts = torch.stack([stream[7 * i : 7 * i + args.prompt_len] for i in range(args.prompts)])  # [n, T]
    new_tokens = round(args.prompt_len / args.ratio)
    results = {"machine": bench.machine_info(args.threads), "settings": []}
    for setting in args.settings:
        layers, _, group = setting.partition(":")
        model = convert(base, int(layers), int(group or 1))
        entry = bench.measure_workload(model, prompts, new_tokens, args.batch_size, args.reps, threads=args.threads)
        results["settings"].append(
            {"num_key_value_layers": int(layers), "key_value_group_size": int(group or 1), **entry}
        )
        print(
            f"L={layers} g={group or 1}: {args.prompts} prompts x {args.prompt_len} + {new_tokens} new, batch "
            f"{args.batch_size}: transformers {entry['transformers']['tokens_per_s']:.0f} tok/s, base (swiftkv "
            f"decode step) {entry['base']['tokens_per_s']:.0f} tok/s, SwiftKV {entry['swiftkv']['tokens_per_s']:.0f} "
            f"tok/s: x{entry['throughput_ratio']:.2f} vs base, x{entry['throughput_ratio_vs_transformers']:.2f} "
            "vs transformers"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
