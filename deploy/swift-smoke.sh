#!/usr/bin/env bash
# The REAL ms-swift `megatron sft` on ONE GPU, rendered and supervised by Cohort (issue 13):
# a controller and one agent (node-a, 127.0.0.2, GPU 0) on loopback, the stack of tests/swift-gpu/
# (ms-swift 3.12.6, Megatron-LM core_r0.15.0, --transformer_impl local, a tiny random Qwen3; no
# transformer_engine: its import is satisfied by the TEST FIXTURE tests/swift-gpu/shim, which this
# script puts on the job's PYTHONPATH; Cohort itself never does).
#   a. a `kind: megatron-sft` job runs to Succeeded; `cohort metrics` shows train points (loss falls)
#      and eval points; figures: submit -> first iteration, iterations, loss first -> last;
#   b. the same job with `restart: {on: [rank_failed]}`: the rank is SIGKILLed once checkpoint 10 is
#      complete; the next attempt resumes from the newest complete checkpoint and its first iteration
#      is that checkpoint's + 1; figures: resumed-at iteration, kill -> next attempt's first iteration;
#   c. a pipeline: `swift infer` (pt backend) on the tiny model before training, the sft stage, the
#      export, `swift infer` after, and `cohort report`;
#   d. the same training started by hand (tests/swift-gpu/run.sh), for the step time against Cohort's;
#   e. preemption of a real megatron-sft job saves on the signal and resumes: the job (queue `shared`,
#      no quota: it borrows the GPU) declares `preempt: {signal: SIGTERM}`, for which Cohort renders
#      Megatron's `exit_signal_handler` into megatron_extra_kwargs (num_workers 0: see docs/src/queues.md);
#      a job of queue team-a (quota 1 GPU) reclaims the GPU; the sft job saves on SIGTERM, is
#      Preempted, and resumes from that save once team-a's job ends; figures: iteration at
#      preemption, resumed-from, iterations lost (goal 0), reclaim -> owner running.
# Prints PASS/FAIL/SKIP per step and the figures; exit 0 only if nothing failed.
#
# Usage: deploy/swift-smoke.sh [--cpu-rehearsal] [BIN_DIR]
#   BIN_DIR  holds cohort-controller, cohort-agent, cohort (default target/release)
#   --cpu-rehearsal  no GPU: a fake GPU slot; step a must get as far as Megatron's
#                    "Megatron requires CUDA" (rendering, preflight, the node's own ms-swift parse,
#                    dataset, launch all real); step e only renders its job (`cohort plan`: the
#                    exit_signal_handler reaches the command line); the rest is SKIPped.
# Environment: PYTHON (the jobs' interpreter, with torch; default python3), OUT (results, default
#   <repo>/.cohort/swift-smoke), SWIFT_SMOKE_STEPS (e.g. "a,b"), SWIFT_SMOKE_PORT (default 17270).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rehearsal=0
bin=""
for arg in "$@"; do
    case "$arg" in
        --cpu-rehearsal) rehearsal=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "swift-smoke: unknown option $arg" >&2; exit 2 ;;
        *) bin="$arg" ;;
    esac
done
bin="$(cd "${bin:-$root/target/release}" 2>/dev/null && pwd)" || { echo "swift-smoke: no such BIN_DIR" >&2; exit 2; }
for b in cohort-controller cohort-agent cohort; do
    [[ -x "$bin/$b" ]] || { echo "swift-smoke: $bin/$b is missing (cargo build --release --workspace)" >&2; exit 2; }
done
PY="$(command -v "${PYTHON:-python3}")" || { echo "swift-smoke: no python ${PYTHON:-python3}" >&2; exit 2; }
"$PY" -c 'import torch' 2>/dev/null || { echo "swift-smoke: $PY cannot import torch (set PYTHON)" >&2; exit 2; }
port="${SWIFT_SMOKE_PORT:-17270}"
url="http://127.0.0.1:$port"
out="${OUT:-$root/.cohort/swift-smoke}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/cohort-swift-smoke.XXXXXX")"
logs="$out/logs"
rm -rf "$logs"
mkdir -p "$logs"
: >"$out/results.tsv"
: >"$out/figures.tsv"

