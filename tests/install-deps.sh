#!/usr/bin/env bash
# System packages the tests need, installed when missing (Debian/Ubuntu):
# etcd (etcd store and election tests), protoc (etcd-client's build; a
# vendored one is used otherwise), Chromium (the web page test), systemd for
# `systemd-analyze verify` of the shipped units (the package only; in a
# container nothing starts it), where Docker is installed busybox-static
# (the compose cluster's image), and python3-venv where python3 cannot make a
# venv (the tiny-sft and Python client examples).
set -euo pipefail
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler libprotobuf-dev)
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# The compose cluster's image (deploy/compose/build-image.sh) needs a static busybox.
if command -v docker >/dev/null 2>&1 && ! { command -v busybox >/dev/null 2>&1 && ! ldd "$(command -v busybox)" >/dev/null 2>&1; }; then
    missing+=(busybox-static)
fi
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: no apt-get; install by hand: ${missing[*]}" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
