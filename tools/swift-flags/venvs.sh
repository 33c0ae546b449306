#!/usr/bin/env bash
# Creates or reuses <repo>/.venv-swift/<VERSION>/, one venv per ms-swift version, for the flag tables
# (dump_flags.py), the real-parser tests (tests/tests/swift_parser.rs) and the log fixtures.
#
#   tools/swift-flags/venvs.sh [VERSION...]      # default: 3.12.6 4.6.0
#
# Prints one "<VERSION> <path-to-python>" line per version on stdout (progress goes to stderr).
# For 3.x, run ms-swift with MEGATRON_LM_PATH=<repo>/.venv-swift/megatron-lm-core_r0.15.0 (extracted here).
# torch (pins/torch.txt) is installed ONCE into .venv-swift/torch and shared by every version's venv
# through a .pth file, so it is never downloaded twice. Each venv keeps a stamp (sha256 of its pins
# file and of the torch pin): a venv whose stamp matches is reused untouched, so a warm run only checks.
# PYTHON picks the interpreter (default: python3.12 from pyenv, else python3.12 on PATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="$repo/.venv-swift"
versions=("$@")
(( ${#versions[@]} )) || versions=(3.12.6 4.6.0)

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    for c in /root/.pyenv/versions/3.12.1/bin/python3.12 "$(command -v python3.12 || true)"; do
        if [[ -n "$c" && -x "$c" ]]; then py="$c"; break; fi
    done
fi
[[ -n "$py" ]] || { echo "venvs.sh: no python3.12 found; set PYTHON=/path/to/python3.12" >&2; exit 1; }

log() { echo "venvs.sh: $*" >&2; }
pip_install() { "$1/bin/python" -m pip install --quiet --disable-pip-version-check "${@:2}" >&2; }

# 1. The shared torch.
torch_venv="$root/torch"
torch_pins="$here/pins/torch.txt"
torch_want="$(sha256sum "$torch_pins" | cut -d' ' -f1)"
if [[ ! -x "$torch_venv/bin/python" || "$(cat "$torch_venv/.stamp" 2>/dev/null)" != "$torch_want" ]]; then
    log "installing torch into $torch_venv (the first time downloads ~4.7 GB with its CUDA libraries)"
    "$py" -m venv "$torch_venv"
    pip_install "$torch_venv" -r "$torch_pins"
    echo "$torch_want" > "$torch_venv/.stamp"
fi
torch_site="$("$torch_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# ms-swift 3.x imports Megatron-LM from MEGATRON_LM_PATH and otherwise git-clones branch core_r0.15.0
# (swift/megatron/init.py:923): the checked-in tarball is that branch's megatron/ package, so nothing is cloned.
mlm="$root/megatron-lm-core_r0.15.0"
if [[ ! -d "$mlm/megatron" ]]; then
    mkdir -p "$mlm"
    tar -xzf "$here/megatron-lm-core_r0.15.0.tgz" -C "$mlm"
fi

# 2. One venv per ms-swift version, seeing the shared torch through a .pth file (after its own
# site-packages, so nothing it installs is shadowed).
for v in "${versions[@]}"; do
    pins="$here/pins/$v.txt"
    [[ -f "$pins" ]] || { echo "venvs.sh: no pins for ms-swift $v: write $pins (see the others)" >&2; exit 1; }
    venv="$root/$v"
    want="$(cat "$pins" "$torch_pins" | sha256sum | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && "$(cat "$venv/.stamp" 2>/dev/null)" == "$want" ]]; then
        echo "$v $venv/bin/python"
        continue
    fi
    log "installing ms-swift $v into $venv"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$torch_site" > "$site/zz-shared-torch.pth"
    # torch is pinned to the shared one, so pip sees it satisfied and never fetches another.
    pip_install "$venv" -r "$pins" -c "$torch_pins"
    "$venv/bin/python" -c 'import torch, swift; from importlib.metadata import version as v; print("venvs.sh: ms-swift", v("ms-swift"), "torch", torch.__version__, "from", torch.__file__)' >&2
    echo "$want" > "$venv/.stamp"
    echo "$v $venv/bin/python"
done