say() { printf '%s\n' "$*"; }
now_ms() { date +%s%3N; }
figure() { printf '%s\t%s\n' "$1" "$2" >>"$out/figures.tsv"; say "  $1: $2"; }
cohort() { "$bin/cohort" --insecure --controller "$url" "$@"; }
pyj() { "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
state_of() { cohort status "$1" -o json 2>/dev/null | pyj 'd["state"].upper()' 2>/dev/null || true; }
wait_state() { # job timeout_s state...: prints the state reached (or the last seen at the deadline)
    local job="$1" deadline=$((SECONDS + $2)) s
    shift 2
    while :; do
        s="$(state_of "$job")"
        for want in "$@" SUCCEEDED FAILED CANCELLED; do [[ "$s" == "$want" ]] && { echo "$s"; return 0; }; done
        ((SECONDS <= deadline)) || { echo "${s:-unknown}"; return 0; }
        sleep 0.5
    done
}
save_job() { # job tag
    cohort status "$1" >"$logs/$2.status.txt" 2>&1 || true
    cohort status "$1" -o json >"$logs/$2.status.json" 2>&1 || true
    # One document of points (cohort.v1), saved as JSON lines.
    cohort metrics "$1" -o json 2>&1 | python3 -c 'import json, sys; [print(json.dumps(p)) for p in json.load(sys.stdin)["points"]]' >"$logs/$2.metrics.jsonl" 2>&1 || true
    cohort logs "$1" >"$logs/$2.log" 2>&1 || true
}
# metric_summary FILE [SINCE_MS]: "<train points> <first iteration> <first loss> <last iteration> <last loss> <eval points> <first unix_ms>"
metric_summary() {
    "$PY" - "$1" "${2:-0}" <<'EOF'
import json, sys
train, evals = [], []
for line in open(sys.argv[1]):
    try:
        p = json.loads(line)
    except ValueError:
        continue
    if int(p.get("unix_ms", 0)) < int(sys.argv[2]):
        continue
    (evals if p.get("is_eval") else train).append(p)
train = [p for p in train if "loss" in p]
if not train:
    print(0, 0, "nan", 0, "nan", len(evals), 0)
else:
    first, last = train[0], train[-1]
    print(len(train), first["iteration"], first["loss"], last["iteration"], last["loss"], len(evals), first["unix_ms"])
EOF
}

# ---------------------------------------------------------------------------
# The ms-swift stack (tests/swift-gpu) and the cluster
# ---------------------------------------------------------------------------
job_env=()
while IFS='=' read -r key value; do
    case "$key" in
        SWIFT_GPU_TINY) tiny="$value" ;;
        SWIFT_GPU_EMPTY_MCORE) empty_mcore="$value" ;;
        SWIFT_GPU_BIN) ov_bin="$value" ;;
        *) job_env+=("$key=$value") ;;
    esac
done < <(PYTHON="$PY" SWIFT_GPU_DIR="${SWIFT_GPU_DIR:-$root/.cohort/swift-gpu}" bash "$root/tests/swift-gpu/setup.sh")
swift_version="$(env "${job_env[@]}" "$PY" -c 'import swift; print(swift.__version__)' 2>/dev/null)" \
    || { echo "swift-smoke: ms-swift does not import with the overlay" >&2; exit 2; }

