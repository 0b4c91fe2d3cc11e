#!/usr/bin/env bash
# The baseline cluster by hand: one redis-server and three Node Socket.IO
# processes (server.mjs, classic @socket.io/redis-adapter) on free loopback
# ports. `flowgate-loadtest compare` starts and stops its own; this is for
# poking at the baseline with the single-scenario subcommands.
#
#   loadtest/baseline/run.sh up      npm ci if needed, start, print the targets
#   loadtest/baseline/run.sh down    stop exactly the PIDs it started
#   loadtest/baseline/run.sh status
#
# Environment: JWT_ACCESS_TOKEN_SECRET (default loadtest-secret),
# RATE_LIMIT_PER_SEC / RATE_LIMIT_BURST (default 20), BASELINE_NODES (3),
# BASELINE_DIR (state dir, default <repo>/.tmp/baseline).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${BASELINE_DIR:-$repo/.tmp/baseline}"
nodes="${BASELINE_NODES:-3}"
export JWT_ACCESS_TOKEN_SECRET="${JWT_ACCESS_TOKEN_SECRET:-loadtest-secret}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # PORT PID
    for _ in $(seq 200); do
        kill -0 "$2" 2>/dev/null || { echo "process $2 exited; see $state/*.log" >&2; return 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

up() {
    if [[ -f "$state/pids" ]]; then echo "already up ($state/pids); run down first" >&2; exit 1; fi
    [[ -d "$here/node_modules" ]] || (cd "$here" && npm ci --no-audit --no-fund)
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$state"
    local rport targets=() p pid
    rport="$(free_port)"
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$state" \
        >"$state/redis.log" 2>&1 &
    pid=$!
    echo "$pid" >>"$state/pids"
    wait_port "$rport" "$pid"
    for k in $(seq "$nodes"); do
        p="$(free_port)"
        (cd "$here" && HOST=127.0.0.1 PORT="$p" REDIS_URL="redis://127.0.0.1:$rport" \
            exec node server.mjs) >"$state/baseline-$k.log" 2>&1 &
        pid=$!
        echo "$pid" >>"$state/pids"
        wait_port "$p" "$pid"
        targets+=("127.0.0.1:$p")
    done
    echo "redis 127.0.0.1:$rport"
    echo "targets $(IFS=,; echo "${targets[*]}")"
    echo "pids $(tail -n "$nodes" "$state/pids" | paste -sd, -)"
}

down() {
    [[ -f "$state/pids" ]] || { echo "not up"; return 0; }
    local pid
    # Nodes first (reverse order), then Redis.
    for pid in $(tac "$state/pids"); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE 'server\.mjs|redis-server'; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    rm -rf "$state"
    echo "stopped"
}

status() {
    [[ -f "$state/pids" ]] || { echo "not up"; return 0; }
    local pid
    while read -r pid; do
        if kill -0 "$pid" 2>/dev/null; then echo "$pid running"; else echo "$pid gone"; fi
    done <"$state/pids"
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
