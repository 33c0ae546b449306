#!/usr/bin/env python3
"""Proves Cohort's environment contract by a real rendezvous.

Node rank 0 listens on MASTER_ADDR:MASTER_PORT. Every other node binds its own
address (COHORT_NODE_IPS[NODE_RANK]), connects, and sends its NODE_RANK and the
contract it sees. Rank 0 checks that it got every rank exactly once, from the
right address, with the same NNODES/WORLD_SIZE/MASTER_PORT, then answers "ok".

FAIL_NODE_RANK=<r> and FAIL_CODE=<c> make node r exit with code c at once
while the others block (rank 0 waiting for r, the rest waiting for rank 0).
"""
import json
import os
import socket
import sys
import time


def env(name):
    value = os.environ.get(name)
    if value is None:
        sys.exit(f"rendezvous: {name} is not set")
    return value


def main():
    rank = int(env("NODE_RANK"))
    nnodes = int(env("NNODES"))
    master = (env("MASTER_ADDR"), int(env("MASTER_PORT")))
    ips = env("COHORT_NODE_IPS").split(",")
    contract = {k: os.environ.get(k) for k in ("NNODES", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "COHORT_JOB_ID")}
    print(f"rank {rank}/{nnodes} pid {os.getpid()} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} master {master}", flush=True)
    if len(ips) != nnodes:
        sys.exit(f"rendezvous: COHORT_NODE_IPS has {len(ips)} entries, NNODES is {nnodes}")
    if ips[0] != master[0]:
        sys.exit(f"rendezvous: MASTER_ADDR {master[0]} is not node rank 0's address {ips[0]}")
    if os.environ.get("FAIL_NODE_RANK") == str(rank):
        print(f"rank {rank}: failing on purpose", file=sys.stderr, flush=True)
        sys.exit(int(os.environ.get("FAIL_CODE", "3")))

    if rank == 0:
        server = socket.create_server(master, reuse_port=False)
        seen = {}
        peers = []
        while len(seen) < nnodes - 1:
            conn, addr = server.accept()
            msg = json.loads(conn.makefile().readline())
            r = msg["rank"]
            if r in seen or not 0 < r < nnodes:
                sys.exit(f"rendezvous: rank {r} unexpected (seen {sorted(seen)})")
            if addr[0] != ips[r]:
                sys.exit(f"rendezvous: rank {r} connected from {addr[0]}, expected {ips[r]}")
            if msg["contract"] != contract | {"COHORT_JOB_ID": contract["COHORT_JOB_ID"]}:
                sys.exit(f"rendezvous: rank {r} sees {msg['contract']}, rank 0 sees {contract}")
            seen[r] = addr
            peers.append(conn)
        for conn in peers:
            conn.sendall(b"ok\n")
        print(f"rendezvous complete: ranks {sorted(seen)} + 0", flush=True)
    else:
        deadline = time.monotonic() + 60
        while True:
            try:
                sock = socket.create_connection(master, timeout=5, source_address=(ips[rank], 0))
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"rendezvous: rank {rank} could not reach {master}")
                time.sleep(0.05)  # rank 0 may not listen yet: retry until the deadline
        sock.settimeout(None)
        sock.sendall((json.dumps({"rank": rank, "contract": contract}) + "\n").encode())
        reply = sock.makefile().readline().strip()
        if reply != "ok":
            sys.exit(f"rendezvous: rank {rank} got {reply!r}")
        print(f"rank {rank}: rendezvous ok", flush=True)


if __name__ == "__main__":
    main()