declare -A pid_of=()
cleanup() {
    local rc=$?
    set +e
    [[ -n "${pid_of[node-a]:-}" ]] && { kill -TERM "${pid_of[node-a]}"; wait "${pid_of[node-a]}"; }
    [[ -n "${pid_of[controller]:-}" ]] && { kill -TERM "${pid_of[controller]}"; wait "${pid_of[controller]}"; }
    cp "$work"/*.log "$logs"/ 2>/dev/null
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "swift-smoke: binaries $bin; python $PY; ms-swift $swift_version; work $work; rehearsal $rehearsal"
# Jobs without `queue:` go to `shared` (no quota: scheduled as without queues); step e's owner job
# goes to team-a, whose quota of 1 GPU the sft job borrows.
printf 'default = "shared"\n[[queue]]\nname = "team-a"\ngpus = 1\n[[queue]]\nname = "shared"\n' >"$work/queues.toml"
"$bin/cohort-controller" --insecure --listen "127.0.0.1:$port" --http "127.0.0.1:$((port + 1))" \
    --data-dir "$work/controller" --master-ports 26300-26399 --queues "$work/queues.toml" \
    >"$work/controller.log" 2>&1 &
pid_of[controller]=$!
gpu_args=(--gpu-indices 0)
((rehearsal)) && gpu_args=(--fake-gpus 1)
COHORT_ALLOW_ROOT_RANKS=$([ "$(id -u)" = 0 ] && echo true || echo false) \
    "$bin/cohort-agent" --insecure --controller "$url" --node-name node-a --advertise-addr 127.0.0.2 \
    --work-dir "$work/node-a" --net-ifname lo --python "$PY" --telemetry-interval 1s "${gpu_args[@]}" \
    >"$work/node-a.log" 2>&1 &
pid_of[node-a]=$!
deadline=$((SECONDS + 60))
until cohort nodes -o json 2>/dev/null | grep -q '"state": "Ready"'; do
    ((SECONDS <= deadline)) || { echo "swift-smoke: node-a not Ready in 60 s; see $work/node-a.log" >&2; exit 1; }
    sleep 0.2
done

# sft_job NAME SAVE TRAIN_ITERS EXTRA_TOP_LEVEL: a megatron-sft job file, Cohort renders the command line.
# SFT_NUM_WORKERS, SFT_EXTRA_KWARGS (megatron_extra_kwargs JSON), SFT_SAVE_INTERVAL change those flags.
sft_job() {
    local env_yaml="" kv default_extra_kwargs='{"no_persist_layer_norm": true}'
    for kv in "${job_env[@]}"; do env_yaml+="  ${kv%%=*}: \"${kv#*=}\""$'\n'; done
    cat <<EOF
name: $1
kind: megatron-sft
nodes: 1
gpus_per_node: 1
python: $PY
workdir: $work
hang_timeout: 600s
stop_grace: 10s
env:
$env_yaml$4
megatron:
  swift_version: "3.12"
  program: [$PY, -m, swift.cli._megatron.main, sft]
  model: $tiny/Qwen3-tiny
  model_type: qwen3
  check_model: false
  load: $empty_mcore
  exit_on_missing_checkpoint: false
  no_initialization: false
  finetune: true
  dataset: [$tiny/data/train.jsonl]
  split_dataset_ratio: 0.05
  dataset_num_proc: 1
  num_workers: ${SFT_NUM_WORKERS:-1}
  max_length: 256
  system: You are a helpful assistant.
  transformer_impl: local
  padding_free: false
  megatron_extra_kwargs: '${SFT_EXTRA_KWARGS:-$default_extra_kwargs}'
  no_masked_softmax_fusion: true
  no_rope_fusion: true
  no_bias_dropout_fusion: true
  no_bias_swiglu_fusion: true
  no_gradient_accumulation_fusion: true
  cross_entropy_loss_fusion: false
  use_distributed_optimizer: false
  bf16: true
  micro_batch_size: 2
  global_batch_size: 8
  train_iters: $3
  log_interval: 1
  lr: 1e-4
  min_lr: 1e-5
  lr_warmup_iters: 2
  eval_interval: 10
  save: $2
  save_interval: ${SFT_SAVE_INTERVAL:-10}
  save_safetensors: false
EOF
}

run_step() { # id title function
    local id="$1" title="$2" fn="$3" rc
    if [[ -n "${SWIFT_SMOKE_STEPS:-}" && ",$SWIFT_SMOKE_STEPS," != *",$id,"* ]]; then
        printf '%s\tSKIP\t%s\n' "$id" "$title (not in SWIFT_SMOKE_STEPS)" >>"$out/results.tsv"
        return 0
    fi
    say ""
    say "==> $id. $title"
    set +e
    (set -e; "$fn")
    rc=$?
    set -e
    case $rc in
        0) printf '%s\tPASS\t%s\n' "$id" "$title" >>"$out/results.tsv"; say "PASS $id. $title" ;;
        3) printf '%s\tSKIP\t%s\n' "$id" "$title" >>"$out/results.tsv"; say "SKIP $id. $title" ;;
        *) printf '%s\tFAIL\t%s\n' "$id" "$title" >>"$out/results.tsv"; say "FAIL $id. $title" ;;
    esac
}

# ---------------------------------------------------------------------------
# a. megatron-sft to Succeeded, metrics from stdout and logging.jsonl
# ---------------------------------------------------------------------------
step_a() {
    sft_job swift-sft "$work/out-a" 30 "" >"$work/a.yaml"
    cohort plan "$work/a.yaml" >"$logs/a.plan.txt" 2>&1 || { cat "$logs/a.plan.txt"; return 1; }
    local t0 job st
    t0=$(now_ms)
    job="$(cohort submit "$work/a.yaml" 2>&1 | awk '/submitted job/ {print $3}')"
    say "  job $job"
    [[ -n "$job" ]] || { say "  the submit printed no job id"; return 1; }
    if ((rehearsal)); then
        st="$(wait_state "$job" 300)"
        save_job "$job" a
        [[ "$st" == FAILED ]] || { say "  expected Failed without CUDA, got $st"; return 1; }
        grep -q "Megatron requires CUDA" "$logs/a.log" \
            || { say "  the failure is not Megatron's CUDA assertion; see $logs/a.log"; tail -20 "$logs/a.log"; return 1; }
        say "  rendered, preflighted, parsed by the node's ms-swift and launched; stopped at Megatron's CUDA check as expected on CPU"
        return 0
    fi
    st="$(wait_state "$job" 900)"
    save_job "$job" a
    [[ "$st" == SUCCEEDED ]] || { say "  job ended $st"; tail -30 "$logs/a.log"; return 1; }
    read -r n it0 loss0 it1 loss1 evals first_ms < <(metric_summary "$logs/a.metrics.jsonl")
    figure "a.submit_to_first_iteration_s" "$(( (first_ms - t0) / 1000 )).$(( (first_ms - t0) % 1000 / 100 ))"
    figure "a.iterations" "$it0 -> $it1 ($n train points, $evals eval points)"
    figure "a.loss" "$loss0 -> $loss1"
    "$PY" -c "import sys; sys.exit(0 if float('$loss1') < float('$loss0') else 1)" || { say "  loss did not fall"; return 1; }
    ((evals >= 2)) || { say "  fewer than 2 eval points"; return 1; }
    ((it1 == 30)) || { say "  last iteration $it1, not 30"; return 1; }
}

# ---------------------------------------------------------------------------
# b. the rank killed after checkpoint 10; the next attempt resumes from it
# ---------------------------------------------------------------------------
step_b() {
    ((rehearsal)) && { say "  needs CUDA"; return 3; }
    sft_job swift-sft-resume "$work/out-b" 60 $'restart:\n  max_restarts: 1\n  backoff: 1s\n  on: [rank_failed]' >"$work/b.yaml"
    local job ckpt="" deadline newest pid kill_ms st
    job="$(cohort submit "$work/b.yaml" 2>&1 | awk '/submitted job/ {print $3}')"
    say "  job $job"
    [[ -n "$job" ]] || { say "  the submit printed no job id"; return 1; }
    deadline=$((SECONDS + 600))
    until [[ -n "$ckpt" ]]; do
        ckpt="$(compgen -G "$work/out-b/v*/checkpoint-10/latest_checkpointed_iteration.txt" || true)"
        ((SECONDS <= deadline)) || { say "  no checkpoint-10 within 600 s"; save_job "$job" b; return 1; }
        sleep 0.1
    done
    # The training worker: torchrun's child, whose command line names sft.py
    # (torchrun's own names it too, as its argument).
    ps -eo pid,ppid,pgid,sid,args >"$logs/b.ps.txt"
    pid=""
    for p in $(pgrep -f '_megatron/sft.py' || true); do
        if ! grep -qa 'torch.distributed.run' "/proc/$p/cmdline" 2>/dev/null; then pid="$p"; break; fi
    done
    [[ -n "$pid" ]] || { say "  no training worker found"; return 1; }
    kill -KILL "$pid"
    kill_ms=$(now_ms)
    newest="$(cat "$work"/out-b/v*/checkpoint-*/latest_checkpointed_iteration.txt 2>/dev/null | sort -n | tail -1)"
    say "  killed worker $pid; newest complete checkpoint: $newest"
    st="$(wait_state "$job" 900)"
    save_job "$job" b
    [[ "$st" == SUCCEEDED ]] || { say "  job ended $st"; tail -30 "$logs/b.log"; return 1; }
    # The points of the next attempt: those read after it started (the killed attempt may
    # have logged an iteration or two past checkpoint 10 before the kill landed).
    local next_start
    next_start="$(pyj 'max(int(a.get("startedUnixMs", a.get("started_unix_ms", 0))) for a in d.get("attempts", []))' <"$logs/b.status.json")"
    ((next_start > kill_ms)) || { say "  no attempt started after the kill"; return 1; }
    read -r n it0 loss0 it1 loss1 evals first_ms < <(metric_summary "$logs/b.metrics.jsonl" "$next_start")
    figure "b.killed_after_checkpoint" "$newest"
    figure "b.resumed_attempt_first_iteration" "$it0"
    figure "b.kill_to_next_attempt_first_iteration_s" "$(( (first_ms - kill_ms) / 1000 )).$(( (first_ms - kill_ms) % 1000 / 100 ))"
    figure "b.resumed_loss" "$loss0 -> $loss1 (iterations $it0 -> $it1)"
    grep -Eq "^attempt: +2|attempt 2|Attempt 2" "$logs/b.status.txt" || say "  (status does not name attempt 2; see $logs/b.status.txt)"
    ((it0 == newest + 1)) || { say "  resumed at $it0, expected $((newest + 1))"; return 1; }
}

