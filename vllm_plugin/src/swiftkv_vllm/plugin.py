"""Registration with vLLM (run by the `vllm.general_plugins` entry point in every vLLM process).

- the four config classes with transformers' `AutoConfig` (`llama_swiftkv`, ...), so vLLM reads config.json;
- the four architectures with vLLM's `ModelRegistry` (lazily: the model module is imported when a model loads);
- a config hook per architecture (vLLM's per-architecture `verify_and_update_config`, run while the engine's
  config is built) that turns on `cache_config.kv_sharing_fast_prefill` for SwiftKV checkpoints, so prompt tokens
  skip layers >= L with no extra flag. `SWIFTKV_VLLM_FAST_PREFILL=0`, or the engine argument
  `--hf-overrides '{"swiftkv_fast_prefill": false}'`, keeps it off (every token runs every layer: exact prompt
  logprobs, no prefill saving).

Tested on vLLM 0.32.x only (it imports vLLM internals that change between minor versions): `register` refuses
other versions. The hook refuses a tensor/pipeline-parallel layout the model cannot split before any weight loads.
"""

from __future__ import annotations

import os

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from transformers import AutoConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

from swiftkv_vllm.configs import (
    FAMILIES,
    FAST_PREFILL_ENV,
    FAST_PREFILL_OVERRIDE,
    SwiftKVLayout,
    check_parallel_layout,
    check_stored_weights,
)

# Under "vllm." so vLLM's handler prints these lines with its level, time and source (it configures only the "vllm"
# logger; a "swiftkv_vllm" logger would reach Python's last-resort handler: warnings as bare text, no INFO at all).
logger = init_logger(f"vllm.{__name__}")

SUPPORTED_VLLM = ">=0.32,<0.33"
# Drafters that propose from token ids alone: they never read the rows fast prefill skips. The others read the
# target's hidden states (EAGLE-style: vLLM refuses fast prefill with them; medusa, mlp_speculator,
# extract_hidden_states) or, as draft_model, add attention layers after the target's, which end the trailing run of
# KV-sharing layers that vLLM's V1 runner gives fast-prefill metadata (so nothing would be skipped).
FAST_PREFILL_DRAFTERS = ("ngram", "ngram_gpu", "suffix")

_registered = False


def check_vllm_version(version: str) -> None:
    """Raise unless `version` (vllm.__version__; "0.32.0+cpu" counts as 0.32.0) is in SUPPORTED_VLLM.

    Pre-releases and dev builds of a supported minor version pass: the internals follow the minor version.
    """
    try:
        supported = SpecifierSet(SUPPORTED_VLLM).contains(Version(version), prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise RuntimeError(
            f"swiftkv-vllm supports vLLM {SUPPORTED_VLLM} (it uses vLLM internals that change between minor "
            f"versions), but vLLM {version} is installed: install a vLLM in that range, or uninstall swiftkv-vllm to "
            "run this vLLM without SwiftKV models."
        )


def register() -> None:
    """Idempotent: vLLM calls general plugins once per process, tests and scripts may call it again."""
    global _registered
    if _registered:
        return
    import vllm

    # vLLM calls general plugins without catching their errors: an unsupported version stops vLLM here, at start.
    check_vllm_version(vllm.__version__)
    from vllm import ModelRegistry

    for config_class, architecture in FAMILIES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"swiftkv_vllm.model:{architecture}")
        MODELS_CONFIG_MAP.setdefault(architecture, SwiftKVConfigHook)
    _registered = True


def fast_prefill_requested(hf_config) -> bool:
    """False when the user turned SwiftKV's fast prefill off (environment or hf_overrides), else True."""
    env = os.environ.get(FAST_PREFILL_ENV, "1").strip().lower()
    if env not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{FAST_PREFILL_ENV}={env!r} is invalid: use 1 (default, fast prefill on) or 0 (off).")
    return env not in ("0", "false", "off") and bool(getattr(hf_config, FAST_PREFILL_OVERRIDE, True))


