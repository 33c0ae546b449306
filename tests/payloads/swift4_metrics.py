#!/usr/bin/env python3
"""Prints ms-swift 4.x metric dicts, on the last node only (like the real
trainer), for iterations 1, 5, 10, ... up to --total, then exits 0."""
import os
import sys

total = int(sys.argv[1]) if len(sys.argv) > 1 else 20
last = int(os.environ["NODE_RANK"]) == int(os.environ["NNODES"]) - 1
print(f"node {os.environ['NODE_RANK']} up", flush=True)
if last:
    for it in [1] + list(range(5, total + 1, 5)):
        loss = 2.0 / it
        print({"loss": round(loss, 8), "grad_norm": 1.5, "learning_rate": 2e-06, "iteration": f"{it}/{total}",
               "elapsed_time": f"{it}s", "remaining_time": f"{total - it}s", "memory(GiB)": 61.23,
               "train_speed(s/it)": 1.0}, flush=True)
