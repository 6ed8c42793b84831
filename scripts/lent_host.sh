#!/usr/bin/env bash
# The CPU benchmarks on another x86-64 machine that has Python and PyTorch but no network (a lent GPU host, whose CPU
# may have AVX512_BF16 / AMX where this one has not), carried in under 64 MB:
#
#   bash scripts/lent_host.sh pack [PYTHON_VERSION]   # here: writes out/carry (~33 MB), for Python 3.12 by default
#   bash scripts/lent_host.sh run ARGS...             # there, in the repository: benchmarks/vs_openvino.py ARGS
#   bash scripts/lent_host.sh all OUTDIR              # there: the whole check below, results and logs in OUTDIR
#
# What travels: OpenVINO GenAI's wheels for the other Python (without the GPU/NPU plugins and the ONNX/TF/Paddle/
# PyTorch/JAX/GGUF frontends: running an IR export on the CPU needs none of them), transformers and gguf at the
# versions swiftkv pins, and the default model as scripts/compressible_checkpoint.py copies it (every matrix its
# first row repeated: the same shapes and cost, files that compress ~1000x) with its two OpenVINO exports.
# Timings only: that model's outputs are meaningless, and swiftkv's SwiftKV layers are the adapters' layouts
# undistilled (vs_openvino.py --model). The repository's bundled adapters need not travel (move them aside for the
# call: the working tree and out/carry together must stay under 64 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=out/carry
ROWS=out/smollm2-rows
EXPORTS=out/openvino-rows
OV_WHEELS=(openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0)  # as setup.sh --openvino
PY_WHEELS=(transformers==5.24.0 gguf==0.19.0)
SITE=/tmp/carry-site

pack() {
  local python="${1:-3.12}" wheels out
  [[ -d "$ROWS" ]] || .venv/bin/python scripts/compressible_checkpoint.py default "$ROWS"
  mkdir -p "$EXPORTS"
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

unpack() {
  mkdir -p "$SITE"
  [[ -d "$SITE/openvino" ]] || tar -xJf "$CARRY/site.tar.xz" -C "$SITE"
  [[ -d "$ROWS" ]] || tar -xJf "$CARRY/models.tar.xz"
  export PYTHONPATH="$SITE:$PWD/src" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
}

run() {
  unpack
  python3 benchmarks/vs_openvino.py --model "$ROWS" --exports "$EXPORTS" "$@"
}

affinity() {  # `taskset -c CPUS`: the first CPU of each of the first $1 physical cores; nothing where it cannot pin
  local cpus
  cpus="$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -"$1" | cut -d, -f1 | paste -sd,)"
  if taskset -c "$cpus" true 2>/dev/null; then echo "taskset -c $cpus"; fi
}

all() {  # ~10 minutes, the most telling steps first; each bounded, its output kept in $1 whatever happens to the
  # next; 8 files at most (what a lent host's call returns): the figures left out (each plot() redraws from its JSON)
  local out="$1" log="$1/log.txt" two
  set +e  # the steps are independent: one that fails or times out must not stop the others
  mkdir -p "$out"
  unpack
  two="$(affinity 2)"
  { lscpu; free -g; nvidia-smi -L; python3 -c 'import torch; print(torch.__version__)'; } >"$out/machine.txt" 2>&1
  timeout 90 python3 -c 'from swiftkv.modeling import native; print("native:", native.usable())' >>"$log" 2>&1
  # What decides the bf16 prefill's next step on an AMX CPU first (docs/cpu.md): swiftkv's attention kernel against
  # SDPA's bf16, and where the bf16 / float32 prefill's time goes, bf16 also with bf16 layers' attention on SDPA
  # (`--attention sdpa-bf16`), SwiftKV off and at L=15: the profiles go into one JSON, keyed by run.
  timeout 60 $two python3 benchmarks/attention_kernel.py --threads 2 --reps 9 --json "$out/attention_kernel.json" \
    >>"$log" 2>&1
  for run in "bf16 swiftkv off" "bf16 sdpa-bf16 off" "bf16 swiftkv L15" "bf16 sdpa-bf16 L15" "float32 swiftkv off"; do
    set -- $run
    timeout 40 $two python3 benchmarks/prefill_profile.py --model "$ROWS" --weights "$1" --attention "$2" \
      --swiftkv "$3" --threads 2 --json "/tmp/profiles/$1_$2_$3.json" --plot "/tmp/profiles/$1_$2_$3.png" >>"$log" 2>&1
  done
  python3 -c 'import json, pathlib, sys; print(json.dumps({p.stem: json.loads(p.read_text())
    for p in sorted(pathlib.Path("/tmp/profiles").glob("*.json"))}, indent=1))' >"$out/prefill_profiles.json"
  # OpenVINO GenAI 2026.4.1 dies of SIGFPE building an LLMPipeline limited to one CPU on such a host
  # (openvinotoolkit/openvino#33300): the comparison runs at 2 threads only.
  timeout 240 $two bash "$0" run --threads 2 --reps 4 --weights bf16 int8 --json "$out/vs_openvino_2threads.json" \
    --plot /tmp/vs_openvino_2threads.png >>"$log" 2>&1
  # PyTorch's weight-only int8/int4 kernels' AVX-512 build against swiftkv's products (docs/cpu.md: 5-87x slower in
  # their AVX2 build); its figures go to the log.
  timeout 40 $two python3 benchmarks/torch_quantized_kernels.py --rows 1 8 --reps 5 --json /tmp/tqk.json \
    >>"$log" 2>&1
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$out/tests.txt" 2>&1
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_weights.py tests/test_attention.py \
    >>"$out/tests.txt" 2>&1
  echo "done in ${SECONDS}s" >>"$log"
}

case "${1:-}" in
  pack) shift && pack "$@" ;;
  run) shift && run "$@" ;;
  all) shift && all "$@" ;;
  *) echo "usage: $0 pack [PYTHON_VERSION] | run VS_OPENVINO_ARGS... | all OUTDIR" >&2 && exit 2 ;;
esac
