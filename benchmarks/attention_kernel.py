"""One causal prefill attention layer: swiftkv's kernel (csrc/attention.cpp) against PyTorch's SDPA, side by side.

    python benchmarks/attention_kernel.py --prompt 2048 --reps 9 --json results/attention_kernel.json
    python benchmarks/attention_kernel.py --baseline-rev e40ded3 --reps 21 --threads 1   # a kernel change's A/B

The default model's layer shape (q [1, 9, T, 64], k and v [1, 3, T, 64], GQA), float32 and, where the build has
AVX512-BF16, the bf16 arithmetic; SDPA gets float32 q/k/v with the K/V heads repeated (its CPU flash attention),
and on a CPU with bf16 hardware also bf16 q/k/v (AMX tiles where the CPU has them; the casts to bf16 and back timed).
The three run in rotation (`bench.rotated`, drift cancels), medians of --reps, and GFLOP/s of the causal triangle
(2 * 2 * T^2 / 2 * H * Dh). Run it in CI's AVX2 environment (ATEN_CPU_CAPABILITY=avx2 ...
SWIFTKV_NATIVE_MARCH=x86-64-v3) for the AVX2 builds of both. --baseline-rev also times the float32 kernel of csrc/
as it was at that git revision, built beside today's in the same process (`native_products.baseline_extension`),
and reports today's time over it as the median of the per-round ratios (`vs_baseline`). Writes --json.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from native_products import baseline_extension, checked_commit

from swiftkv.bench import machine_info, num_threads, rates, rotated, timed
from swiftkv.files import write_json
from swiftkv.modeling import native
from swiftkv.modeling.weights import native_bf16

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M


def runs(prompt: int, baseline=None) -> dict:
    """The timed calls by name, on one random layer's q [1, H, T, Dh] (strided, as transformers passes it), k, v;
    `baseline` (an earlier build of the extension) adds its float32 kernel as "kernel_float32_baseline"."""
    torch.manual_seed(0)
    q = torch.randn(1, prompt, HEADS, HEAD_DIM).transpose(1, 2)
    k, v = torch.randn(1, KV_HEADS, prompt, HEAD_DIM), torch.randn(1, KV_HEADS, prompt, HEAD_DIM)
    k_all, v_all = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    ext, scale = native.extension(), HEAD_DIM**-0.5
    calls = {
        "kernel_float32": lambda: ext.prefill_attention(q, k, v, scale, False),
        "sdpa_float32": lambda: F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, scale=scale),
    }
    if baseline is not None:
        calls["kernel_float32_baseline"] = lambda: baseline.prefill_attention(q, k, v, scale, False)
    if ext.has_bf16_attention():
        calls["kernel_bf16"] = lambda: ext.prefill_attention(q, k, v, scale, True)
    if native_bf16():  # PyTorch's flash attention on bf16 q/k/v (AMX tiles where the CPU has them), casts included
        calls["sdpa_bf16"] = lambda: F.scaled_dot_product_attention(
            *(t.to(torch.bfloat16) for t in (q, k_all, v_all)), is_causal=True, scale=scale
        ).float()
    return {name: (lambda call=call: timed(call)) for name, call in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="results/attention_kernel.json")
    parser.add_argument("--baseline-rev", help="git revision whose float32 kernel to time beside today's")
    args = parser.parse_args()
    if args.prompt < 2 or args.reps < 1 or args.threads < 1:
        parser.error(f"--prompt >= 2, --reps >= 1, --threads >= 1 (got {args.prompt}, {args.reps}, {args.threads})")
    baseline_commit = checked_commit(parser, args.baseline_rev)
    baseline = baseline_extension(args.baseline_rev) if args.baseline_rev else None
    with num_threads(args.threads), torch.inference_mode():
        times = rotated(runs(args.prompt, baseline), args.reps)
    flop = 2 * 2 * args.prompt**2 / 2 * HEADS * HEAD_DIM
    result = {
        "machine": machine_info(args.threads),
        "prompt": args.prompt,
        "reps": args.reps,
        **rates(times, flop, "sdpa_float32", "sdpa"),
    }
    if baseline is not None:  # today's kernel time over the baseline's, per round (drift cancels), then the median
        rounds = zip(times["kernel_float32"], times["kernel_float32_baseline"], strict=True)
        result |= {
            "baseline_rev": args.baseline_rev,
            "baseline_commit": baseline_commit,
            "vs_baseline": statistics.median(today.wall_s / before.wall_s for today, before in rounds),
        }
    write_json(result, args.json)
    for name, ms in result["median_ms"].items():
        print(f"{name}: {ms:.1f} ms, {result['gflops'][name]:.0f} GFLOP/s, {result['vs_sdpa'][name]:.2f}x SDPA's time")
    if baseline is not None:
        print(f"kernel_float32 / {args.baseline_rev}'s: {result['vs_baseline']:.3f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