# ---------------------------------------------------------------------------
# c. a pipeline: swift infer before and after training, cohort report
# ---------------------------------------------------------------------------
step_c() {
    ((rehearsal)) && { say "  needs CUDA"; return 3; }
    "$PY" -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][:4]
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps({"messages": [m for m in r["messages"] if m["role"] != "assistant"]}) + "\n")
' "$tiny/data/train.jsonl" "$work/prompts.jsonl"
    local env_yaml="" kv job st
    for kv in "${job_env[@]}"; do env_yaml+="  ${kv%%=*}: \"${kv#*=}\""$'\n'; done
    # The sft stage: step a's megatron: section (the pipeline sets swift_version), saving
    # Hugging Face safetensors too, so that infer reads the checkpoint (3.10+ does that itself).
    sft_job unused "$work/pipeline-sft" 20 "" | sed -n '/^megatron:/,$p' | grep -v '^  swift_version:' \
        | sed -e 's/^  save_safetensors: false$/  save_safetensors: true/' -e 's/^/    /' >"$work/c.megatron"
    {
        printf 'name: swift-pipeline\nkind: pipeline\nswift_version: "3.12"\n'
        printf 'model: %s\noutput_dir: %s\npython: %s\nworkdir: %s\nhang_timeout: 600s\n' \
            "$tiny/Qwen3-tiny" "$work/pipeline" "$PY" "$work"
        printf 'env:\n%s  PATH: "%s:/usr/local/bin:/usr/bin:/bin"\n' "$env_yaml" "$ov_bin"
        printf 'stages:\n  - name: sft\n    kind: megatron-sft\n    nodes: 1\n    gpus_per_node: 1\n'
        cat "$work/c.megatron"
        printf '  - name: answers\n    kind: infer\n    prompts: %s\n    max_new_tokens: 32\n' "$work/prompts.jsonl"
        printf '    after: ${stages.sft.checkpoint}\n'
    } >"$work/c.yaml"
    cohort plan "$work/c.yaml" >"$logs/c.plan.txt" 2>&1 || { cat "$logs/c.plan.txt"; return 1; }
    job="$(cohort submit "$work/c.yaml" 2>&1 | awk '/submitted job/ {print $3}')"
    say "  job $job"
    [[ -n "$job" ]] || { say "  the submit printed no job id"; return 1; }
    st="$(wait_state "$job" 1200)"
    save_job "$job" c
    cohort report "$job" --dir "$logs/c.report" >"$logs/c.report.md" 2>&1 || true
    local stage
    for stage in sft answers; do cohort logs "$job.$stage" >"$logs/c.$stage.log" 2>&1 || true; done
    [[ "$st" == SUCCEEDED ]] || {
        say "  pipeline ended $st"; head -40 "$logs/c.status.txt"
        grep -v '^\s*$' "$logs/c.sft.log" | grep -B3 -A25 -m1 'Traceback' | head -60
        return 1
    }
    head -30 "$logs/c.report.md"
    grep -qi "before" "$logs/c.report.md" && grep -qi "after" "$logs/c.report.md" \
        || { say "  the report lacks before/after"; return 1; }
}

