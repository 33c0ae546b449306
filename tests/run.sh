#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs missing system
# packages (tests/install-deps.sh), prepares the Python environments of the
# example job and of the Python client example (tests/tests/python_client.rs)
# and the real ms-swift venvs (tools/swift-flags/venvs.sh),
# builds every binary (the integration tests start the real cohort-controller
# and cohort-agent), and runs every test (in two streams at once, below).
# Extra arguments go to `cargo test`, e.g. `bash tests/run.sh -p cohort-shared`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tests/install-deps.sh
examples/tiny-sft/setup-venv.sh
examples/python-client/setup.sh
# The real ms-swift 3.12.6 and 4.6.0 (cached venvs sharing one torch) for tests/tests/swift_parser.rs.
tools/swift-flags/venvs.sh >/dev/null
cargo build --workspace --all-targets
if (( $# > 0 )); then
    cargo test --workspace --no-fail-fast "$@"
    exit
fi
# Every test, in two streams at once: most integration tests wait on real
# processes (a controller, agents, etcd, ranks) far more than they compute,
# so one stream leaves the machine's cores idle (CI's 2 cores: 12 minutes in
# one stream). Stream 2 takes every crate's unit tests, the other crates'
# integration tests, the doc tests, the integration tests named here (the
# longest, about half of the time) and the fault-injection suite
# (tests/tests/faults.rs: real multi-process failures, each case once, with
# assertions on the end state); stream 1 the rest of cohort-tests, printed as
# it runs. Stream 2's output follows once both are done.
#
# Every command selects the whole workspace (`--workspace`, then targets by
# name): a selection of some packages (`-p`, `--exclude`) unifies other
# features of the dependencies than the build above did, and cargo rebuilds
# half the workspace for it, on both cores, while the other stream's tests
# wait on real processes with deadlines (a CI run failed that way: 17 clusters
# not Ready within 20 s while stream 2 compiled).
second=(megatron compose swift_parser gang preemption)
first=()
ours=()
for file in tests/tests/*.rs; do
    name=$(basename "$file" .rs)
    ours+=("$name")
    [[ " ${second[*]} " == *" $name "* ]] || first+=(--test "$name")
done
# The other crates' integration tests; a name cohort-tests has too runs in
# that stream's selection (both targets of that name run).
others=()
for file in agent/tests/*.rs controller/tests/*.rs controller/cli/tests/*.rs shared/tests/*.rs proto/tests/*.rs; do
    [[ -f "$file" ]] || continue
    name=$(basename "$file" .rs)
    [[ " ${ours[*]} " == *" $name "* ]] || others+=(--test "$name")
done
tests_of() { printf -- '--test %s ' "$@"; }
# Nothing may be left to compile once the streams start (see above): this
# builds what the selections need beyond the build above, if anything.
cargo test --workspace --no-run --lib --bins "${others[@]}" "${first[@]}" $(tests_of "${second[@]}")
log=target/tests-stream-2.log
(
    status=0
    cargo test --workspace --no-fail-fast --lib --bins "${others[@]}" || status=1
    cargo test --workspace --no-fail-fast --doc || status=1
    cargo test --workspace --no-fail-fast $(tests_of "${second[@]}") || status=1
    echo "== fault-injection suite"
    cargo test --workspace --test faults -- --ignored --skip fault_figures --test-threads 2 || status=1
    exit $status
) > "$log" 2>&1 &
stream2=$!
status=0
cargo test --workspace --no-fail-fast "${first[@]}" || status=1
wait "$stream2" || status=1
echo "== stream 2 (unit tests, other crates, ${second[*]}, the fault-injection suite): $log"
cat "$log"
if (( status != 0 )); then
    echo "== tests failed (search the output above for 'FAILED' or 'panicked')" >&2
fi
exit $status
