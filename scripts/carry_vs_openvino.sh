#!/usr/bin/env bash
# benchmarks/vs_openvino.py on another x86-64 machine that has Python, PyTorch and no network (a lent GPU host, whose
# CPU may have AVX512_BF16 / AMX where this one has not), in under 64 MB:
#
#   bash scripts/carry_vs_openvino.sh pack [PYTHON_VERSION]   # here: writes out/carry (~45 MB), default 3.12
#   bash scripts/carry_vs_openvino.sh run ARGS...             # there, in the repository: vs_openvino.py ARGS
#
# What travels: OpenVINO GenAI's wheels for the other Python (without the GPU/NPU plugins and the ONNX/TF/Paddle/
# PyTorch/JAX/GGUF frontends: running an IR export on the CPU needs none of them), transformers and gguf at the
# versions swiftkv pins, and the default model as scripts/compressible_checkpoint.py copies it (every matrix its
# first row repeated: the same shapes and cost, files that compress ~1000x) with its two OpenVINO exports.
# Timings only: that model's outputs are meaningless, and swiftkv's SwiftKV layers are the adapters' layouts
# undistilled (vs_openvino.py --model).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=out/carry
ROWS=out/smollm2-rows
EXPORTS=out/openvino-rows
OV_WHEELS=(openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0)  # as setup.sh --openvino
PY_WHEELS=(transformers==5.24.0 gguf==0.19.0)

pack() {
  local python="${1:-3.12}" wheels
  [[ -d "$ROWS" ]] || .venv/bin/python scripts/compressible_checkpoint.py default "$ROWS"
  for format in fp32 int8; do
    out="$EXPORTS/SmolLM2-135M-Instruct-$format"
    [[ -f "$out/openvino_model.xml" ]] && continue
    HF_HUB_OFFLINE=1 .venv-openvino/bin/optimum-cli export openvino --model "$ROWS" \
      --task text-generation-with-past --weight-format "$format" "$out.partial" >"$out.log" 2>&1
    mv "$out.partial" "$out"
  done
  rm -rf "$CARRY" && mkdir -p "$CARRY"
  wheels="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" "${OV_WHEELS[@]}" "${PY_WHEELS[@]}"
  mkdir "$wheels/site"
  for wheel in "$wheels"/*.whl; do unzip -q -o "$wheel" -d "$wheels/site"; done
  (cd "$wheels/site/openvino/libs" && rm -f libopenvino_intel_{gpu,npu}_plugin.so cache.json \
    libopenvino_{onnx,tensorflow,pytorch,paddle,gguf,tensorflow_lite,jax}_frontend.so.*)
  tar -C "$wheels/site" -cf - . | xz -T0 -6 >"$CARRY/site.tar.xz"
  tar -cf - "$ROWS" "$EXPORTS"/SmolLM2-135M-Instruct-{fp32,int8} | xz -T0 -6 >"$CARRY/models.tar.xz"
  rm -rf "$wheels"
  du -sh "$CARRY"
}

run() {
  local site=/tmp/carry-site
  mkdir -p "$site"
  [[ -d "$site/openvino" ]] || tar -xJf "$CARRY/site.tar.xz" -C "$site"
  [[ -d "$ROWS" ]] || tar -xJf "$CARRY/models.tar.xz"
  export PYTHONPATH="$site:$PWD/src" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  python3 benchmarks/vs_openvino.py --model "$ROWS" --exports "$EXPORTS" "$@"
}

case "${1:-}" in
  pack) shift && pack "$@" ;;
  run) shift && run "$@" ;;
  *) echo "usage: $0 pack [PYTHON_VERSION] | run VS_OPENVINO_ARGS..." >&2 && exit 2 ;;
esac
