#!/usr/bin/env bash
# The node agent's resident memory (issue 19: RSS <= 20 MiB with real NVML), idle and registered:
# a controller and several agents on loopback, one per variant, in the same run. After SETTLE
# seconds, for each agent: VmRSS, RssAnon, RssFile, threads, Pss, and the 8 mappings with the most
# resident memory (from /proc/PID/smaps), three readings 5 s apart; the same for each agent's GPU
# reader (`cohort-agent gpu-reader`, the child process NVML runs in by default), labelled AGENT/reader.
#
# Usage: tools/agent-rss.sh [BIN_DIR]   (default target/debug; holds cohort-controller, cohort-agent, cohort)
# Environment:
#   REAL_NVML=1  the agents read their GPUs through NVML (a GPU host; `--gpu-indices 0`);
#                otherwise 8 fake GPUs
#   VARIANTS     ';'-separated "label=ENV... -- agent-flags"; default: tokio workers as on a 128-CPU
#                host (the agent before --worker-threads), the default 2 workers, each with and without
#                MALLOC_ARENA_MAX=2
#   SETTLE       seconds before the first reading (default 20)
#   PORT         the controller's gRPC port (default 17370)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(cd "${1:-$root/target/debug}" && pwd)"
settle="${SETTLE:-20}"
port="${PORT:-17370}"
default_variants="workers-128=TOKIO_WORKER_THREADS=128 -- --worker-threads 0;workers-2=-- --worker-threads 2"
default_variants+=";workers-2-arena2=MALLOC_ARENA_MAX=2 -- --worker-threads 2"
default_variants+=";workers-128-arena2=TOKIO_WORKER_THREADS=128 MALLOC_ARENA_MAX=2 -- --worker-threads 0"
variants="${VARIANTS:-$default_variants}"
gpus="--fake-gpus 8"
[[ "${REAL_NVML:-0}" == 1 ]] && gpus="--gpu-indices 0"
work="$(mktemp -d /tmp/agent-rss.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
export COHORT_CONTROLLER_CONFIG=/dev/null COHORT_AGENT_CONFIG=/dev/null

url="http://127.0.0.1:$port"
"$bin/cohort-controller" --insecure --listen "127.0.0.1:$port" --http "127.0.0.1:$((port + 1))" \
    --data-dir "$work/controller" >"$work/controller.log" 2>&1 &
pids+=($!)

declare -A pid_of
i=2
IFS=';' read -r -a specs <<<"$variants"
for spec in "${specs[@]}"; do
    label="${spec%%=*}"
    rest="${spec#*=}"
    envs="${rest%%--*}"
    flags="${rest#*--}"
    # shellcheck disable=SC2086 # ENV assignments and flags are split into words on purpose
    env $envs "$bin/cohort-agent" --insecure --controller "$url" --node-name "$label" \
        --advertise-addr "127.0.0.$i" --work-dir "$work/$label" --net-ifname lo --allow-root-ranks \
        --telemetry-interval 1s $gpus $flags >"$work/$label.log" 2>&1 &
    pids+=($!)
    pid_of[$label]=$!
    i=$((i + 1))
done

deadline=$((SECONDS + 60))
until [[ "$("$bin/cohort" --insecure --controller "$url" nodes -o json 2>/dev/null | grep -c '"state": "Ready"')" -ge "${#specs[@]}" ]]; do
    if ((SECONDS > deadline)); then
        echo "agent-rss: not every agent was Ready within 60 s" >&2
        tail -n 20 "$work"/*.log >&2
        exit 1
    fi
    sleep 0.2
done
echo "agent-rss: ${#specs[@]} agent(s) Ready ($gpus); first reading after ${settle}s"
# An idle agent measured over a fixed time is the point here, not waiting for an event.
sleep "$settle"
# VmRSS, RssAnon, RssFile, threads, and Pss (file pages shared with another process, such as the
# agent's binary with its reader, counted half to each).
reading() {
    {
        grep -E '^(VmRSS|RssAnon|RssFile|Threads):' "/proc/$1/status"
        grep -E '^Pss:' "/proc/$1/smaps_rollup"
    } | tr -s ' \t' ' ' | paste -sd ';'
}
for round in 1 2 3; do
    for label in $(printf '%s\n' "${!pid_of[@]}" | sort); do
        p="${pid_of[$label]}"
        printf 'round %s %-20s %s\n' "$round" "$label" "$(reading "$p")"
        # The agent's GPU reader (`cohort-agent gpu-reader`, NVML's process), if it has one.
        for r in $(pgrep -P "$p" -f gpu-reader || true); do
            printf 'round %s %-20s %s\n' "$round" "$label/reader" "$(reading "$r")"
        done
    done
    ((round < 3)) && sleep 5
done
top_mappings() {
    echo "== $1: the mappings with the most resident memory (kB)"
    awk '/^[0-9a-f]+-[0-9a-f]+ / { name = $6 ? $6 : "[anon]" } /^Rss:/ { rss[name] += $2 } END { for (n in rss) printf "%8d  %s\n", rss[n], n }' \
        "/proc/$2/smaps" | sort -rn | head -n 8
}
for label in $(printf '%s\n' "${!pid_of[@]}" | sort); do
    top_mappings "$label" "${pid_of[$label]}"
    for r in $(pgrep -P "${pid_of[$label]}" -f gpu-reader || true); do top_mappings "$label/reader" "$r"; done
done
