#!/usr/bin/env python3
"""Pretraining of a small GPT with megatron-core and tensor parallelism.

A real Megatron run that fits in a minute: megatron-core's `GPTModel` built
from `get_gpt_layer_local_spec()` (no Transformer Engine, no apex), split
across ranks by `parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)`,
trained with Adam on a synthetic, learnable token stream. The last global rank
prints Megatron-LM's `training_log` line every `--log-interval` iterations, in
Megatron-LM's exact format, so Cohort's agent parses it like the real thing.

Started per node by launch.sh (torchrun), one rank per GPU; needs at least TP
ranks (default 2). `--cpu` runs the same program over gloo on CPU (a
rehearsal for machines without GPUs), `--dry-log` prints sample log lines
without any distributed set-up. See README.md.
"""
import argparse
import math
import os
import sys
import time
from datetime import datetime

PROG = "megatron-gpt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="train_gpt.py")
    p.add_argument("--iters", type=int, default=50, help="training iterations (Megatron's --train-iters)")
    p.add_argument("--log-interval", type=int, default=5, help="print a training_log line every N iterations")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per data-parallel rank per iteration")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (Adam)")
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=5)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cpu", action="store_true",
                   help="rehearsal on CPU over gloo (no GPUs needed; still needs >= TP ranks)")
    p.add_argument("--dry-log", action="store_true",
                   help="print a few training_log lines from made-up values and exit (format check)")
    args = p.parse_args(argv)
    problems = []
    for name in ("iters", "log_interval", "tp", "num_layers", "hidden_size", "num_attention_heads",
                 "vocab_size", "seq_length", "micro_batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden_size % args.num_attention_heads:
        problems.append("--hidden-size must be divisible by --num-attention-heads")
    if args.num_attention_heads % args.tp:
        problems.append("--num-attention-heads must be divisible by the tensor-parallel size")
    if args.vocab_size % args.tp:
        problems.append("--vocab-size must be divisible by the tensor-parallel size")
    if problems:
        p.error("; ".join(problems))
    return args


# --------------------------------------------------------------------------
# Megatron-LM's training_log line (megatron/training/training.py)
# --------------------------------------------------------------------------
def training_log_line(iteration, train_iters, consumed_samples, elapsed_ms, learning_rate,
                      global_batch_size, lm_loss, grad_norm, tflops=None, loss_scale=1.0,
                      skipped=0, nan=0, now=None):
    """One line exactly as Megatron-LM's `training_log` prints it (with
    `--log-throughput` when `tflops` is given), e.g.
    ` [2024-04-06 02:59:36] iteration       43/     100 | consumed samples:         5504 | ...`."""
    now = now or datetime.now()
    s = f" [{now.strftime('%Y-%m-%d %H:%M:%S')}]"
    s += " iteration {:8d}/{:8d} |".format(iteration, train_iters)
    s += " consumed samples: {:12d} |".format(consumed_samples)
    s += " elapsed time per iteration (ms): {:.1f} |".format(elapsed_ms)
    if tflops is not None:
        s += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
    s += f" learning rate: {learning_rate:.6E} |"
    s += " global batch size: {:5d} |".format(global_batch_size)
    s += " {}: {:.6E} |".format("lm loss", lm_loss)
    s += " loss scale: {:.1f} |".format(loss_scale)
    if grad_norm is not None:
        s += " grad norm: {:.3f} |".format(grad_norm)
    s += " number of skipped iterations: {:3d} |".format(skipped)
    s += " number of nan iterations: {:3d} |".format(nan)
    return s


def learning_rate(it, args):
    """Megatron's default schedule: linear warmup, then cosine decay to min_lr.
    `it` is the 1-based iteration about to run."""
    warmup = min(args.lr_warmup_iters, args.iters)
    if warmup and it <= warmup:
        return args.lr * it / warmup
    progress = (it - warmup) / max(1, args.iters - warmup)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def flops_per_iteration(args, global_batch_size):
    """Megatron-LM's dense-GPT estimate (no recompute): 72 B s L h^2 (1 + s/6h + V/12hL)."""
    b, s, L, h, V = global_batch_size, args.seq_length, args.num_layers, args.hidden_size, args.vocab_size
    return 72 * b * s * L * h * h * (1 + s / (6 * h) + V / (12 * h * L))


def dry_log(args):
    gbs = args.micro_batch_size
    loss = math.log(args.vocab_size)
    for it in range(args.log_interval, args.iters + 1, args.log_interval):
        loss *= 0.9
        print(training_log_line(it, args.iters, it * gbs, 52.0, learning_rate(it, args), gbs, loss, 1.5,
                                tflops=0.1), flush=True)


def fail(message, code=2):
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.dry_log:
        dry_log(args)
        return 0

    # Checked before torch.distributed starts, so that a wrong size fails at
    # once with a message rather than hanging in a rendezvous or a collective.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 2 or world_size < args.tp:
        fail(f"needs at least {max(2, args.tp)} ranks for tensor parallelism {args.tp}, got WORLD_SIZE={world_size} "
             "(run it under torchrun across 2 nodes x 1 GPU, or 1 node x 2 GPUs)")
    if world_size % args.tp:
        fail(f"WORLD_SIZE={world_size} is not divisible by the tensor-parallel size {args.tp}")

    import torch
    if not args.cpu:
        if not torch.cuda.is_available():
            fail("no CUDA GPU is visible to this rank (CUDA_VISIBLE_DEVICES="
                 f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); it needs one GPU per rank "
                 "(--cpu rehearses on CPU over gloo)")
        if local_rank >= torch.cuda.device_count():
            fail(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible on this node; "
                 "it needs one GPU per rank")
    try:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig
        import megatron.core as mcore
    except ImportError as e:
        fail(f"megatron-core is not importable by {sys.executable}: {e} "
             "(pip install megatron-core==0.19.2, or put its wheel's contents on PYTHONPATH)")

    if args.cpu:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        # CPU rehearsal only: megatron-core allocates some buffers on
        # `torch.cuda.current_device()`; point that at the CPU.
        torch.cuda.current_device = lambda: "cpu"
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    t0 = time.time()
    torch.distributed.init_process_group(backend=backend, world_size=world_size, rank=rank)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    last = rank == world_size - 1
    # The inference tracker is a no-op stand-in for the CUDA RNG tracker (no dropout here); CPU only.
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed, inference_rng_tracker=args.cpu)
    torch.manual_seed(args.seed)

    print(f"{PROG}: rank {rank}/{world_size} (tp rank {tp_rank}, dp rank {dp_rank}/{dp_size}) on {device}, "
          f"backend {backend}, megatron-core {mcore.__version__}, torch {torch.__version__}, "
          f"job {os.environ.get('COHORT_JOB_ID', '-')} attempt {os.environ.get('COHORT_ATTEMPT', '-')}",
          flush=True)

    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tp,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
    ).to(device)
    params = list(model.parameters())
    local_params = sum(p.numel() for p in params)
    total_params = torch.tensor([sum(p.numel() for p in params if is_tp_param(p) or tp_rank == 0)],
                                dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total_params, group=parallel_state.get_tensor_model_parallel_group())
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gbs = args.micro_batch_size * dp_size
    flops = flops_per_iteration(args, gbs)
    if last:
        print(f"{PROG}: GPT {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, "
              f"vocab {args.vocab_size}, seq {args.seq_length}: {int(total_params.item())} parameters "
              f"({local_params} on this rank); global batch {gbs}, {args.iters} iterations; "
              f"set-up {time.time() - t0:.1f} s", flush=True)

    position_ids = torch.arange(args.seq_length, device=device).unsqueeze(0).expand(args.micro_batch_size, -1)
    # Megatron's convention: True marks a position that may NOT be attended to.
    attention_mask = torch.triu(torch.ones(args.seq_length, args.seq_length, dtype=torch.bool, device=device),
                                diagonal=1).view(1, 1, args.seq_length, args.seq_length)
    loss_sum, loss_count, nan_iters = 0.0, 0, 0
    interval_start = time.time()
    for it in range(1, args.iters + 1):
        lr = learning_rate(it, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, labels = synthetic_batch(args, it, dp_rank, device)
        optimizer.zero_grad(set_to_none=True)
        per_token = model(tokens, position_ids, attention_mask, labels=labels)  # [b, s], vocab-parallel CE
        loss = per_token.float().mean()
        loss.backward()
        if dp_size > 1:
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=parallel_state.get_data_parallel_group())
                    p.grad.div_(dp_size)
        grad_norm = clip_grad_norm(params, args.clip_grad, parallel_state, tp_rank, device)
        optimizer.step()

        reported = loss.detach()
        if dp_size > 1:
            torch.distributed.all_reduce(reported, group=parallel_state.get_data_parallel_group())
            reported /= dp_size
        value = reported.item()
        if math.isfinite(value):
            loss_sum += value
            loss_count += 1
        else:
            nan_iters += 1
        if it % args.log_interval == 0 or it == args.iters:
            elapsed = time.time() - interval_start
            per_iter = elapsed / max(1, loss_count + nan_iters)
            if last:
                avg = loss_sum / loss_count if loss_count else float("nan")
                tflops = flops / per_iter / world_size / 1e12
                print(training_log_line(it, args.iters, it * gbs, per_iter * 1000.0, lr, gbs, avg, grad_norm,
                                        tflops=tflops, nan=nan_iters), flush=True)
            loss_sum, loss_count, nan_iters = 0.0, 0, 0
            interval_start = time.time()

    if last:
        print(f"{PROG}: done, {args.iters} iterations", flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0


_SUCCESSORS = {}


def synthetic_batch(args, it, dp_rank, device):
    """Tokens and next-token labels of a learnable synthetic language: a
    fixed random permutation `succ` of the vocabulary (the same on every rank)
    gives each token its successor, followed with probability 0.9; otherwise
    the next token is uniform. The loss can fall from ln(vocab) (6.93 for
    1024) towards about 1.0 nat. Each batch is the same on every rank of a
    tensor-parallel group (seeded by iteration and data-parallel rank) and
    different across data-parallel ranks."""
    import torch
    succ = _SUCCESSORS.get((args.vocab_size, args.seed))
    if succ is None:
        succ = torch.randperm(args.vocab_size, generator=torch.Generator().manual_seed(args.seed))
        _SUCCESSORS[(args.vocab_size, args.seed)] = succ
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + it * 1009 + dp_rank)
    b, n = args.micro_batch_size, args.seq_length + 1
    noise = torch.randint(args.vocab_size, (b, n), generator=g)
    follow = torch.rand((b, n), generator=g) < 0.9
    stream = torch.empty((b, n), dtype=torch.long)
    stream[:, 0] = noise[:, 0]
    for t in range(1, n):
        stream[:, t] = torch.where(follow[:, t], succ[stream[:, t - 1]], noise[:, t])
    return stream[:, :-1].contiguous().to(device), stream[:, 1:].contiguous().to(device)


def is_tp_param(p):
    return bool(getattr(p, "tensor_model_parallel", False))


def clip_grad_norm(params, max_norm, parallel_state, tp_rank, device):
    """The global L2 norm of the gradients, counting a parameter replicated
    across the tensor-parallel group once (as Megatron's optimizer does), then
    clipping to max_norm. Returns the norm before clipping."""
    import torch
    sq = torch.zeros(1, dtype=torch.float32, device=device)
    for p in params:
        if p.grad is not None and (is_tp_param(p) or tp_rank == 0):
            sq += p.grad.detach().float().pow(2).sum()
    torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
    norm = sq.sqrt().item()
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


if __name__ == "__main__":
    sys.exit(main())
