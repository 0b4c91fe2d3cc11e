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
#   PERF=node              the same for node 1 instead of Redis
#   PERF_CALLGRAPH="--call-graph dwarf,16384"   how perf unwinds (default -g)
#   SYSCALLS=1             count Redis's and node 1's system calls over the window
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

rport="${REDIS_PORT:-26391}"
nport0="${NODE_PORT0:-27410}"
# shellcheck source=lib.sh
source loadtest/lib.sh
start_redis
R=(redis-cli -p "$rport")
cpu() { "${R[@]}" info cpu | grep -E 'used_cpu_(sys|user):' | cut -d: -f2 | tr -d '\r' | paste -sd+ | bc; }
start_nodes "$@"

"$lt" rooms --rooms "${ROOMS:-250}" --members "${MEMBERS:-10}" --rate "${RATE:-1}" --duration 25 \
    --target "$(IFS=,; echo "${targets[*]}")" --secret loadtest-secret >"$out/rooms.out" 2>&1 &
lp=$!
sleep 10 # connecting and joining take a few seconds; the window is in the traffic
"${R[@]}" config resetstat >/dev/null
c0=$(cpu)
curl -s "http://${targets[0]}/metrics" >"$out/metrics0"
if [[ -n "${PERF:-}" ]]; then
    ppid="$rpid"
    [[ "$PERF" == node ]] && ppid="${pids[0]}"
    perf record -F 999 ${PERF_CALLGRAPH:--g} -p "$ppid" -o "$out/perf.data" -- sleep 10 >/dev/null 2>&1
elif [[ -n "${SYSCALLS:-}" ]]; then
    # System calls of Redis and of node 1 over the window: writes per
    # delivery and per event, wake-ups (epoll_wait) per call.
    ev=syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait
    perf stat -x, -e "$ev" -p "$rpid" -o "$out/syscalls.redis" -- sleep 10 &
    perf stat -x, -e "$ev" -p "${pids[0]}" -o "$out/syscalls.node1" -- sleep 10
    wait $!
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
if [[ -n "${SYSCALLS:-}" ]]; then
    for who in redis node1; do
        echo "system calls of $who in the window:"
        grep syscalls "$out/syscalls.$who" | awk -F, '{ sub(/syscalls:sys_enter_/, "", $3); printf "  %-12s %d\n", $3, $1 }'
    done
fi
echo "files: $out"