class SwiftKVConfigHook(VerifyAndUpdateConfig):
    """Turns on vLLM's KV-sharing fast prefill for SwiftKV checkpoints, and guards prompt logprobs."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        check_parallel_layout(hf_config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        check_stored_weights(hf_config)
        layout = SwiftKVLayout.of(hf_config)
        cache_config = vllm_config.cache_config
        if not layout.skips:
            logger.warning(
                "SwiftKV: this %s checkpoint runs as its base model (every token through every layer, no prefill "
                "skipping, %d KV-cache entries): %s.",
                hf_config.model_type,
                layout.num_layers,
                base_model_reason(hf_config),
            )
            return
        if not cache_config.kv_sharing_fast_prefill:
            if not fast_prefill_requested(hf_config):
                logger.info("SwiftKV: fast prefill off by request; every prompt token runs every layer.")
                return
            speculative = vllm_config.speculative_config
            if speculative is not None and speculative.method not in FAST_PREFILL_DRAFTERS:
                logger.warning(
                    "SwiftKV: fast prefill off with the %r drafter, so prompt tokens run every layer: it reads the "
                    "target model's hidden states, which fast prefill leaves unset for prompt tokens (vLLM refuses "
                    "fast prefill with EAGLE-style drafters), or adds attention layers after the target's (a draft "
                    "model), which end the run of layers vLLM's V1 runner lets prompt tokens skip. Drafters that "
                    "keep it on: %s.",
                    speculative.method,
                    ", ".join(FAST_PREFILL_DRAFTERS),
                )
                return
            cache_config.kv_sharing_fast_prefill = True
        logger.warning(
            "SwiftKV: fast prefill on (prompt tokens stop after layer %d of %d; %d KV-cache entries for %d layers). "
            "Requests for prompt logprobs are refused; to serve them start with %s=0.",
            layout.num_key_value_layers,
            layout.num_layers,
            layout.cache_entries,
            layout.num_layers,
            FAST_PREFILL_ENV,
        )
        _guard_prompt_logprobs(vllm_config)
        _select_cudagraph_mode(vllm_config)


def base_model_reason(hf_config) -> str:
    """Why a SwiftKV config has no SwiftKV layer (for the start-up warning)."""
    if not getattr(hf_config, "swiftkv", False):
        return '"swiftkv" is false or missing in config.json (a converted checkpoint says "swiftkv": true)'
    layers = hf_config.num_hidden_layers
    if hf_config.num_key_value_layers is None:
        return f"num_key_value_layers is missing in config.json, so all {layers} layers are base layers"
    return (
        f"num_key_value_layers ({hf_config.num_key_value_layers}) equals num_hidden_layers ({layers}), so no layer "
        "uses the SwiftKV projections"
    )


def _select_cudagraph_mode(vllm_config) -> None:
    """CUDA graphs that cannot freeze which rows run layers >= L.

    The model compiles in two parts around the row gather (`swiftkv_vllm.model.SwiftKVModel`); the gather runs
    eagerly between them, so piecewise graphs are right for every batch. A full graph is captured by a dummy run,
    where no row is dropped, so it is right only for batches whose every row is kept: decode-only batches
    (FULL_AND_PIECEWISE, vLLM's CUDA default, and FULL_DECODE_ONLY). FULL would replay that graph for prefill
    batches too: it becomes FULL_AND_PIECEWISE.
    """
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode == CUDAGraphMode.FULL:
        compilation.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        logger.warning(
            "SwiftKV: cudagraph_mode FULL would replay a graph captured with every row for prefill batches, whose "
            "rows after layer L differ per step: using FULL_AND_PIECEWISE (full graphs for decode-only batches only)."
        )
    logger.info(
        "SwiftKV: compiled in two parts around the row gather unless enforce_eager; CUDA graphs (where the platform "
        "has them): %s, full graphs only for decode-only batches.",
        compilation.cudagraph_mode.name if compilation.cudagraph_mode is not None else "vLLM's default",
    )


def _guard_prompt_logprobs(vllm_config) -> None:
    """Add the validator below to the engine's logits processors (the V1 runner's hook for per-request checks).

    vLLM's own check (AsyncLLM, i.e. `vllm serve`) names only `--kv-sharing-fast-prefill`, a flag a SwiftKV user
    never passed; the offline `LLM` path has no front-end check at all. This names SwiftKV and the way out.
    """
    if vllm_config.use_v2_model_runner:
        return
    if vllm_config.speculative_config is not None:
        # vLLM refuses to start with a custom logits processor under speculative decoding.
        logger.warning(
            "SwiftKV: with speculative decoding the offline LLM cannot refuse prompt logprobs at admission (vLLM "
            "allows no custom logits processor then): a request for them stops the engine at vLLM's own fast-prefill "
            "assertion; `vllm serve` still refuses them. To score prompt tokens, start with %s=0.",
            FAST_PREFILL_ENV,
        )
        return
    from swiftkv_vllm.guard import SwiftKVPromptLogprobsGuard

    model_config = vllm_config.model_config
    processors = list(model_config.logits_processors or [])
    if SwiftKVPromptLogprobsGuard not in processors:
        model_config.logits_processors = [*processors, SwiftKVPromptLogprobsGuard]
