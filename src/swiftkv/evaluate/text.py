"""Perplexity, KL(teacher || student) and top-1 agreement on held-out text (full forward, every token scored)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swiftkv.corpora import NAMED_SOURCES, as_text, load_examples
from swiftkv.evaluate.scoring import add_sums, sequence_stats, summarize_text


def text_examples(source: str, limit: int | None) -> list[str]:
    """Texts of a named source's fixed held-out split (in corpus order), or of every record of a local file."""
    split = "heldout" if source in NAMED_SOURCES else "all"
    texts = [as_text(example) for example in load_examples(source, split=split)]
    return texts[:limit] if limit is not None else texts


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
    sums: dict[str, float] = {}
    texts = text_examples(source, limit)
    used = 0
    for text in tqdm(texts, desc=f"ppl:{source}", leave=False):
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]  # [1, T]
        if ids.shape[1] < 2:
            continue
        add_sums(sums, sequence_stats(model, ids.to(model.device), modes))
        used += 1
    if used == 0:
        raise ValueError(f"Text source {source!r} has no example with at least 2 tokens to score.")
    return {"examples": used, **summarize_text(sums)}
