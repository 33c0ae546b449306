#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs missing system
# packages (tests/install-deps.sh), prepares the Python environments of the
# example job and of the Python client example (tests/tests/python_client.rs)
# and the real ms-swift venvs (tools/swift-flags/venvs.sh),
# builds every binary (the integration tests start the real cohort-controller
# and cohort-agent), and runs every test.
# Extra arguments go to `cargo test`, e.g. `bash tests/run.sh -p cohort-shared`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tests/install-deps.sh
examples/tiny-sft/setup-venv.sh
examples/python-client/setup.sh
# The real ms-swift 3.12.6 and 4.6.0 (cached venvs sharing one torch) for tests/tests/swift_parser.rs.
tools/swift-flags/venvs.sh >/dev/null
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
# The fault-injection suite (tests/tests/faults.rs): real multi-process
# failures, each case once, with assertions on the end state. Skipped when
# arguments narrow the run (e.g. `-p cohort-shared`).
if (( $# == 0 )); then
    echo "== fault-injection suite"
    cargo test -p cohort-tests --test faults -- --ignored --skip fault_figures --test-threads 2
fi
