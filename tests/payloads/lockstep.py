"""A stand-in for a data-parallel trainer, for the fault-injection suite.

Every node runs one rank; each step ends in a barrier through rank 0 (a TCP
server on MASTER_ADDR:MASTER_PORT), like an all-reduce. As with NCCL under
ms-swift's timeout, a peer that stops or vanishes makes the others wait
forever, never erroring. Each rank prints `step N` after each barrier.

Environment (besides Cohort's contract):
  STEPS         steps to run (default 20); STEPS_FIRST for attempt 1 (default: STEPS)
  STEP_S        seconds of "work" per step (default 0.1)
  EXIT0_NODE_RANK  on attempt 1, this node exits 0 after step 3 (the others then wait)
  FILL_DIR      each step writes 1 MiB there (a full disk fails the rank)
  FINISH_FILE   once this file exists, every rank finishes after the same step (rank 0
                sees it and tells the others in the barrier): a job that runs until told
"""
import faulthandler
import os
import signal
import socket
import sys
import time

# The two lines a trainer adds so that Cohort can dump its stacks when it hangs.
faulthandler.register(signal.SIGUSR1, all_threads=True)

nnodes = int(os.environ["NNODES"])
rank = int(os.environ["NODE_RANK"])
attempt = int(os.environ.get("COHORT_ATTEMPT", "1"))
steps = int(os.environ.get("STEPS", "20"))
if attempt == 1:
    steps = int(os.environ.get("STEPS_FIRST", steps))
step_s = float(os.environ.get("STEP_S", "0.1"))
exit0 = os.environ.get("EXIT0_NODE_RANK")
fill_dir = os.environ.get("FILL_DIR")
finish_file = os.environ.get("FINISH_FILE")
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def say(text):
    print(f"rank {rank} attempt {attempt}: {text}", flush=True)


def wait_forever():
    # What a rank blocked in a collective does: nothing, silently.
    while True:
        time.sleep(3600)


def recv_byte(sock):
    try:
        data = sock.recv(1)
    except ConnectionError:  # the peer is gone (reset): wait, as for a clean close
        data = b""
    if not data:
        wait_forever()
    return data


def send_byte(sock, byte):
    try:
        sock.sendall(byte)
    except ConnectionError:  # the peer is gone (reset, broken pipe)
        wait_forever()


if rank == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, port))
    server.listen(nnodes)
    peers = [server.accept()[0] for _ in range(nnodes - 1)]

    def barrier():
        """Returns whether every rank finishes after this step."""
        for p in peers:
            recv_byte(p)
        finish = bool(finish_file) and os.path.exists(finish_file)
        for p in peers:
            send_byte(p, b"f" if finish else b"g")
        return finish
else:
    deadline = time.time() + 60
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
        return recv_byte(conn) == b"f"


say(f"pid {os.getpid()} joined {nnodes} nodes")
for step in range(1, steps + 1):
    time.sleep(step_s)
    if fill_dir:
        with open(os.path.join(fill_dir, f"ckpt-{rank}-{attempt}-{step}"), "wb") as f:
            f.write(b"\0" * (1 << 20))
    finish = barrier()
    say(f"step {step}")
    if finish:
        say("finish file seen")
        break
    if exit0 is not None and attempt == 1 and int(exit0) == rank and step == 3:
        say("leaving early with code 0")
        sys.exit(0)
say("done")
