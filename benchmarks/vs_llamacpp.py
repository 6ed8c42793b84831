"""Decode and prefill speed on CPU: stock transformers vs swiftkv vs llama.cpp, in one interleaved run.

    pip install llama-cpp-python sentencepiece      # benchmark only (builds llama.cpp from source, ~10 min)
    python SDIST/vendor/llama.cpp/convert_hf_to_gguf.py SMOLLM2_DIR \\
        --outtype f32 --outfile out/SmolLM2-135M-Instruct-F32.gguf   # SDIST: the unpacked sdist
    python benchmarks/vs_llamacpp.py --gguf out/SmolLM2-135M-Instruct-F32.gguf
    # SMOLLM2_DIR: the default model's converted checkpoint, swiftkv.embedded.default_model_dir()

Engines (same weights, float32, the same number of threads):
- transformers: the stock model class, `DynamicCache`, one forward per token (what `generate` runs);
- swiftkv-off: the SwiftKV model with SwiftKV off (the exact base model) through swiftkv's decode step;
- swiftkv: the SwiftKV model (--adapter, L and g from it): fast prefill + swiftkv's decode step;
- llama.cpp: llama-cpp-python on the F32 GGUF of the same checkpoint, flash attention on.
Decode: greedy tokens/s for --new-tokens steps after a --decode-prompt prompt (each engine prefilled once,
every repetition rewinds to the prompt). Prefill: tokens/s for a --prefill-prompt prompt from an empty cache.
Every repetition runs every engine once, rotating the order; medians and min-max over --reps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from swiftkv.adapter import apply_adapter
from swiftkv.bench import (
    greedy_decode,
    machine_info,
    num_threads,
    prefill,
    rotated,
    timed,
)
from swiftkv.files import portable_path, save_figure, write_json
from swiftkv.loading import load_model
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]


class LlamaCpp:
    """Greedy prefill/decode through llama-cpp-python's low-level eval (no sampling chain, no detokenising)."""

    def __init__(self, gguf: Path, threads: int, context: int):
        from llama_cpp import Llama  # noqa: PLC0415  (benchmark-only dependency)

        self.llm = Llama(
            str(gguf),
            n_ctx=context,
            n_batch=context,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,
            verbose=False,
        )

    def next_token(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def prefill(self, ids: list[int]) -> int:
        self.llm.n_tokens = 0  # eval() drops every cached position >= n_tokens
        self.llm.eval(ids)
        return self.next_token()

    def decode(self, prompt_len: int, token: int, steps: int) -> list[int]:
        self.llm.n_tokens = prompt_len
        out = []
        for _ in range(steps):
            self.llm.eval([token])
            token = self.next_token()
            out.append(token)
        return out


def torch_decoders(stock, swift, ids: torch.Tensor, steps: int) -> dict:
    """name -> (run(), tokens()) for the three torch engines, each prefilled once with `ids` [1, P]."""
    engines = {}
    for name, model, mode in (("transformers", stock, False), ("swiftkv-off", swift, False), ("swiftkv", swift, True)):
        with swiftkv_mode(swift, mode):
            out = prefill(model, ids, steps)
        engines[name] = (model, mode, out.cache, out.logits[:, -1:].argmax(-1))

    def runner(name):
        model, mode, cache, first = engines[name]

        def run():
            with swiftkv_mode(swift, mode):
                tokens = greedy_decode(model, cache, first, steps)
            cache.crop(-steps)
            return tokens[0].tolist()

        return run

    return {name: runner(name) for name in engines}


def measure(args) -> dict:
    stock, _ = load_model("default")
    swift = apply_adapter(stock, args.adapter).eval()  # shares the stock model's weight tensors
    cpp = LlamaCpp(args.gguf, args.threads, args.prefill_prompt + args.new_tokens + 8)
    gen = torch.Generator().manual_seed(0)
    vocab = swift.config.vocab_size
    decode_ids = torch.randint(100, vocab - 100, (1, args.decode_prompt), generator=gen)
    prefill_ids = torch.randint(100, vocab - 100, (1, args.prefill_prompt), generator=gen)
    tokens: dict[str, list[int]] = {}
    with num_threads(args.threads), torch.inference_mode():
        decoders = torch_decoders(stock, swift, decode_ids, args.new_tokens)
        cpp_first = cpp.prefill(decode_ids[0].tolist())
        decoders["llama.cpp"] = lambda: cpp.decode(args.decode_prompt, cpp_first, args.new_tokens)

        def keep(name, fn):
            return lambda: timed(lambda: tokens.__setitem__(name, fn()))

        decode = rotated({n: keep(n, fn) for n, fn in decoders.items()}, args.reps, warmup=1)

        def torch_prefill(model, mode):
            def run():
                with swiftkv_mode(swift, mode):
                    prefill(model, prefill_ids)

            return run

        prefills = {
            "transformers": torch_prefill(stock, False),
            "swiftkv": torch_prefill(swift, True),
            "llama.cpp": lambda: cpp.prefill(prefill_ids[0].tolist()),
        }
        pre = rotated({n: (lambda fn=fn: timed(fn)) for n, fn in prefills.items()}, args.reps, warmup=1)
    return {
        "decode": _rates(decode, args.new_tokens),
        "prefill": _rates(pre, args.prefill_prompt),
        "greedy_tokens": tokens,
    }


def _rates(times: dict, tokens: int) -> dict:
    """Tokens/s per engine: median and min-max over the repetitions, plus the raw wall times."""
    out = {}
    for name, runs in times.items():
        walls = [r.wall_s for r in runs]
        out[name] = {
            "tokens_per_s": tokens / statistics.median(walls),
            "min_tokens_per_s": tokens / max(walls),
            "max_tokens_per_s": tokens / min(walls),
            "times_s": walls,
        }
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "decode", f"decode after {result['decode_prompt']} tokens (batch 1)"),
        (axes[1], "prefill", f"prefill of {result['prefill_prompt']} tokens"),
    ):
        names = list(result[key])
        rates = [result[key][n]["tokens_per_s"] for n in names]
        lows = [r - result[key][n]["min_tokens_per_s"] for n, r in zip(names, rates, strict=True)]
        highs = [result[key][n]["max_tokens_per_s"] - r for n, r in zip(names, rates, strict=True)]
        ax.bar(names, rates, yerr=[lows, highs], color="tab:blue", capsize=4)
        ax.set_title(title)
        ax.set_ylabel("tokens/s (median, min-max)")
    fig.suptitle(f"{result['model']} fp32, {result['machine']['threads']} threads")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="F32 GGUF of SmolLM2-135M-Instruct")
    parser.add_argument("--adapter", default="smollm2-L15-g1", help="adapter dir or bundled name")
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-prompt", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "vs_llamacpp.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "results" / "vs_llamacpp.png")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {
        "model": "SmolLM2-135M-Instruct",
        "adapter": portable_path(args.adapter),
        "gguf": portable_path(args.gguf),
        "decode_prompt": args.decode_prompt,
        "new_tokens": args.new_tokens,
        "prefill_prompt": args.prefill_prompt,
        "reps": args.reps,
        "machine": machine_info(args.threads),
        **measure(args),
    }
    result["wall_s"] = time.perf_counter() - start
    write_json(result, args.json)
    plot(result, args.plot)
    for key in ("decode", "prefill"):
        for name, row in result[key].items():
            print(
                f"{key:8s} {name:13s} {row['tokens_per_s']:8.1f} tok/s  [{row['min_tokens_per_s']:.1f}-"
                f"{row['max_tokens_per_s']:.1f}]"
            )


if __name__ == "__main__":
    main()
