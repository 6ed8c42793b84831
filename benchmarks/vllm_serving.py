"""Base model vs its SwiftKV conversion served by the same vLLM engine, same arguments, runs alternated.

Run in the vLLM environment (`bash scripts/setup.sh --vllm`); checkpoints as written by swiftkv (main venv):

    .venv-vllm/bin/python benchmarks/vllm_serving.py --base BASE_DIR --swiftkv SWIFTKV_DIR [--swiftkv-g3 G3_DIR] \
        --prompt-len 2048 --requests 32 --reps 3 --json results/vllm_serving.json
    .venv/bin/python benchmarks/vllm_serving.py --plot results/vllm_serving.json   # PNG (needs matplotlib)

Three figures (docs/vllm.md):
- prefill: time of one request of `--prompt-len` tokens and 1 output token (the engine's TTFT), base vs SwiftKV;
- workload: `--requests` concurrent requests of `--prompt-len` prompt tokens and prompt/10 output tokens: aggregate
  tokens/s and the mean time per output token (TPOT) from vLLM's request metrics;
- memory: KV-cache blocks in `--kv-cache-mib` and the largest batch of (prompt + output)-token requests they hold,
  base vs the g=3 conversion (the AcrossKV gain; needs `--swiftkv-g3`).
Prompts are random token ids (prefix caching off, so no request reuses another's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

BLOCK_SIZE = 32  # vLLM's CPU attention needs multiples of 32


def engine(path: str, args: argparse.Namespace):
    from vllm import LLM

    return LLM(
        path,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=args.prompt_len + args.prompt_len // 10 + 8,
        max_num_batched_tokens=max(args.prompt_len, 2048),
        max_num_seqs=max(args.requests, 1),
        kv_cache_memory_bytes=args.kv_cache_mib << 20,
        block_size=BLOCK_SIZE,
        enable_prefix_caching=False,
        disable_log_stats=False,
        seed=0,
    )


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(100, vocab, (length,), generator=gen).tolist()} for _ in range(count)]


def run(llm, prompts: list[dict], new_tokens: int) -> dict:
    """Wall time, aggregate tokens/s, mean TTFT and TPOT of one batch of requests."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(p["prompt_token_ids"]) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
    tpot = [
        (o.metrics.last_token_ts - o.metrics.first_token_ts) / (len(o.outputs[0].token_ids) - 1)
        for o in outputs
        if o.metrics is not None and len(o.outputs[0].token_ids) > 1
    ]
    return {
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_s": statistics.mean(ttft) if ttft else None,
        "tpot_s": statistics.mean(tpot) if tpot else None,
    }


def alternate(engines: dict, prompts: list[dict], new_tokens: int, reps: int) -> dict:
    """`reps` runs of each engine, alternated (base, swiftkv, base, ...) so drifts hit both; medians."""
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(reps):
        for name, llm in engines.items():
            runs[name].append(run(llm, prompts, new_tokens))
    keys = ("wall_s", "tokens_per_s", "ttft_s", "tpot_s")
    medians = {
        name: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in keys}
        for name, rs in runs.items()
    }
    return {"runs": runs, "median": medians}


def kv_capacity(llm, tokens_per_request: int) -> dict:
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    per_request = -(-tokens_per_request // BLOCK_SIZE)
    return {"blocks": blocks, "tokens": blocks * BLOCK_SIZE, "largest_batch": blocks // per_request}


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def measure(args: argparse.Namespace) -> dict:
    new_tokens = max(1, args.prompt_len // 10)
    engines = {"base": engine(args.base, args), "swiftkv": engine(args.swiftkv, args)}
    vocab = engines["base"].llm_engine.vllm_config.model_config.get_vocab_size()
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS")},
        "args": {k: str(v) for k, v in vars(args).items()},
        "prefill": alternate(engines, random_prompts(1, args.prompt_len, vocab, 0), 1, args.reps),
        "workload": alternate(
            engines, random_prompts(args.requests, args.prompt_len, vocab, 1), new_tokens, args.workload_reps
        )
        if args.requests
        else None,
        "kv": {name: kv_capacity(llm, args.prompt_len + new_tokens) for name, llm in engines.items()},
    }
    close(engines.pop("swiftkv"))
    if args.swiftkv_g3:
        g3 = engine(args.swiftkv_g3, args)
        result["kv"]["swiftkv_g3"] = kv_capacity(g3, args.prompt_len + new_tokens)
        close(g3)
    close(engines.pop("base"))
    summarize(result)
    return result


def summarize(result: dict) -> None:
    prefill, kv = result["prefill"]["median"], result["kv"]
    work = result["workload"]["median"] if result["workload"] else None
    result["summary"] = {
        "prefill_time_ratio": prefill["swiftkv"]["wall_s"] / prefill["base"]["wall_s"],
        "throughput_ratio": work["swiftkv"]["tokens_per_s"] / work["base"]["tokens_per_s"] if work else None,
        "tpot_ratio": work["swiftkv"]["tpot_s"] / work["base"]["tpot_s"] if work and work["base"]["tpot_s"] else None,
        "largest_batch_ratio_g3": (
            kv["swiftkv_g3"]["largest_batch"] / kv["base"]["largest_batch"] if "swiftkv_g3" in kv else None
        ),
    }
    for key, value in result["summary"].items():
        print(f"{key}: {value:.3f}" if value is not None else f"{key}: n/a")


def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(json_path.read_text())
    prefill, kv = result["prefill"]["median"], result["kv"]
    panels = [("prefill time (s)", {k: v["wall_s"] for k, v in prefill.items()})]
    if result["workload"]:
        panels.append(("workload tokens/s", {k: v["tokens_per_s"] for k, v in result["workload"]["median"].items()}))
    panels.append(("largest batch in the KV budget", {k: v["largest_batch"] for k, v in kv.items()}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(list(values), list(values.values()), color=["#888", "#2a7", "#27a"][: len(values)])
        ax.set_title(title)
    fig.suptitle(f"vLLM (CPU), prompt {result['args']['prompt_len']} tokens: base vs SwiftKV")
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base checkpoint directory")
    parser.add_argument("--swiftkv", help="its SwiftKV conversion (e.g. L=15, g=1)")
    parser.add_argument("--swiftkv-g3", help="its g=3 conversion, for the KV-capacity figure")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests of the 10:1 workload (0: none)")
    parser.add_argument("--reps", type=int, default=3, help="alternated runs of the prefill measurement")
    parser.add_argument("--workload-reps", type=int, default=1)
    parser.add_argument("--kv-cache-mib", type=int, default=1024, help="KV-cache memory of every engine")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="no torch.compile")
    parser.add_argument("--json", type=Path, default=Path("results/vllm_serving.json"))
    parser.add_argument("--plot", type=Path, help="only draw the PNG of this JSON (main venv: needs matplotlib)")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return
    if not (args.base and args.swiftkv):
        parser.error("--base and --swiftkv are required (or --plot JSON)")
    result = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
