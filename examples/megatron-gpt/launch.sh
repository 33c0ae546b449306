#!/usr/bin/env bash
# Per-node entry point of the megatron-gpt job: what Cohort's agent starts on
# every node, in the job's workdir. Like ms-swift's `megatron sft`, it wraps
# torchrun with static rendezvous and no restarts: a failed rank fails the
# node, and Cohort, not torchrun, decides what happens to the gang.
# Arguments are passed to train_gpt.py (e.g. --iters 50 --log-interval 5).
# megatron-core must be importable by the interpreter (pip install
# megatron-core==0.19.2, or its wheel unpacked on PYTHONPATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

missing=()
for var in NNODES NODE_RANK NPROC_PER_NODE MASTER_ADDR MASTER_PORT; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
done
if (( ${#missing[@]} )); then
    echo "launch.sh: missing environment: ${missing[*]} (Cohort's agent sets them;" \
         "by hand: NNODES=1 NODE_RANK=0 NPROC_PER_NODE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 $0)" >&2
    exit 2
fi
if [[ -n "${WORLD_SIZE:-}" ]] && (( WORLD_SIZE != NNODES * NPROC_PER_NODE )); then
    echo "launch.sh: WORLD_SIZE=$WORLD_SIZE but NNODES x NPROC_PER_NODE = $NNODES x $NPROC_PER_NODE" >&2
    exit 2
fi
if (( NNODES * NPROC_PER_NODE < 2 )); then
    echo "launch.sh: tensor parallelism needs at least 2 ranks, got NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE" >&2
    exit 2
fi

if [[ -n "${COHORT_PYTHON:-}" ]]; then
    PY="$COHORT_PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    PY="$repo/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
echo "launch.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE proc(s), master $MASTER_ADDR:$MASTER_PORT, python $PY"

exec "$PY" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$here/train_gpt.py" "$@"
