#!/usr/bin/env bash
# Builds the image every container of the compose cluster runs, FROM scratch:
# Cohort's own binaries (cohort-controller, cohort-agent, cohort), etcd from
# the host's etcd-server package, busybox-static (a shell and coreutils for
# job payloads), and exactly the shared libraries they link (from ldd). No
# registry is needed. Usage: build-image.sh [IMAGE] (default cohort-local:dev).
# COHORT_BIN_DIR picks the binaries (default target/debug; build them first:
# `cargo build --workspace --bins`, or --release and COHORT_BIN_DIR=target/release).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
image="${1:-cohort-local:dev}"
bin_dir="${COHORT_BIN_DIR:-$root/target/debug}"

need() { command -v "$1" >/dev/null 2>&1 || { echo "build-image: $1 not found; $2" >&2; exit 1; }; }
need docker "install Docker"
need etcd "apt-get install etcd-server"
need busybox "apt-get install busybox-static"
for b in cohort-controller cohort-agent cohort; do
    [[ -x "$bin_dir/$b" ]] || { echo "build-image: $bin_dir/$b missing: cargo build --workspace --bins" >&2; exit 1; }
done

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
rootfs="$stage/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp,data,jobs} "$rootfs/var/lib"
chmod 1777 "$rootfs/tmp"
programs=("$bin_dir/cohort-controller" "$bin_dir/cohort-agent" "$bin_dir/cohort" "$(command -v etcd)")
for p in "${programs[@]}"; do
    cp "$p" "$rootfs/bin/"
done
busybox="$(command -v busybox)"
if ldd "$busybox" >/dev/null 2>&1; then
    echo "build-image: $busybox is not static: apt-get install busybox-static" >&2
    exit 1
fi
cp "$busybox" "$rootfs/bin/busybox"
for applet in sh echo cat sleep ls env hostname id ps kill true false seq date nc wc grep; do
    ln -sf busybox "$rootfs/bin/$applet"
done
# The dynamic loader and every library the programs link, at their own paths.
for p in "${programs[@]}"; do
    ldd "$p" | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
# glibc >= 2.34 has files and dns NSS built in; say which to use.
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"
cp "$root/deploy/compose/jobs/"*.yaml "$rootfs/jobs/"
cat >"$stage/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
DOCKERFILE
docker build -q -t "$image" "$stage" >/dev/null
echo "built $image ($(du -sh "$rootfs" | cut -f1) from $bin_dir)"
