#!/usr/bin/env bash
# Cohort's proof on real GPUs, on ONE host with at least 2 NVIDIA GPUs:
# a controller and two agents on loopback addresses, one GPU each
# (node-a 127.0.0.2 --gpu-indices 0, node-b 127.0.0.3 --gpu-indices 1), then
#   a. `cohort nodes` shows the real GPUs (model, GPU-... UUID, memory);
#   b. examples/jobs/tiny-sft.yaml (DDP over NCCL) succeeds, its loss falls,
#      and GPU utilisation > 0 shows in the controller's /metrics meanwhile;
#   c. examples/jobs/megatron-gpt-tp2.yaml (megatron-core, tensor parallelism
#      2 across the two nodes) succeeds and its Megatron-LM training_log lines
#      come back through `cohort metrics` (>= 3 points, loss falls);
#   d. a long Megatron run loses ONE rank (SIGKILL of the python worker on
#      node-b): the job ends Failed and no process of it is left on either
#      node within 10 s (teardown time printed);
#   f. a tiny-sft run over NCCL loses progress when one rank is SIGSTOPped
#      (the other blocks in an all-reduce): the hang is detected within
#      hang_timeout (45 s), stacks are dumped, node-b is named the suspect,
#      and attempt 2 (restart: on: [hang]) runs to success;
#   e. figures: launch latency (submit -> Running) of both jobs, and the
#      agent's CPU and RSS over 10 s while it reads its GPU's telemetry every
#      second, against an idle agent with --fake-gpus.
# Prints PASS/FAIL/SKIP per step and a summary; exit 0 only if nothing failed.
#
# Usage: deploy/gpu-smoke.sh [--cpu-rehearsal] [BIN_DIR]
#   BIN_DIR   holds cohort-controller, cohort-agent, cohort (default target/release)
#   --cpu-rehearsal   no GPU needed: fake GPU slots, gloo on CPU, Megatron with
#                     --cpu; the checks that need real GPUs are SKIPped, saying so.
# Environment:
#   COHORT_PYTHON   the interpreter of the jobs (needs torch; transformers for
#                   tiny-sft; megatron-core for Megatron). Default: python3
#                   (with --cpu-rehearsal: <repo>/.venv/bin/python if present).
#                   megatron-core missing but .whl/megatron_core-*.whl present:
#                   the wheel is unpacked into the work directory and put on PYTHONPATH.
#   OUT             where results go (summary.txt, results.json, logs.tar.gz);
#                   default <repo>/.cohort/gpu-smoke
#   COHORT_SMOKE_STEPS         run only these steps, e.g. "a,b,f" (default: all)
#   COHORT_SMOKE_PORT          controller gRPC port (default 17170; /metrics on +1)
#   COHORT_SMOKE_MASTER_PORTS  MASTER_PORT range (default 26100-26199)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

rehearsal=0
bin=""
for arg in "$@"; do
    case "$arg" in
        --cpu-rehearsal) rehearsal=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu-smoke: unknown option $arg" >&2; exit 2 ;;
        *) bin="$arg" ;;
    esac
done
bin_arg="${bin:-$root/target/release}"
bin="$(cd "$bin_arg" 2>/dev/null && pwd)" || { echo "gpu-smoke: no such directory: $bin_arg" >&2; exit 2; }
for b in cohort-controller cohort-agent cohort; do
    [[ -x "$bin/$b" ]] || { echo "gpu-smoke: $bin/$b is missing (cargo build --release --workspace)" >&2; exit 2; }
done

port="${COHORT_SMOKE_PORT:-17170}"
http_port=$((port + 1))
master_ports="${COHORT_SMOKE_MASTER_PORTS:-26100-26199}"
url="http://127.0.0.1:$port"
metrics_url="http://127.0.0.1:$http_port/metrics"
out="${OUT:-$root/.cohort/gpu-smoke}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/cohort-gpu-smoke.XXXXXX")"
trap 'rm -rf "$work"' EXIT # until the cluster starts; then cleanup() keeps it
logs="$work/logs"
mkdir -p "$logs"
results="$work/results.tsv"
figures="$work/figures.tsv"
: >"$results"
: >"$figures"
# Every process of this run's jobs inherits this (through the agents), so the
# final sweep can find exactly those and nothing else.
export COHORT_SMOKE_RUN="gpu-smoke-$$-$RANDOM"
HOST_PY="$(command -v python3)"

