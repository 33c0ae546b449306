#!/usr/bin/env python3
"""Stands in for an ms-swift 4.x `megatron sft` that logs its metrics only to
<output_dir>/v0-<time>/logging.jsonl (on the last node), not to stdout. Given
--save (the 3.x dialect) it writes 3.x records instead: `global_step/max_steps`,
and an eval record with no iteration after iteration 5, as ms-swift 3.12.6 does
(swift/megatron/trainers/base.py:721-725)."""
import json
import os
import sys
import time

argv = sys.argv[1:]
v3 = "--save" in argv
out = argv[argv.index("--save" if v3 else "--output_dir") + 1]
last = int(os.environ["NODE_RANK"]) == int(os.environ["NNODES"]) - 1
print(f"node {os.environ['NODE_RANK']} training", flush=True)
if last:
    run = os.path.join(out, "v0-20261128-120000")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "logging.jsonl"), "a") as f:
        for it in (1, 5, 10):
            if v3:
                record = {"lm loss": round(3.0 / it, 8), "grad_norm": 1.0, "learning_rate": 1e-05,
                          "elapsed_time_per_iteration": 0.5, "memory(GiB)": 1.0, "elapsed_time": f"{it}s",
                          "remaining_time": f"{10 - it}s", "loss_scale": 1.0, "consumed_samples": it * 2,
                          "global_step/max_steps": f"{it}/10"}
            else:
                record = {"loss": round(3.0 / it, 8), "grad_norm": 1.0, "learning_rate": 1e-05,
                          "iteration": f"{it}/10", "elapsed_time": f"{it}s", "remaining_time": f"{10 - it}s",
                          "memory(GiB)": 1.0, "train_speed(s/it)": 0.5}
            f.write(json.dumps(record) + "\n")
            if v3 and it == 5:
                f.write(json.dumps({"eval_lm loss": 0.25}) + "\n")
            f.flush()
            time.sleep(0.6)
# Give the agent's follower a poll to read the last record.
time.sleep(1.2)
