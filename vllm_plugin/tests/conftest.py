"""Fixtures of the plugin's tests (helpers in engines.py)."""

from __future__ import annotations

import os

import pytest
from engines import load_expected

# Tests read the model's row counters through `LLM.apply_model`, which pickles a function to the engine process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# The model's row counter is a debug switch, off by default: on for the tests that read it.
os.environ.setdefault("SWIFTKV_VLLM_COUNT_ROWS", "1")


@pytest.fixture(scope="session")
def expected() -> dict:
    return load_expected()