# ---------------------------------------------------------------------------
# d. the same training by hand, for the step time
# ---------------------------------------------------------------------------
step_d() {
    ((rehearsal)) && { say "  needs CUDA"; return 3; }
    OUTDIR="$work/out-d" RUN_LOG="$logs/d.by-hand.log" MASTER_PORT=26399 PYTHON="$PY" \
        SWIFT_GPU_DIR="${SWIFT_GPU_DIR:-$root/.cohort/swift-gpu}" bash "$root/tests/swift-gpu/run.sh" \
        --train_iters 30 --log_interval 1 >/dev/null 2>&1 || { say "  the run by hand failed"; tail -20 "$logs/d.by-hand.log"; return 1; }
    # Megatron's own elapsed time per iteration, medians of iterations 5..30, Cohort's run against by hand.
    "$PY" - "$logs/d.by-hand.log" "$logs/a.log" <<'EOF' | while read -r line; do figure "${line%% *}" "${line#* }"; done
import re, statistics, sys
def median_ms(path):
    xs = [float(m.group(2)) for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)", open(path, errors="replace").read()) if int(m.group(1)) >= 5]
    return statistics.median(xs) if xs else float("nan")
hand, ours = median_ms(sys.argv[1]), median_ms(sys.argv[2])
print(f"d.step_ms_by_hand {hand:.1f}")
print(f"d.step_ms_cohort {ours:.1f} ({ours / hand:.2f}x)")
EOF
}

