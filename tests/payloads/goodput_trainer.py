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
TRACKER = "latest_checkpointed_iteration.txt"


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


def complete(iteration):
    return os.path.exists(os.path.join(ckpt_dir, f"iter_{iteration:07d}", "metadata.json"))


def newest_complete():
    """The tracker's iteration if complete, else the newest complete iter_ directory."""
    try:
        with open(os.path.join(ckpt_dir, TRACKER)) as f:
            named = int(f.read().strip())
        if complete(named):
            return named
    except (OSError, ValueError):
        pass
    found = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith("iter_") and name[5:].isdigit() and complete(int(name[5:])):
            found.append(int(name[5:]))
    return max(found, default=0)


def save(iteration):
    d = os.path.join(ckpt_dir, f"iter_{iteration:07d}")
    os.makedirs(d, exist_ok=True)
    began = time.time()
    with open(os.path.join(d, "__0_0.distcp"), "w") as f:
        f.write("shard")
    time.sleep(save_s)  # writing the shards; a kill here leaves the directory incomplete
    for name in ("common.pt", ".metadata", "metadata.json"):
        with open(os.path.join(d, name), "w") as f:
            f.write("stub")
    with open(os.path.join(ckpt_dir, TRACKER + ".tmp"), "w") as f:
        f.write(str(iteration))
    os.replace(os.path.join(ckpt_dir, TRACKER + ".tmp"), os.path.join(ckpt_dir, TRACKER))
    record("saved", iteration=iteration, save_s=time.time() - began)


record("start")
time.sleep(start_s)
record("init")
resume = newest_complete()
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
        print(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {step:8d}/{steps:8d} | "
              f"elapsed time per iteration (ms): {(now - last) * 1000:.1f} | lm loss: {2.0 / (1 + step / 100):.6E} |",
              flush=True)
        last = now
    if step % ckpt_every == 0 and step < steps:
        if rank == 0:
            save(step)
        barrier()
record("done", iteration=steps)
say("done")
