"""Quality of a SwiftKV model against its own teacher (the same checkpoint with SwiftKV off).

`evaluate(model, tokenizer, tasks)` runs perplexity / KL / agreement on held-out text, multiple-choice accuracy
by log-likelihood (MMLU, BIG-bench) and GSM8K exact match through the real fast-prefill `generate`, for both
modes of one model object. `swiftkv.evaluate.harness` adapts the model to lm-evaluation-harness.
"""

from swiftkv.evaluate.tasks import DEFAULT_TASKS, EvalOptions, evaluate, format_table, valid_task_names

__all__ = ["DEFAULT_TASKS", "EvalOptions", "evaluate", "format_table", "valid_task_names"]
