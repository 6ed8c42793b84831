"""Perplexity, KL(teacher || student) and top-1 agreement on held-out text (full forward, every token scored).

`run_text_task` scores one source; `run_domains` scores every source of the default distillation mixture plus the
domains kept out of training, and reports each one and the token-weighted overall.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swiftkv.corpora import DOMAIN_SOURCES, UNSEEN_SOURCES, as_text, eval_split, load_examples
from swiftkv.evaluate.scoring import BASE, MODES, SWIFTKV, add_sums, sequence_stats, summarize_text, variants_stats
from swiftkv.modes import is_swiftkv


def token_samples(tokenizer, source: str, limit: int | None, max_tokens: int) -> list[torch.Tensor]:
    """Token ids [1, T<=max_tokens] of the first `limit` examples (with >= 2 tokens) of `source`'s evaluation
    split (`eval_split`), in corpus order; chats rendered with the chat template (`as_text`)."""
    samples = []
    for example in load_examples(source, split=eval_split(source)):
        ids = tokenizer(as_text(example, tokenizer), return_tensors="pt")["input_ids"][:, :max_tokens]
        if ids.shape[1] >= 2:
            samples.append(ids)
        if len(samples) == limit:
            break
    if not samples:
        raise ValueError(f"Text source {source!r} has no example with at least 2 tokens to score.")
    return samples


def score_samples(
    model: PreTrainedModel, samples: Sequence[torch.Tensor], modes: Sequence[str], desc: str
) -> dict[str, float]:
    """Token statistics (`sequence_stats`) summed over samples, with their count as `examples`."""
    sums: dict[str, float] = {"examples": len(samples)}
    for ids in tqdm(samples, desc=desc, leave=False):
        add_sums(sums, sequence_stats(model, ids.to(model.device), modes))
    return sums


def run_text_task(
    model: PreTrainedModel,
    tokenizer,
    source: str,
    modes: Sequence[str],
    limit: int | None = None,
    max_tokens: int = 1024,
) -> dict[str, object]:
    """{examples, tokens, base: {ppl}, swiftkv: {ppl}, kl, agreement} over the first `max_tokens` of each text.

    Perplexity is token-weighted over all examples: exp(sum of NLL / number of scored tokens); the first token of
    each text has no context and is not scored.
    """
    sums = score_samples(model, token_samples(tokenizer, source, limit, max_tokens), modes, f"ppl:{source}")
    return {"examples": sums.pop("examples"), **summarize_text(sums)}


def run_domains(
    model: PreTrainedModel,
    tokenizer,
    modes: Sequence[str],
    limit: int | None = 32,
    max_tokens: int = 1024,
    sources: Sequence[str] = DOMAIN_SOURCES,
) -> dict[str, object]:
    """Every domain source scored like `run_text_task`, plus `ppl_ratio` (SwiftKV / base); `overall` is the
    token-weighted summary of all sources but the unseen domains (UNSEEN_SOURCES: reported, not pooled)."""
    if set(modes) == set(MODES) and is_swiftkv(model):
        return run_domains_variants({SWIFTKV: model}, tokenizer, limit, max_tokens, sources)[SWIFTKV]
    return _domains_table(
        {
            source: score_samples(model, token_samples(tokenizer, source, limit, max_tokens), modes, source)
            for source in tqdm(sources, desc="domains", leave=False)
        }
    )


def run_domains_variants(
    variants: dict[str, PreTrainedModel],
    tokenizer,
    limit: int | None = 32,
    max_tokens: int = 1024,
    sources: Sequence[str] = DOMAIN_SOURCES,
) -> dict[str, dict]:
    """{name: `run_domains` table} of SwiftKV variants of ONE base model, scored in one pass (`variants_stats`)."""
    sums: dict[str, dict[str, dict]] = {name: {} for name in variants}  # name -> source -> sums
    for source in tqdm(sources, desc="domains", leave=False):
        samples = token_samples(tokenizer, source, limit, max_tokens)
        for name in variants:
            sums[name][source] = {"examples": len(samples)}
        for ids in tqdm(samples, desc=f"domain {source}", leave=False):
            for name, part in variants_stats(variants, ids.to(next(iter(variants.values())).device)).items():
                add_sums(sums[name][source], part)
    return {name: _domains_table(per_source) for name, per_source in sums.items()}


def _domains_table(per_source_sums: dict[str, dict]) -> dict[str, object]:
    rows: dict[str, dict] = {}
    pooled: dict[str, float] = {}
    for source, sums in per_source_sums.items():
        examples = sums.pop("examples", None)
        if source not in UNSEEN_SOURCES:
            add_sums(pooled, sums)
        rows[source] = _with_ratio(
            {"examples": examples, "split": eval_split(source), "unseen": source in UNSEEN_SOURCES}
            | summarize_text(sums)
        )
    return {"sources": rows, "overall": _with_ratio(summarize_text(pooled)) if pooled else None}


# The 25%-skip quality targets (issue 16): every trained-on domain within +3% perplexity of the base, and the
# overall top-1 agreement with the base >= 90%. Unseen domains are reported beside them, not judged.
MAX_PPL_INCREASE = 0.03
MIN_AGREEMENT = 0.90


def quality_shortfalls(
    table: dict, max_ppl_increase: float = MAX_PPL_INCREASE, min_agreement: float = MIN_AGREEMENT
) -> list[str]:
    """What keeps a per-domain table (`run_domains`) from the quality targets, e.g. ['wikipedia +6.6%']; [] = met."""
    misses = [
        f"{source} {row['ppl_ratio'] - 1:+.1%}"
        for source, row in table["sources"].items()
        if not row.get("unseen") and row["ppl_ratio"] > 1 + max_ppl_increase
    ]
    if table["overall"]["agreement"] < min_agreement:
        misses.append(f"agreement {table['overall']['agreement']:.1%}")
    return misses


def _with_ratio(row: dict) -> dict:
    if BASE in row and SWIFTKV in row:
        row["ppl_ratio"] = row[SWIFTKV]["ppl"] / row[BASE]["ppl"]
    return row


def format_domains(result: dict) -> list[str]:
    """The per-domain table: one line per source, then the overall line."""
    header = f"{'domain':<22}{'texts':>6}{'tokens':>8}{'base ppl':>10}{'swiftkv':>10}{'ratio':>8}{'KL':>8}{'agree':>8}"
    lines = [header, "-" * len(header)]
    rows = list(result["sources"].items()) + ([("overall", result["overall"])] if result["overall"] else [])
    for name, row in rows:
        label = f"{name} (unseen)" if row.get("unseen") else name
        cells = [f"{row[mode]['ppl']:>10.3f}" if mode in row else f"{'-':>10}" for mode in (BASE, SWIFTKV)]
        ratio = f"{row['ppl_ratio'] - 1:>+8.1%}" if "ppl_ratio" in row else f"{'-':>8}"
        kl = f"{row['kl']:>8.4f}" if "kl" in row else f"{'-':>8}"
        agree = f"{row['agreement']:>8.1%}" if "agreement" in row else f"{'-':>8}"
        lines.append(f"{label:<22}{row.get('examples', ''):>6}{row['tokens']:>8}{''.join(cells)}{ratio}{kl}{agree}")
    return lines
