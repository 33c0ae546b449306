#!/usr/bin/env bash
# The GPU reader (`cohort-agent gpu-reader`, the agent's NVML process) under faults, with a real
# controller and agent on loopback: the reader stopped (SIGSTOP: an NVML call that never returns)
# and killed (SIGKILL), then the agent killed. Prints how long each took to be noticed (a new
# reader running, the orphaned reader ending) and the GPU's telemetry the controller holds after
# each restart (`cohort gpus -o json`: temperature, power, memory).
#
# Usage: tools/gpu-reader-faults.sh [BIN_DIR]   (default target/debug)
# Environment: REAL_NVML=1 reads GPU 0 through NVML (a GPU host); otherwise 2 fake GPUs in a
# reader (`--gpu-reader process`). PORT: the controller's gRPC port (default 17380).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(cd "${1:-$root/target/debug}" && pwd)"
port="${PORT:-17380}"
gpus=(--fake-gpus 2 --gpu-reader process)
[[ "${REAL_NVML:-0}" == 1 ]] && gpus=(--gpu-indices 0)
work="$(mktemp -d /tmp/gpu-reader-faults.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
export COHORT_CONTROLLER_CONFIG=/dev/null COHORT_AGENT_CONFIG=/dev/null
url="http://127.0.0.1:$port"
cli() { "$bin/cohort" --insecure --controller "$url" "$@"; }
now() { date +%s.%N; }
since() { python3 -c 'import sys, time; print(round(time.time() - float(sys.argv[1]), 3))' "$1"; }
# Polls (every 50 ms, up to 60 s) until the command succeeds.
until_true() {
    local deadline=$((SECONDS + 60))
    until "$@"; do
        ((SECONDS < deadline)) || { echo "gpu-reader-faults: timed out waiting for: $*" >&2; tail -n 30 "$work"/*.log >&2; exit 1; }
        sleep 0.05
    done
}

"$bin/cohort-controller" --insecure --listen "127.0.0.1:$port" --http "127.0.0.1:$((port + 1))" \
    --data-dir "$work/controller" >"$work/controller.log" 2>&1 &
pids+=($!)
"$bin/cohort-agent" --insecure --controller "$url" --node-name node0 --advertise-addr 127.0.0.2 \
    --work-dir "$work/node0" --net-ifname lo --allow-root-ranks --telemetry-interval 1s "${gpus[@]}" \
    >"$work/node0.log" 2>&1 &
agent=$!
pids+=("$agent")
ready() { cli nodes -o json 2>/dev/null | grep -q '"state": "Ready"'; }
until_true ready
reader() { pgrep -P "$agent" -f gpu-reader | head -n 1; }
has_reader() { [[ -n "$(reader)" ]]; }
until_true has_reader
# GPU 0's temperature, power and memory in use, as the controller has them.
reading() {
    cli gpus -o json 2>/dev/null | python3 -c 'import json, sys
t = json.load(sys.stdin)["nodes"][0]["telemetry"][0]
print(t.get("temperature_c"), "C", t.get("power_w"), "W", t.get("memory_used_bytes"), "B used")'
}
echo "reader $(reader) of agent $agent; GPU 0: $(reading)"

for signal in STOP KILL; do
    old="$(reader)"
    kill -"$signal" "$old"
    start="$(now)"
    replaced() { local r; r="$(reader)"; [[ -n "$r" && "$r" != "$old" ]]; }
    until_true replaced
    took="$(since "$start")"
    # Two polls of the new reader, then what the controller holds.
    sleep 2.5
    echo "SIG$signal: a new reader $(reader) after ${took}s; GPU 0: $(reading)"
done
grep -E "GPU reader|no GPU telemetry" "$work/node0.log" | tail -n 6 | cut -c1-220

last="$(reader)"
kill -9 "$agent"
start="$(now)"
gone() { [[ ! -e "/proc/$last" ]] || grep -q '^State:.*Z' "/proc/$last/status" 2>/dev/null; }
until_true gone
echo "agent killed: its reader $last ended after $(since "$start")s"
