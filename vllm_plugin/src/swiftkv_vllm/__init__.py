"""swiftkv-vllm: serve SwiftKV checkpoints (`llama_swiftkv`, `mistral_swiftkv`, `qwen2_swiftkv`, `qwen3_swiftkv`)
with stock vLLM 0.32: prompt tokens skip layers >= L (vLLM's KV-sharing fast prefill) and each AcrossKV group keeps
one KV-cache entry.

Installed, it registers itself in every vLLM process through the `vllm.general_plugins` entry point; nothing to
import. `register()` is idempotent.
"""

from swiftkv_vllm.plugin import FAST_PREFILL_ENV, register

__all__ = ["FAST_PREFILL_ENV", "register"]
__version__ = "0.1.0"
