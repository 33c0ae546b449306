#!/usr/bin/env python3
"""Records when this node's rank started and stopped, in DIR/<node>.start and
DIR/<node>.stop (seconds since the epoch), so tests can check from the
processes' own clocks that no two attempts overlapped. Runs until SIGTERM,
or until DIR/release exists (then exits 0). Prints a line every 100 ms."""
import os
import signal
import sys
import time

out = sys.argv[1]
node = os.environ["COHORT_NODE_NAME"]
attempt = os.environ.get("COHORT_JOB_ID", "job")
with open(os.path.join(out, f"{node}.{attempt}.start"), "w") as f:
    f.write(repr(time.time()))


def stop(*_):
    with open(os.path.join(out, f"{node}.{attempt}.stop"), "w") as f:
        f.write(repr(time.time()))
    sys.exit(143)


signal.signal(signal.SIGTERM, stop)
i = 0
while not os.path.exists(os.path.join(out, "release")):
    if i % 10 == 0:
        print(f"{node} tick {i}", flush=True)
    i += 1
    time.sleep(0.01)
with open(os.path.join(out, f"{node}.{attempt}.stop"), "w") as f:
    f.write(repr(time.time()))
