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

rport="${REDIS_PORT:-26392}"
nport0="${NODE_PORT0:-27420}"
# shellcheck source=lib.sh
source loadtest/lib.sh
start_redis
# Above the rate limit's default: the activity phase sends one event per
# room at once, from users that also joined a moment before.
start_nodes FLOWGATE_RATE_LIMIT_PER_SEC=100 FLOWGATE_RATE_LIMIT_BURST=100 "$@"

"$lt" idle --connections "${CONNS:-20000}" --settle-secs "${SETTLE:-20}" --hold-secs 1 \
    --activity-bytes "${ACTIVITY:-16384}" \
    --target "$(IFS=,; echo "${targets[*]}")" --source-ips 127.0.0.1,127.0.0.2 \
    --secret loadtest-secret --pids "$(IFS=,; echo "${pids[*]}")" --extra-pids "$rpid" \
    >"$out/idle.out" 2>&1
grep -iE 'rss|held|connect' "$out/idle.out" | head -n 12
echo "files: $out"
