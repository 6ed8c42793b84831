"""lm-evaluation-harness adapter: lm_eval's Hugging Face wrapper (HFLM) around a SwiftKV model object.

Loglikelihood requests call `model(ids).logits`, the full forward (every token scored correctly); generation
requests call `model.generate`, the fast-prefill path. `swiftkv=False` runs the same object as the teacher.

    pip install 'lm-eval>=0.4'          # optional; swiftkv does not depend on it
    python -m swiftkv.evaluate.harness run --model swiftkv \\
        --model_args pretrained=default,num_key_value_layers=15,swiftkv=True \\
        --include_path MY_TASKS/ --tasks my_task --limit 100   # lm_eval's own CLI, our model registered

`pretrained` is anything `swiftkv eval` accepts ('default', a checkpoint dir, a .gguf); `num_key_value_layers` /
`skip` / `key_value_group_size` convert a base model on the fly (undistilled), `adapter=DIR` applies a distilled
adapter. In Python: `SwiftKVLM(pretrained=model, tokenizer=tokenizer)` wraps a model you already hold.
"""

from __future__ import annotations

import sys

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as error:  # lm_eval missing, or one of its own dependencies
    raise ModuleNotFoundError(
        f"The lm-evaluation-harness adapter needs the `lm_eval` package ({error}). Install it with: "
        "pip install 'lm-eval>=0.4'  (swiftkv's own `swiftkv eval` tasks do not need it)."
    ) from error

from swiftkv.loading import load, origin
from swiftkv.modes import is_swiftkv, set_swiftkv


@register_model("swiftkv")
class SwiftKVLM(HFLM):
    """HFLM over a SwiftKV model; `swiftkv` picks the student (True) or the teacher (False) of one model object."""

    def __init__(
        self,
        pretrained="default",
        tokenizer=None,
        swiftkv: bool = True,
        num_key_value_layers: int | None = None,
        skip: float | None = None,
        key_value_group_size: int = 1,
        adapter: str | None = None,
        dtype: str = "float32",
        **kwargs,
    ):
        if isinstance(pretrained, str):
            name = pretrained
            layout = {"num_key_value_layers": num_key_value_layers, "skip": skip}
            pretrained, loaded_tokenizer = load(
                name, adapter=adapter, key_value_group_size=int(key_value_group_size), dtype=dtype, **layout
            )
            tokenizer = tokenizer or loaded_tokenizer
            converted = num_key_value_layers is not None or skip is not None
            print(f"swiftkv: {origin(name, adapter, pretrained, converted)}", file=sys.stderr)
        if tokenizer is None:
            raise ValueError("Pass tokenizer= with a model object (SwiftKVLM(pretrained=model, tokenizer=tok)).")
        if is_swiftkv(pretrained):
            set_swiftkv(pretrained, bool(swiftkv))
        elif swiftkv:
            print("swiftkv: not a SwiftKV model; evaluating it as the base model", file=sys.stderr)
        kwargs.setdefault("device", str(pretrained.device))
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)


def main() -> None:
    """lm_eval's command line with the `swiftkv` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
