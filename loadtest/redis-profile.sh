#!/usr/bin/env bash
# What Redis spends per published event under the rooms scenario, on
# flowgate alone (compare.sh gives the same figure side by side with the
# baseline; this one is for A/B runs of two flowgate builds and for a
# profile of Redis itself):
#
#   loadtest/redis-profile.sh [VAR=value ...]      the nodes get these env vars
#
#   BIN=path/to/flowgate   the gateway build to run (default target/release/flowgate)
#   PERF=1                 also `perf record -g` Redis over the window (perf.data in OUT)
#   RATE=1 ROOMS=250 MEMBERS=10   the rooms load (events/s per member)
#   OUT=dir                where logs, INFO commandstats and metrics go (default: a temp dir)
#
# Starts one Redis and three nodes on fixed loopback ports (26391, 27411-27413;
# override with REDIS_PORT / NODE_PORT0), runs `flowgate-loadtest rooms` for
# 25 s, and over a 10 s window in the middle reads Redis's CPU (INFO cpu),
# its commandstats, and node 1's metrics. Stops what it started, by PID.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bin="${BIN:-target/release/flowgate}"
lt=target/release/flowgate-loadtest
[[ -x "$bin" && -x "$lt" ]] || { echo "build first: cargo build --release -p flowgate-gateway -p flowgate-loadtest" >&2; exit 2; }
rport="${REDIS_PORT:-26391}"
nport0="${NODE_PORT0:-27410}"
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
        # Redis shuts down asynchronously: wait, so a next run can bind the port.
        while kill -0 "$rpid" 2>/dev/null; do sleep 0.1; done
    fi
}
trap cleanup EXIT

redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$out/redis.pid" --logfile "$out/redis.log"
for _ in $(seq 50); do [[ -s "$out/redis.pid" ]] && break; sleep 0.1; done
rpid="$(cat "$out/redis.pid")"
R=(redis-cli -p "$rport")
cpu() { "${R[@]}" info cpu | grep -E 'used_cpu_(sys|user):' | cut -d: -f2 | tr -d '\r' | paste -sd+ | bc; }

targets=()
for k in 1 2 3; do
    port=$((nport0 + k))
    env "$@" FLOWGATE_NODE_ID="node$k" PORT="$port" HOST=127.0.0.1 \
        REDIS_URL="redis://127.0.0.1:$rport" JWT_ACCESS_TOKEN_SECRET=loadtest-secret \
        FLOWGATE_WORKER_THREADS=1 FLOWGATE_MAX_CONNECTIONS=200000 \
        FLOWGATE_MAX_UNAUTHENTICATED_PER_IP=200000 RUST_LOG=warn "$bin" >"$out/node$k.log" 2>&1 &
    pids+=($!)
    targets+=("127.0.0.1:$port")
done
sleep 2
for p in "${pids[@]}"; do kill -0 "$p" || { echo "a node died:" >&2; tail -n 3 "$out"/node*.log >&2; exit 1; }; done

"$lt" rooms --rooms "${ROOMS:-250}" --members "${MEMBERS:-10}" --rate "${RATE:-1}" --duration 25 \
    --target "$(IFS=,; echo "${targets[*]}")" --secret loadtest-secret >"$out/rooms.out" 2>&1 &
lp=$!
sleep 10 # connecting and joining take a few seconds; the window is in the traffic
"${R[@]}" config resetstat >/dev/null
c0=$(cpu)
curl -s "http://${targets[0]}/metrics" >"$out/metrics0"
if [[ -n "${PERF:-}" ]]; then
    perf record -F 999 -g -p "$rpid" -o "$out/perf.data" -- sleep 10 >/dev/null 2>&1
else
    sleep 10
fi
c1=$(cpu)
curl -s "http://${targets[0]}/metrics" >"$out/metrics1"
"${R[@]}" info commandstats >"$out/cmdstats"
wait "$lp"

events=$(grep -E '^cmdstat_xadd:' "$out/cmdstats" | sed -E 's/^cmdstat_xadd:calls=([0-9]+),.*/\1/')
# node 1's counters over the window: publish calls, events, lease calls
delta() { echo $(($(grep -E "^$1 " "$out/metrics1" | cut -d' ' -f2) - $(grep -E "^$1 " "$out/metrics0" | cut -d' ' -f2))); }
echo "Redis CPU over the 10 s window: $(echo "$c1 - $c0" | bc) s"
echo "events logged (XADD):           ${events:-0}"
[[ -n "$events" && "$events" -gt 0 ]] &&
    echo "Redis CPU per event:            $(echo "($c1 - $c0) * 1000000 / $events" | bc) µs"
echo "node 1: $(delta flowgate_bus_published_events_total) events in $(delta flowgate_bus_publish_calls_total) publish calls, $(delta flowgate_limiter_redis_calls_total) limiter lease calls"
grep -E '^cmdstat_' "$out/cmdstats" | sed -E 's/,rejected_calls.*//' | sort -t= -k2 -nr | head -n 8
grep -E 'rate/snd|sustained|lost|nothing' "$out/rooms.out" | head -n 3
echo "files: $out"
