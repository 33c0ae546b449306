#!/usr/bin/env python3
"""Stands in for `megatron sft` (ms-swift 3.x flags) in tests.

Every node prints ms-swift 3.x metric lines on the last node only, as the
real trainer does. A fresh run (no `--load <dir> --finetune false`) has node
rank 0 write Megatron checkpoints into `--save`: iterations 2 and 4 complete,
then iteration 6 half-written (its directory without metadata, the tracker
already naming it), and then every node fails. A resumed run prints where it
resumed from and succeeds.
"""
import os
import sys
import time


def flag(name):
    argv = sys.argv[1:]
    if name in argv:
        i = argv.index(name)
        return argv[i + 1] if i + 1 < len(argv) else ""
    return None


def log(iteration, total, loss):
    if int(os.environ["NODE_RANK"]) == int(os.environ["NNODES"]) - 1:
        print(f" [2026-01-01 00:00:0{iteration % 10}] iteration {iteration:8d}/{total:8d} | consumed samples: {iteration * 16:12d} | "
              f"elapsed time per iteration (ms): 100.0 | memory(GiB): 1.0 | elapsed time: {iteration}s | remaining time: {total - iteration}s | "
              f"learning rate: 1.000000E-05 | global batch size:    16 | lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.000 | "
              f"number of skipped iterations:   0 | number of nan iterations:   0 |", flush=True)


def checkpoint(save, iteration, complete=True):
    d = os.path.join(save, f"iter_{iteration:07d}")
    os.makedirs(d, exist_ok=True)
    if complete and flag("--save_safetensors") == "true" and flag("--no_save_optim") == "true":
        # Like ms-swift: the mcore checkpoint without the model, the weights as safetensors
        # (3.12.6 swift/megatron/trainers/base.py:1051-1052).
        with open(os.path.join(d, "common.pt"), "w") as f:
            f.write("stub")
        with open(os.path.join(save, "model.safetensors"), "w") as f:
            f.write("stub")
    elif complete:
        # torch_dist: the weights are in the .distcp shards.
        for name in ("__0_0.distcp", "common.pt", "metadata.json", ".metadata"):
            with open(os.path.join(d, name), "w") as f:
                f.write("stub")
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def main():
    save = flag("--save")
    load = flag("--load")
    print("fake megatron argv:", " ".join(sys.argv[1:]), flush=True)
    if flag("--finetune") == "false" and load:
        # Like Megatron: the tracker in --load names the iteration to load.
        with open(os.path.join(load, "latest_checkpointed_iteration.txt")) as f:
            iteration = int(f.read().strip())
        if not os.path.exists(os.path.join(load, f"iter_{iteration:07d}", "common.pt")):
            print(f"FileNotFoundError: checkpoint iter_{iteration:07d} is incomplete", file=sys.stderr, flush=True)
            return 1
        print(f"resumed from {load} at iteration {iteration}", flush=True)
        log(8, 8, 0.5)
        return 0
    rank0 = os.environ["NODE_RANK"] == "0"
    for it in (2, 4):
        log(it, 8, 3.0 - it * 0.25)
        if rank0:
            checkpoint(save, it)
    if rank0:
        checkpoint(save, 6, complete=False)
    else:
        # Ranks move in lockstep: the others fail only once rank 0 has written.
        deadline = time.monotonic() + 30
        while not os.path.isdir(os.path.join(save, "iter_0000006")) and time.monotonic() < deadline:
            time.sleep(0.05)
    print("RuntimeError: CUDA error: an illegal memory access was encountered (simulated)", file=sys.stderr, flush=True)
    return 1


sys.exit(main())
