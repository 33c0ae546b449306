"""Training-log fixtures printed by ms-swift's OWN logging code, with made-up values.

    .venv-swift/<version>/bin/python tools/swift-flags/make_log_fixtures.py [--out DIR]

writes <DIR>/ms-swift-<version>.log (what the last rank prints) and <DIR>/ms-swift-<version>.logging.jsonl
(default DIR: shared/tests/fixtures/logs). Nothing trains: the functions that format the lines are called
directly, on a CPU, with their surroundings replaced by stand-ins. What is real and what is a stand-in:

3.x: swift/megatron/trainers/base.py BaseMegatronTrainer.training_log (the `iteration N/M | ... |` line and the
     train record of logging.jsonl) and the tail of evaluate (the eval record of logging.jsonl: `eval_<key>` and
     NO iteration), both ms-swift's code, run unchanged. Stand-ins: Megatron's get_args/get_timers (a namespace
     and a timer with fixed times), the tensorboard/wandb writers (None), one_logger, the model-parallel max
     reduction (identity), the FLOP count, torch.cuda.max_memory_reserved (a fixed byte count) and tensors created
     on 'cuda' (created on the CPU). The eval stdout line (`validation loss at iteration N ...`) is printed by
     Megatron-LM's training.evaluate_and_print_results, not by ms-swift: it is not generated here (the real H200
     log, ms-swift-3.12.6-h200-real.log, has it).
4.x: swift/megatron/trainers/base.py BaseMegatronTrainer.on_log (metric reduction, eval_ prefix) and
     swift/megatron/callbacks/print.py PrintCallback.on_log (the dict printed through tqdm.write and the
     logging.jsonl record), run unchanged. Stand-ins: the trainer object (args, state, config), time.time (so the
     elapsed/remaining times are fixed) and torch.cuda.max_memory_reserved.
"""
import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def argcheck():
    path = os.path.join(REPO, 'agent', 'src', 'preflight', 'swift_argcheck.py')
    spec = importlib.util.spec_from_file_location('swift_argcheck', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_swift(name):
    with argcheck()._transformer_engine_stub():
        return importlib.import_module(name)


class Args(types.SimpleNamespace):
    """Megatron's global args: unset options read as None (false)."""

    def __getattr__(self, name):
        return None


GiB = 1024**3
TRAIN = [  # iteration, lm loss, grad norm, learning rate
    (1, 6.9824, 4.4316, 5.0e-05), (5, 6.9126, 4.0467, 9.397e-05), (10, 6.6091, 3.6257, 6.281e-05),
    (15, 6.3522, 3.1020, 2.5e-05), (20, 6.2105, 2.8831, 1.0e-05)
]
EVAL = [(10, 6.4811), (20, 6.2903)]


def make_v3(out_log, out_jsonl):
    import torch
    base = import_swift('swift.megatron.trainers.base')
    real_torch = torch

    class CudaFree(types.ModuleType):
        """torch, except that 'cuda' tensors are made on the CPU and the peak memory is fixed."""

        def __getattr__(self, name):
            return getattr(real_torch, name)

        @staticmethod
        def tensor(*a, device=None, **k):
            return real_torch.tensor(*a, **k)

    fake_torch = CudaFree('torch')
    fake_torch.cuda = types.SimpleNamespace(max_memory_reserved=lambda: int(21.5 * GiB),
                                            memory_stats=real_torch.cuda.memory_stats)
    args = Args(micro_batch_size=1, data_parallel_size=8, world_size=8, seq_length=2048, log_interval=5,
                train_iters=20, consumed_train_samples=0, skipped_train_samples=0, log_throughput=True,
                tensorboard_log_interval=1, curr_iteration=0, global_batch_size=16, eval_iters=2)

    class Timer:
        def __init__(self):
            self.total = 0.0

        def elapsed(self, barrier=False):
            return 0.612 * args.log_interval

        def active_time(self):
            return self.total

        def start(self, barrier=False):
            pass

        def stop(self):
            pass

    timer = Timer()

    class Timers:
        def __call__(self, name, log_level=None):
            return timer

        def log(self, *a, **k):
            pass

        def write(self, *a, **k):
            pass

    stand_ins = {
        'torch': fake_torch,
        'get_args': lambda: args,
        'get_timers': lambda: Timers(),
        'get_tensorboard_writer': lambda: None,
        'get_wandb_writer': lambda: None,
        'one_logger_utils': types.SimpleNamespace(track_app_tag=lambda *a: None, track_e2e_metrics=lambda *a: None),
        'reduce_max_stat_across_model_parallel_group': lambda x: x,
        'get_num_microbatches': lambda: 2,
        'num_floating_point_operations': lambda a, batch: 3.1e14 * batch,
        'is_last_rank': lambda: True,
    }
    for name, value in stand_ins.items():
        setattr(base, name, value)
    # the concrete trainer `megatron sft` uses (swift/megatron/trainers/trainer.py), without its __init__
    trainer = object.__new__(importlib.import_module('swift.megatron.trainers.trainer').MegatronTrainer)
    trainer.jsonl_writer = base.JsonlWriter(out_jsonl, enable_async=False, write_on_rank='last')
    trainer.mcore_013 = True
    # as BaseMegatronTrainer.__init__ sets them (base.py:90); no custom metric is recorded, so none is reduced
    trainer.custom_metrics = {'train': {}, 'eval': {}}

    stdout = io.StringIO()
    eval_at = dict(EVAL)
    with contextlib.redirect_stdout(stdout):
        for iteration, loss, grad_norm, lr in TRAIN:
            args.curr_iteration = iteration - 1
            args.consumed_train_samples = iteration * args.global_batch_size
            timer.total = 0.612 * iteration
            total_loss_dict = {'advanced iterations': args.log_interval - 1}
            loss_dict = {'lm loss': torch.tensor([loss])}
            total_loss_dict['lm loss'] = torch.tensor([loss * (args.log_interval - 1)])
            base.BaseMegatronTrainer.training_log(trainer, loss_dict, total_loss_dict, lr, None, iteration, 1.0,
                                                  False, 0, grad_norm, None, None)
            if iteration in eval_at:
                # the tail of BaseMegatronTrainer.evaluate (base.py:715-725): per-key means, then the jsonl record
                logs = {}
                for key, val in {'lm loss': torch.tensor(eval_at[iteration])}.items():
                    logs[f'eval_{key}'] = round(val.item(), 8)
                trainer.jsonl_writer.append(logs)
    return stdout.getvalue()


def make_v4(out_log, out_jsonl):
    import torch
    import time
    base = import_swift('swift.megatron.trainers.base')
    printing = importlib.import_module('swift.megatron.callbacks.print')
    torch.cuda.max_memory_reserved = lambda *a, **k: int(21.5 * GiB)
    if hasattr(printing, 'reduce_max_stat_across_model_parallel_group'):
        printing.reduce_max_stat_across_model_parallel_group = lambda x: x
    clock = [1_000_000.0]
    printing.time = types.SimpleNamespace(time=lambda: clock[0])
    args = Args(train_iters=20, eval_iters=2, output_dir=os.path.dirname(out_jsonl), num_microbatches=2)
    trainer = types.SimpleNamespace(args=args, state=types.SimpleNamespace(iteration=0),
                                    config=types.SimpleNamespace(num_moe_experts=None))
    trainer.call_event = lambda event, **kw: [getattr(c, event)(**kw) for c in trainer.callbacks]
    trainer._log_callback = lambda logs, n_steps: base.BaseMegatronTrainer._log_callback(trainer, logs, n_steps)
    callback = printing.PrintCallback(trainer)
    callback.is_write_rank = True
    trainer.callbacks = [callback]
    stdout = io.StringIO()
    eval_at = dict(EVAL)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        callback.on_train_begin()
        callback.jsonl_writer = printing.JsonlWriter(out_jsonl, enable_async=False, write_on_rank='last')
        callback.training_bar.close()
        # tqdm.write goes to stdout
        callback.training_bar = types.SimpleNamespace(write=lambda s: print(s), update=lambda n: None,
                                                      close=lambda: None)
        for iteration, loss, grad_norm, lr in TRAIN:
            trainer.state.iteration = iteration
            clock[0] = 1_000_000.0 + 0.612 * iteration
            n_steps = 1 if iteration == 1 else 5
            logs = {'loss': torch.tensor([loss * n_steps, float(n_steps)]), 'n_steps': n_steps,
                    'grad_norm': grad_norm, 'learning_rate': lr}
            base.BaseMegatronTrainer.on_log(trainer, logs)
            if iteration in eval_at:
                logs = {'loss': torch.tensor([eval_at[iteration] * 2, 2.0]), 'n_steps': 2}
                base.BaseMegatronTrainer.on_log(trainer, logs, prefix='eval_')
    return stdout.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.path.join(REPO, 'shared', 'tests', 'fixtures', 'logs'))
    opts = ap.parse_args()
    default_mlm = os.path.join(REPO, '.venv-swift', 'megatron-lm-core_r0.15.0')
    if 'MEGATRON_LM_PATH' not in os.environ and os.path.isdir(os.path.join(default_mlm, 'megatron')):
        os.environ['MEGATRON_LM_PATH'] = default_mlm
    version = argcheck().swift_version()
    os.makedirs(opts.out, exist_ok=True)
    out_log = os.path.join(opts.out, 'ms-swift-%s.log' % version)
    out_jsonl = os.path.join(opts.out, 'ms-swift-%s.logging.jsonl' % version)
    if os.path.exists(out_jsonl):
        os.remove(out_jsonl)  # JsonlWriter appends
    with tempfile.TemporaryDirectory():
        make = make_v3 if version.startswith('3.') else make_v4
        text = make(out_log, out_jsonl)
    with open(out_log, 'w') as f:
        f.write(text)
    print(out_log)
    print(out_jsonl)


if __name__ == '__main__':
    main()
