#!/usr/bin/env bash
# flowgate vs the Node Socket.IO + @socket.io/redis-adapter baseline, side by
# side on this machine, in one run:
#
#   loadtest/compare.sh                 modest sizes, a few minutes on 2 cores
#   loadtest/compare.sh --full          the issue's targets (100,000 idle
#                                       connections, capped by the open-files
#                                       limit; 50,000 deliveries/s in rooms)
#   loadtest/compare.sh --scenarios rooms,ramp --room-rate 4 ...
#                                       any flag of `flowgate-loadtest compare`
#
# Builds the release binaries, installs the baseline's packages (npm ci),
# raises the open-files limit, then runs `flowgate-loadtest compare`, which
# for each scenario starts Redis + 3 flowgate nodes, runs it, stops them,
# starts Redis + 3 baseline processes, runs it, stops them (all on loopback,
# free ports) and prints the ratios. Results: loadtest/results/<date>/
# (or --out-dir). Every process it started is stopped by PID on exit.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

cargo build --release --locked -p flowgate-gateway -p flowgate-loadtest 2>&1 | tail -n 3 ||
    cargo build --release -p flowgate-gateway -p flowgate-loadtest
if [[ ! -d loadtest/baseline/node_modules ]]; then
    (cd loadtest/baseline && npm ci --no-audit --no-fund)
fi

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[$i]}" == "--out-dir" ]]; then out="${args[$((i + 1))]:-}"; fi
    if [[ "${args[$i]}" == --out-dir=* ]]; then out="${args[$i]#--out-dir=}"; fi
done
if [[ -z "$out" ]]; then
    out="loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)"
    args+=(--out-dir "$out")
fi
mkdir -p "$out"

# The binary stops its children itself; this trap is for the case where it
# is killed outright: stop, by PID, whatever it listed as still running.
lt_pid=""
cleanup() {
    if [[ -n "$lt_pid" ]] && kill -0 "$lt_pid" 2>/dev/null; then
        kill -TERM "$lt_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$lt_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    local f pid
    for f in "$out"/*/pids; do
        [[ -f "$f" ]] || continue
        while read -r pid; do
            [[ -n "$pid" ]] || continue
            if [[ -r /proc/$pid/cmdline ]] &&
                tr '\0' ' ' </proc/"$pid"/cmdline | grep -qE 'redis-server|flowgate|server\.mjs'; then
                kill -TERM "$pid" 2>/dev/null || true
            fi
        done <"$f"
    done
}
trap cleanup EXIT

target/release/flowgate-loadtest compare "${args[@]}" &
lt_pid=$!
wait "$lt_pid"
