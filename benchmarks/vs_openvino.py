"""Time to first token and decode speed on CPU: swiftkv against OpenVINO GenAI, in one interleaved run.

    bash scripts/setup.sh --openvino     # OpenVINO GenAI into .venv (benchmark only) + the two exports below
    .venv/bin/python benchmarks/vs_openvino.py
    # exports: .venv-openvino/bin/optimum-cli export openvino --model SMOLLM2_DIR --task text-generation-with-past
    #          --weight-format {fp32,int8} out/openvino/SmolLM2-135M-Instruct-{fp32,int8}
    # SMOLLM2_DIR: the default model's converted checkpoint, swiftkv.embedded.default_model_dir()

openvino, openvino-genai and openvino-tokenizers are a benchmark-only tool in .venv (swiftkv never imports them;
they need no transformers, so .venv keeps its own); only the export needs optimum-intel, which pins an older
transformers and so lives in .venv-openvino.

Engines, all greedy, exactly --new-tokens tokens per call (EOS ignored), --threads threads each:
- openvino/default: LLMPipeline on the fp32 export as a user gets it (CPU plugin defaults: bf16 compute where the
  CPU has AVX512_BF16/AMX, paged attention with prefix caching, the plugin's KV-cache precision);
- openvino/f32: the same with INFERENCE_PRECISION_HINT=f32;
- openvino/int8: LLMPipeline on the int8-weight export (optimum-intel's int8_asym per channel), defaults otherwise;
- swiftkv-off/W: the SwiftKV model with SwiftKV off (the exact base model) through swiftkv's prefill and decode step;
- swiftkv-L15/W, swiftkv-L22/W: the bundled adapters smollm2-L15-g1 / smollm2-L22-g1 (prompt tokens skip layers
  >= L), for each weight format W of --weights (swiftkv.modeling.weights). With --model, another checkpoint of
  SmolLM2's architecture (its exports in --exports), whose SwiftKV layers are the undistilled layouts L=15 / L=22:
  the adapters' shapes and cost, not their trained values (scripts/compressible_checkpoint.py makes such a copy
  whose files compress ~1000x, to carry this benchmark to a machine without network; timings only).
Token ids go in directly (no tokenizer in the timed path); every call gets a FRESH prompt of --prompt-length tokens
(natural text rotated by the call's index), so OpenVINO's prefix cache never holds any of it. TTFT: call start to
the first token; decode tokens/s: the other new-tokens - 1 tokens over the rest of the call. Every repetition runs
every engine once, rotating the order; medians and min-max over --reps. Ratios: of two engines' medians, and
(`paired_ttft`) the median of the ratios within each repetition, which cancels drift between repetitions; each
target also counts the repetitions whose own ratio met it (`repetitions_met` of `reps`). --json is rewritten after
every repetition (`repetitions_done`): a run stopped early keeps what it finished (the figure comes at the end).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import swiftkv
from swiftkv.bench import (
    PROMPT_TEXT,
    Run,
    greedy_decode,
    machine_info,
    num_threads,
    prefill,
    rotated,
    threads_label,
    timed,
)
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.loading import DEFAULT_MODEL, load_model_config, load_tokenizer, resolve_model_path
from swiftkv.modeling.weights import FORMATS, default_format, resolve_formats
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
EXPORTS = ROOT / "out" / "openvino"
SETUP = "bash scripts/setup.sh --openvino"
ADAPTERS = {"L15": "smollm2-L15-g1", "L22": "smollm2-L22-g1"}
LAYERS = {"L15": 15, "L22": 22}  # each adapter's num_key_value_layers (key_value_group_size 1)
OPENVINO_ENGINES = {  # name -> (export's weight format, LLMPipeline properties beyond threads)
    "openvino/default": ("fp32", {}),
    "openvino/f32": ("fp32", {"INFERENCE_PRECISION_HINT": "f32"}),
    "openvino/int8": ("int8", {}),
}
KEPT_TOKENS = 16  # greedy tokens recorded per engine: enough to see where engines part
WARMUP = 1  # untimed rounds first (thread pools, allocators, OpenVINO's first dynamic-shape compile)


@dataclass(frozen=True)
class Call:
    ttft_s: float  # call start -> first new token
    total_s: float  # call start -> last new token
    tokens: list[int]


# ---------------------------------------------------------------------------------------------- prompts


def text_ids(model: str) -> list[int]:
    """PROMPT_TEXT's token ids (`model`'s tokenizer), once around: prompts are rotations of it repeated."""
    return load_tokenizer(resolve_model_path(model))(PROMPT_TEXT, add_special_tokens=False)["input_ids"]


def fresh_prompt(ids: list[int], length: int, index: int) -> list[int]:
    """`length` tokens of the text repeated, starting `index` tokens in: for index < len(ids) every prompt differs
    from every other from its first token on, so no prefix cache (OpenVINO's is on by default) can serve it."""
    repeated = ids * ((length + index) // len(ids) + 1)
    return repeated[index : index + length]


# ---------------------------------------------------------------------------------------------- engines


class Engine:
    """One engine in the rotation: its k-th call (warm-up included) runs on fresh prompt k; keeps every Call."""

    def __init__(self, generate: Callable[[list[int]], Call], ids: list[int], length: int):
        self.generate, self.ids, self.length = generate, ids, length
        self.calls: list[Call] = []

    def __call__(self) -> Run:
        prompt = fresh_prompt(self.ids, self.length, len(self.calls))
        return timed(lambda: self.calls.append(self.generate(prompt)))


@functools.cache
def _first_token_clock() -> type:
    """A streamer that notes when the first token arrives (defined on first use: openvino_genai is optional)."""
    import openvino_genai  # noqa: PLC0415  (benchmark-only dependency)

    class FirstTokenClock(openvino_genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.first_s: float | None = None

        def write(self, token) -> openvino_genai.StreamingStatus:
            if self.first_s is None:
                self.first_s = time.perf_counter()
            return openvino_genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    return FirstTokenClock


class OpenVino:
    """OpenVINO GenAI's LLMPipeline on one export: greedy, exactly `new_tokens` tokens from token ids."""

    def __init__(self, export: Path, threads: int, new_tokens: int, properties: dict[str, str]):
        import openvino_genai  # noqa: PLC0415

        self.pipe = openvino_genai.LLMPipeline(
            str(export), "CPU", INFERENCE_NUM_THREADS=threads, NUM_STREAMS=1, **properties
        )
        self.config = openvino_genai.GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, do_sample=False)
        self.new_tokens = new_tokens

    def __call__(self, ids: list[int]) -> Call:
        import openvino  # noqa: PLC0415

        clock = _first_token_clock()()
        start = time.perf_counter()
        result = self.pipe.generate(openvino.Tensor(np.array([ids], dtype=np.int64)), self.config, clock)
        total = time.perf_counter() - start
        tokens = [int(t) for t in result.tokens[0]]
        if len(tokens) != self.new_tokens or clock.first_s is None:
            raise RuntimeError(f"OpenVINO generated {len(tokens)} tokens, asked for {self.new_tokens}.")
        return Call(clock.first_s - start, total, tokens)


def swiftkv_generator(model, swift: bool, threads: int, new_tokens: int) -> Callable[[list[int]], Call]:
    """What swiftkv's `generate` runs, greedy: prefill (the first token) then `new_tokens - 1` decode steps."""

    @torch.inference_mode()
    def generate(ids: list[int]) -> Call:
        with num_threads(threads), swiftkv_mode(model, swift):
            start = time.perf_counter()
            out = prefill(model, torch.tensor([ids]), new_tokens)
            first = out.logits[:, -1:].argmax(-1)
            ttft = time.perf_counter() - start
            rest = greedy_decode(model, out.cache, first, new_tokens - 1)
            total = time.perf_counter() - start
        return Call(ttft, total, [int(first), *rest[0].tolist()])

    return generate


def swiftkv_engines(args) -> dict[str, Callable[[list[int]], Call]]:
    """swiftkv-off / swiftkv-L15 / swiftkv-L22 per weight format (SwiftKV off runs on the L15 model's weights)."""
    threads, new_tokens, engines = args.threads, args.new_tokens, {}
    for fmt in args.weights:
        for short in ADAPTERS:
            model = swiftkv_model(args.model, short, fmt)
            if short == "L15":
                engines[f"swiftkv-off/{fmt}"] = swiftkv_generator(model, False, threads, new_tokens)
            engines[f"swiftkv-{short}/{fmt}"] = swiftkv_generator(model, True, threads, new_tokens)
    return engines


def swiftkv_model(name: str, short: str, fmt: str):
    """The default model with the bundled adapter `short` names; another checkpoint with that adapter's layout."""
    if name == DEFAULT_MODEL:
        return swiftkv.load(name, adapter=ADAPTERS[short], weights=fmt)[0]
    return swiftkv.load(name, num_key_value_layers=LAYERS[short], weights=fmt)[0]


def openvino_engines(exports: Path, threads: int, new_tokens: int) -> dict[str, OpenVino]:
    return {
        name: OpenVino(export_dir(exports, fmt), threads, new_tokens, properties)
        for name, (fmt, properties) in OPENVINO_ENGINES.items()
    }


def export_dir(exports: Path, fmt: str) -> Path:
    return exports / f"{MODEL}-{fmt}"


# ---------------------------------------------------------------------------------------------- measuring


def measure(args, ids: list[int], save: Callable[[dict], None]) -> dict:
    """Every engine timed in rotation; `save` gets the result so far after each repetition (an interrupted or
    killed run keeps the repetitions it finished)."""
    generators = {
        **openvino_engines(args.exports, args.threads, args.new_tokens),
        **swiftkv_engines(args),
    }
    engines = {name: Engine(fn, ids, args.prompt_length) for name, fn in generators.items()}

    def so_far(walls: dict) -> dict:
        rows = {name: summarise(e.calls[WARMUP:], walls[name], args.new_tokens) for name, e in engines.items()}
        return {"repetitions_done": len(next(iter(walls.values()))), "engines": rows, **comparisons(rows, args.weights)}

    return so_far(rotated(engines, args.reps, warmup=WARMUP, after_round=lambda walls: save(so_far(walls))))


def summarise(calls: list[Call], walls: list[Run], new_tokens: int) -> dict:
    """Median and min-max TTFT and decode tokens/s over the timed calls, and the last call's first tokens (every
    engine's last call ran on the same prompt)."""
    ttfts = [c.ttft_s for c in calls]
    rates = [(new_tokens - 1) / (c.total_s - c.ttft_s) for c in calls]
    return {
        "ttft_s": statistics.median(ttfts),
        "min_ttft_s": min(ttfts),
        "max_ttft_s": max(ttfts),
        "decode_tokens_per_s": statistics.median(rates),
        "min_decode_tokens_per_s": min(rates),
        "max_decode_tokens_per_s": max(rates),
        "ttfts_s": ttfts,
        "totals_s": [c.total_s for c in calls],
        "cpu_s": [w.cpu_s for w in walls],  # this process, all threads: ~threads * wall unless others compete
        "tokens": calls[-1].tokens[:KEPT_TOKENS],
    }


def comparisons(results: dict, weights: list[str]) -> dict:
    """swiftkv / OpenVINO ratios for every pair, the issue's four targets, and token agreement with the exact base."""
    openvino = [n for n in results if n.startswith("openvino/")]
    ratios = {
        name: {
            other: {
                "ttft": row["ttft_s"] / results[other]["ttft_s"],
                "paired_ttft": paired(row["ttfts_s"], results[other]["ttfts_s"]),
                "decode": row["decode_tokens_per_s"] / results[other]["decode_tokens_per_s"],
            }
            for other in openvino
        }
        for name, row in results.items()
        if name.startswith("swiftkv")
    }
    reference = results["swiftkv-off/float32"]["tokens"] if "float32" in weights else None
    return {
        "ratios": ratios,
        "targets": targets(results, ratios, weights),
        "agreement_with": "swiftkv-off/float32" if reference else None,
        "agreement": {name: _leading_equal(row["tokens"], reference) for name, row in results.items()}
        if reference
        else {},
    }


def per_repetition(times: list[float], others: list[float]) -> list[float]:
    """times[i] / others[i] for every repetition i. A repetition runs every engine back to back, so its ratio
    cancels the host's drift between repetitions, which the ratio of two engines' medians keeps."""
    return [a / b for a, b in zip(times, others, strict=True)]


def paired(times: list[float], others: list[float]) -> float:
    """The median of `per_repetition` ratios."""
    return statistics.median(per_repetition(times, others))


def targets(results: dict, ratios: dict, weights: list[str]) -> list[dict]:
    """Issue 33's targets, each with the engines it compares; a target whose engine did not run says so."""
    default = default_format()
    wanted = [
        ("ttft", f"swiftkv-L15/{default}", "openvino/default", "<=", 0.5),
        ("ttft", f"swiftkv-L22/{default}", "openvino/default", "<=", 0.75),
        ("prefill speed", "swiftkv-off/float32", "openvino/f32", ">=", 1.0),
        ("decode", "swiftkv-L15/int8", "openvino/int8", ">=", 1.0),
    ]
    out = []
    for metric, engine, against, op, target in wanted:
        row = {"metric": metric, "engine": engine, "against": against, "target": f"{op} {target}"}
        if (missing := next((name for name in (engine, against) if name not in results), None)) is not None:
            out.append({**row, "ratio": None, "met": None, "note": f"{missing} not measured (--weights {weights})"})
            continue
        pair = ratios[engine][against]
        ratio = {"ttft": pair["ttft"], "prefill speed": 1 / pair["ttft"], "decode": pair["decode"]}[metric]
        row = {**row, "ratio": ratio, "met": _meets(ratio, op, target)}
        if metric != "decode":  # TTFTs are timed per repetition: how often a repetition met the target too
            reps = per_repetition(results[engine]["ttfts_s"], results[against]["ttfts_s"])
            reps = reps if metric == "ttft" else [1 / r for r in reps]
            paired_ratio = pair["paired_ttft"] if metric == "ttft" else 1 / pair["paired_ttft"]
            met = sum(_meets(r, op, target) for r in reps)
            row |= {"paired_ratio": paired_ratio, "repetitions_met": met, "reps": len(reps)}
        out.append(row)
    return out


def _meets(ratio: float, op: str, target: float) -> bool:
    return ratio <= target if op == "<=" else ratio >= target


def _leading_equal(tokens: list[int], reference: list[int]) -> int:
    """How many first tokens equal the reference's (greedy decoding parts for good at the first difference)."""
    count = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        count += 1
    return count


# ---------------------------------------------------------------------------------------------- output


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    engines = result["engines"]
    names = list(engines)
    colors = ["tab:orange" if n.startswith("openvino") else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, scale, title in (
        (axes[0], "ttft_s", 1e3, f"time to first token, {result['prompt_length']}-token prompt (ms)"),
        (axes[1], "decode_tokens_per_s", 1.0, f"decode after it, {result['new_tokens']} tokens (tokens/s)"),
    ):
        mid = [scale * engines[n][key] for n in names]
        low = [m - scale * engines[n][f"min_{key}"] for m, n in zip(mid, names, strict=True)]
        high = [scale * engines[n][f"max_{key}"] - m for m, n in zip(mid, names, strict=True)]
        ax.bar(names, mid, yerr=[low, high], color=colors, capsize=3)
        ax.set_title(title + ", median and min-max", fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    machine = result["machine"]
    model = MODEL if result["model"] == MODEL else f"{result['model']} ({MODEL}'s shapes, SwiftKV undistilled)"
    fig.suptitle(
        f"{model}: swiftkv vs OpenVINO GenAI, {threads_label(machine['threads'])}, {machine['cpu_model']}", fontsize=9
    )
    fig.tight_layout()
    return save_figure(fig, path)


def summary_lines(result: dict) -> list[str]:
    lines = [f"{'engine':<22} {'TTFT ms':>9} {'decode tok/s':>13}  first tokens"]
    for name, row in result["engines"].items():
        lines.append(f"{name:<22} {1e3 * row['ttft_s']:>9.1f} {row['decode_tokens_per_s']:>13.1f}  {row['tokens'][:8]}")
    for t in result["targets"]:
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
        if t.get("paired_ratio") is not None:
            ratio += f" (paired by repetition: {t['paired_ratio']:.3f}, met in {t['repetitions_met']}/{t['reps']})"
        lines.append(f"target {t['metric']}: {t['engine']} / {t['against']} = {ratio} (want {t['target']})")
    return lines


def openvino_info(exports: Path) -> dict:
    import openvino  # noqa: PLC0415
    import openvino_genai  # noqa: PLC0415

    core = openvino.Core()
    return {
        "openvino": openvino.get_version(),
        "openvino_genai": openvino_genai.get_version(),
        "exports": {fmt: portable_path(export_dir(exports, fmt)) for fmt in ("fp32", "int8")},
        "engines": {name: {"export": fmt, "properties": props} for name, (fmt, props) in OPENVINO_ENGINES.items()},
        # The CPU plugin's default here: the precision openvino/default and openvino/int8 compute in.
        "cpu_default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
        "cpu_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-length", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", nargs="+", choices=FORMATS, default=list(FORMATS), help="swiftkv's formats")
    parser.add_argument("--exports", type=Path, default=EXPORTS, help="where the OpenVINO exports are")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="swiftkv's checkpoint, exported in --exports")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "vs_openvino.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument, then the OpenVINO side, checked before any model loads (exit 2 with the fix)."""
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first token ends the TTFT; decode speed needs the rest)")
    try:
        config = load_model_config(args.model)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model!r}: {error}")
    if config.num_hidden_layers <= max(LAYERS.values()):
        layers = config.num_hidden_layers
        parser.error(f"--model {args.model!r} has {layers} layers; the L=22 layout needs more than 22")
    longest = config.max_position_embeddings - args.new_tokens
    if not 2 <= args.prompt_length <= longest:
        parser.error(f"--prompt-length must be between 2 and {longest} (the context less --new-tokens)")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    args.weights = resolve_formats(args.weights)  # engines named by what runs (bf16 without bf16 hardware: float32)
    distinct = len(text_ids(args.model)) - WARMUP  # rotations of the text: one fresh prompt per call, warm-up included
    if not 1 <= args.reps <= distinct:
        parser.error(f"--reps must be between 1 and {distinct} (the fresh prompts there are)")
    if importlib.util.find_spec("openvino_genai") is None:
        parser.error(f"openvino-genai is not installed in this environment: run `{SETUP}`")
    for fmt in dict.fromkeys(fmt for fmt, _ in OPENVINO_ENGINES.values()):  # in order, once each
        if not (export_dir(args.exports, fmt) / "openvino_model.xml").is_file():
            parser.error(f"the OpenVINO export {export_dir(args.exports, fmt)} is missing: run `{SETUP}`")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    result = {
        "model": MODEL if args.model == DEFAULT_MODEL else portable_path(args.model),
        "swiftkv_layouts": "bundled adapters" if args.model == DEFAULT_MODEL else "undistilled, the adapters' layouts",
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "warmup": WARMUP,
        "prompts": "PROMPT_TEXT's tokens repeated, rotated by the call's index: fresh per call, same length",
        "swiftkv_weights": args.weights,
        "swiftkv_default_weights": default_format(),
        "machine": machine_info(args.threads),
        "openvino": openvino_info(args.exports),
    }

    def save(partial: dict) -> None:
        write_json({**result, **partial, "wall_s": time.perf_counter() - start}, args.json)

    result |= measure(args, text_ids(args.model), save)
    result["wall_s"] = time.perf_counter() - start
    write_json(result, args.json)
    plot(result, figure_beside(args.json, args.plot))
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
