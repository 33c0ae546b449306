#!/usr/bin/env bash
# Creates or updates <repo>/.venv with the pins in requirements.txt.
# Idempotent: a hash of requirements.txt is kept in the venv, and a venv whose
# hash matches is left alone. When COHORT_PYTHON names an interpreter that
# already imports torch and transformers (a GPU host), nothing is installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/.venv"
req="$here/requirements.txt"
stamp="$venv/.cohort-tiny-sft-requirements.sha256"

if [[ -n "${COHORT_PYTHON:-}" ]]; then
    if "$COHORT_PYTHON" -c 'import torch, transformers' 2>/dev/null; then
        echo "setup-venv: COHORT_PYTHON=$COHORT_PYTHON already imports torch and transformers; nothing to do"
        exit 0
    fi
    echo "setup-venv: COHORT_PYTHON=$COHORT_PYTHON cannot import torch and transformers;" \
         "install them there (pip install -r $req) or unset COHORT_PYTHON to use $venv" >&2
    exit 1
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup-venv: $venv is up to date with $req"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup-venv: creating $venv with $(command -v python3) ($(python3 --version 2>&1))"
    python3 -m venv "$venv"
fi
echo "setup-venv: installing into $venv (the first time takes a few minutes: torch from PyPI pulls"
echo "  its CUDA libraries, ~4.7 GB in all, even on a machine without a GPU):"
grep -v '^\s*#' "$req" | grep -v '^\s*$' | sed 's/^/    /'
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# pip's own progress: each download with its size and a progress bar.
"$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on -r "$req"
"$venv/bin/python" -c 'import torch, transformers; print(f"setup-venv: torch {torch.__version__}, transformers {transformers.__version__}")'
echo "$want" > "$stamp"
echo "setup-venv: done"
