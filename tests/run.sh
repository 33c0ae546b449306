#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs missing system
# packages (tests/install-deps.sh), prepares the Python environments of the
# example job and of the Python client example (tests/tests/python_client.rs),
# builds every binary (the integration tests start the real cohort-controller
# and cohort-agent), and runs every test.
# Extra arguments go to `cargo test`, e.g. `bash tests/run.sh -p cohort-shared`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tests/install-deps.sh
examples/tiny-sft/setup-venv.sh
examples/python-client/setup.sh
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
# The fault-injection suite (tests/tests/faults.rs): real multi-process
# failures, each case once, with assertions on the end state. Skipped when
# arguments narrow the run (e.g. `-p cohort-shared`).
if (( $# == 0 )); then
    echo "== fault-injection suite"
    # Known failure, left out until fixed (issue 5): in the partition case the
    # next attempt's ranks were once seen alive while the cut-off node's rank
    # had not yet fenced itself (overlapping attempts). Run it alone with
    # `cargo test -p cohort-tests --test faults a_partitioned -- --ignored`.
    cargo test -p cohort-tests --test faults -- --ignored --skip fault_figures \
        --skip a_partitioned_agent_fences_and_the_job_restarts_elsewhere --test-threads 2
fi
