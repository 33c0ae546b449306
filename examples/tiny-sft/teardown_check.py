#!/usr/bin/env python3
"""Checks the tear-down order of train.py against the usual one.

Two gloo ranks (processes forked from this one) run CYCLES cycles of:
init_process_group, DDP over a small model, three steps with an all_reduce,
a barrier, then tear-down in ORDER:

  usual:  destroy_process_group(), then DDP freed (what most scripts do; DDP's
          reducer then frees the group with the GIL held, and the group's
          destructor joins a thread that may need the GIL: a deadlock now and
          then, pytorch/pytorch#56297)
  train:  DDP, optimizer and model freed and collected, then
          destroy_process_group() (what train.py does)

A cycle that does not end within 10 s is a deadlock: the script says after
how many cycles and exits 1. Usage: teardown_check.py usual|train [CYCLES]
"""
import gc
import os
import queue
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

STALL_S = 10


def rank_main(rank, order, cycles, tmp, done):
    torch.set_num_threads(1)
    for cycle in range(cycles):
        store = dist.FileStore(os.path.join(tmp, f"store-{cycle}"), 2)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
        model = torch.nn.Linear(16, 16)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = ddp(torch.randn(4, 16)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
        dist.barrier()
        if order == "usual":
            dist.destroy_process_group()
            del ddp
        else:
            del ddp, optimizer, model
            gc.collect()
            dist.destroy_process_group()
        done.put((rank, cycle))


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("usual", "train"):
        sys.exit(__doc__)
    order, cycles = sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 200
    ctx = mp.get_context("fork")
    done = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [ctx.Process(target=rank_main, args=(r, order, cycles, tmp, done)) for r in range(2)]
        for p in ranks:
            p.start()
        finished = [-1, -1]
        deadline = time.monotonic() + STALL_S
        while min(finished) < cycles - 1:
            try:
                rank, cycle = done.get(timeout=max(0.1, deadline - time.monotonic()))
                finished[rank] = cycle
                deadline = time.monotonic() + STALL_S
            except queue.Empty:
                if time.monotonic() > deadline:
                    print(f"{order}: deadlock after {min(finished) + 1} of {cycles} cycles", flush=True)
                    for p in ranks:
                        p.kill()
                    sys.exit(1)
        for p in ranks:
            p.join()
    print(f"{order}: {cycles} cycles, no deadlock", flush=True)


if __name__ == "__main__":
    main()
