#!/usr/bin/env bash
# TEST FIXTURE: the same real `megatron sft` WITHOUT Cohort, started by hand as users do today (the baseline
# deploy/swift-smoke.sh compares against). Extra flags are appended to the command line.
#   PYTHON=/path/to/python3.12 bash run.sh --train_iters 40
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
while IFS='=' read -r key value; do export "$key=$value"; done < <(PYTHON="$PY" bash "$HERE/setup.sh")
export MODELSCOPE_CACHE=${MODELSCOPE_CACHE:-$HERE/cache} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} NPROC_PER_NODE=${NPROC_PER_NODE:-1} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29555}
T=$SWIFT_GPU_TINY
OUTDIR=${OUTDIR:-$HERE/out}
mkdir -p "$OUTDIR"
set -x
"$PY" -m swift.cli._megatron.main sft \
  --model "$T/Qwen3-tiny" --model_type qwen3 --check_model false \
  --load "$SWIFT_GPU_EMPTY_MCORE" --exit_on_missing_checkpoint false --no_initialization false --finetune true \
  --dataset "$T/data/train.jsonl" --split_dataset_ratio 0.05 --dataset_num_proc 1 --num_workers 1 \
  --max_length 256 --system 'You are a helpful assistant.' \
  --transformer_impl local --padding_free false --megatron_extra_kwargs '{"no_persist_layer_norm": true}' \
  --no_masked_softmax_fusion true --no_rope_fusion true --no_bias_dropout_fusion true \
  --no_bias_swiglu_fusion true --no_gradient_accumulation_fusion true --cross_entropy_loss_fusion false \
  --use_distributed_optimizer false --bf16 true --micro_batch_size 2 --global_batch_size 8 --train_iters 20 --log_interval 5 \
  --lr 1e-4 --min_lr 1e-5 --lr_warmup_iters 2 \
  --eval_interval 10 --save "$OUTDIR" --save_interval 10 --save_safetensors false \
  "$@" 2>&1 | tee "${RUN_LOG:-$HERE/run.log}"
