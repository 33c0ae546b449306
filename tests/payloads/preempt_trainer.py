"""A one-rank simulated trainer for the preemption and resume tests
(tests/tests/preemption.rs, tests/tests/command_resume.rs).

It steps every STEP_S seconds, prints a Megatron-LM training_log line per step
(Cohort reads the iteration from it), and writes a Megatron-layout checkpoint
(CKPT_DIR/iter_0000010/ then latest_checkpointed_iteration.txt) every
CKPT_EVERY steps, at most CKPT_MAX times. A start resumes from the newest
complete checkpoint.

SAVE_ON_SIGNAL=1: on SIGUSR1 it finishes the step, saves it and exits 0 (what
`preempt: {signal: SIGUSR1}` asks for). Otherwise it ignores SIGUSR1 and is
stopped by the SIGTERM that follows the grace.

FAIL_AT: the first attempt exits 1 after this step (a crash to restart from).

LOG: one JSON object a line: resumed (with what Cohort said in
COHORT_RESUME_FROM and COHORT_RESUME_ITERATION), step, saved (with on_signal).
"""
import json
import os
import signal
import sys
import time

import megatron_layout

attempt = int(os.environ.get("COHORT_ATTEMPT", "1"))
steps = int(os.environ.get("STEPS", "100000"))
step_s = float(os.environ["STEP_S"])
ckpt_every = int(os.environ["CKPT_EVERY"])
ckpt_max = int(os.environ.get("CKPT_MAX", "1000000"))
ckpt_dir = os.environ["CKPT_DIR"]
log_path = os.environ["LOG"]
save_on_signal = os.environ.get("SAVE_ON_SIGNAL") == "1"
fail_at = int(os.environ.get("FAIL_AT", "0"))


def record(event, **fields):
    with open(log_path, "a") as f:
        f.write(json.dumps({"event": event, "attempt": attempt, **fields}) + "\n")


def save(iteration, on_signal):
    megatron_layout.save(ckpt_dir, iteration)
    record("saved", iteration=iteration, on_signal=on_signal)


asked = False


def on_usr1(signum, frame):
    global asked
    asked = True


signal.signal(signal.SIGUSR1, on_usr1 if save_on_signal else signal.SIG_IGN)
os.makedirs(ckpt_dir, exist_ok=True)
resume = megatron_layout.newest_complete(ckpt_dir)
record("resumed", iteration=resume, cohort_from=os.environ.get("COHORT_RESUME_FROM"),
       cohort_iteration=os.environ.get("COHORT_RESUME_ITERATION"))
saves = 0
last = time.time()
for step in range(resume + 1, steps + 1):
    time.sleep(step_s)
    now = time.time()
    print(megatron_layout.training_log(step, steps, now - last), flush=True)
    last = now
    record("step", iteration=step)
    if asked:
        save(step, on_signal=True)
        sys.exit(0)
    if step % ckpt_every == 0 and saves < ckpt_max:
        save(step, on_signal=False)
        saves += 1
    if attempt == 1 and step == fail_at:
        record("crashed", iteration=step)
        sys.exit(1)
record("done", iteration=steps)
