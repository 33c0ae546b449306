#!/usr/bin/env python3
"""Supervised fine-tuning of a tiny Qwen3-architecture model with DDP.

A stand-in for ms-swift's `megatron sft` that runs anywhere in a minute: same
launcher (torchrun, static rendezvous), same data format (messages JSONL), same
chat template (ChatML), loss on assistant tokens only, and the same training
log lines, so that Cohort's agent supervises and parses it exactly like the
real thing. Started by launch.sh on every node; see README.md.
"""
import argparse
import faulthandler
import gc
import json
import math
import os
import random
import resource
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from transformers import Qwen3Config, Qwen3ForCausalLM

# Cohort dumps the stacks of a hung job: with py-spy when the node has it,
# otherwise by sending SIGUSR1, which this line (and `import faulthandler, signal`)
# turns into a dump of every thread on stderr.
faulthandler.register(signal.SIGUSR1, all_threads=True)

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100  # label value that the loss skips (PyTorch's and HF's convention)


# --------------------------------------------------------------------------
# Tokenizer: UTF-8 bytes are tokens 0-255, then the ChatML specials.
# --------------------------------------------------------------------------
class ByteChatTokenizer:
    IM_START = 256  # <|im_start|>
    IM_END = 257  # <|im_end|>
    PAD = 258  # <|endoftext|>, Qwen's pad token
    vocab_size = 259

    def render(self, messages):
        """Token ids and labels for Qwen's ChatML template:
        `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

        Only an assistant message's content and its <|im_end|> are trained on
        (ms-swift's default); system and user turns, every role header and the
        newline after <|im_end|> get IGNORE.
        """
        ids, labels = [], []
        for m in messages:
            header = [self.IM_START, *f"{m['role']}\n".encode()]
            body = [*m["content"].encode(), self.IM_END]
            trained = m["role"] == "assistant"
            ids += header + body + [ord("\n")]
            labels += [IGNORE] * len(header) + (body if trained else [IGNORE] * len(body)) + [IGNORE]
        return ids, labels


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")


