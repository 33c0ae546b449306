#!/usr/bin/env bash
# Creates or updates examples/python-client/.venv with the pins in
# requirements.txt (grpcio, grpcio-tools). Idempotent: a venv whose stamp
# matches requirements.txt is left alone; concurrent runs wait for each other.
# The stubs are not made here: cohort_client.py generates them from proto/ when
# it starts (into gen/, gitignored), so they always match the protos.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.cohort-python-client-requirements.sha256"
python="${PYTHON:-python3}"

exec 9>"$here/.setup.lock"
flock 9

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "python-client setup: $venv is up to date with $req"
    exit 0
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "python-client setup: $python cannot make a venv (on Debian: apt-get install python3-venv)" >&2
    exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then
    echo "python-client setup: creating $venv with $(command -v "$python") ($("$python" --version 2>&1))"
    "$python" -m venv "$venv"
fi
echo "python-client setup: installing $req into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: -r "$req"
"$venv/bin/python" -c 'import grpc, grpc_tools; print(f"python-client setup: grpcio {grpc.__version__}")'
echo "$want" > "$stamp"
echo "python-client setup: done"
