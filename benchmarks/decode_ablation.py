"""What each piece of swiftkv's decode path gives: ms per token, SwiftKV off (the base model), batch 1.

    python benchmarks/decode_ablation.py --prompt 512 --new-tokens 32 --reps 5

Variants, interleaved on one model object: "dynamic" (transformers' forward + DynamicCache, MKL: the stock path),
"cache" (same forward, SwiftKVCache written in place), "step" (+ swiftkv's decode step, still MKL),
"onednn" (+ oneDNN products: the Python step), "native" (the whole step in C++, csrc/decode.cpp: what `generate`
runs), then "native-FORMAT" for each other weight format of --formats (modeling/weights.py: the native step reading
bf16 weights or int8 / int4 blocks). Writes --json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch
from transformers import DynamicCache

from swiftkv.bench import greedy_decode, machine_info, num_threads, rotated, timed
from swiftkv.conversion import convert
from swiftkv.files import portable_path, write_json
from swiftkv.loading import load_model
from swiftkv.modeling import decode
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modeling.kernels import onednn_linears
from swiftkv.modeling.native import native_decode
from swiftkv.modeling.weights import FORMATS, apply_format
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]

# name -> (cache class, decode step on, oneDNN on, native step on)
VARIANTS = {
    "dynamic": (DynamicCache, False, False, False),
    "cache": (SwiftKVCache, False, False, False),
    "step": (SwiftKVCache, True, False, False),
    "onednn": (SwiftKVCache, True, True, False),
    "native": (SwiftKVCache, True, True, True),
}


@contextlib.contextmanager
def decode_step(enabled: bool):
    """Let `generate`'s decode step run (True) or force transformers' forward (False)."""
    applies = decode.applies
    if not enabled:
        decode.applies = lambda *args: False
    try:
        yield
    finally:
        decode.applies = applies


def _native_run(fmt: str, ids: torch.Tensor, new_tokens: int):
    """The native step on its own copy of the model in weight format `fmt` (SwiftKV off), prefilled on `ids`."""
    model = apply_format(convert(load_model("default")[0], 15, 1), fmt)
    with swiftkv_mode(model, False):
        cache = SwiftKVCache(config=model.config)
        first = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def run():
        with swiftkv_mode(model, False):
            timing = timed(lambda: greedy_decode(model, cache, first, new_tokens))
        cache.crop(-new_tokens)
        return timing

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="*", choices=FORMATS[1:], default=list(FORMATS[1:]))
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "decode_ablation.json")
    args = parser.parse_args()
    model = convert(load_model("default")[0], 15, 1)
    ids = torch.randint(100, 20000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    runs = {}
    with num_threads(args.threads), torch.inference_mode(), swiftkv_mode(model, False):
        for name, (cache_class, step, onednn, native) in VARIANTS.items():
            with onednn_linears(onednn):
                cache = cache_class(config=model.config)
                first = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

            def run(cache=cache, first=first, step=step, onednn=onednn, native=native):
                with onednn_linears(onednn), decode_step(step), native_decode(native):
                    timing = timed(lambda: greedy_decode(model, cache, first, args.new_tokens))
                cache.crop(-args.new_tokens)
                return timing

            runs[name] = run
        for fmt in args.formats:
            runs[f"native-{fmt}"] = _native_run(fmt, ids, args.new_tokens)
        times = rotated(runs, args.reps)
    result = {
        "machine": machine_info(args.threads),
        **vars(args) | {"json": portable_path(args.json)},
        "ms_per_token": {},
    }
    for name, timings in times.items():
        per_token = [1e3 * t.wall_s / args.new_tokens for t in timings]
        result["ms_per_token"][name] = {"median": statistics.median(per_token), "runs": per_token}
        print(f"{name:12s} {statistics.median(per_token):6.1f} ms/token")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
