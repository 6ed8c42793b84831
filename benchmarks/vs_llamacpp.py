"""Decode and prefill speed on CPU: stock transformers vs swiftkv vs llama.cpp at matching precisions, in one
interleaved run.

    pip install llama-cpp-python sentencepiece      # benchmark only (builds llama.cpp from source, ~10 min)
    python SDIST/vendor/llama.cpp/convert_hf_to_gguf.py SMOLLM2_DIR \\
        --outtype f32 --outfile out/SmolLM2-135M-Instruct-F32.gguf   # SDIST: the unpacked sdist (also --outtype q8_0)
    python benchmarks/vs_llamacpp.py --gguf F32=out/SmolLM2-135M-Instruct-F32.gguf Q8_0=... Q4_1=SHIPPED_Q4_1
    # SMOLLM2_DIR: the default model's converted checkpoint, swiftkv.embedded.default_model_dir(); SHIPPED_Q4_1:
    # the GGUF the default model ships as, swiftkv.embedded.smollm2_gguf() (swiftkv's int4 holds its very blocks)

Engines, the same number of threads; each --gguf TYPE=PATH pairs llama.cpp on that file with swiftkv at the matching
weight format (F32: float32, BF16: bf16, Q8_0: int8, Q4_0/Q4_1: int4; modeling/weights.py):
- transformers: the stock model class, float32, `DynamicCache`, one forward per token (what `generate` runs);
- swiftkv-off/W: the SwiftKV model in format W with SwiftKV off (the base model) through swiftkv's decode step;
- swiftkv/W: the SwiftKV model (--adapter, L and g from it) in format W: fast prefill + swiftkv's decode step;
- llama.cpp/TYPE: llama-cpp-python on the GGUF, flash attention on.
Decode: greedy tokens/s for --new-tokens steps after a --decode-prompt prompt (each engine prefilled once,
every repetition rewinds to the prompt). Prefill: tokens/s for a --prefill-prompt prompt from an empty cache.
Every repetition runs every engine once, rotating the order; medians and min-max over --reps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import swiftkv
from swiftkv.bench import (
    greedy_decode,
    machine_info,
    num_threads,
    prefill,
    rotated,
    threads_label,
    timed,
)
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.loading import load_model, load_model_config
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


# GGUF type -> swiftkv's weight format holding the same kind of weights
FORMAT_OF = {"F32": "float32", "BF16": "bf16", "Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}


def gguf_arg(text: str) -> tuple[str, Path]:
    """argparse type: 'TYPE=PATH' with TYPE a key of FORMAT_OF and an existing file."""
    kind, _, path = text.partition("=")
    if kind not in FORMAT_OF or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write TYPE=PATH with TYPE one of {', '.join(FORMAT_OF)}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    return kind, Path(path)


def torch_engine(model, mode: bool, ids: torch.Tensor, steps: int):
    """(decode run, prefill run) of one torch model in one mode; decode prefilled once with `ids` [1, P]."""
    with swiftkv_mode(model, mode):
        out = prefill(model, ids, steps)
    cache, first = out.cache, out.logits[:, -1:].argmax(-1)

    def decode():
        with swiftkv_mode(model, mode):
            tokens = greedy_decode(model, cache, first, steps)
        cache.crop(-steps)
        return tokens[0].tolist()

    return decode, lambda prompt: _prefill_in_mode(model, mode, prompt)


def _prefill_in_mode(model, mode: bool, prompt: torch.Tensor) -> None:
    with swiftkv_mode(model, mode):
        prefill(model, prompt)


def engines(args, decode_ids: torch.Tensor) -> dict:
    """name -> (decode run, prefill run(prompt)) for every engine of the comparison."""
    stock, _ = load_model("default")
    out = {"transformers": torch_engine(stock, False, decode_ids, args.new_tokens)}
    for kind, path in args.gguf:
        fmt = FORMAT_OF[kind]
        if f"swiftkv/{fmt}" not in out:  # Q4_0 and Q4_1 both pair with int4: one swiftkv model for both
            swift, _ = swiftkv.load("default", adapter=args.adapter, weights=fmt)
            out[f"swiftkv-off/{fmt}"] = torch_engine(swift, False, decode_ids, args.new_tokens)
            out[f"swiftkv/{fmt}"] = torch_engine(swift, True, decode_ids, args.new_tokens)
        cpp = LlamaCpp(path, args.threads, args.prefill_prompt + args.new_tokens + 8)
        cpp_first = cpp.prefill(decode_ids[0].tolist())
        out[f"llama.cpp/{kind}"] = (
            functools.partial(cpp.decode, args.decode_prompt, cpp_first, args.new_tokens),
            lambda prompt, cpp=cpp: cpp.prefill(prompt[0].tolist()),
        )
    return out


def measure(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = load_model_config("default").vocab_size
    decode_ids = torch.randint(100, vocab - 100, (1, args.decode_prompt), generator=gen)
    prefill_ids = torch.randint(100, vocab - 100, (1, args.prefill_prompt), generator=gen)
    tokens: dict[str, list[int]] = {}
    with num_threads(args.threads), torch.inference_mode():
        runs = engines(args, decode_ids)

        def keep(name, fn):
            return lambda: timed(lambda: tokens.__setitem__(name, fn()))

        decode = rotated({n: keep(n, fns[0]) for n, fns in runs.items()}, args.reps, warmup=1)
        prefills = {n: functools.partial(timed, functools.partial(fns[1], prefill_ids)) for n, fns in runs.items()}
        pre = rotated(prefills, args.reps, warmup=1)
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


# Issue 33's decode targets: (swiftkv engine, llama.cpp engine, minimum ratio of their decode tokens/s)
TARGETS = (("swiftkv/int8", "llama.cpp/Q8_0", 1.2), ("swiftkv/int4", "llama.cpp/Q4_0", 1.0))


def targets(decode: dict) -> list[dict]:
    """Each decode target whose two engines ran, with its ratio and whether it is met."""
    out = []
    for engine, against, minimum in TARGETS:
        if engine in decode and against in decode:
            ratio = decode[engine]["tokens_per_s"] / decode[against]["tokens_per_s"]
            out.append(
                {
                    "engine": engine,
                    "against": against,
                    "target": f">= {minimum}",
                    "ratio": ratio,
                    "met": ratio >= minimum,
                }
            )
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for ax, key, title in (
        (axes[0], "decode", f"decode after {result['decode_prompt']} tokens (batch 1)"),
        (axes[1], "prefill", f"prefill of {result['prefill_prompt']} tokens"),
    ):
        names = list(result[key])
        rates = [result[key][n]["tokens_per_s"] for n in names]
        lows = [r - result[key][n]["min_tokens_per_s"] for n, r in zip(names, rates, strict=True)]
        highs = [result[key][n]["max_tokens_per_s"] - r for n, r in zip(names, rates, strict=True)]
        ax.bar(names, rates, yerr=[lows, highs], color="tab:blue", capsize=4)
        ax.tick_params(axis="x", labelrotation=60)
        ax.set_title(title)
        ax.set_ylabel("tokens/s (median, min-max)")
    fig.suptitle(f"{result['model']}, {threads_label(result['machine']['threads'])}")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--gguf", type=gguf_arg, nargs="+", required=True, help="TYPE=PATH GGUFs of SmolLM2-135M-Instruct (F32, Q8_0..)"
    )
    parser.add_argument("--adapter", default="smollm2-L15-g1", help="adapter dir or bundled name")
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-prompt", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "vs_llamacpp.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {
        "model": "SmolLM2-135M-Instruct",
        "adapter": portable_path(args.adapter),
        "gguf": {kind: portable_path(path) for kind, path in args.gguf},
        "decode_prompt": args.decode_prompt,
        "new_tokens": args.new_tokens,
        "prefill_prompt": args.prefill_prompt,
        "reps": args.reps,
        "machine": machine_info(args.threads),
        **measure(args),
    }
    result["targets"] = targets(result["decode"])
    result["wall_s"] = time.perf_counter() - start
    write_json(result, args.json)
    plot(result, figure_beside(args.json, args.plot))
    for key in ("decode", "prefill"):
        for name, row in result[key].items():
            print(
                f"{key:8s} {name:18s} {row['tokens_per_s']:8.1f} tok/s  [{row['min_tokens_per_s']:.1f}-"
                f"{row['max_tokens_per_s']:.1f}]"
            )
    for t in result["targets"]:
        print(f"target decode: {t['engine']} / {t['against']} = {t['ratio']:.3f} (want {t['target']})")


if __name__ == "__main__":
    main()