def row_problem(row):
    """What is wrong with one parsed JSONL row, or None."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        return 'expected an object with a non-empty "messages" list'
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role is {m.get('role')!r}, expected one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content is missing or not a string"
    if not any(m["role"] == "assistant" for m in row["messages"]):
        return "no assistant message: nothing to train on"
    return None


def load_dataset(path, tokenizer, max_length):
    """Tokenised (ids, labels) samples, truncated to max_length, and stats.
    Exits with `file:line: problem` on the first bad row."""
    if not path.is_file():
        sys.exit(f"tiny-sft: dataset {path} does not exist (pass --data FILE)")
    samples = []
    stats = {"rows": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0, "dropped": 0}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"tiny-sft: {path}:{lineno}: not valid JSON: {e.msg} at column {e.colno}")
            problem = row_problem(row)
            if problem:
                sys.exit(f"tiny-sft: {path}:{lineno}: {problem}")
            ids, labels = tokenizer.render(row["messages"])
            stats["rows"] += 1
            if len(ids) > max_length:
                stats["truncated"] += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):
                # Truncation cut every assistant token: the row would add 0/0 to the loss.
                stats["dropped"] += 1
                continue
            stats["tokens"] += len(ids)
            stats["trained_tokens"] += sum(label != IGNORE for label in labels)
            samples.append((ids, labels))
    return samples, stats


def collate(batch, pad_id):
    """Right-pads a batch to its longest sample."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def endless(loader, sampler):
    """Micro-batches forever, reshuffled each epoch (the run is sized in iterations)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# --------------------------------------------------------------------------
# Schedule and log format
# --------------------------------------------------------------------------
def learning_rate(it, args, warmup):
    """Megatron's default shape: linear warmup, then cosine decay to min_lr.
    `it` is the 1-based iteration about to run."""
    if it <= warmup:
        return args.lr * it / warmup
    progress = (it - warmup) / max(1, args.steps - warmup)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def format_duration(seconds):
    """ms-swift's form: 41s, 8m 33s, 1h 16m 54s, 1d 6h 54m 11s."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m {s}s"
    if h:
        return f"{h}h {m}m {s}s"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def memory_gib(device):
    """Peak memory: allocated CUDA memory on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def training_log_line(it, args, *, consumed, ms_per_iter, mem, elapsed, lr, gbs, loss, grad_norm, skipped, nan):
    # Field for field what ms-swift 3.x (Megatron's training_log plus memory and
    # elapsed/remaining time) prints; see shared/fixtures/logs/ms-swift-3x.log.
    # ms-swift extrapolates from the run's average pace, not the last interval's.
    remaining = elapsed / it * (args.steps - it)
    return (
        f" [{datetime.now():%Y-%m-%d %H:%M:%S}]"
        f" iteration {it:8d}/{args.steps:8d} |"
        f" consumed samples: {consumed:12d} |"
        f" elapsed time per iteration (ms): {ms_per_iter:.1f} |"
        f" memory(GiB): {mem:.2f} |"
        f" elapsed time: {format_duration(elapsed)} |"
        f" remaining time: {format_duration(remaining)} |"
        f" learning rate: {lr:.6E} |"
        f" global batch size: {gbs:5d} |"
        f" lm loss: {loss:.6E} |"
        f" loss scale: 1.0 |"
        f" grad norm: {grad_norm:.3f} |"
        f" number of skipped iterations: {skipped:3d} |"
        f" number of nan iterations: {nan:3d} |"
    )


# --------------------------------------------------------------------------
def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "examples" / "data" / "tiny-sft.jsonl",
                   help="messages-format JSONL (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="training iterations (default: %(default)s)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per rank per iteration (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=256, help="tokens (bytes) per sample, longer rows are truncated (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=5e-4, help="learning rate at the end of the cosine decay (default: %(default)s)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (default: %(default)s)")
    p.add_argument("--log-interval", type=int, default=5, help="log every N iterations, plus the first and the last (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed for weights and data order (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--hidden-size", type=int, default=128, help="model width (default: %(default)s)")
    p.add_argument("--save", type=Path, help="directory where global rank 0 saves the final model (save_pretrained)")
    args = p.parse_args()
    args.data = args.data.resolve()  # errors name the file, whatever the workdir
    for name in ("steps", "micro_batch_size", "max_length", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main():
    args = parse_args()

    # torchrun sets these for every worker.
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    last_rank = world - 1

    # Read and check the data before joining the process group: a bad row then
    # fails every rank at once instead of leaving peers waiting at a collective.
    tokenizer = ByteChatTokenizer()
    samples, stats = load_dataset(args.data, tokenizer, args.max_length)
    global_batch = args.micro_batch_size * world  # data-parallel only: every rank is a replica
    if len(samples) < global_batch:
        sys.exit(f"tiny-sft: {args.data} has {len(samples)} usable rows, fewer than one global batch "
                 f"({args.micro_batch_size} x {world} ranks)")

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # Every rank of this node shares its cores: one thread each, or they
        # oversubscribe them and each step gets several times slower.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)

    def say(msg):  # start-up lines: rank 0 only
        if rank == 0:
            print(f"tiny-sft: {msg}", flush=True)

    say(f"job {os.environ.get('COHORT_JOB_ID', '-')} attempt {os.environ.get('COHORT_ATTEMPT', '-')}, "
        f"world size {world} ({os.environ.get('NNODES', '?')} nodes x {os.environ.get('LOCAL_WORLD_SIZE', '?')} per node), "
        f"backend {backend}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} thread(s)")
        + f", torch {torch.__version__}, transformers {transformers.__version__}")

    random.seed(args.seed)
    torch.manual_seed(args.seed)

    say(f"dataset {args.data}: {stats['rows']} rows, {stats['tokens']} tokens, {stats['trained_tokens']} trained "
        f"(assistant) tokens; {stats['truncated']} truncated to {args.max_length}, {stats['dropped']} dropped")

    heads, kv_heads, head_dim = 4, 2, args.hidden_size // 4
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=args.max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.IM_START,
        eos_token_id=tokenizer.IM_END,
        pad_token_id=tokenizer.PAD,
    )
    model = Qwen3ForCausalLM(config).to(device)  # same seed on every rank; DDP also broadcasts rank 0's weights
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model Qwen3ForCausalLM: {args.layers} layers, hidden {args.hidden_size}, {heads} heads / {kv_heads} KV heads "
        f"of {head_dim}, vocab {tokenizer.vocab_size} (bytes + ChatML specials), {n_params / 1e6:.2f} M parameters")
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(samples, batch_size=args.micro_batch_size, sampler=sampler, drop_last=True,
                        collate_fn=lambda b: collate(b, tokenizer.PAD))
    batches = endless(loader, sampler)

    # Weight decay on matrices only, not on norm weights (as Megatron does).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, round(args.warmup_fraction * args.steps))
    say(f"{args.steps} iterations, global batch {global_batch} ({args.micro_batch_size} per rank x {world}), "
        f"lr {args.lr:g} -> {args.min_lr:g} (warmup {warmup}, cosine), metrics on the last rank ({last_rank})")

    # Like Megatron, a logged loss is the mean over the iterations since the
    # previous log line and over all data-parallel ranks.
    interval_loss, interval_iters, nan_iters, last_log_it = 0.0, 0, 0, 0
    first_logged = last_logged = None
    started = interval_start = time.monotonic()
    ddp.train()
    for it in range(1, args.steps + 1):
        lr = learning_rate(it, args, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        loss = ddp(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).item()
        optimizer.step()

        # Sum then divide: gloo has no ReduceOp.AVG.
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
        mean_loss = mean_loss.item() / world
        if math.isnan(mean_loss):
            nan_iters += 1
        else:
            interval_loss += mean_loss
            interval_iters += 1

        if it == 1 or it % args.log_interval == 0 or it == args.steps:
            now = time.monotonic()
            logged_loss = interval_loss / interval_iters if interval_iters else float("nan")
            first_logged = logged_loss if first_logged is None else first_logged
            last_logged = logged_loss
            # Only the last global rank prints metrics, as ms-swift and Megatron
            # do (it holds the last pipeline stage): Cohort's agent parses the
            # metrics from the node with NODE_RANK = NNODES-1.
            if rank == last_rank:
                print(training_log_line(
                    it, args, consumed=it * global_batch, ms_per_iter=(now - interval_start) * 1000 / (it - last_log_it),
                    mem=memory_gib(device), elapsed=now - started, lr=lr, gbs=global_batch, loss=logged_loss,
                    grad_norm=grad_norm, skipped=0, nan=nan_iters), flush=True)
            interval_loss, interval_iters, interval_start, last_log_it = 0.0, 0, now, it

    if rank == last_rank:
        print(f"training finished: first loss {first_logged:.4f}, last loss {last_logged:.4f} "
              f"({args.steps} iterations, {format_duration(time.monotonic() - started)})", flush=True)
    if args.save and rank == 0:
        args.save.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.save)
        print(f"tiny-sft: saved the model to {args.save}", flush=True)
    dist.barrier()  # nobody tears the group down while rank 0 still saves
    # DDP's reducer must not be the last holder of the process group: it is
    # freed with the GIL held, and ProcessGroupGloo's destructor then joins
    # its work thread, which may still be freeing the barrier's work and need
    # the GIL. The process hangs at exit, now and then, after training ended
    # (pytorch/pytorch#56297). Freed first, the reducer leaves the group to
    # destroy_process_group, which destroys it without the GIL.
    del ddp, optimizer, model
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
