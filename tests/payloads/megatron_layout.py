"""What the simulated trainers (goodput_trainer.py, preempt_trainer.py) share:
Megatron-LM's checkpoint layout and its training_log line.

A checkpoint is CKPT_DIR/iter_0000010/ (shards, common.pt, .metadata, then
metadata.json last), and latest_checkpointed_iteration.txt naming it, replaced
atomically after the directory is complete. Cohort finds saves and iterations
from exactly these, so both trainers must write them the same way.
"""
import os
import time

TRACKER = "latest_checkpointed_iteration.txt"


def iter_dir(ckpt_dir, iteration):
    return os.path.join(ckpt_dir, f"iter_{iteration:07d}")


def complete(ckpt_dir, iteration):
    return os.path.exists(os.path.join(iter_dir(ckpt_dir, iteration), "metadata.json"))


def newest_complete(ckpt_dir):
    """The tracker's iteration if complete, else the newest complete iter_ directory; 0 if none."""
    try:
        with open(os.path.join(ckpt_dir, TRACKER)) as f:
            named = int(f.read().strip())
        if complete(ckpt_dir, named):
            return named
    except (OSError, ValueError):
        pass
    found = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith("iter_") and name[5:].isdigit() and complete(ckpt_dir, int(name[5:])):
            found.append(int(name[5:]))
    return max(found, default=0)


def save(ckpt_dir, iteration, write_s=0.0):
    """Writes the checkpoint of `iteration`; `write_s` seconds pass between the first
    shard and the rest (a kill then leaves the directory incomplete)."""
    d = iter_dir(ckpt_dir, iteration)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "__0_0.distcp"), "w") as f:
        f.write("shard")
    if write_s > 0:
        time.sleep(write_s)
    for name in ("common.pt", ".metadata", "metadata.json"):
        with open(os.path.join(d, name), "w") as f:
            f.write("stub")
    with open(os.path.join(ckpt_dir, TRACKER + ".tmp"), "w") as f:
        f.write(str(iteration))
    os.replace(os.path.join(ckpt_dir, TRACKER + ".tmp"), os.path.join(ckpt_dir, TRACKER))


def saved_line(iteration, save_dir):
    """Megatron-LM's line once a save is complete (core 0.15 checkpointing.save_checkpoint, print_rank_0)."""
    return (f"  successfully saved checkpoint from iteration {int(iteration):7d} to {save_dir} "
            f"[ t 1/1, p 1/1 ]")


def training_log(step, steps, elapsed_s):
    """Megatron-LM's training_log line, from which Cohort reads iterations and loss."""
    return (f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {step:8d}/{steps:8d} | "
            f"elapsed time per iteration (ms): {elapsed_s * 1000:.1f} | lm loss: {2.0 / (1 + step / 100):.6E} |")
