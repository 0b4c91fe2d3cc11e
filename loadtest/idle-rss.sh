#!/usr/bin/env bash
# RSS per idle joined connection on flowgate alone, for A/B runs of two
# builds (compare.sh gives the same figure side by side with the baseline):
#
#   loadtest/idle-rss.sh [VAR=value ...]           the nodes get these env vars
#
#   BIN=path/to/flowgate   the gateway build to run (default target/release/flowgate)
#   CONNS=20000            idle joined connections, rooms of 10, over three nodes
#   ACTIVITY=16384         then each room's first member sends a pod:update
#                          of this many bytes and RSS is read again (0: no)
#   SETTLE=20              seconds before each RSS reading
#   OUT=dir                where logs and the report go (default: a temp dir)
#
# Starts one Redis and three nodes on fixed loopback ports (26392,
# 27421-27423; override with REDIS_PORT / NODE_PORT0), runs
# `flowgate-loadtest idle`, prints its RSS lines. Stops what it started, by PID.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bin="${BIN:-target/release/flowgate}"
lt=target/release/flowgate-loadtest
[[ -x "$bin" && -x "$lt" ]] || { echo "build first: cargo build --release -p flowgate-gateway -p flowgate-loadtest" >&2; exit 2; }
rport="${REDIS_PORT:-26392}"
nport0="${NODE_PORT0:-27420}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
ulimit -n 20000 2>/dev/null || true

pids=()
rpid=""
cleanup() {
    [[ ${#pids[@]} -gt 0 ]] && kill "${pids[@]}" 2>/dev/null || true
    for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.2; done; done
    if [[ -n "$rpid" ]]; then
        kill "$rpid" 2>/dev/null || true
        while kill -0 "$rpid" 2>/dev/null; do sleep 0.1; done
    fi
}
trap cleanup EXIT

redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --maxclients 100000 --pidfile "$out/redis.pid" --logfile "$out/redis.log"
for _ in $(seq 50); do [[ -s "$out/redis.pid" ]] && break; sleep 0.1; done
rpid="$(cat "$out/redis.pid")"

targets=()
for k in 1 2 3; do
    port=$((nport0 + k))
    env "$@" FLOWGATE_NODE_ID="node$k" PORT="$port" HOST=127.0.0.1 \
        REDIS_URL="redis://127.0.0.1:$rport" JWT_ACCESS_TOKEN_SECRET=loadtest-secret \
        FLOWGATE_WORKER_THREADS=1 FLOWGATE_MAX_CONNECTIONS=200000 \
        FLOWGATE_MAX_UNAUTHENTICATED_PER_IP=200000 FLOWGATE_RATE_LIMIT_PER_SEC=100 \
        FLOWGATE_RATE_LIMIT_BURST=100 RUST_LOG=warn "$bin" >"$out/node$k.log" 2>&1 &
    pids+=($!)
    targets+=("127.0.0.1:$port")
done
sleep 2
for p in "${pids[@]}"; do kill -0 "$p" || { echo "a node died:" >&2; tail -n 3 "$out"/node*.log >&2; exit 1; }; done

"$lt" idle --connections "${CONNS:-20000}" --settle-secs "${SETTLE:-20}" --hold-secs 1 \
    --activity-bytes "${ACTIVITY:-16384}" \
    --target "$(IFS=,; echo "${targets[*]}")" --source-ips 127.0.0.1,127.0.0.2 \
    --secret loadtest-secret --pids "$(IFS=,; echo "${pids[*]}")" --extra-pids "$rpid" \
    >"$out/idle.out" 2>&1
grep -iE 'rss|held|connect' "$out/idle.out" | head -n 12
echo "files: $out"
