"""Distillation data: examples -> token sequences with target labels -> deterministic global batches.

A sequence is `input_ids` plus `labels` of the same length (-100 = not a target, Hugging Face convention: the
logits at position t are scored when `labels[t + 1] != -100`). Plain text is packed into `max_length` chunks
(every token a target); a chat is one sequence rendered with the tokenizer's chat template, and with
`assistant_only` only the assistant turns are targets.

Assistant spans come from rendering prefixes of the conversation (templates without `{% generation %}` markers,
such as SmolLM2's, give no other way): the tokens of `render(messages[:i], add_generation_prompt=True)` and of
`render(messages[:i+1])` must be prefixes of the tokens of the whole conversation (the prefix property); then
the assistant turn i is exactly the tokens between the two. A template that breaks the property is an error.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator, Mapping, Sequence

import torch

from swiftkv.corpora import load_examples

IGNORE = -100


@dataclasses.dataclass
class TokenSequence:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not a target

    @property
    def num_targets(self) -> int:
        """Logit positions scored: t with labels[t + 1] != IGNORE (the first token is never predicted)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclasses.dataclass
class DataStats:
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    targets: int = 0
    truncated: int = 0  # chats cut at max_length
    dropped: int = 0  # chats left without targets after truncation


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(
    tokenizer, messages: list[dict], assistant_only: bool, where: str = "chat", max_length: int | None = None
) -> TokenSequence:
    """Render a conversation with the chat template; label assistant tokens (or every token).

    The whole conversation is tokenized once (with character offsets). For assistant turn i, the renderings of
    `messages[:i]` + generation prompt and of `messages[:i+1]` must be prefixes of the whole rendering, ending
    on token boundaries of its tokenization (the prefix property); the tokens between them are the targets.
    Turns that start beyond `max_length` tokens are not rendered (the sequence is cut there anyway).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: the tokenizer has no chat template, so chat examples cannot be rendered.")
    text = _render(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
    ids = encoded["input_ids"]
    if not assistant_only:
        return TokenSequence(ids, list(ids))
    token_end = {end: i + 1 for i, (_, end) in enumerate(encoded["offset_mapping"])}  # char end -> tokens so far
    token_end[0] = 0
    horizon = len(ids) if max_length is None else min(len(ids), max_length)
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        bounds = []
        for prefix, what in (
            (_render(tokenizer, messages[:turn], generation_prompt=True), "the prompt before"),
            (_render(tokenizer, messages[: turn + 1]), "the conversation through"),
        ):
            if not text.startswith(prefix) or len(prefix) not in token_end:
                raise ValueError(
                    f"{where}: the chat template breaks the prefix property at assistant turn {turn}: {what} that "
                    "turn does not render as a token-aligned prefix of the whole conversation, so assistant tokens "
                    "cannot be located. Use assistant_only=false, or a template that renders turns in order."
                )
            bounds.append(token_end[len(prefix)])
        start, end = bounds
        labels[start:end] = ids[start:end]
        if end >= horizon:
            break
    return TokenSequence(ids, labels)


def _text_ids(tokenizer, text: str) -> list[int]:
    """A plain text's token ids followed by EOS (the separator when texts are packed together)."""
    eos = tokenizer.eos_token_id
    return tokenizer(text)["input_ids"] + ([eos] if eos is not None else [])


def pack_text(tokenizer, texts: Sequence[str], max_length: int) -> list[TokenSequence]:
    """Concatenate texts (each followed by EOS) and cut into `max_length` chunks; every token is a target."""
    stream = [token for text in texts for token in _text_ids(tokenizer, text)]
    chunks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [TokenSequence(chunk, list(chunk)) for chunk in chunks if len(chunk) >= 2]


def build_sequences(
    tokenizer,
    sources: Sequence[str | os.PathLike],
    max_length: int,
    assistant_only: bool,
    split: str = "train",
    max_examples: int | None = None,
) -> tuple[list[TokenSequence], DataStats]:
    """Every source's examples (in order) as sequences of at most `max_length` tokens, with targets."""
    sequences: list[TokenSequence] = []
    stats = DataStats()
    for source in sources:
        examples = load_examples(source, split=split)[:max_examples]
        stats.examples += len(examples)
        chats = [ex["messages"] for ex in examples if "messages" in ex]
        texts = [ex["text"] for ex in examples if "text" in ex]
        if assistant_only and chats and not any(m.get("role") == "assistant" for chat in chats for m in chat):
            raise ValueError(
                f"Data source {str(source)!r} has {len(chats)} chat examples but no assistant turn, so with "
                "assistant_only=true there is nothing to learn from; set assistant_only=false or fix the roles "
                "(expected 'assistant')."
            )
        found = pack_text(tokenizer, texts, max_length) if texts else []
        for number, messages in enumerate(chats, 1):
            seq = encode_chat(tokenizer, messages, assistant_only, f"{source} chat {number}", max_length)
            if len(seq.input_ids) > max_length:
                stats.truncated += 1
                seq = TokenSequence(seq.input_ids[:max_length], seq.labels[:max_length])
            if seq.num_targets == 0:
                stats.dropped += 1
                continue
            found.append(seq)
        if not found:
            raise ValueError(f"Data source {str(source)!r} gives no sequence with targets (split={split!r}).")
        sequences += found
    stats.sequences = len(sequences)
    stats.tokens = sum(len(s.input_ids) for s in sequences)
    stats.targets = sum(s.num_targets for s in sequences)
    return sequences, stats


