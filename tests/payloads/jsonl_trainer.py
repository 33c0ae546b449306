#!/usr/bin/env python3
"""Stands in for an ms-swift 4.x `megatron sft` that logs its metrics only to
<output_dir>/v0-<time>/logging.jsonl (on the last node), not to stdout."""
import json
import os
import sys
import time

argv = sys.argv[1:]
out = argv[argv.index("--output_dir") + 1]
last = int(os.environ["NODE_RANK"]) == int(os.environ["NNODES"]) - 1
print(f"node {os.environ['NODE_RANK']} training", flush=True)
if last:
    run = os.path.join(out, "v0-20261128-120000")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "logging.jsonl"), "a") as f:
        for it in (1, 5, 10):
            record = {"loss": round(3.0 / it, 8), "grad_norm": 1.0, "learning_rate": 1e-05,
                      "iteration": f"{it}/10", "elapsed_time": f"{it}s", "remaining_time": f"{10 - it}s",
                      "memory(GiB)": 1.0, "train_speed(s/it)": 0.5}
            f.write(json.dumps(record) + "\n")
            f.flush()
            time.sleep(0.6)
# Give the agent's follower a poll to read the last record.
time.sleep(1.2)
