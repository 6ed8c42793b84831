"""Decode quality per weight format: perplexity read through the decode step itself, one token at a time.

    python benchmarks/decode_quality.py --adapter smollm2-L15-g1 --formats float32 int8 int4 \\
        --json results/decode_quality.json --plot results/decode_quality.png

Why: `swiftkv eval` (benchmarks/weights_quality.py) scores whole texts in one forward, which runs the prefill's
products. The native decode step's int8/int4 products also round the activations to 8-bit blocks
(modeling/weights.py), and only generation runs them. Here the first --prompt tokens of each text are prefilled,
then every later token goes through `generate`'s decode step (SwiftKVCache, the native step where it builds), and the
log-probability of the text's own next token is read: a teacher-forced perplexity of the decode arithmetic, per
source and mode (base / SwiftKV), against float32's, with each position's top-1 agreement with float32.

All formats decode each text side by side (float32 first), so KL(float32 || format) per token is read too. One JSON
per source in --runs (an interrupted run resumes where it stopped); targets as weights_quality.py's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from weights_quality import TARGETS

from swiftkv.bench import num_threads
from swiftkv.corpora import DOMAIN_SOURCES
from swiftkv.evaluate.scoring import MODES, SWIFTKV
from swiftkv.evaluate.text import token_samples
from swiftkv.files import figure_beside, portable_path, save_figure, write_json
from swiftkv.loading import load
from swiftkv.modeling.cache import SwiftKVCache
from swiftkv.modeling.weights import FORMATS, resolve_formats
from swiftkv.modes import swiftkv_mode

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def decoded_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [T - prompt, V] predicting tokens prompt..T-1 of `ids` [1, T]: the prompt prefilled, then each later
    token fed alone through the decode step."""
    cache = SwiftKVCache(model.config, ids.shape[1])
    logits = [model(ids[:, :prompt], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]]
    for t in range(prompt, ids.shape[1] - 1):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1])
    return torch.stack(logits)


def score_source(models: dict, texts: list[torch.Tensor], prompt: int) -> dict:
    """{fmt: {mode: {nll, tokens, kl, agree}}} over `texts`: NLL of each text's own tokens, and against float32's
    decode of the same text KL(float32 || fmt) summed over positions and the positions where top-1 agrees."""
    out: dict = {fmt: {} for fmt in models}
    for mode in MODES:
        sums = {fmt: {"nll": 0.0, "tokens": 0, "kl": 0.0, "agree": 0} for fmt in models}
        for ids in texts:
            targets = ids[0, prompt:, None]
            reference = None
            for fmt, model in models.items():  # float32 first (main puts it there)
                with swiftkv_mode(model, mode == SWIFTKV):
                    logp = torch.log_softmax(decoded_logits(model, ids, prompt), -1)  # [T - prompt, V]
                reference = logp if reference is None else reference
                row = sums[fmt]
                row["nll"] -= logp.gather(1, targets).sum().item()
                row["tokens"] += targets.shape[0]
                row["kl"] += (reference.exp() * (reference - logp)).sum().item()
                row["agree"] += (logp.argmax(-1) == reference.argmax(-1)).sum().item()
        for fmt in models:
            out[fmt][mode] = sums[fmt]
    return out


def compare(scores: dict[str, dict]) -> dict:
    """Per format (not float32), source and mode: decode perplexity / float32's - 1, mean KL(float32 || fmt) per
    token and top-1 agreement with float32; the worst increase and whether weights_quality's target holds."""
    out = {}
    for fmt in next(iter(scores.values())):
        if fmt == "float32":
            continue
        increase, kl, agreement = {}, {}, {}
        for source, table in scores.items():
            row, ref = table[fmt], table["float32"]
            increase[source] = {m: math.exp((row[m]["nll"] - ref[m]["nll"]) / row[m]["tokens"]) - 1 for m in MODES}
            kl[source] = {m: row[m]["kl"] / row[m]["tokens"] for m in MODES}
            agreement[source] = {m: row[m]["agree"] / row[m]["tokens"] for m in MODES}
        worst = max(v for row in increase.values() for v in row.values())
        target = TARGETS.get(fmt)
        out[fmt] = {"increase": increase, "kl": kl, "agreement": agreement, "worst": worst, "target": target}
        out[fmt]["met"] = None if target is None else worst <= target
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = result["compare"]
    sources = list(next(iter(formats.values()))["increase"])
    series = [(fmt, mode) for fmt in formats for mode in MODES]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (fmt, mode) in enumerate(series):
        xs = [j + (i - len(series) / 2 + 0.5) * width for j in range(len(sources))]
        ax.bar(xs, [100 * formats[fmt]["increase"][s][mode] for s in sources], width, label=f"{fmt} {mode}")
    for fmt in formats:
        if formats[fmt]["target"] is not None:
            ax.axhline(100 * formats[fmt]["target"], linestyle="--", linewidth=0.8, color="grey")
    ax.set_xticks(range(len(sources)), sources, rotation=60, ha="right")
    ax.set_ylabel("decode perplexity vs float32 (%)")
    ax.set_title(f"{result['adapter']}: teacher-forced through the decode step")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="smollm2-L15-g1", help="adapter dir or bundled name")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["float32", "int8", "int4"])
    parser.add_argument("--limit", type=int, default=4, help="texts per source")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per text (prompt included)")
    parser.add_argument("--prompt", type=int, default=32, help="tokens prefilled before decoding starts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=ROOT / "out" / "decode_quality")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "decode_quality.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()
    if args.prompt < 1 or args.tokens <= args.prompt + 1:
        parser.error(f"--tokens ({args.tokens}) must exceed --prompt ({args.prompt}) + 1, and --prompt be >= 1")
    formats = resolve_formats(["float32", *args.formats])  # float32 (the reference) first; bf16 may run as float32
    loaded = {fmt: load("default", adapter=args.adapter, weights=fmt) for fmt in formats}
    models, tokenizer = {fmt: model for fmt, (model, _) in loaded.items()}, loaded["float32"][1]
    scores = {}
    with num_threads(args.threads):
        for source in tqdm(DOMAIN_SOURCES, desc="decode_quality"):
            run = args.runs / f"{Path(args.adapter).name}_{'-'.join(formats)}_{args.limit}x{args.tokens}p{args.prompt}"
            path = run / f"{source}.json"
            if not path.exists():
                texts = token_samples(tokenizer, source, args.limit, args.tokens)
                texts = [ids for ids in texts if ids.shape[1] > args.prompt + 1]
                write_json(score_source(models, texts, args.prompt), path)
            scores[source] = json.loads(path.read_text())
    result = {
        "adapter": portable_path(args.adapter),
        "limit": args.limit,
        "tokens": args.tokens,
        "prompt": args.prompt,
        "compare": compare(scores),
    }
    write_json(result, args.json)
    plot(result, figure_beside(args.json, args.plot))
    for fmt, row in result["compare"].items():
        low = min(v for r in row["agreement"].values() for v in r.values())
        high_kl = max(v for r in row["kl"].values() for v in r.values())
        print(
            f"{fmt}: worst decode perplexity {100 * row['worst']:+.2f}% (target {row['target']}), KL <= {high_kl:.4f}, "
            f"top-1 agreement >= {low:.1%}"
        )


if __name__ == "__main__":
    main()
