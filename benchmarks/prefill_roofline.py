"""How close a float32 prefill runs to this CPU's multiply-add peak: the peak, one layer's products, the attention
kernel and a whole prefill of the default model (SwiftKV off), in GFLOP/s and as a fraction of the peak.

    python benchmarks/prefill_roofline.py --threads 2 --reps 7 --json results/prefill_roofline.json

The peak is the native extension's `fma_peak` (every thread multiply-adding its build's vectors in registers). The
products are one layer's seven (q, k, v, o, gate, up, down) at --prompt rows through `kernels.linear`, the kernel a
prefill uses (`weights.panel_product` on AVX2, oneDNN where ATen runs AVX-512); the attention is csrc/attention.cpp
on that layer's shape (its causal triangle counted, as benchmarks/attention_kernel.py does). The whole prefill's
time per layer, less one layer's products and attention, is the `rest` (norms, RoPE, SiLU, residual adds, cache
copies, Python).
The four run in rotation (`bench.rotated`), medians of --reps. Writes --json and --plot.

What it tells: where an engine that multiplies in float32 can still gain on this CPU. When products and attention
both run near the peak, a faster first token needs fewer operations (SwiftKV's skip) or narrower arithmetic.
"""

from __future__ import annotations

import argparse

import torch

import swiftkv
from swiftkv.bench import machine_info, num_threads, prefill, rates, rotated, timed
from swiftkv.files import figure_beside, save_figure, write_json
from swiftkv.modeling import kernels, native

PEAK_ITERATIONS = 10_000_000  # ~19 ms of multiply-adds per thread on a 3 GHz core: long enough to time
PARTS = ("peak", "products", "attention", "prefill")


def layer_products(model) -> list:
    """The seven Linear layers of the first decoder layer, in the order a prefill runs them."""
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def flops(model, prompt: int) -> dict[str, float]:
    """Floating-point operations of each part (PARTS; the peak's on the threads in force now)."""
    config = model.config
    products = sum(2 * prompt * proj.in_features * proj.out_features for proj in layer_products(model))
    attention = 2 * 2 * prompt**2 / 2 * config.num_attention_heads * head_dim(config)
    lm_head = 2 * config.hidden_size * config.vocab_size  # the last token's logits only
    return {
        "peak": native.extension().fma_peak(1) * PEAK_ITERATIONS,  # one iteration's operations on every thread
        "products": products,
        "attention": attention,
        "prefill": config.num_hidden_layers * (products + attention) + lm_head,
    }


def calls(model, prompt: int) -> dict:
    """The timed call of each part (PARTS), on the model's own weights and random activations."""
    config, ext = model.config, native.extension()
    heads, kv_heads, dh = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, prompt))
    products = layer_products(model)
    # One input per width, as in a layer (q, k, v share the normed hidden state, gate and up too): a fresh input per
    # product would stream ~40 MB from memory that a prefill finds in cache.
    inputs = {proj.in_features: torch.randn(prompt, proj.in_features) for proj in products}
    q = torch.randn(1, prompt, heads, dh).transpose(1, 2)  # [1, H, T, Dh], strided as transformers passes it
    k, v = torch.randn(1, kv_heads, prompt, dh), torch.randn(1, kv_heads, prompt, dh)
    work = {
        "peak": lambda: ext.fma_peak(PEAK_ITERATIONS),
        "products": lambda: [kernels.linear(inputs[proj.in_features], proj) for proj in products],
        "attention": lambda: ext.prefill_attention(q, k, v, dh**-0.5, False),
        "prefill": lambda: prefill(model, ids),
    }
    return {name: (lambda call=call: timed(call)) for name, call in work.items()}


def summary(layers: int, prompt: int, flop: dict, times: dict, threads: int) -> dict:
    """Medians (ms), GFLOP/s and fractions of the peak per part (PARTS), and one layer's time split."""
    rated = rates(times, flop, "peak", "peak")
    median_ms, gflops = rated["median_ms"], rated["gflops"]
    layer_ms = median_ms["prefill"] / layers
    return {
        "machine": machine_info(threads),
        "prompt": prompt,
        "median_ms": median_ms,
        "gflop": {name: flop[name] / 1e9 for name in PARTS},
        "gflops": gflops,
        "fraction_of_peak": {name: gflops[name] / gflops["peak"] for name in PARTS},
        "layer_ms": {
            "products": median_ms["products"],
            "attention": median_ms["attention"],
            "rest": layer_ms - median_ms["products"] - median_ms["attention"],
            "total": layer_ms,
        },
        "runs_ms": rated["runs_ms"],
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    parts = PARTS[1:]
    left.bar(parts, [100 * result["fraction_of_peak"][p] for p in parts], color="tab:blue")
    left.axhline(100, color="black", linewidth=0.8)
    left.set_ylabel("% of the multiply-add peak")
    left.set_title(f"float32 at {result['gflops']['peak']:.0f} GFLOP/s peak, {result['machine']['threads']} thread(s)")
    bottom = 0.0
    for part in ("products", "attention", "rest"):
        ms = result["layer_ms"][part]
        right.bar(["one layer"], [ms], bottom=bottom, label=f"{part} {ms:.1f} ms")
        bottom += ms
    right.set_ylabel("ms")
    right.set_title(f"{result['prompt']}-token prompt, per decoder layer")
    right.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="results/prefill_roofline.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    if args.prompt < 2 or args.reps < 1 or args.threads < 1:
        parser.error(f"--prompt >= 2, --reps >= 1, --threads >= 1 (got {args.prompt}, {args.reps}, {args.threads})")
    if native.usable() is None:
        parser.error("the native extension is not available here (a C++ compiler and ninja are needed)")
    model, _ = swiftkv.load("default", weights="float32")
    with num_threads(args.threads), torch.inference_mode():
        flop = flops(model, args.prompt)
        times = rotated(calls(model, args.prompt), args.reps)
    result = {**summary(model.config.num_hidden_layers, args.prompt, flop, times, args.threads), "reps": args.reps}
    write_json(result, args.json)
    plot(result, figure_beside(args.json, args.plot))
    for part in PARTS:
        print(
            f"{part}: {result['median_ms'][part]:.1f} ms, {result['gflops'][part]:.0f} GFLOP/s, "
            f"{100 * result['fraction_of_peak'][part]:.0f}% of the peak"
        )
    print("one layer: " + ", ".join(f"{k} {v:.1f} ms" for k, v in result["layer_ms"].items()))


if __name__ == "__main__":
    main()
