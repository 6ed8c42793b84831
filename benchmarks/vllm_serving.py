"""Base model vs its SwiftKV conversion served by the same vLLM engine, same arguments, runs alternated.

Run in the vLLM environment (`bash scripts/setup.sh --vllm`); checkpoints as written by swiftkv (main venv). By
default the engines run as a vLLM user gets them: `--dtype auto` (bf16 on a CPU for these checkpoints) and
torch.compile (`--no-eager`); `--dtype float32 --eager` is the old like-for-like setting.

    .venv-vllm/bin/python benchmarks/vllm_serving.py --base BASE_DIR --swiftkv SWIFTKV_DIR [--swiftkv-g3 G3_DIR] \
        --json results/vllm_serving.json
    .venv/bin/python benchmarks/vllm_serving.py --plot results/vllm_serving.json   # PNG (needs matplotlib)

Figures (docs/vllm.md), every one base vs SwiftKV, medians of alternated runs:
- prefill: one request of `--prompt-len` tokens and 1 output token (the engine's TTFT);
- decode: `--decode-requests` concurrent requests of 64 prompt + 128 output tokens: the time per output token
  (TPOT) is the decode step, since the prompts fill one step;
- workloads: `--workloads RxP` items, R concurrent requests of P prompt tokens and P/10 output tokens (the 10:1
  enterprise shape): aggregate tokens/s, mean TTFT and TPOT from vLLM's request metrics;
- memory: KV-cache blocks in `--kv-cache-mib` and the largest batch of requests they hold, base vs the g=3
  conversion (the AcrossKV gain; needs `--swiftkv-g3`).
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
DECODE_PROMPT, DECODE_OUTPUT = 64, 128
KEYS = ("wall_s", "tokens_per_s", "ttft_s", "tpot_s")
# The environment that decides which kernels run (threads, ISA caps): recorded with every result.
ENV_KEYS = (
    "OMP_NUM_THREADS",
    "VLLM_CPU_OMP_THREADS_BIND",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)


def portable_path(path: str) -> str:
    """swiftkv.files.portable_path (how every result records a path), loaded by file: swiftkv is not installed in
    the vLLM environment, and that module imports only the standard library."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("swiftkv_files", Path(__file__).parents[1] / "src/swiftkv/files.py")
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    return files.portable_path(path)


