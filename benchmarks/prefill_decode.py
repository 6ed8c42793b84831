"""SwiftKV vs its base model on CPU or GPU: prefill time vs the FLOPs theory, decode tokens/s, KV-cache bytes.

    python benchmarks/prefill_decode.py                      # SmolLM2-135M-Instruct, T=256..2048, L=15 g=1 and g=3
    python benchmarks/prefill_decode.py --prompt-lengths 2048 --settings 15:1 --reps 7
    python benchmarks/prefill_decode.py --device cuda --dtype bf16 --config benchmarks/configs/llama-3.1-8b.json \
        --settings 16:1 16:4 --prompt-lengths 1024 4096 8192 --batch-size 4

--config builds the architecture with random weights (speed does not depend on the weight values; nothing to
download): SwiftKV's prefill saving for a model you cannot load here, e.g. Llama-3.1-8B as in the paper.

Writes every run's time plus machine info to --json and a speed-up plot to --plot. Base and SwiftKV run
interleaved on the same model object (config.swiftkv False / True), so both see the same machine state.
Other processes on the machine inflate some runs: compare medians, and check "load_average" in the JSON.
glibc returns freed activations to the OS and page-faults them back (the base model, with more activations,
pays more); `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296` before the command avoids it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swiftkv.bench import run_benchmark, summary_lines
from swiftkv.cli.args import layout_arg
from swiftkv.config import DTYPES
from swiftkv.files import figure_beside


def parse_args() -> argparse.Namespace:
    out = Path(__file__).resolve().parents[1] / "out" / "bench"  # out/ is git-ignored
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="default", help="Hugging Face dir or embedded name (default: SmolLM2)")
    source.add_argument("--config", type=Path, help="a config.json: that architecture with random weights")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048], metavar="T")
    parser.add_argument(
        "--settings",
        type=layout_arg,
        nargs="+",
        default=[(15, 1), (15, 3)],
        metavar="L[:g]",
        help="SwiftKV layouts: num_key_value_layers[:key_value_group_size] (default: 15:1 15:3)",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed runs per mode (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=1, help="copies of each prompt per forward")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per decode run (0: skip)")
    parser.add_argument("--decode-prompt-len", type=int, help="prompt before decoding (default: longest)")
    parser.add_argument("--json", type=Path, default=out / "prefill_decode.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    args.plot = figure_beside(args.json, args.plot)
    return args


def random_model(config_path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The architecture of `config_path` with random weights, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads(config_path.read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._name_or_path = f"{config_path.stem} (random weights)"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def main() -> None:
    args = parse_args()
    if args.config is not None:
        args.model = random_model(args.config, DTYPES[args.dtype], args.device)
    result = run_benchmark(
        args.model,
        prompt_lengths=args.prompt_lengths,
        settings=args.settings,
        reps=args.reps,
        decode_tokens=args.decode_tokens,
        json_path=args.json,
        plot_path=args.plot,
        threads=args.threads,
        warmup=args.warmup,
        decode_prompt_len=args.decode_prompt_len,
        dtype=DTYPES[args.dtype],
        device=args.device,
        batch_size=args.batch_size,
    )
    print("\n".join(summary_lines(result)))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