def _source_sequences(
    tokenizer, source: str, max_length: int, assistant_only: bool, split: str, seed: int
) -> Iterator[TokenSequence]:
    """A source's sequences in a seeded random order of its examples, cycling (reshuffled) without end.

    Plain texts are packed like `pack_text` (each followed by EOS, cut at `max_length`); chats longer than
    `max_length` are cut; sequences without targets are skipped.
    """
    examples = load_examples(source, split=split)
    rng = random.Random(f"{seed}:{source}")
    stream: list[int] = []
    while True:
        produced, buffered = 0, len(stream)
        for index in rng.sample(range(len(examples)), len(examples)):
            example = examples[index]
            if "text" in example:
                stream += _text_ids(tokenizer, example["text"])
                while len(stream) >= max_length:
                    produced += 1
                    yield TokenSequence(stream[:max_length], stream[:max_length])
                    stream = stream[max_length:]
                continue
            seq = encode_chat(tokenizer, example["messages"], assistant_only, f"{source} chat {index}", max_length)
            seq = TokenSequence(seq.input_ids[:max_length], seq.labels[:max_length])
            if seq.num_targets > 0:
                produced += 1
                yield seq
        if not produced and len(stream) == buffered:  # a whole pass added nothing: it never will
            raise ValueError(
                f"Data source {source!r} gives no sequence with targets (split={split!r}, max_length={max_length})."
            )


def build_mixture(
    tokenizer,
    weights: Mapping[str, float],
    tokens: int,
    max_length: int,
    assistant_only: bool,
    split: str = "train",
    seed: int = 0,
) -> tuple[list[TokenSequence], dict[str, int]]:
    """About `tokens` tokens drawn from the sources in proportion to `weights` (token shares), and the tokens
    drawn per source.

    Each source contributes sequences (in its own seeded order) until its share `tokens * w / sum(w)` is reached,
    so the mix is exact up to one sequence per source and the same for a given seed whatever the other sources
    are. A source smaller than its share repeats (reshuffled).
    """
    total_weight = sum(weights.values())
    sequences: list[TokenSequence] = []
    drawn: dict[str, int] = {}
    for source, weight in weights.items():
        quota = tokens * weight / total_weight
        drawn[source] = 0
        stream = _source_sequences(tokenizer, source, max_length, assistant_only, split, seed)
        while drawn[source] < quota:
            seq = next(stream)
            sequences.append(seq)
            drawn[source] += len(seq.input_ids)
    return sequences, drawn


@dataclasses.dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 = token, 0 = padding
    labels: torch.Tensor  # [B, T] IGNORE on padding and non-targets


def collate(sequences: Sequence[TokenSequence], pad_id: int) -> MicroBatch:
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        ids[row, :n] = torch.tensor(seq.input_ids)
        labels[row, :n] = torch.tensor(seq.labels)
        mask[row, :n] = 1
    return MicroBatch(ids, mask, labels)


class BatchPlan:
    """Which sequences every process uses at every optimizer step: a pure function of (seed, step).

    Step s reads the global batch `perm_e[k*G : (k+1)*G]` (e = epoch, k = s mod steps per epoch, G = micro batch
    x accumulation x world size, perm_e a seeded permutation); process r takes its contiguous G/world slice, cut
    into micro-batches. The data position is therefore just the step number: resuming needs nothing else, and
    the global batch is the same for any number of processes with the same G.
    """

    def __init__(
        self, sequences: Sequence[TokenSequence], micro_batch_size: int, accumulation: int, world: int, seed: int
    ):
        self.sequences, self.micro, self.accumulation, self.world, self.seed = (
            sequences,
            micro_batch_size,
            accumulation,
            world,
            seed,
        )
        self.global_batch = micro_batch_size * accumulation * world
        self.steps_per_epoch = len(sequences) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"The data has {len(sequences)} sequences, fewer than one global batch of {self.global_batch} "
                f"(micro_batch_size x gradient_accumulation_steps x processes); add data or lower them."
            )
        self._epoch, self._perm = None, None

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.sequences), generator=generator).tolist()
        return self._perm[k * self.global_batch : (k + 1) * self.global_batch]

    def counts(self, step: int) -> tuple[int, int]:
        """(target logits, tokens) of the whole global batch: the normalisers of the KL and the hidden MSE."""
        chosen = [self.sequences[i] for i in self.global_indices(step)]
        return sum(s.num_targets for s in chosen), sum(len(s.input_ids) for s in chosen)

    def micro_batches(self, step: int, rank: int, pad_id: int) -> list[MicroBatch]:
        per_rank = self.micro * self.accumulation
        mine = self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]
        return [
            collate([self.sequences[i] for i in mine[j : j + self.micro]], pad_id)
            for j in range(0, per_rank, self.micro)
        ]
