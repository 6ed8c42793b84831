"""Prefill and decode benchmark of SwiftKV against its own base model, next to the FLOPs and KV-bytes theory.

Every measurement is an interleaved A/B comparison on ONE model object: `config.swiftkv = False` is the exact
base model, `True` the SwiftKV model, so both modes share weights, memory layout and machine state. Shapes:
T prompt tokens, N layers, L = `num_key_value_layers`, g = `key_value_group_size`, D hidden size.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from swiftkv.config import validate_swiftkv_layout
from swiftkv.files import portable_path, save_figure, write_json
from swiftkv.modeling.cache import SwiftKVCache, measured_kv_bytes
from swiftkv.modeling.kernels import onednn_linears
from swiftkv.modeling.weights import apply_format
from swiftkv.modes import is_swiftkv, swiftkv_mode
from swiftkv.theory import kv_bytes_ratio, theoretical_prefill_flops_ratio

# Natural English for prompts (repeated, then truncated to exactly T tokens): real text gives the tokenizer
# realistic token ids, which matters for nothing in the FLOPs but keeps the benchmark honest and reproducible.
PROMPT_TEXT = (
    "The river valley had been farmed for centuries before the railway arrived. Each spring the water rose "
    "over the lower fields and left behind a layer of dark silt, and each autumn the families gathered to "
    "bring in wheat, barley and apples before the first frost. When the engineers came to survey the line, "
    "they found that the old stone bridge could not carry a locomotive, so they built a new one of iron a "
    "mile downstream. The village grew toward the station: a post office, two inns, a school with a bell "
    "that could be heard across the water. Older people still remember the sound of the evening train and "
    "the smell of coal smoke drifting over the orchards on still summer nights. "
)


@dataclass(frozen=True)
class Run:
    wall_s: float  # what the user waits for: the timed quantity
    cpu_s: float  # CPU time of this process, all threads: ~threads * wall_s unless other processes compete


Timings = dict[str, list[Run]]  # mode ("base" | "swiftkv") or engine name -> one Run per timed call


# ---------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """torch intra-op threads for the block (the benchmark's machine setting), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize() -> None:
    """Wait for queued CUDA kernels (they run asynchronously), so a wall time covers them; no-op on CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> Run:
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize()
    return Run(time.perf_counter() - wall, time.process_time() - cpu)


def prefill(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int = 0):
    """What `generate` runs first: a new cache (room for `new_tokens` more), only the last token's logits.

    input_ids [B, T]. SwiftKV models get the `SwiftKVCache` their `generate` uses (fast decode step); stock models
    transformers' `DynamicCache`.
    """
    cache = SwiftKVCache(model.config, input_ids.shape[1] + new_tokens) if is_swiftkv(model) else None
    return model(input_ids, cache=cache, use_cache=True, logits_to_keep=1)


def interleaved(run: Callable[[bool], Run], reps: int, warmup: int = 1) -> Timings:
    """Call `run(swiftkv)` for both modes `reps` times, alternating which mode goes first (drift cancels)."""
    return rotated({"base": lambda: run(False), "swiftkv": lambda: run(True)}, reps, warmup)


def rotated(
    runs: dict[str, Callable[[], Run]],
    reps: int,
    warmup: int = 1,
    after_round: Callable[[Timings], None] | None = None,
) -> Timings:
    """Time every named run `reps` times, rotating which goes first each round (drift cancels).

    `warmup` untimed rounds come first (allocator, thread pool and caches settle). A bar on stderr counts rounds;
    `after_round` gets the timings so far after every timed round (a long benchmark saves what it has finished).
    """
    names = list(runs)
    times: Timings = {name: [] for name in names}
    for rnd in tqdm(range(-warmup, reps), desc=f"rounds ({warmup} warm-up)", unit="round", leave=False):
        shift = max(rnd, 0) % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]()
            if rnd >= 0:
                times[name].append(run)
        if rnd >= 0 and after_round is not None:
            after_round(times)
    return times


def rates(times: Timings, flop: float | dict[str, float], baseline: str, label: str) -> dict[str, dict]:
    """Medians of rotated runs of `flop` floating-point operations (one workload, or each engine's own by name):
    ms, GFLOP/s, time against the `baseline` engine's (as "vs_<label>"), and every run's ms, each by engine name
    (the kernel benchmarks' JSON)."""
    median_ms = {name: statistics.median(r.wall_s for r in runs) * 1e3 for name, runs in times.items()}
    work = flop if isinstance(flop, dict) else dict.fromkeys(times, flop)
    return {
        "median_ms": median_ms,
        "gflops": {name: work[name] / ms / 1e6 for name, ms in median_ms.items()},
        f"vs_{label}": {name: ms / median_ms[baseline] for name, ms in median_ms.items()},
        "runs_ms": {name: [r.wall_s * 1e3 for r in runs] for name, runs in times.items()},
    }


@torch.inference_mode()
def measure_prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, reps: int = 5, warmup: int = 1, threads: int = 2
) -> Timings:
    """Wall and CPU seconds per prefill of `input_ids` [B, T], base and SwiftKV interleaved."""

    def run(swift: bool) -> Run:
        with swiftkv_mode(model, swift):
            return timed(lambda: prefill(model, input_ids))

    with num_threads(threads):
        return interleaved(run, reps, warmup)


@torch.inference_mode()
def _prefilled(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int) -> tuple[Cache, torch.Tensor]:
    """Cache after the prompt [B, P] and the greedy first token [B, 1] (current mode)."""
    out = prefill(model, input_ids, new_tokens)
    return out.cache, out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def greedy_decode(model: PreTrainedModel, cache: Cache, token: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy steps from `cache`, tokens [B, 1] at a time, never stopping early (fixed length)."""
    out_tokens = []
    for _ in range(new_tokens):
        logits = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits  # [B, 1, V]
        token = logits[:, -1:].argmax(-1)
        out_tokens.append(token)
    return torch.cat(out_tokens, dim=1)  # [B, new_tokens]


def measure_decode(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    new_tokens: int = 32,
    reps: int = 5,
    warmup: int = 1,
    threads: int = 2,
) -> Timings:
    """Wall and CPU seconds for `new_tokens` greedy decode steps after the prompt `input_ids` [B, P], modes interleaved.

    Each mode is prefilled ONCE (untimed); every run crops its cache back to the P prompt tokens, so all runs
    decode from the same state without paying for the prompt again.
    """
    with num_threads(threads):
        states = {}
        for swift in (False, True):
            with swiftkv_mode(model, swift):
                states[swift] = _prefilled(model, input_ids, new_tokens)

        def run(swift: bool) -> Run:
            cache, first = states[swift]
            with swiftkv_mode(model, swift):
                timing = timed(lambda: greedy_decode(model, cache, first, new_tokens))
            cache.crop(-new_tokens)  # back to the prompt only
            return timing

        return interleaved(run, reps, warmup)


def summary(runs: Sequence[Run]) -> dict[str, object]:
    """Every run's wall and CPU seconds, plus median / min / max of the wall times."""
    times = [r.wall_s for r in runs]
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_times_s": [r.cpu_s for r in runs],
    }


# ---------------------------------------------------------------------------------------------- KV bytes


@torch.inference_mode()
def measure_kv_bytes(model: PreTrainedModel, input_ids: torch.Tensor) -> dict[str, float]:
    """Cache bytes after one prefill of `input_ids` [B, P] in each mode, next to `kv_bytes_ratio`."""
    measured = {}
    for swift in (False, True):
        with swiftkv_mode(model, swift):
            measured[swift] = measured_kv_bytes(prefill(model, input_ids).cache)
    return {
        "prompt_len": input_ids.shape[1],
        "base_bytes": measured[False],
        "swiftkv_bytes": measured[True],
        "measured_ratio": measured[True] / measured[False],
        "theoretical_ratio": kv_bytes_ratio(model.config),
    }


# ---------------------------------------------------------------------------------------------- driver


def _proc_status_kb(field: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in KiB (None where /proc is not Linux's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_delta(fn: Callable[[], object], device: torch.device | None = None) -> int | None:
    """Bytes the peak memory rises above the memory in use just before `fn()`: the CUDA allocator's on a GPU,
    else the process's RSS (Linux; None elsewhere).

    Freed memory goes back to the OS first (gc + glibc malloc_trim) and the kernel's peak-RSS mark is reset
    (`5` into /proc/self/clear_refs), so the figure is this call's own working set: activations and KV cache.
    """
    if device is not None and device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _proc_status_kb("VmRSS")
    fn()
    peak = _proc_status_kb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) * 1024


@torch.inference_mode()
def measure_peak_memory(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int) -> dict[str, int | None]:
    """Peak memory above the loaded model while prefilling `input_ids` [B, P] and decoding `new_tokens`."""
    result = {}
    for swift in (False, True):
        with swiftkv_mode(model, swift):

            def run() -> None:
                cache, first = _prefilled(model, input_ids, new_tokens)
                greedy_decode(model, cache, first, new_tokens)

            result["swiftkv" if swift else "base"] = peak_memory_delta(run, model.device)
    return result


def prompt_ids(tokenizer, vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """Exactly `length` token ids [1, length]: PROMPT_TEXT repeated and tokenised, or seeded random ids."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (1, length), generator=generator)
    ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    repeats = length // len(ids) + 1
    return torch.tensor([(ids * repeats)[:length]], dtype=torch.long)


@torch.inference_mode()
def measure_workload(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    new_tokens: int,
    batch_size: int,
    reps: int = 3,
    warmup: int = 1,
    threads: int = 2,
) -> dict[str, object]:
    """End-to-end throughput of a batched generate workload (e.g. 10:1 prompt:output), engines interleaved.

    prompts [n, T] (equal lengths: no padding), greedy, exactly `new_tokens` per prompt. Tokens/s counts prompt
    plus output tokens, as an offline batch job pays for both. Engines: "transformers" (SwiftKV off, stock MKL
    kernels, transformers' DynamicCache: the stock model's generate, bit for bit), "base" (SwiftKV off with
    swiftkv's kernels and decode step) and "swiftkv".
    """

    def workload(**options) -> None:
        for start in range(0, prompts.shape[0], batch_size):
            chunk = prompts[start : start + batch_size]
            model.generate(
                chunk,
                attention_mask=torch.ones_like(chunk),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **options,
            )

    def run(swift: bool, stock: bool = False, **options) -> Callable[[], Run]:
        def timed_run() -> Run:
            with swiftkv_mode(model, swift), onednn_linears(not stock):
                return timed(lambda: workload(**options))

        return timed_run

    engines = {
        "transformers": run(False, stock=True, cache_implementation="dynamic"),
        "base": run(False),
        "swiftkv": run(True),
    }
    with num_threads(threads):
        times = rotated(engines, reps, warmup)
    tokens = prompts.numel() + prompts.shape[0] * new_tokens
    result = {
        mode: summary(runs) | {"tokens_per_s": tokens / summary(runs)["median_s"]} for mode, runs in times.items()
    }
    return {
        "prompts": prompts.shape[0],
        "prompt_len": prompts.shape[1],
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        **result,
        "throughput_ratio": result["swiftkv"]["tokens_per_s"] / result["base"]["tokens_per_s"],
        "throughput_ratio_vs_transformers": result["swiftkv"]["tokens_per_s"] / result["transformers"]["tokens_per_s"],
    }


# The variables that limit which instructions the kernels use (ATen, oneDNN, MKL, the native step's -march): CI's
# AVX2 pass sets them all (docs/testing.md), and a result measured under them compares only with one that was too.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "SWIFTKV_NATIVE_MARCH")


def threads_label(threads: int) -> str:
    """ "1 thread", "2 threads": for figure titles and summaries."""
    return f"{threads} thread{'' if threads == 1 else 's'}"


def machine_info(threads: int, device: str | torch.device = "cpu") -> dict[str, object]:
    """The one machine block of every result: versions, threads, CPU, the instruction-set limits in force (the
    variables as set, ATen's resulting capability, the native step's build target), and the GPU when one ran it."""
    import transformers

    from swiftkv.modeling import native

    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "load_average": list(os.getloadavg()),  # other processes on the machine slow some runs: look here first
        "isa_variables": {name: os.environ.get(name) for name in ISA_VARIABLES},  # None: not set
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_march": native.MARCH,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _prefill_entry(model: PreTrainedModel, ids: torch.Tensor, reps: int, warmup: int, threads: int) -> dict:
    """Timings of one prompt length, with the measured time ratio next to the theoretical FLOPs ratio."""
    times = measure_prefill(model, ids, reps, warmup, threads)
    base, swift = summary(times["base"]), summary(times["swiftkv"])
    paired = [s.wall_s / b.wall_s for s, b in zip(times["swiftkv"], times["base"], strict=True)]
    return {
        "prompt_len": ids.shape[1],
        "base": base,
        "swiftkv": swift,
        "measured_ratio": swift["median_s"] / base["median_s"],  # ratio of medians (headline)
        "min_ratio": swift["min_s"] / base["min_s"],  # fastest runs: least disturbed by other processes
        "paired_ratios": paired,  # run r of SwiftKV / run r of base: spread of the ratio itself
        "theoretical_flops_ratio": theoretical_prefill_flops_ratio(model.config, ids.shape[1]),
    }


def _decode_entry(
    model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, reps: int, warmup: int, threads: int
) -> dict:
    """Decode timings after the prompt `ids` [B, P], as seconds per run and tokens/s (all B sequences)."""
    times = measure_decode(model, ids, new_tokens, reps, warmup, threads)
    entry: dict[str, object] = {"prompt_len": ids.shape[1], "new_tokens": new_tokens}
    tokens = new_tokens * ids.shape[0]  # every sequence of the batch gains new_tokens
    for mode, runs in times.items():
        entry[mode] = {**summary(runs), "tokens_per_s": [tokens / r.wall_s for r in runs]}
        entry[mode]["tokens_per_s_median"] = statistics.median(entry[mode]["tokens_per_s"])
    entry["speedup"] = entry["swiftkv"]["tokens_per_s_median"] / entry["base"]["tokens_per_s_median"]
    return entry


def run_benchmark(
    model_dir_or_model: str | os.PathLike | PreTrainedModel,
    prompt_lengths: Sequence[int] = (256, 512, 1024, 2048),
    settings: Sequence[tuple[int, int]] = ((15, 1), (15, 3)),
    reps: int = 5,
    decode_tokens: int = 32,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    threads: int = 2,
    warmup: int = 1,
    decode_prompt_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    device: str = "cpu",
    batch_size: int = 1,
    weights: str = "float32",
) -> dict:
    """Convert the base model for each (L, g) and measure prefill, decode and KV bytes against the theory.

    `decode_prompt_len` defaults to the longest prompt length; `decode_tokens=0` skips decode. `tokenizer` (for a
    model object; a dir brings its own) makes prompts of real text, else seeded random ids. `batch_size` copies of
    each prompt run together ([B, T]) on `device`. Returns the result dict that is also written to `json_path` (and
    drawn to `plot_path`). Medians are over the timed `reps`. `weights`: the converted models' Linear format
    (weights.py), applied after each conversion.
    """
    from swiftkv.conversion import convert

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        from swiftkv.loading import load_model

        model, tokenizer = load_model(model_dir_or_model)
        model = model.to(device, dtype)
        name = str(model_dir_or_model)
    else:
        model, name = model_dir_or_model.eval().to(device), model_dir_or_model.name_or_path or "random weights"
    decode_len = decode_prompt_len or max(prompt_lengths)
    check_benchmark_args(model.config, prompt_lengths, settings, reps, decode_tokens, decode_len)
    prompts = {
        t: prompt_ids(tokenizer, model.config.vocab_size, t).repeat(batch_size, 1).to(device)
        for t in {*prompt_lengths, decode_len}
    }
    result = {
        "machine": machine_info(threads, device),
        "model": {**_model_info(model, name, dtype), "weights": weights},
        "benchmark": {
            "prompt_lengths": list(prompt_lengths),
            "batch_size": batch_size,
            "reps": reps,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
            "decode_prompt_len": decode_len,
            "prompt": "PROMPT_TEXT repeated" if tokenizer is not None else "random ids (seed 0)",
        },
        "settings": [],
    }
    result["settings"] = _finished_settings(json_path, result)
    done = {(s["num_key_value_layers"], s["key_value_group_size"]) for s in result["settings"]}
    todo = [setting for setting in settings if tuple(setting) not in done]
    steps = len(todo) * (len(prompt_lengths) + 1 + bool(decode_tokens))
    with tqdm(total=steps, desc="swiftkv bench", unit="step") as bar:
        for n_kv, group in todo:
            swift = apply_format(convert(model, n_kv, group), weights)  # convert shares the base weights: no copy
            result["settings"].append(
                _run_setting(swift, prompts, prompt_lengths, decode_len, decode_tokens, reps, warmup, threads, bar)
            )
            if json_path is not None:  # keep what is measured: an interrupted run resumes after this layout
                write_json(result, json_path)
    if plot_path is not None:
        plot(result, plot_path)
    return result


def check_benchmark_args(config, prompt_lengths, settings, reps: int, decode_tokens: int, decode_len: int) -> None:
    """Every argument checked against the model before the first measurement (a late failure loses work)."""
    for n_kv, group in settings:
        validate_swiftkv_layout(config.num_hidden_layers, n_kv, group)
    context = getattr(config, "max_position_embeddings", None) or float("inf")
    for length in prompt_lengths:
        if not 2 <= length <= context:
            raise ValueError(f"prompt length {length} is invalid: it must be between 2 and the context ({context}).")
    if decode_len + decode_tokens > context:
        raise ValueError(f"decode after {decode_len} tokens + {decode_tokens} new ones exceeds the context {context}.")
    if reps < 1 or decode_tokens < 0:
        raise ValueError(f"reps={reps} must be >= 1 and decode_tokens={decode_tokens} >= 0.")


def _finished_settings(json_path, result: dict) -> list[dict]:
    """Layouts already measured in `json_path` by a run with the same model and benchmark arguments."""
    if json_path is None or not Path(json_path).exists():
        return []
    previous = json.loads(Path(json_path).read_text())
    same = previous.get("benchmark") == result["benchmark"] and previous.get("model") == result["model"]
    return previous.get("settings", []) if same else []


def _run_setting(
    model: PreTrainedModel,
    prompts: dict[int, torch.Tensor],
    prompt_lengths: Sequence[int],
    decode_len: int,
    decode_tokens: int,
    reps: int,
    warmup: int,
    threads: int,
    bar: tqdm,
) -> dict:
    """All measurements of one converted model (one (L, g) layout)."""
    config = model.config
    layout = f"L={config.num_key_value_layers} g={config.key_value_group_size}"
    entry = {
        "num_key_value_layers": config.num_key_value_layers,
        "key_value_group_size": config.key_value_group_size,
        "prefill": [],
    }
    for length in prompt_lengths:
        bar.set_postfix_str(f"{layout} prefill T={length}")
        entry["prefill"].append(_prefill_entry(model, prompts[length], reps, warmup, threads))
        bar.update()
    bar.set_postfix_str(f"{layout} KV bytes")
    entry["kv_bytes"] = measure_kv_bytes(model, prompts[decode_len])
    entry["peak_memory_bytes"] = measure_peak_memory(model, prompts[decode_len], decode_tokens)
    bar.update()
    if decode_tokens:
        bar.set_postfix_str(f"{layout} decode P={decode_len}")
        entry["decode"] = _decode_entry(model, prompts[decode_len], decode_tokens, reps, warmup, threads)
        entry["latency"] = _latency(entry["prefill"], entry["decode"])
        bar.update()
    return entry


def _latency(prefills: list[dict], decode: dict) -> dict:
    """Time to first token (the prefill of the decode prompt, when it was measured) and time per output token."""
    latency = {"prompt_len": decode["prompt_len"]}
    for mode in ("base", "swiftkv"):
        ttft = [p[mode]["median_s"] for p in prefills if p["prompt_len"] == decode["prompt_len"]]
        latency[mode] = {
            "ttft_s": ttft[0] if ttft else None,
            "tpot_s": 1.0 / decode[mode]["tokens_per_s_median"],
        }
    return latency


def _model_info(model: PreTrainedModel, name: str, dtype: torch.dtype) -> dict[str, object]:
    config = model.config
    return {
        "name": portable_path(name),
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": config._attn_implementation,
    }


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Prefill speed-up (base / SwiftKV median time) vs prompt length: measured (solid) and FLOPs theory (dashed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, setting in enumerate(result["settings"]):
        lengths = [p["prompt_len"] for p in setting["prefill"]]
        label = f"L={setting['num_key_value_layers']}, g={setting['key_value_group_size']}"
        color = f"C{i}"
        speedup = [1 / p["measured_ratio"] for p in setting["prefill"]]
        # Bars span the per-run (paired) speed-ups: wide bars mean other processes disturbed some runs.
        low = [s - 1 / max(p["paired_ratios"]) for s, p in zip(speedup, setting["prefill"], strict=True)]
        high = [1 / min(p["paired_ratios"]) - s for s, p in zip(speedup, setting["prefill"], strict=True)]
        ax.errorbar(lengths, speedup, yerr=[low, high], fmt="o-", capsize=3, color=color, label=f"{label} measured")
        ax.plot(
            lengths,
            [1 / p["theoretical_flops_ratio"] for p in setting["prefill"]],
            "--",
            color=color,
            label=f"{label} FLOPs theory",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill speed-up vs base (x)")
    machine = result["machine"]
    where = machine.get("gpu") or f"{threads_label(machine['threads'])}, {machine['cpu_model']}"
    batch = result["benchmark"].get("batch_size", 1)
    ax.set_title(f"{Path(result['model']['name']).name}, batch {batch}: {where}", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_lines(result: dict) -> list[str]:
    """A few human-readable lines: one per (layout, prompt length), plus decode and KV bytes per layout."""
    lines = [f"{'layout':<10} {'T':>6} {'base ms':>9} {'swiftkv ms':>11} {'measured':>9} {'min':>6} {'theory':>7}"]
    for s in result["settings"]:
        layout = f"L={s['num_key_value_layers']} g={s['key_value_group_size']}"
        for p in s["prefill"]:
            lines.append(
                f"{layout:<10} {p['prompt_len']:>6} {1e3 * p['base']['median_s']:>9.1f} "
                f"{1e3 * p['swiftkv']['median_s']:>11.1f} {p['measured_ratio']:>9.3f} {p['min_ratio']:>6.3f} "
                f"{p['theoretical_flops_ratio']:>7.3f}"
            )
        if "decode" in s:
            d, lat = s["decode"], s["latency"]
            lines.append(
                f"{layout:<10} decode after P={d['prompt_len']}: base {d['base']['tokens_per_s_median']:.1f} tok/s, "
                f"swiftkv {d['swiftkv']['tokens_per_s_median']:.1f} tok/s (x{d['speedup']:.2f}); TPOT "
                f"{1e3 * lat['base']['tpot_s']:.1f} / {1e3 * lat['swiftkv']['tpot_s']:.1f} ms"
                + (
                    f"; TTFT {1e3 * lat['base']['ttft_s']:.0f} / {1e3 * lat['swiftkv']['ttft_s']:.0f} ms"
                    if lat["base"]["ttft_s"] is not None
                    else ""
                )
            )
        peak = s.get("peak_memory_bytes", {})
        if peak.get("base") is not None:
            lines.append(
                f"{layout:<10} peak memory above the loaded model (prefill + decode): base "
                f"{peak['base'] / 2**20:.1f} MiB, swiftkv {peak['swiftkv'] / 2**20:.1f} MiB"
            )
        kv = s["kv_bytes"]
        lines.append(
            f"{layout:<10} KV bytes: {kv['swiftkv_bytes'] / 2**20:.1f} / {kv['base_bytes'] / 2**20:.1f} MiB "
            f"= {kv['measured_ratio']:.4f} (theory {kv['theoretical_ratio']:.4f})"
        )
    return lines
