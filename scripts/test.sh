#!/usr/bin/env bash
# Runs every test of flowgate on a fresh machine: installs what the tests
# need (scripts/deps.sh), checks formatting and lints, runs the Rust tests
# (unit, property, raw-frame, integration with real dependencies) with
# nextest, the offline deploy checks, then the socket.io-client interop
# tests and the real-browser demo test with Node's test runner.
# Exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD

bash scripts/deps.sh || { echo "scripts/deps.sh failed"; exit 1; }
ulimit -n 65536 2>/dev/null || true

failed=0
step() {
    echo "==> $*"
    if ! "$@"; then
        echo "FAILED: $*"
        failed=1
    fi
}

step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
step cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
    step cargo nextest run --workspace --locked --no-fail-fast
else
    step cargo test --workspace --locked --no-fail-fast
fi
# Doc tests are not run by nextest.
step cargo test --workspace --locked --doc
step bash scripts/check-deploy.sh
(
    cd crates/gateway/tests/interop &&
        FLOWGATE_BIN="$root/target/debug/flowgate" npm test
) || { echo "FAILED: interop tests"; failed=1; }
# The demo canvas in Debian's chromium (headless, system browser).
(
    cd crates/gateway/tests/browser &&
        FLOWGATE_BIN="$root/target/debug/flowgate" npm test
) || { echo "FAILED: browser tests"; failed=1; }

if [ "$failed" -ne 0 ]; then
    echo "some checks failed"
fi
exit "$failed"