say() { printf '%s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
now_ms() { date +%s%3N; }
die() { say "  FAIL: $*" >&2; exit 1; }
figure() { printf '%s\t%s\n' "$1" "$2" >>"$figures"; say "  $1: $2"; }
cohort() { "$bin/cohort" --insecure --controller "$url" "$@"; }
# pyj EXPR: evaluates EXPR with d = the JSON document on stdin.
pyj() { "$HOST_PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
http_get() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 2 "$1"
    else
        "$HOST_PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
    fi
}
# Pids of processes whose command line contains $1 (never this script's own helpers).
procs_matching() {
    "$HOST_PY" - "$1" <<'EOF'
import os, sys
pat, me = sys.argv[1], os.getpid()
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == me:
        continue
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    if pat in cmd:
        print(pid)
EOF
}

# descendants PID: PID's descendants, from /proc.
descendants() {
    "$HOST_PY" - "$1" <<'EOF'
import os, sys
children = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        continue
    children.setdefault(ppid, []).append(int(pid))
out, todo = [], [int(sys.argv[1])]
while todo:
    for child in children.get(todo.pop(), []):
        out.append(child)
        todo.append(child)
print(" ".join(map(str, out)))
EOF
}
# kill_tree PID: SIGTERM to PID and to every process below it, by pid.
kill_tree() {
    local tree
    tree="$(descendants "$1" 2>/dev/null || true)"
    # shellcheck disable=SC2086 # a list of pids
    kill "$1" $tree 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# Interpreter and GPUs
# ---------------------------------------------------------------------------
if [[ -n "${COHORT_PYTHON:-}" ]]; then
    PY="$(command -v "$COHORT_PYTHON")" || { echo "gpu-smoke: COHORT_PYTHON=$COHORT_PYTHON not found" >&2; exit 2; }
elif ((rehearsal)) && [[ -x "$root/.venv/bin/python" ]]; then
    PY="$root/.venv/bin/python"
else
    PY="$HOST_PY"
fi
export COHORT_PYTHON="$PY"
"$PY" -c 'import torch' 2>/dev/null || { echo "gpu-smoke: $PY cannot import torch (set COHORT_PYTHON)" >&2; exit 2; }
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
else
    gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
if ((!rehearsal && gpus < 2)); then
    echo "gpu-smoke: needs a host with at least 2 NVIDIA GPUs (nvidia-smi -L lists $gpus);" \
         "run with --cpu-rehearsal to rehearse the same steps on CPU with fake GPUs" >&2
    exit 2
fi
if ! "$PY" -c 'import megatron.core' >/dev/null 2>&1; then
    wheels=("$root"/.whl/megatron_core-*.whl)
    wheel="${wheels[0]}"
    if [[ -f "$wheel" ]]; then
        "$HOST_PY" -m zipfile -e "$wheel" "$work/site"
        export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
        say "gpu-smoke: megatron-core from $(basename "$wheel"), unpacked into $work/site (PYTHONPATH)"
    fi
fi
megatron_ok=1
"$PY" -c 'import megatron.core' >/dev/null 2>&1 || megatron_ok=0
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$http_port") 2>/dev/null; then
    echo "gpu-smoke: port $port or $http_port is in use; set COHORT_SMOKE_PORT" >&2
    exit 2
fi

# ---------------------------------------------------------------------------
# Cluster and clean-up
# ---------------------------------------------------------------------------
declare -A pid_of=()
step_pid=""
cleanup() {
    local rc=$?
    set +e
    # A step still running (interrupted): it and everything it started.
    [[ -n "$step_pid" ]] && kill_tree "$step_pid"
    local f
    for f in "$work"/pid.*; do [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null; done
    # Agents stop their processes on SIGTERM; then the controller goes.
    local agents=()
    for n in node-a node-b; do [[ -n "${pid_of[$n]:-}" ]] && agents+=("${pid_of[$n]}"); done
    if ((${#agents[@]})); then
        kill -TERM "${agents[@]}" 2>/dev/null
        wait "${agents[@]}" 2>/dev/null
    fi
    if [[ -n "${pid_of[controller]:-}" ]]; then
        kill -TERM "${pid_of[controller]}" 2>/dev/null
        wait "${pid_of[controller]}" 2>/dev/null
    fi
    # Anything of this run's jobs still alive (it should not be): by pid, found by our marker.
    local left
    left="$("$HOST_PY" - "$COHORT_SMOKE_RUN" <<'EOF'
import os, sys
mark = f"COHORT_SMOKE_RUN={sys.argv[1]}".encode()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if mark in env and b"COHORT_JOB_ID" in b"\0".join(env) and int(pid) != os.getpid():
            print(pid)
    except OSError:
        pass
EOF
)"
    if [[ -n "$left" ]]; then
        local stray=()
        mapfile -t stray <<<"$left"
        say "gpu-smoke: killing leftover job processes: ${stray[*]}" >&2
        kill -KILL "${stray[@]}" 2>/dev/null
    fi
    tar -C "$work" -czf "$out/logs.tar.gz" logs 2>/dev/null
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_agent() { # name addr extra-args...
    local name="$1" addr="$2"
    shift 2
    # As root, the ranks run as root too: say that is wanted (a node's config names an unprivileged rank-user).
    COHORT_ALLOW_ROOT_RANKS=$([ "$(id -u)" = 0 ] && echo true || echo false) \
    "$bin/cohort-agent" --insecure --controller "$url" --node-name "$name" --advertise-addr "$addr" \
        --work-dir "$work/$name" --net-ifname lo --python "$PY" --telemetry-interval 1s "$@" \
        >"$logs/$name.log" 2>&1 &
    pid_of[$name]=$!
}
# background PID NAME: remembers a process a step started, for cleanup() in the main shell.
background() { echo "$1" >"$work/pid.$2"; }
wait_ready() { # count timeout_s
    local deadline=$((SECONDS + $2))
    until [[ "$(cohort nodes -o json 2>/dev/null | grep -c '"state": "Ready"')" -ge "$1" ]]; do
        ((SECONDS <= deadline)) || { echo "gpu-smoke: $1 agent(s) not Ready within $2 s; see $logs/*.log" >&2; return 1; }
        sleep 0.2
    done
}
job_json() { cohort status "$1" -o json; }
# wait_state JOB TIMEOUT_S STATE...: waits until the job is in one of STATEs (upper case).
wait_state() {
    local job="$1" deadline=$((SECONDS + $2)) state
    shift 2
    while :; do
        state="$(job_json "$job" | pyj 'd["state"].upper()' 2>/dev/null || true)"
        if [[ -z "$state" ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "NO-CONTROLLER"
            return 0
        fi
        for s in "$@"; do [[ "$state" == "$s" ]] && { echo "$state"; return 0; }; done
        case "$state" in SUCCEEDED | FAILED | CANCELLED)
            echo "$state"; return 0 ;;
        esac
        ((SECONDS <= deadline)) || { echo "$state"; return 0; }
        sleep 0.5
    done
}
give_up() { # job: cancel a job that is still going, so that it frees its GPUs for the next step
    timeout 30 "$bin/cohort" --controller "$url" cancel "$1" --wait >/dev/null 2>&1 || true
}
save_job() { # job tag: status, metrics and logs into the log directory
    job_json "$1" >"$logs/$2.status.json" 2>&1 || true
    # One document of points (cohort.v1), saved as JSON lines.
    cohort metrics "$1" -o json 2>&1 | python3 -c 'import json, sys; [print(json.dumps(p)) for p in json.load(sys.stdin)["points"]]' >"$logs/$2.metrics.jsonl" 2>&1 || true
    cohort logs "$1" >"$logs/$2.log" 2>&1 || true
}
launch_latency() { job_json "$1" | pyj 'int(d.get("running_unix_ms", 0)) - int(d["submitted_unix_ms"]) if d.get("running_unix_ms") else "never Running"'; }
# loss_summary FILE: "<points> <first loss> <last loss>" of a metrics JSON-lines file.
loss_summary() {
    "$HOST_PY" - "$1" <<'EOF'
import json, sys
pts = []
for line in open(sys.argv[1]):
    try:
        p = json.loads(line)
    except ValueError:
        continue
    if "loss" in p and not p.get("is_eval"):
        pts.append((int(p["iteration"]), p["loss"]))
pts.sort()
print(len(pts), pts[0][1] if pts else "nan", pts[-1][1] if pts else "nan")
EOF
}
# A variant of a job file, with workdir made absolute (it lives in $work) and argv edited.
job_variant() { # src dst sed-expr-for-command-line
    sed -e "s|^workdir: \.\.$|workdir: $root/examples|" -e "$3" "$1" >"$2"
    grep -q "^workdir: $root/examples$" "$2" || { echo "gpu-smoke: cannot rewrite workdir of $1" >&2; return 1; }
}

run_step() { # id title function
    local id="$1" title="$2" fn="$3" rc
    if [[ -n "${COHORT_SMOKE_STEPS:-}" && ",$COHORT_SMOKE_STEPS," != *",$id,"* ]]; then
        printf '%s\tSKIP\t%s\n' "$id" "$title (not in COHORT_SMOKE_STEPS)" >>"$results"
        return 0
    fi
    step "$id. $title"
    # In the background and waited for, so that INT/TERM reach the main
    # shell's trap at once (bash defers traps while a foreground child runs).
    (
        set -e
        "$fn"
    ) &
    step_pid=$!
    set +e
    wait "$step_pid"
    rc=$?
    set -e
    step_pid=""
    case $rc in
        0) printf '%s\tPASS\t%s\n' "$id" "$title" >>"$results"; say "PASS $id. $title" ;;
        3) printf '%s\tSKIP\t%s\n' "$id" "$title" >>"$results"; say "SKIP $id. $title" ;;
        *) printf '%s\tFAIL\t%s\n' "$id" "$title" >>"$results"; say "FAIL $id. $title" ;;
    esac
}

step "Cluster: controller on $url (/metrics on :$http_port), agents node-a and node-b; work dir $work"
mode="GPU"
((rehearsal)) && mode="CPU REHEARSAL (fake GPUs, gloo; GPU-only checks are skipped)"
say "mode: $mode; binaries: $bin; python: $PY; megatron-core importable: $megatron_ok; GPUs on host: $gpus"
"$bin/cohort-controller" --insecure --listen "127.0.0.1:$port" --http "127.0.0.1:$http_port" --data-dir "$work/controller" \
    --master-ports "$master_ports" >"$logs/controller.log" 2>&1 &
pid_of[controller]=$!
if ((rehearsal)); then
    start_agent node-a 127.0.0.2 --fake-gpus 1
    start_agent node-b 127.0.0.3 --fake-gpus 1
else
    start_agent node-a 127.0.0.2 --gpu-indices 0
    start_agent node-b 127.0.0.3 --gpu-indices 1
fi
wait_ready 2 60
cohort nodes

# ---------------------------------------------------------------------------
step_a() {
    cohort nodes -o json >"$logs/nodes.json"
    local problems
    problems="$("$HOST_PY" - "$logs/nodes.json" "$rehearsal" <<'EOF'
import json, sys
nodes = {n["info"]["name"]: n for n in json.load(open(sys.argv[1]))["nodes"]}
rehearsal = sys.argv[2] == "1"
problems, uuids = [], []
for name in ("node-a", "node-b"):
    gpus = nodes.get(name, {}).get("info", {}).get("gpus", [])
    if len(gpus) != 1:
        problems.append(f"{name}: {len(gpus)} GPUs, expected 1")
    for g in gpus:
        mem = int(g.get("memory_total_bytes", 0))
        print(f"  {name}: GPU {g.get('index', 0)} {g.get('name', '?')!r} uuid {g.get('uuid', '?')} "
              f"memory {mem / 2**30:.1f} GiB fake={g.get('fake', False)} pci {g.get('pci_bus_id', '?')}", file=sys.stderr)
        uuids.append(g.get("uuid", ""))
        if rehearsal:
            continue
        if g.get("fake") or "fake" in g.get("name", "").lower():
            problems.append(f"{name}: GPU {g.get('name')!r} is fake")
        if not g.get("uuid", "").startswith("GPU-"):
            problems.append(f"{name}: UUID {g.get('uuid')!r} does not start with GPU-")
        if mem <= 0:
            problems.append(f"{name}: memory_total_bytes is {mem}")
if not rehearsal and len(set(uuids)) != len(uuids):
    problems.append(f"the two nodes report the same GPU: {uuids}")
print("; ".join(problems))
EOF
)"
    [[ -z "$problems" ]] || die "$problems"
    if ((rehearsal)); then
        say "  SKIP: cpu rehearsal, the GPUs are fake (the real-GPU checks need NVML)"
        return 3
    fi
    say "  real GPUs: model named, UUIDs GPU-..., memory > 0, one distinct GPU per node"
}

# ---------------------------------------------------------------------------
poll_gpu_util() { # file: appends "<unix_ms> <metric line>" every 0.5 s until killed
    while :; do
        local t
        t=$(now_ms)
        { http_get "$metrics_url" 2>/dev/null || true; } | grep '^cohort_gpu_utilization_percent' | sed "s/^/$t /" >>"$1" || true
        sleep 0.5
    done
}
max_util() { # file [job]: the highest reading in the file (of that job's GPUs only, when given)
    awk -v job="${2:+job=\"$2\"}" 'index($0, job) { v = $NF + 0; if (v > m) m = v } END { printf "%g\n", m + 0 }' "$1"
}

step_b() {
    local job t0 state pts first last util
    poll_gpu_util "$logs/gpu-util.tiny-sft.log" &
    poller=$! # global: the subshell's EXIT trap needs it
    background "$poller" poller-b
    trap 'kill "$poller" 2>/dev/null || true; rm -f "$work/pid.poller-b"' EXIT
    t0=$(now_ms)
    job="$(cohort submit examples/jobs/tiny-sft.yaml)"
    say "  submitted $job"
    echo "$job" >"$work/job.tiny-sft"
    state="$(wait_state "$job" 120 SUCCEEDED)"
    kill "$poller" 2>/dev/null || true
    [[ "$state" == SUCCEEDED || "$state" == FAILED || "$state" == CANCELLED ]] || give_up "$job"
    save_job "$job" tiny-sft
    say "  $job: $state after $((($(now_ms) - t0) / 1000)) s"
    [[ "$state" == SUCCEEDED ]] || { tail -n 30 "$logs/tiny-sft.log" >&2; die "$job ended $state"; }
    read -r pts first last < <(loss_summary "$logs/tiny-sft.metrics.jsonl")
    say "  metrics: $pts points, loss $first -> $last"
    ((pts >= 2)) || die "only $pts metrics points"
    "$HOST_PY" -c "import sys; sys.exit(0 if $last < $first else 1)" || die "loss did not fall ($first -> $last)"
    # The poller ran from just before the submit to the end of the job, and
    # node-a and node-b have no other work: any reading above 0 is this job's.
    util="$(max_util "$logs/gpu-util.tiny-sft.log")"
    figure "tiny-sft max GPU utilisation in /metrics while it ran (%)" "$util"
    figure "tiny-sft max GPU utilisation in /metrics labelled job=\"$job\" (%)" "$(max_util "$logs/gpu-util.tiny-sft.log" "$job")"
    if ((rehearsal)); then
        say "  SKIP (utilisation check): cpu rehearsal, fake GPUs report 0 %"
        return 0
    fi
    "$HOST_PY" -c "import sys; sys.exit(0 if $util > 0 else 1)" ||
        die "no GPU utilisation > 0 seen in $metrics_url while $job ran (samples: $(wc -l <"$logs/gpu-util.tiny-sft.log"))"
}

# ---------------------------------------------------------------------------
megatron_file() { # iters -> path of the job file to submit
    local src="examples/jobs/megatron-gpt-tp2.yaml" dst="$work/megatron-gpt-$1.yaml" extra=""
    ((rehearsal)) && extra=", --cpu"
    if [[ "$1" == 50 && -z "$extra" ]]; then
        echo "$src"
        return
    fi
    job_variant "$src" "$dst" "s|^command: \[megatron-gpt/launch.sh, --iters, \"50\"\(.*\)\]$|command: [megatron-gpt/launch.sh, --iters, \"$1\"\1$extra]|"
    grep -q -- "--iters, \"$1\"" "$dst" || { echo "gpu-smoke: cannot rewrite the command of $src" >&2; return 1; }
    echo "$dst"
}

step_c() {
    ((megatron_ok)) || die "megatron-core is not importable by $PY (pip install megatron-core==0.19.2, or put .whl/megatron_core-0.19.2-*.whl in the repository)"
    local file job t0 state pts first last
    file="$(megatron_file 50)"
    t0=$(now_ms)
    job="$(cohort submit "$file")"
    say "  submitted $job ($file)"
    echo "$job" >"$work/job.megatron"
    state="$(wait_state "$job" 150 SUCCEEDED)"
    [[ "$state" == SUCCEEDED || "$state" == FAILED || "$state" == CANCELLED ]] || give_up "$job"
    save_job "$job" megatron
    say "  $job: $state after $((($(now_ms) - t0) / 1000)) s"
    [[ "$state" == SUCCEEDED ]] || { tail -n 40 "$logs/megatron.log" >&2; die "$job ended $state"; }
    grep -m 3 'iteration ' "$logs/megatron.log" | sed 's/^/  /' || true
    read -r pts first last < <(loss_summary "$logs/megatron.metrics.jsonl")
    say "  metrics: $pts points (format $(head -n 1 "$logs/megatron.metrics.jsonl" | pyj 'd.get("format")')), lm loss $first -> $last"
    ((pts >= 3)) || die "only $pts Megatron metrics points came back through cohort metrics"
    "$HOST_PY" -c "import sys; sys.exit(0 if $last < $first else 1)" || die "lm loss did not fall ($first -> $last)"
}

# ---------------------------------------------------------------------------
step_d() {
    ((megatron_ok)) || die "megatron-core is not importable by $PY"
    local file job state deadline shim worker t_kill t_now t_failed="" t_gone="" left live
    file="$(megatron_file 100000)"
    poll_gpu_util "$logs/gpu-util.megatron-long.log" &
    poller=$! # global: the subshell's EXIT trap needs it
    background "$poller" poller-d
    trap 'kill "$poller" 2>/dev/null || true; rm -f "$work/pid.poller-d"' EXIT
    job="$(cohort submit "$file")"
    say "  submitted $job ($file)"
    state="$(wait_state "$job" 60 RUNNING)"
    [[ "$state" == RUNNING ]] || { give_up "$job"; save_job "$job" megatron-long; die "$job is $state, not Running"; }
    # Training, not just started: wait for 2 metrics points (the ranks are in the loop).
    deadline=$((SECONDS + 120))
    until (($(cohort metrics "$job" -o json 2>/dev/null | grep -c '"iteration"') >= 2)); do
        ((SECONDS <= deadline)) || { give_up "$job"; save_job "$job" megatron-long; die "no training metrics from $job within 120 s"; }
        sleep 0.5
    done
    shim="$(job_json "$job" | pyj '[p["pid"] for p in d["processes"] if p["node_name"] == "node-b"][0]')"
    worker="$("$HOST_PY" - "$shim" <<'EOF'
import os, sys
root = int(sys.argv[1])
children = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        continue
    children.setdefault(ppid, []).append(int(pid))
todo, found = [root], []
while todo:
    pid = todo.pop()
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    if "train_gpt.py" in cmd and "torch.distributed.run" not in cmd:
        found.append(pid)
    todo += children.get(pid, [])
print(" ".join(map(str, found)))
EOF
)"
    [[ -n "$worker" && "$worker" != *" "* ]] || give_up "$job"
    [[ -n "$worker" && "$worker" != *" "* ]] || die "expected one python worker under node-b's process $shim, found '${worker}'"
    say "  node-b: process $shim (shim), python worker $worker: $(tr '\0' ' ' </proc/"$worker"/cmdline | cut -c1-160)"
    say "  job processes before the kill: $(procs_matching train_gpt.py | wc -l)"
    t_kill=$(now_ms)
    kill -KILL "$worker"
    deadline=$((t_kill + 10000))
    while :; do
        t_now=$(now_ms)
        state="$(job_json "$job" | pyj 'd["state"].upper() + " " + str(d.get("live_processes", 0))' || echo "UNKNOWN ?")"
        live="${state#* }"
        state="${state% *}"
        left="$(procs_matching train_gpt.py | tr '\n' ' ')"
        left="${left% }"
        [[ "$state" == FAILED && -z "$t_failed" ]] && t_failed=$t_now
        [[ "$live" == 0 && -z "$left" && -z "$t_gone" ]] && t_gone=$t_now
        [[ -n "$t_failed" && -n "$t_gone" ]] && break
        ((t_now <= deadline)) || break
        sleep 0.1
    done
    kill "$poller" 2>/dev/null || true
    save_job "$job" megatron-long
    say "  failure: $(pyj 'd.get("failure", {}).get("message", d.get("reason", ""))' <"$logs/megatron-long.status.json")"
    if [[ -n "$t_failed" ]]; then
        figure "teardown: SIGKILL of one rank -> job Failed (ms, polled)" "$((t_failed - t_kill))"
    fi
    if [[ -n "$t_gone" ]]; then
        figure "teardown: SIGKILL of one rank -> no process of the job on either node (ms, polled)" "$((t_gone - t_kill))"
    fi
    figure "teardown by the agents' clocks: SIGKILL -> last process of the gang ended (ms)" \
        "$(pyj "max(int(p.get('ended_unix_ms', 0)) for p in d['processes']) - $t_kill" <"$logs/megatron-long.status.json")"
    figure "megatron long run max GPU utilisation seen in /metrics (%)" "$(max_util "$logs/gpu-util.megatron-long.log" "$job")"
    [[ -n "$t_failed" ]] || die "$job is $state 10 s after the kill, not FAILED"
    [[ "$live" == 0 ]] || die "$job still has $live live processes 10 s after the kill"
    [[ -z "$left" ]] || { ps -o pid,ppid,etime,args -p "${left// /,}" >&2 || true; die "processes of the job left 10 s after the kill: $left"; }
    say "  $job Failed after $((t_failed - t_kill)) ms; no train_gpt.py process on either node after $((t_gone - t_kill)) ms"
}

# ---------------------------------------------------------------------------
# f. A hang on real NCCL: one rank of a tiny-sft run is SIGSTOPped, so the
# other blocks in an all-reduce (its GPU spinning at a flat rate). Cohort must
# see no progress for hang_timeout, dump the stacks, fail the attempt as
# `hang` with node-b as the suspect, and run attempt 2 (a short run) to the end.
hang_job_file() { # path
    cat >"$1" <<JOB
name: tiny-sft-hang
kind: command
nodes: 2
gpus_per_node: 1
workdir: $root/examples
env:
  OMP_NUM_THREADS: "1"
  NCCL_NVLS_ENABLE: "0"
  TORCH_SYMM_MEM_DISABLE_MULTICAST: "1"
stop_grace: 5s
hang_timeout: 45s
restart: {max_restarts: 1, backoff: 1s, on: [hang]}
# Attempt 1 trains "forever" (until the hang); attempt 2 is a short run.
command: [bash, -c, 'exec tiny-sft/launch.sh --steps "\$(if [ "\$COHORT_ATTEMPT" = 1 ]; then echo 1000000; else echo 60; fi)" --log-interval 5']
JOB
}

step_f() {
    local file job state attempt cause shim worker pid t_stop t_hang="" t_run2="" t_now deadline doc left status
    file="$work/tiny-sft-hang.yaml"
    hang_job_file "$file"
    job="$(cohort submit "$file")"
    say "  submitted $job ($file)"
    echo "$job" >"$work/job.tiny-sft-hang"
    state="$(wait_state "$job" 120 RUNNING)"
    [[ "$state" == RUNNING ]] || { give_up "$job"; save_job "$job" tiny-sft-hang; die "$job is $state, not Running"; }
    deadline=$((SECONDS + 120))
    until (($(cohort metrics "$job" -o json 2>/dev/null | grep -c '"iteration"') >= 2)); do
        ((SECONDS <= deadline)) || { give_up "$job"; save_job "$job" tiny-sft-hang; die "no training metrics from $job within 120 s"; }
        sleep 0.5
    done
    # Training in attempt 1 (a start slower than hang_timeout would already have ended it).
    attempt="$(job_json "$job" | pyj 'd["state"].upper() + "/" + str(d.get("attempt", 0))')"
    [[ "$attempt" == RUNNING/1 ]] || { give_up "$job"; save_job "$job" tiny-sft-hang; die "$job is $attempt before the SIGSTOP, not RUNNING/1"; }
    shim="$(job_json "$job" | pyj '[p["pid"] for p in d["processes"] if p["node_name"] == "node-b"][0]')"
    worker=""
    for pid in $(descendants "$shim"); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'train.py' &&
            ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'torch.distributed.run'; then
            worker="$worker $pid"
        fi
    done
    worker="${worker# }"
    if [[ -z "$worker" || "$worker" == *" "* ]]; then
        give_up "$job"
        die "expected one python worker under node-b's process $shim, found '$worker'"
    fi
    say "  node-b: SIGSTOP of the python worker $worker (under shim $shim)"
    t_stop=$(now_ms)
    kill -STOP "$worker"
    deadline=$((t_stop + 180000))
    while :; do
        t_now=$(now_ms)
        doc="$(job_json "$job" 2>/dev/null || true)"
        if [[ -n "$doc" ]]; then
            read -r state attempt cause < <(pyj '" ".join([d["state"].upper(), str(d.get("attempt", 0)), ((d.get("attempts") or [{}])[0].get("failure") or {}).get("cause", "-")])' <<<"$doc")
            [[ "$cause" == hang && -z "$t_hang" ]] && t_hang=$t_now
            [[ "$attempt" == 2 && "$state" == RUNNING && -z "$t_run2" ]] && t_run2=$t_now
            case "$state" in SUCCEEDED | FAILED | CANCELLED) break ;; esac
        fi
        ((t_now <= deadline)) || break
        sleep 0.5
    done
    kill -CONT "$worker" 2>/dev/null || true
    state="$(wait_state "$job" 120 SUCCEEDED)"
    save_job "$job" tiny-sft-hang
    status="$logs/tiny-sft-hang.status.json"
    [[ -n "$t_hang" ]] && figure "NCCL hang (SIGSTOP of one rank) -> attempt failed as hang (ms; hang_timeout 45 s)" "$((t_hang - t_stop))"
    [[ -n "$t_run2" ]] && figure "NCCL hang -> attempt 2 Running (ms)" "$((t_run2 - t_stop))"
    "$HOST_PY" - "$status" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
for a in d.get("attempts", []):
    f = a.get("failure") or {}
    print("  attempt %s: %s; cause %s; suspect %s (%s)" % (a.get("attempt"), a.get("state", "").upper(),
          f.get("cause", "-"), f.get("suspect_node", "-"), f.get("suspect_reason", "-")[:100]))
    for line in a.get("stack_dumps", []):
        print("    stack dump:", line[:160])
PY
    grep -m 16 '\[cohort stack dump\]' "$logs/tiny-sft-hang.log" | cut -c1-200 | sed 's/^/  /' || true
    [[ -n "$t_hang" ]] || { give_up "$job"; die "no attempt of $job failed as a hang within 180 s of the SIGSTOP (state $state)"; }
    [[ "$(pyj '(d["attempts"][0].get("failure") or {}).get("suspect_node", "")' <"$status")" == node-b ]] ||
        die "the suspect of the hang is not node-b"
    [[ "$(pyj 'len(d["attempts"][0].get("stack_dumps", []))' <"$status")" -ge 1 ]] || die "attempt 1 kept no stack dumps"
    grep -q '\[cohort stack dump\]' "$logs/tiny-sft-hang.log" || die "no stack dump lines in the job's log"
    [[ "$state" == SUCCEEDED ]] || die "$job ended $state after the hang, not SUCCEEDED (attempt 2 should have run to the end)"
    left="$(procs_matching tiny-sft/train.py | tr '\n' ' ')"
    [[ -z "${left// /}" ]] || die "processes of $job left: $left"
}

# ---------------------------------------------------------------------------
# ticks and RSS of a pid: "<utime+stime ticks> <VmRSS kB>"
proc_sample() {
    local stat rss
    stat="$(cat "/proc/$1/stat")"
    stat="${stat##*) }"
    read -r -a f <<<"$stat"
    rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status")"
    echo "$((f[11] + f[12])) ${rss:-0}"
}

step_e() {
    local f job lat tck a0 a1 c0 c1 b0 b1 t0 t1
    for f in tiny-sft megatron; do
        [[ -s "$work/job.$f" ]] || { say "  $f: no job (its step failed early)"; continue; }
        job="$(cat "$work/job.$f")"
        lat="$(launch_latency "$job")"
        figure "launch latency $f (submit -> Running, ms)" "$lat"
    done
    # An idle agent with a fake GPU beside the real ones, for comparison. It
    # joins only now, so that no job could have been placed on it.
    start_agent node-c 127.0.0.4 --fake-gpus 1
    background "${pid_of[node-c]}" node-c
    trap 'kill -TERM "${pid_of[node-c]}" 2>/dev/null || true; wait "${pid_of[node-c]}" 2>/dev/null || true; rm -f "$work/pid.node-c"' EXIT
    wait_ready 3 60
    sleep 5 # past its start-up probe
    tck="$(getconf CLK_TCK)"
    read -r a0 _ < <(proc_sample "${pid_of[node-a]}")
    read -r b0 _ < <(proc_sample "${pid_of[node-b]}")
    read -r c0 _ < <(proc_sample "${pid_of[node-c]}")
    t0=$(now_ms)
    sleep 10
    t1=$(now_ms)
    read -r a1 arss < <(proc_sample "${pid_of[node-a]}")
    read -r b1 brss < <(proc_sample "${pid_of[node-b]}")
    read -r c1 crss < <(proc_sample "${pid_of[node-c]}")
    local gpu_kind="real GPU, NVML"
    ((rehearsal)) && gpu_kind="fake GPU (rehearsal)"
    cpu() { "$HOST_PY" -c "print(f'{($2 - $1) / $tck / (($t1 - $t0) / 1000) * 100:.2f}')"; }
    figure "agent node-a ($gpu_kind, 1 s telemetry) CPU % of a core over $(((t1 - t0) / 1000)) s" "$(cpu "$a0" "$a1")"
    figure "agent node-a RSS (MiB)" "$((arss / 1024))"
    figure "agent node-b ($gpu_kind, 1 s telemetry) CPU % of a core" "$(cpu "$b0" "$b1")"
    figure "agent node-b RSS (MiB)" "$((brss / 1024))"
    figure "agent node-c (--fake-gpus 1, idle) CPU % of a core" "$(cpu "$c0" "$c1")"
    figure "agent node-c RSS (MiB)" "$((crss / 1024))"
    read -r a0 arss < <(proc_sample "${pid_of[controller]}")
    figure "controller RSS (MiB)" "$((arss / 1024))"
}

run_step a "cohort nodes shows the real GPUs" step_a
run_step b "tiny-sft across node-a and node-b: Succeeded, loss falls, GPU utilisation > 0" step_b
if ((megatron_ok)); then
    run_step c "Megatron GPT, tensor parallelism 2 across the nodes: Succeeded, >= 3 metrics points, loss falls" step_c
    run_step d "one rank SIGKILLed: job Failed, nothing left on either node within 10 s" step_d
else
    for s in c d; do
        [[ -z "${COHORT_SMOKE_STEPS:-}" || ",$COHORT_SMOKE_STEPS," == *",$s,"* ]] || continue
        step "$s. Megatron"
        say "FAIL $s: megatron-core is not importable by $PY and no .whl/megatron_core-*.whl to unpack"
        printf '%s\tFAIL\t%s\n' "$s" "Megatron: megatron-core missing" >>"$results"
    done
fi
run_step f "one rank SIGSTOPped (NCCL hang): hang detected, stacks dumped, attempt 2 succeeds" step_f
run_step e "figures: launch latency, agent CPU and RSS with 1 s GPU telemetry" step_e

# ---------------------------------------------------------------------------
step "Summary ($mode)"
{
    say "gpu-smoke on ${HOSTNAME:-?} at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), mode: $mode"
    nvidia-smi -L 2>/dev/null | sed 's/^/  /' || true
    say "python $PY; $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "")' 2>/dev/null || true)"
    say ""
    awk -F '\t' '{ printf "%-4s %s. %s\n", $2, $1, $3 }' "$results"
    say ""
    awk -F '\t' '{ printf "  %s: %s\n", $1, $2 }' "$figures"
} | tee "$out/summary.txt"
"$HOST_PY" - "$results" "$figures" "$mode" >"$out/results.json" <<'EOF'
import json, sys
steps = [dict(zip(("step", "result", "title"), l.rstrip("\n").split("\t"))) for l in open(sys.argv[1]) if l.strip()]
figs = dict(l.rstrip("\n").split("\t", 1) for l in open(sys.argv[2]) if l.strip())
print(json.dumps({"mode": sys.argv[3], "steps": steps, "figures": figs}, indent=2))
EOF
say "results: $out/summary.txt, $out/results.json, $out/logs.tar.gz (work dir $work)"
if grep -q $'\tFAIL\t' "$results"; then
    say "gpu-smoke: FAILED"
    exit 1
fi
say "gpu-smoke: PASSED"
