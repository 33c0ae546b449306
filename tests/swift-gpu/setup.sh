#!/usr/bin/env bash
# TEST FIXTURE, not part of the product: prepares a real ms-swift 3.12.6 `megatron sft` stack on a host
# without network, transformer_engine, apex or nvcc (see README.txt), then prints the environment a job
# needs as `KEY=VALUE` lines. Sourced by run.sh and deploy/swift-smoke.sh.
#   PYTHON   interpreter with torch (default python3); 3.12 for these wheels
#   SWIFT_GPU_DIR   where overlay/, Megatron-LM/ and tiny/ go (default: this directory)
# Installs ./whl/*.whl (fetch-wheels.sh downloads them) into $SWIFT_GPU_DIR/overlay, never into the
# system site-packages; unpacks Megatron-LM core_r0.15.0; builds the tiny random Qwen3 and its dataset.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python3}
DIR=${SWIFT_GPU_DIR:-$HERE}
OV=$DIR/overlay
mkdir -p "$DIR"
if [ ! -f "$OV/.done" ]; then
  ls "$HERE"/whl/*.whl >/dev/null 2>&1 || { echo "swift-gpu: no wheels in $HERE/whl; run $HERE/fetch-wheels.sh where pip reaches the registry" >&2; exit 2; }
  rm -rf "$OV" "$DIR/Megatron-LM"; mkdir -p "$OV" "$DIR/Megatron-LM"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$OV" "$HERE"/whl/*.whl >&2
  else  # no pip: a wheel is a zip
    for w in "$HERE"/whl/*.whl; do "$PY" -m zipfile -e "$w" "$OV"; done
  fi
  tar xzf "$HERE/../../tools/swift-flags/megatron-lm-core_r0.15.0.tgz" -C "$DIR/Megatron-LM"
  touch "$OV/.done"
fi
[ -f "$DIR/tiny/Qwen3-tiny/model.safetensors" ] || PYTHONPATH="$OV" "$PY" "$HERE/make_tiny.py" "$DIR/tiny" >&2
mkdir -p "$DIR/empty-mcore"
# Megatron-LM before the overlay: its megatron/ has training/; the megatron-core wheel gives the dist metadata.
cat <<ENV
MEGATRON_LM_PATH=$DIR/Megatron-LM
PYTHONPATH=$HERE/shim:$DIR/Megatron-LM:$OV
HF_HUB_OFFLINE=1
HF_DATASETS_OFFLINE=1
TRANSFORMERS_OFFLINE=1
CUDA_DEVICE_MAX_CONNECTIONS=1
SWIFT_GPU_TINY=$DIR/tiny
SWIFT_GPU_EMPTY_MCORE=$DIR/empty-mcore
SWIFT_GPU_BIN=$OV/bin
ENV
