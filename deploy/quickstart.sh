#!/usr/bin/env bash
# One command, a local Cohort cluster and a real two-node training job:
#   1. installs the Python environment of the example (a virtualenv in .venv),
#   2. builds cohort-controller, cohort-agent and cohort,
#   3. starts a controller (embedded store) and two agents, "node-a" on
#      127.0.0.2 and "node-b" on 127.0.0.3, so the nodes really have different
#      addresses,
#   4. submits examples/jobs/tiny-sft.yaml (supervised fine-tuning of a tiny
#      Qwen3 model across both nodes with torchrun), follows its logs, and
#      prints its final state,
#   5. stops the cluster. The exit code is 0 only if the job succeeded.
# On a host with 2+ NVIDIA GPUs each node gets one real GPU (NCCL); elsewhere
# each gets one fake GPU slot and the job trains on CPU (gloo).
# Environment: COHORT_QUICKSTART_PORT (default 17070), COHORT_QUICKSTART_DIR
# (default .cohort/quickstart), COHORT_PYTHON (an interpreter that already has
# torch and transformers; skips the virtualenv).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
port="${COHORT_QUICKSTART_PORT:-17070}"
dir="${COHORT_QUICKSTART_DIR:-$root/.cohort/quickstart}"
url="https://127.0.0.1:$port"
tls="$dir/controller/tls"

# Each step says how long the quickstart has run so far (the first run builds for minutes).
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

step "Python environment for the example job"
examples/tiny-sft/setup-venv.sh

step "Building Cohort (cargo build --workspace --bins: about 5 minutes the first time on 2 cores)"
# Not --quiet: cargo's Compiling lines and progress bar show that it moves.
cargo build --workspace --bins
bin="$root/target/debug"
cohort() { "$bin/cohort" --controller "$url" "$@"; }

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "quickstart: port $port is in use; set COHORT_QUICKSTART_PORT to a free port" >&2
    exit 1
fi
rm -rf "$dir"
mkdir -p "$dir"
pids=()
cleanup() {
    # Agents stop their processes on SIGTERM; then the controller goes.
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]:1}" 2>/dev/null || true
        wait "${pids[@]:1}" 2>/dev/null || true
        kill -TERM "${pids[0]}" 2>/dev/null || true
        wait "${pids[0]}" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Starting a controller on $url and two agents (logs in $dir)"
# Mutual TLS, as on a real cluster: a cluster CA and an admin token (init), a
# join token with which each agent gets its node certificate.
"$bin/cohort-controller" init --tls-dir "$tls" >"$dir/init.log"
# One join token for both agents: reusable (join tokens are single-use by default).
join_token="$("$bin/cohort-controller" token --tls-dir "$tls" --role join --reusable --ttl 10m 2>/dev/null)"
export COHORT_CA_CERT="$tls/ca.crt" COHORT_TOKEN_FILE="$tls/admin.token"
"$bin/cohort-controller" --listen "127.0.0.1:$port" --data-dir "$dir/controller" >"$dir/controller.log" 2>&1 &
pids+=($!)
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
i=0
for node in node-a:127.0.0.2 node-b:127.0.0.3; do
    name="${node%%:*}"
    addr="${node##*:}"
    if ((gpus >= 2)); then gpu_args=(--gpu-indices "$i"); else gpu_args=(--fake-gpus 1); fi
    # As root, the ranks run as root too: say that is wanted (a node's config names an unprivileged rank-user).
    COHORT_ALLOW_ROOT_RANKS=$([ "$(id -u)" = 0 ] && echo true || echo false) \
    "$bin/cohort-agent" --controller "$url" --node-name "$name" --advertise-addr "$addr" \
        --ca-cert "$tls/ca.crt" --join-token "$join_token" \
        --work-dir "$dir/$name" --net-ifname lo "${gpu_args[@]}" >"$dir/$name.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
done

deadline=$((SECONDS + 30))
until [ "$(cohort nodes -o json 2>/dev/null | grep -c '"state": "Ready"')" -ge 2 ]; do
    if ((SECONDS > deadline)); then
        echo "quickstart: the agents did not register within 30 s; see $dir/*.log" >&2
        exit 1
    fi
    sleep 0.2
done
cohort nodes

step "cohort plan examples/jobs/tiny-sft.yaml"
cohort plan examples/jobs/tiny-sft.yaml

step "cohort submit examples/jobs/tiny-sft.yaml, then cohort logs --follow"
job="$(cohort submit examples/jobs/tiny-sft.yaml)"
cohort logs "$job" --follow

step "cohort status $job"
cohort status "$job"
cohort status "$job" -o json | grep -q '"state": "Succeeded"'
step "Done. To keep a cluster up for trying things: $bin/cohort dev up (and cohort dev down)"