def workload(spec: str) -> tuple[int, int]:
    """'16x1024' -> (16 requests, 1024 prompt tokens)."""
    try:
        requests, prompt = (int(part) for part in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload {spec!r} is not RxP (e.g. 16x1024)") from None
    if requests < 1 or prompt < 1:
        raise argparse.ArgumentTypeError(f"workload {spec!r}: requests and prompt tokens must be >= 1")
    return requests, prompt


def output_tokens(prompt_tokens: int) -> int:
    """The 10:1 shape's output length for a prompt."""
    return max(1, prompt_tokens // 10)


def engine(path: str, args: argparse.Namespace):
    from vllm import LLM

    longest = max([args.prompt_len, DECODE_PROMPT] + [p for _, p in args.workloads])
    return LLM(
        path,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=longest + max(output_tokens(longest), DECODE_OUTPUT) + 8,
        max_num_batched_tokens=max(longest, 2048),
        max_num_seqs=max([r for r, _ in args.workloads] + args.decode_requests + [1]),
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


def alternate(engines: dict, prompts: list[dict], new_tokens: int, reps: int, warmup: bool = True) -> dict:
    """A warm-up run each (new shapes may compile), then `reps` runs of each engine, alternated (base, swiftkv,
    base, ...); medians."""
    for llm in engines.values() if warmup else ():
        run(llm, prompts, new_tokens)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(reps):
        for name, llm in engines.items():
            runs[name].append(run(llm, prompts, new_tokens))
    medians = {
        name: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in KEYS}
        for name, rs in runs.items()
    }
    return {
        "prompt_tokens": len(prompts[0]["prompt_token_ids"]),
        "requests": len(prompts),
        "output_tokens": new_tokens,
        "runs": runs,
        "median": medians,
        "ratio": ratios(medians),
    }


def ratios(medians: dict) -> dict:
    """SwiftKV / base of every median (tokens/s: higher is better; times: lower is better)."""
    base, swift = medians["base"], medians["swiftkv"]
    return {k: swift[k] / base[k] if base[k] and swift[k] is not None else None for k in KEYS}


def kv_capacity(llm, tokens_per_request: int) -> dict:
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    per_request = -(-tokens_per_request // BLOCK_SIZE)
    return {"blocks": blocks, "tokens": blocks * BLOCK_SIZE, "largest_batch": blocks // per_request}


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def machine(engines: dict) -> dict:
    config = next(iter(engines.values())).llm_engine.vllm_config
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
        "dtype": str(config.model_config.dtype),
        "compilation_mode": config.compilation_config.mode.name,  # NONE: eager; DYNAMO_TRACE_ONCE: compiled (CPU)
    }


def measure(args: argparse.Namespace) -> dict:
    engines = {"base": engine(args.base, args), "swiftkv": engine(args.swiftkv, args)}
    vocab = engines["base"].llm_engine.vllm_config.model_config.get_vocab_size()
    paths = ("base", "swiftkv", "swiftkv_g3", "json")
    recorded = {k: portable_path(str(v)) if k in paths and v else str(v) for k, v in vars(args).items()}
    result = {"machine": machine(engines), "args": recorded}
    result["prefill"] = alternate(engines, random_prompts(1, args.prompt_len, vocab, 0), 1, args.reps)
    result["decode"] = {
        str(n): alternate(engines, random_prompts(n, DECODE_PROMPT, vocab, 2), DECODE_OUTPUT, args.reps)
        for n in args.decode_requests
    }
    result["workloads"] = {
        f"{r}x{p}": alternate(engines, random_prompts(r, p, vocab, 1), output_tokens(p), args.workload_reps, False)
        for r, p in args.workloads
    }
    tokens = args.prompt_len + output_tokens(args.prompt_len)
    result["kv"] = {name: kv_capacity(llm, tokens) for name, llm in engines.items()}
    close(engines.pop("swiftkv"))
    if args.swiftkv_g3:
        g3 = engine(args.swiftkv_g3, args)
        result["kv"]["swiftkv_g3"] = kv_capacity(g3, tokens)
        close(g3)
    close(engines.pop("base"))
    summarize(result)
    return result


def summarize(result: dict) -> None:
    kv = result["kv"]
    summary = {"prefill_time_ratio": result["prefill"]["ratio"]["wall_s"]}
    for n, figure in result["decode"].items():
        summary[f"decode_{n}_tpot_ratio"] = figure["ratio"]["tpot_s"]
    for name, figure in result["workloads"].items():
        summary[f"workload_{name}_throughput_ratio"] = figure["ratio"]["tokens_per_s"]
        summary[f"workload_{name}_ttft_ratio"] = figure["ratio"]["ttft_s"]
        summary[f"workload_{name}_tpot_ratio"] = figure["ratio"]["tpot_s"]
    if "swiftkv_g3" in kv:
        summary["largest_batch_ratio_g3"] = kv["swiftkv_g3"]["largest_batch"] / kv["base"]["largest_batch"]
    result["summary"] = summary
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if value is not None else f"{key}: n/a")


def plot(json_path: Path) -> Path:
    """One bar per figure: SwiftKV / base (1.0 = the base model; below 1 is better for times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(json_path.read_text())
    summary = {k: v for k, v in result["summary"].items() if v is not None}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(summary)), 4))
    colors = ["#2a7" if ("throughput" in k or "batch" in k) == (v >= 1) else "#c44" for k, v in summary.items()]
    ax.bar(range(len(summary)), list(summary.values()), color=colors)
    ax.axhline(1.0, color="#444", lw=1)
    ax.set_xticks(range(len(summary)), [k.removesuffix("_ratio") for k in summary], rotation=35, ha="right")
    ax.set_ylabel("SwiftKV / base")
    machine = result["machine"]
    fig.suptitle(
        f"vLLM (CPU), {machine.get('dtype')}, {machine.get('compilation_mode')}, "
        f"{machine['env'].get('OMP_NUM_THREADS') or '?'} thread(s): SwiftKV / base (green: better)"
    )
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base checkpoint directory")
    parser.add_argument("--swiftkv", help="its SwiftKV conversion (e.g. L=15, g=1)")
    parser.add_argument("--swiftkv-g3", help="its g=3 conversion, for the KV-capacity figure")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens of the prefill figure")
    parser.add_argument("--decode-requests", type=int, nargs="*", default=[8, 32], help="decode figures (0: none)")
    parser.add_argument("--workloads", type=workload, nargs="*", default=[workload("16x1024"), workload("32x2048")])
    parser.add_argument("--reps", type=int, default=5, help="alternated runs of the prefill and decode figures")
    parser.add_argument("--workload-reps", type=int, default=1)
    parser.add_argument("--kv-cache-mib", type=int, default=1024, help="KV-cache memory of every engine")
    parser.add_argument("--dtype", default="auto", help="vLLM's --dtype (auto: bf16 on a CPU for these models)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=False, help="no torch.compile")
    parser.add_argument("--json", type=Path, default=Path("results/vllm_serving.json"))
    parser.add_argument("--plot", type=Path, help="only draw the PNG of this JSON (main venv: needs matplotlib)")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return
    if not (args.base and args.swiftkv):
        parser.error("--base and --swiftkv are required (or --plot JSON)")
    args.decode_requests = [n for n in args.decode_requests if n > 0]
    result = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.plot is None and _has_matplotlib():
        print(f"wrote {plot(args.json)}")


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


if __name__ == "__main__":
    main()