# ---------------------------------------------------------------------------
# e. preemption: the sft job saves on SIGTERM (Megatron's exit_signal_handler) and resumes from it
# ---------------------------------------------------------------------------
step_e() {
    # Cohort merges exit_signal_handler into megatron_extra_kwargs, which ms-swift 3.12.6 puts on
    # Megatron's argv (megatron_args.py:793-805); its dataloader workers read args.exit_signal, which
    # Megatron core_r0.15 lacks (trainers/base.py:1191-1194): no workers. No periodic save: the only
    # checkpoint is the one made on the signal.
    SFT_NUM_WORKERS=0 SFT_SAVE_INTERVAL=100000 \
        sft_job swift-sft-preempt "$work/out-e" 80 $'preempt:\n  signal: SIGTERM\n  grace: 600s' >"$work/e.yaml"
    cohort plan "$work/e.yaml" >"$logs/e.plan.txt" 2>&1 || { cat "$logs/e.plan.txt"; return 1; }
    grep -q 'exit_signal_handler' "$logs/e.plan.txt" || { say "  Cohort did not render exit_signal_handler; see $logs/e.plan.txt"; return 1; }
    if ((rehearsal)); then
        say "  rendered: Cohort put exit_signal_handler into megatron_extra_kwargs (the run needs CUDA)"
        return 0
    fi
    local job owner deadline st reclaim_ms running_ms at from lost
    job="$(cohort submit "$work/e.yaml" 2>&1 | awk '/submitted job/ {print $3}')"
    say "  job $job"
    [[ -n "$job" ]] || { say "  the submit printed no job id"; return 1; }
    deadline=$((SECONDS + 600))
    until (( $(cohort metrics "$job" -o json 2>/dev/null | pyj 'max([int(p.get("iteration", 0)) for p in d["points"]] or [0])' 2>/dev/null || echo 0) >= 15 )); do
        ((SECONDS <= deadline)) || { say "  no iteration 15 within 600 s"; save_job "$job" e; return 1; }
        sleep 0.5
    done
    printf 'name: owner\nkind: command\nnodes: 1\ngpus_per_node: 1\nqueue: team-a\ncommand: [sleep, "30"]\n' >"$work/e-owner.yaml"
    owner="$(cohort submit "$work/e-owner.yaml" 2>&1 | awk '/submitted job/ {print $3}')"
    reclaim_ms=$(now_ms)
    say "  owner job $owner (queue team-a) reclaims the GPU"
    st="$(wait_state "$owner" 900 RUNNING SUCCEEDED)"
    running_ms=$(now_ms)
    [[ "$st" == RUNNING || "$st" == SUCCEEDED ]] || { say "  the owner's job is $st"; save_job "$job" e; return 1; }
    st="$(wait_state "$job" 1800 SUCCEEDED FAILED CANCELLED)"
    save_job "$job" e
    [[ "$st" == SUCCEEDED ]] || { say "  job ended $st"; tail -30 "$logs/e.log"; return 1; }
    read -r at from lost < <(pyj '" ".join(str(p.get(k, "-")) for p in [next(a["preemption"] for a in d["attempts"] if a.get("preemption"))] for k in ("iteration", "resumed_iteration", "lost_iterations"))' <"$logs/e.status.json")
    figure "e.iteration_at_preemption" "$at"
    figure "e.resumed_from" "$from"
    figure "e.lost_iterations" "$lost"
    figure "e.reclaim_to_owner_running_s" "$(( (running_ms - reclaim_ms) / 1000 ))"
    [[ "$lost" == 0 ]] || { say "  $lost iterations lost; expected 0 with exit_signal_handler"; return 1; }
}

run_step a "megatron-sft job, real ms-swift, to Succeeded with train and eval metrics" step_a
run_step b "rank killed after checkpoint 10; the next attempt resumes from it" step_b
run_step c "pipeline: swift infer before and after the sft stage, cohort report" step_c
run_step d "the same training by hand (step time)" step_d
run_step e "preemption of a real megatron-sft job saves on the signal and resumes" step_e

say ""
say "== results ($([ "$rehearsal" = 1 ] && echo CPU rehearsal || echo GPU); ms-swift $swift_version)"
cat "$out/results.tsv"
say "== figures"
cat "$out/figures.tsv"
! grep -q $'\tFAIL\t' "$out/results.tsv"
