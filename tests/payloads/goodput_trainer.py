"""A simulated training job for the goodput benchmark (cohort-goodput).

Every node runs one rank; each step ends in a barrier through rank 0 (a TCP
server on MASTER_ADDR:MASTER_PORT), like an all-reduce: a rank that stops or
vanishes makes the others wait silently, as NCCL does. Node rank 0 writes a
checkpoint every CKPT_EVERY steps in the Megatron layout (CKPT_DIR/iter_0000010/
then latest_checkpointed_iteration.txt naming it), and a start resumes from
the newest complete one. Times are already scaled by the benchmark's time
factor.

Environment (besides Cohort's contract):
  STEPS       steps of the whole run           STEP_S   seconds per step
  CKPT_EVERY  steps between checkpoints        SAVE_S   seconds one save takes
  START_S     seconds from exec to the first step work (imports, NCCL init)
  LOAD_S      seconds to load a checkpoint     CKPT_DIR where checkpoints go
  GOODPUT_LOG node rank 0 appends one JSON object a line: start, init, loaded, step, saved, done
"""
import faulthandler
import json
import os
import signal
import socket
import time

import megatron_layout

faulthandler.register(signal.SIGUSR1, all_threads=True)

nnodes = int(os.environ["NNODES"])
rank = int(os.environ["NODE_RANK"])
attempt = int(os.environ.get("COHORT_ATTEMPT", "1"))
steps = int(os.environ["STEPS"])
step_s = float(os.environ["STEP_S"])
ckpt_every = int(os.environ["CKPT_EVERY"])
save_s = float(os.environ["SAVE_S"])
start_s = float(os.environ["START_S"])
load_s = float(os.environ["LOAD_S"])
ckpt_dir = os.environ["CKPT_DIR"]
log_path = os.environ["GOODPUT_LOG"]
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def record(event, **fields):
    if rank != 0:
        return
    with open(log_path, "a") as f:
        f.write(json.dumps({"event": event, "attempt": attempt, "t": time.time(), **fields}) + "\n")


def say(text):
    print(f"rank {rank} attempt {attempt}: {text}", flush=True)


def wait_forever():
    while True:
        time.sleep(3600)


def recv_byte(sock):
    try:
        data = sock.recv(1)
    except ConnectionError:
        data = b""
    if not data:
        wait_forever()
    return data


def send_byte(sock, byte):
    try:
        sock.sendall(byte)
    except ConnectionError:
        wait_forever()


def save(iteration):
    began = time.time()
    megatron_layout.save(ckpt_dir, iteration, write_s=save_s)
    record("saved", iteration=iteration, save_s=time.time() - began)
    # Megatron-LM's own line on rank 0 once a save is complete: `cohort status` takes the saves from it.
    print(megatron_layout.saved_line(iteration, ckpt_dir), flush=True)


record("start")
time.sleep(start_s)
record("init")
resume = megatron_layout.newest_complete(ckpt_dir)
if resume:
    time.sleep(load_s)
record("loaded", iteration=resume)
say(f"resumed from iteration {resume}")

if rank == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, port))
    server.listen(nnodes)
    peers = [server.accept()[0] for _ in range(nnodes - 1)]

    def barrier():
        for p in peers:
            recv_byte(p)
        for p in peers:
            send_byte(p, b"g")
else:
    deadline = time.time() + 120
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            conn.settimeout(None)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)

    def barrier():
        send_byte(conn, b"s")
        recv_byte(conn)

os.makedirs(ckpt_dir, exist_ok=True)
last = time.time()
for step in range(resume + 1, steps + 1):
    time.sleep(step_s)
    barrier()
    record("step", iteration=step)
    say(f"step {step}")
    if rank == nnodes - 1:
        # A Megatron-LM training_log line: Cohort reads the job's metrics (and `cohort status` its saves) from it.
        now = time.time()
        print(megatron_layout.training_log(step, steps, now - last), flush=True)
        last = now
    if step % ckpt_every == 0 and step < steps:
        if rank == 0:
            save(step)
        barrier()
record("done", iteration=steps)
say("done")
