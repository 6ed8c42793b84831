"""Fixtures of the plugin's tests (helpers in engines.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from engines import load_expected

# Tests read the model's row counters through `LLM.apply_model`, which pickles a function to the engine process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# The model's row counter is a debug switch, off by default: on for the tests that read it.
os.environ.setdefault("SWIFTKV_VLLM_COUNT_ROWS", "1")
# vLLM's compile cache (AOT-compiled parts) in a folder of this run, never the user's ~/.cache/vllm.
_COMPILE_CACHE = None
if "VLLM_CACHE_ROOT" not in os.environ:
    _COMPILE_CACHE = os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="swiftkv-vllm-tests-")


def pytest_unconfigure(config) -> None:
    if _COMPILE_CACHE:
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def expected() -> dict:
    return load_expected()
