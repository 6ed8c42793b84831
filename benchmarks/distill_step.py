"""Distillation step time: shared prefix (layers < L once, target-only logits) vs the naive step.

Naive = teacher forward (swiftkv off, no grad) + student forward (swiftkv on) + backward, whole-model calls with
every position's logits, as a straightforward implementation does. Shared = `swiftkv.distill.loss`: layers < L
run once for both, then the teacher and student branches, and only target positions go through the LM head.
A middle variant (shared prefix, all logits) separates the two savings. Same loss value and gradients (tests).

Timings are interleaved (naive, shared, ... per repetition) on one model object and one real micro-batch of
chat data (assistant-only targets). Prints a few lines and writes JSON.

`--weights int8 int4` times the recipe's step with the frozen Linear layers in those formats (`swiftkv distill
weights=F`: teacher and student share them), float32 activations, and measures the same teacher fidelity; every
column also gives its frozen tensors' bytes.

`--dtypes float32 bfloat16` also times the recipe's step ("shared") with the frozen weights in bf16, as
`swiftkv distill dtype=bfloat16` runs it (its own model object, autocast, trainable weights float32), interleaved
with the others, and measures what bf16 does to the teacher: KL(fp32 teacher || bf16 teacher) per token,
perplexity ratio and top-1 agreement of the base model (SwiftKV off) on every position of the batch.

    python benchmarks/distill_step.py --model default -L 15 -g 1 --seq-len 512 --threads 2 --json distill_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from swiftkv.bench import machine_info, threads_label
from swiftkv.config import DTYPES
from swiftkv.conversion import convert
from swiftkv.distill.loss import distill_loss, kl_sum, shared_prefix_forward
from swiftkv.distill.recipe import format_frozen_layers, freeze_all_but_swiftkv, frozen_dtype_autocast
from swiftkv.evaluate.scoring import BASE, final_hidden, logits_of, summarize_text, token_stats
from swiftkv.files import portable_path
from swiftkv.loading import load_model
from swiftkv.modeling.weights import FORMATS
from swiftkv.sequences import collate, encode_chat

MODES = ("naive", "shared_all_logits", "shared")


def chat_batch(tokenizer, source: str, seq_len: int, micro_batch: int):
    """`micro_batch` held-out-free training conversations of at least `seq_len` tokens, cut to exactly `seq_len`."""
    from swiftkv.corpora import load_examples

    sequences = []
    for example in load_examples(source, split="train"):
        seq = encode_chat(tokenizer, example["messages"], assistant_only=True, max_length=seq_len)
        if len(seq.input_ids) >= seq_len:
            seq.input_ids, seq.labels = seq.input_ids[:seq_len], seq.labels[:seq_len]
            sequences.append(seq)
        if len(sequences) == micro_batch:
            return collate(sequences, tokenizer.pad_token_id or 0)
    raise ValueError(f"{source} has fewer than {micro_batch} conversations of {seq_len} tokens")


def step(model, batch, mode: str, hidden_layer: int, n_targets: int, n_tokens: int) -> float:
    """One forward + backward; returns the loss."""
    if mode == "shared_all_logits":
        student, teacher, h_s, h_t = shared_prefix_forward(model, batch, hidden_layer, all_logits=True)
        loss = kl_sum(student, teacher, 2.0) / n_targets + ((h_s - h_t) ** 2).mean(-1).sum() / n_tokens
    else:
        terms = distill_loss(
            model,
            batch,
            temperature=2.0,
            hidden_weight=1.0,
            hidden_layer=hidden_layer,
            num_targets=n_targets,
            num_tokens=n_tokens,
            shared_prefix=mode == "shared",
        )
        loss = terms.total
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def student(name: str, dtype: str, num_key_value_layers: int, group_size: int, device: str, weights: str = "float32"):
    """(model, tokenizer) as the recipe trains it: frozen weights in `dtype`, their Linear layers in format `weights`,
    `*_swiftkv` float32 and trainable."""
    base, tokenizer = load_model(name, dtype)
    model = convert(base, num_key_value_layers, group_size).eval()
    format_frozen_layers(model, weights, recipe_start=True)
    model = model.to(device)
    freeze_all_but_swiftkv(model)
    return model, tokenizer


def frozen_bytes(model) -> int:
    """Bytes of the tensors that do not train (frozen parameters and buffers: float weights or blocks)."""
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def teacher_fidelity(reference, other, batch) -> dict:
    """{tokens, base: {ppl}, swiftkv: {ppl}, kl, agreement} of the base model (SwiftKV off) in two dtypes, on
    every position of `batch`: "base" is `reference`, "swiftkv" is `other` (KL(reference || other) per token)."""
    mask = batch.attention_mask[:, 1:].bool()  # [B, T-1]: positions with a next token to predict
    logits = [
        logits_of(model, final_hidden(model, batch.input_ids, batch.attention_mask, [BASE])[BASE][:, :-1][mask])
        for model in (reference, other)
    ]  # each [tokens, V]
    return summarize_text(token_stats(*logits, batch.input_ids[:, 1:][mask]))


def theoretical_ratio(config, target_fraction: float) -> dict:
    """Matmul FLOPs (2 per weight per token; attention scores ignored) of shared / naive.

    Backward through a frozen layer computes input gradients only (~1x its forward). Naive: teacher N layers +
    student N layers + backward N-L, LM head 3x on every position. Shared: L + teacher N-L + student N-L +
    backward N-L, LM head 3x on target positions only.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d, q, kv = config.hidden_size, config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = 2 * d * q + 2 * d * kv + 3 * d * config.intermediate_size
    head = d * config.vocab_size
    n, late = config.num_hidden_layers, config.num_hidden_layers - config.num_key_value_layers
    naive = (2 * n + late) * layer + 3 * head
    shared_all = (n + 2 * late) * layer + 3 * head
    shared = (n + 2 * late) * layer + 3 * head * target_fraction
    return {"shared_all_logits": shared_all / naive, "shared": shared / naive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("-L", "--num-key-value-layers", type=int, default=15)
    parser.add_argument("-g", "--key-value-group-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--data", default="chitchat")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        choices=list(DTYPES),
        help="frozen-weight dtypes: float32 runs every mode; each other dtype runs the recipe's step ('shared')",
    )
    parser.add_argument(
        "--weights",
        nargs="*",
        default=[],
        choices=[fmt for fmt in FORMATS if fmt != "float32"],
        help="frozen Linear layers' formats (distill weights=F): each runs the recipe's step ('shared') in float32",
    )
    parser.add_argument("--json", type=Path, default=Path("distill_step.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = student(args.model, "float32", args.num_key_value_layers, args.key_value_group_size, args.device)
    others = {
        dtype: student(args.model, dtype, args.num_key_value_layers, args.key_value_group_size, args.device)[0]
        for dtype in args.dtypes
        if dtype != "float32"
    }
    formats = {
        fmt: student(args.model, "float32", args.num_key_value_layers, args.key_value_group_size, args.device, fmt)[0]
        for fmt in args.weights
    }
    batch = chat_batch(tokenizer, args.data, args.seq_len, args.micro_batch)
    batch = type(batch)(*(t.to(args.device) for t in (batch.input_ids, batch.attention_mask, batch.labels)))
    n_targets = int((batch.labels[:, 1:] != -100).sum())
    n_tokens = int(batch.attention_mask.sum())
    hidden_layer = model.config.num_hidden_layers - 1
    # column name -> (model, its step mode, its frozen weights' dtype)
    columns = {mode: (model, mode, torch.float32) for mode in MODES}
    columns |= {f"shared_{dtype}": (other, "shared", DTYPES[dtype]) for dtype, other in others.items()}
    columns |= {f"shared_weights_{fmt}": (other, "shared", torch.float32) for fmt, other in formats.items()}

    def timed(column: str) -> tuple[float, float]:
        net, mode, dtype = columns[column]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with frozen_dtype_autocast(torch.device(args.device).type, dtype):
            loss = step(net, batch, mode, hidden_layer, n_targets, n_tokens)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss

    for column in columns:  # warm-up
        timed(column)
    times: dict[str, list[float]] = {column: [] for column in columns}
    losses = {}
    for _ in range(args.reps):
        for column in columns:
            seconds, losses[column] = timed(column)
            times[column].append(seconds)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    theory = theoretical_ratio(model.config, n_targets / n_tokens)
    result = {
        "model": portable_path(args.model),
        "num_key_value_layers": args.num_key_value_layers,
        "key_value_group_size": args.key_value_group_size,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "target_fraction": n_targets / n_tokens,
        "machine": machine_info(args.threads, args.device),
        "times_s": times,
        "median_s": median,
        "ratio_vs_naive": {column: median[column] / median["naive"] for column in columns},
        "theoretical_ratio": theory,
        "tokens_per_s": {column: n_tokens / median[column] for column in columns},
        "loss": losses,
        "frozen_bytes": {column: frozen_bytes(net) for column, (net, _, _) in columns.items()},
        "teacher_vs_float32": {
            name: teacher_fidelity(model, other, batch) for name, other in (others | formats).items()
        },
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.model} L={args.num_key_value_layers} g={args.key_value_group_size}: {args.micro_batch}x{args.seq_len} "
        f"tokens ({result['target_fraction']:.0%} targets), {threads_label(args.threads)}, median of {args.reps}"
    )
    for column in columns:
        theory_note = f" (FLOPs theory {theory[column]:.2f})" if column in theory else ""
        print(
            f"  {column:<18} {median[column] * 1000:7.0f} ms/step  {result['tokens_per_s'][column]:6.0f} tok/s  "
            f"ratio {result['ratio_vs_naive'][column]:.3f}{theory_note}  loss {losses[column]:.5f}  "
            f"frozen {result['frozen_bytes'][column] / 2**20:.0f} MiB"
        )
    for name, fidelity in result["teacher_vs_float32"].items():
        ratio = fidelity["swiftkv"]["ppl"] / fidelity["base"]["ppl"]
        print(
            f"  teacher {name} vs float32 on {fidelity['tokens']} tokens: KL {fidelity['kl']:.5f}/token, "
            f"perplexity ratio {ratio:.4f}, top-1 agreement {fidelity['agreement']:.1%}"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
