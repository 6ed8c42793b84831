"""A logits processor that changes no logits: its `validate_params` refuses prompt logprobs under fast prefill.

vLLM runs `validate_params` of every configured logits processor when a request is admitted (offline `LLM` and
`vllm serve` alike), before the engine could fail on it.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from swiftkv_vllm.configs import PROMPT_LOGPROBS_ERROR


class SwiftKVPromptLogprobsGuard(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if sampling_params.prompt_logprobs is not None:
            raise VLLMValidationError(PROMPT_LOGPROBS_ERROR, parameter="prompt_logprobs")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
