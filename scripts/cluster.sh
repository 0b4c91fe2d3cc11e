#!/usr/bin/env bash
# A local flowgate cluster on loopback: one redis-server, three flowgate
# nodes and HAProxy (deploy/haproxy.cfg) in front of them, all as child
# processes with free ports, their state, logs and PIDs in one directory.
#
#   scripts/cluster.sh up       start everything, wait until healthy, print the ports
#   scripts/cluster.sh status   show what runs (PIDs, ports, health)
#   scripts/cluster.sh down     stop exactly the recorded PIDs, remove the state dir
#   scripts/cluster.sh env      print the cluster's ports as shell assignments
#
# Environment (all optional):
#   FLOWGATE_CLUSTER_DIR       state dir (default: <repo>/.tmp/cluster)
#   FLOWGATE_BIN               flowgate binary (default: target/release/flowgate,
#                              built with cargo when missing)
#   FLOWGATE_CLUSTER_NO_REDIS  1: do not give the nodes REDIS_URL (each node then
#                              runs its own in-memory engine: NOT a real cluster;
#                              for testing this script's mechanics)
#   FLOWGATE_CLUSTER_SKIP_DEPS 1: do not run scripts/deps.sh first
#   FLOWGATE_CLUSTER_WAIT_SECS how long to wait for health (default 30)
#   LB_PORT, STATS_PORT        fixed ports for the load balancer and its stats
#                              page (default: free ports)
#   JWT_ACCESS_TOKEN_SECRET    default "dev-secret"
#   FLOWGATE_SERVICE_TOKEN     default "dev-service-token"
#   Any other variable (RUST_LOG, FLOWGATE_*, DATABASE_URL, ...) is passed to
#   the nodes as is.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${FLOWGATE_CLUSTER_DIR:-$repo/.tmp/cluster}"
wait_secs="${FLOWGATE_CLUSTER_WAIT_SECS:-30}"
stop_wait_secs=15
nodes=(node1 node2 node3)
PATH="$PATH:/usr/sbin:/usr/local/sbin"

log() { printf 'cluster: %s\n' "$*"; }
err() { printf 'cluster: ERROR: %s\n' "$*" >&2; }

# --- PID bookkeeping ----------------------------------------------------------
# $state/pids/NAME.pid holds "PID STARTTIME": the start time (field 22 of
# /proc/PID/stat) guards against stopping an unrelated process that reused
# the PID after ours exited.

# Fields 3.. of /proc/PID/stat (after "pid (comm) ", comm may hold spaces),
# without forking; nothing if the process does not exist.
stat_fields() {
    local line
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 0
    echo "${line##*) }"
}

starttime() { # PID -> start time in clock ticks, or nothing
    local fields
    read -r -a fields <<<"$(stat_fields "$1")"
    echo "${fields[19]:-}"
}

record_pid() { # NAME PID
    mkdir -p "$state/pids"
    echo "$2 $(starttime "$2")" >"$state/pids/$1.pid"
}

# PID of NAME if it is still the process we started; nothing otherwise.
live_pid() {
    local f="$state/pids/$1.pid" pid st
    [[ -f "$f" ]] || return 0
    read -r pid st <"$f" || return 0
    [[ -n "$pid" && -n "$st" ]] || return 0
    [[ "$(starttime "$pid")" == "$st" ]] || return 0
    is_zombie "$pid" && return 0 # exited, not reaped yet
    echo "$pid"
}

now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; } # bash >= 5

is_zombie() { [[ "$(stat_fields "$1")" == Z* ]]; }

gone() { [[ ! -d /proc/$1 ]] || is_zombie "$1"; }

recorded_names() {
    local f
    for f in "$state"/pids/*.pid; do
        [[ -e "$f" ]] || continue
        f="${f##*/}"
        echo "${f%.pid}"
    done
}

# SIGTERM the given names, wait up to $stop_wait_secs, then SIGKILL.
stop_names() {
    local name pid pids=() names=()
    for name in "$@"; do
        pid="$(live_pid "$name")"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null && { pids+=("$pid"); names+=("$name"); }
        fi
    done
    ((${#pids[@]})) || return 0
    log "stopping ${names[*]} (SIGTERM)"
    local deadline=$(($(now_us) + stop_wait_secs * 1000000))
    while (($(now_us) < deadline)); do
        local alive=0
        for pid in "${pids[@]}"; do
            gone "$pid" || alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for name in "$@"; do
        pid="$(live_pid "$name")"
        if [[ -n "$pid" ]]; then
            log "$name (pid $pid) still running after ${stop_wait_secs}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    # reap them when they are our children (a failed `up`); no-op otherwise
    wait "${pids[@]}" 2>/dev/null || true
}

# Stops everything recorded: the load balancer and nodes first (the nodes
# drain while Redis is still there), Redis last.
stop_all() {
    local names=() others=() name
    mapfile -t names < <(recorded_names)
    for name in "${names[@]}"; do
        [[ "$name" == redis ]] || others+=("$name")
    done
    ((${#others[@]})) && stop_names "${others[@]}"
    [[ -f "$state/pids/redis.pid" ]] && stop_names redis
    return 0
}

# --- helpers --------------------------------------------------------------------

free_ports() { # N -> N distinct free loopback ports, one per line
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
    s.close()
EOF
}

http_status() { # URL -> HTTP status, or 000
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

last_lines() { # NAME
    local f="$state/logs/$1.log"
    if [[ -s "$f" ]]; then
        echo "---- last lines of $f ----" >&2
        tail -n 25 "$f" >&2
        echo "----" >&2
    else
        echo "(no output in $f)" >&2
    fi
}

exit_status_of() { # PID (our child) -> "exited with status N" or ""
    local rc=0
    if gone "$1"; then
        wait "$1" 2>/dev/null || rc=$?
        echo "exited with status $rc"
    fi
}

# Run in a child's subshell before exec: close every descriptor above 2, so
# the long-lived processes hold neither our lock nor any pipe of whoever
# started this script (a caller reading our output would otherwise wait for
# them forever).
close_fds() {
    local fd
    for fd in "/proc/$BASHPID/fd/"*; do
        fd="${fd##*/}"
        if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
}

raise_nofile() {
    local hard
    hard="$(ulimit -Hn)"
    if [[ "$hard" == unlimited ]]; then
        ulimit -n 1048576 2>/dev/null || true
    else
        ulimit -n "$hard" 2>/dev/null || true
    fi
    # root may raise the hard limit too
    ulimit -n 1048576 2>/dev/null || true
}

# --- up ------------------------------------------------------------------------------

up_done=0
on_up_exit() {
    ((up_done)) && return 0
    err "cluster did not come up; stopping what was started"
    stop_all
    local keep="$repo/.tmp/cluster-failed"
    if [[ -d "$state/logs" ]]; then
        rm -rf "$keep"
        mkdir -p "$keep"
        cp -r "$state/logs" "$keep/"
        err "logs kept in $keep/logs"
    fi
    rm -rf "$state"
}

wait_healthy() { # NAME URL PID
    local name="$1" url="$2" pid="$3" code="" why
    local deadline=$(($(now_us) + wait_secs * 1000000))
    while (($(now_us) < deadline)); do
        code="$(http_status "$url")"
        [[ "$code" == 200 ]] && return 0
        why="$(exit_status_of "$pid")"
        if [[ -n "$why" ]]; then
            err "$name (pid $pid) $why before it became healthy"
            last_lines "$name"
            if grep -q 'Redis engine is not built' "$state/logs/$name.log" 2>/dev/null; then
                err "this flowgate has no Redis engine yet; FLOWGATE_CLUSTER_NO_REDIS=1 starts the nodes without REDIS_URL"
            fi
            return 1
        fi
        sleep 0.2
    done
    err "$name: $url did not answer 200 within ${wait_secs}s (last status: ${code:-none})"
    last_lines "$name"
    return 1
}

cmd_up() {
    local name pid
    if [[ -d "$state/pids" ]]; then
        for name in $(recorded_names); do
            if [[ -n "$(live_pid "$name")" ]]; then
                err "a cluster is already running from $state (see: $0 status; stop it with: $0 down)"
                exit 1
            fi
        done
        log "removing stale state dir $state"
    fi
    rm -rf "$state"

    if [[ "${FLOWGATE_CLUSTER_SKIP_DEPS:-0}" != 1 ]]; then
        "$repo/scripts/deps.sh"
    fi

    local bin="${FLOWGATE_BIN:-$repo/target/release/flowgate}"
    if [[ ! -x "$bin" ]]; then
        if [[ -n "${FLOWGATE_BIN:-}" ]]; then
            err "FLOWGATE_BIN=$bin is not an executable file"
            exit 1
        fi
        log "building $bin (cargo build --release -p flowgate-gateway)"
        (cd "$repo" && cargo build --release -p flowgate-gateway) || {
            err "cargo build failed"
            exit 1
        }
    fi

    raise_nofile
    log "open-files limit: $(ulimit -n)"

    mkdir -p "$state/logs" "$state/pids" "$state/redis"
    trap on_up_exit EXIT
    trap 'exit 130' INT TERM

    local ports
    mapfile -t ports < <(free_ports 6)
    local redis_port="${ports[0]}"
    local node_ports=("${ports[1]}" "${ports[2]}" "${ports[3]}")
    local lb_port="${LB_PORT:-${ports[4]}}"
    local stats_port="${STATS_PORT:-${ports[5]}}"

    # Redis: loopback only, no persistence, foreground (we hold its PID).
    (
        close_fds
        exec setsid redis-server --bind 127.0.0.1 --port "$redis_port" \
            --save '' --appendonly no --daemonize no \
            --dir "$state/redis" --logfile ''
    ) >"$state/logs/redis.log" 2>&1 </dev/null &
    pid=$!
    record_pid redis "$pid"
    local ok=0
    local deadline=$(($(now_us) + wait_secs * 1000000))
    while (($(now_us) < deadline)); do
        if [[ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" == PONG ]]; then
            ok=1
            break
        fi
        if [[ -n "$(exit_status_of "$pid")" ]]; then break; fi
        sleep 0.1
    done
    if ((!ok)); then
        err "redis-server (pid $pid) did not answer PING on port $redis_port"
        last_lines redis
        exit 1
    fi
    log "redis    pid $pid  redis://127.0.0.1:$redis_port"

    local redis_url="redis://127.0.0.1:$redis_port"
    local jwt_secret="${JWT_ACCESS_TOKEN_SECRET:-dev-secret}"
    local service_token="${FLOWGATE_SERVICE_TOKEN:-dev-service-token}"
    if [[ "${FLOWGATE_CLUSTER_NO_REDIS:-0}" == 1 ]]; then
        log "FLOWGATE_CLUSTER_NO_REDIS=1: nodes start WITHOUT REDIS_URL (separate in-memory engines, not a real cluster)"
    fi

    local n port
    for n in 0 1 2; do
        name="${nodes[$n]}"
        port="${node_ports[$n]}"
        (
            if [[ "${FLOWGATE_CLUSTER_NO_REDIS:-0}" == 1 ]]; then
                unset REDIS_URL
            else
                export REDIS_URL="$redis_url"
            fi
            export HOST=127.0.0.1 PORT="$port" FLOWGATE_NODE_ID="$name"
            export JWT_ACCESS_TOKEN_SECRET="$jwt_secret"
            export FLOWGATE_SERVICE_TOKEN="$service_token"
            export FLOWGATE_LOG_FORMAT=json
            # Drain: 5 s notice (HAProxy marks a node down after ~4 s),
            # then exit well within the 15 s that `down` waits.
            export FLOWGATE_DRAIN_NOTICE_MS="${FLOWGATE_DRAIN_NOTICE_MS:-5000}"
            export FLOWGATE_DRAIN_WINDOW_MS="${FLOWGATE_DRAIN_WINDOW_MS:-4000}"
            export FLOWGATE_SHUTDOWN_DEADLINE_MS="${FLOWGATE_SHUTDOWN_DEADLINE_MS:-12000}"
            close_fds
            exec setsid "$bin" serve
        ) >"$state/logs/$name.log" 2>&1 </dev/null &
        record_pid "$name" $!
    done

    for n in 0 1 2; do
        name="${nodes[$n]}"
        pid="$(live_pid "$name")"
        [[ -n "$pid" ]] || pid="$(cut -d' ' -f1 "$state/pids/$name.pid")"
        wait_healthy "$name" "http://127.0.0.1:${node_ports[$n]}/health" "$pid" || exit 1
        log "$name    pid $pid  http://127.0.0.1:${node_ports[$n]}  (health 200)"
    done

    # HAProxy
    local hx_env=(LB_ADDR=127.0.0.1 LB_PORT="$lb_port"
        STATS_ADDR=127.0.0.1 STATS_PORT="$stats_port"
        NODE1_ADDR=127.0.0.1 NODE1_PORT="${node_ports[0]}"
        NODE2_ADDR=127.0.0.1 NODE2_PORT="${node_ports[1]}"
        NODE3_ADDR=127.0.0.1 NODE3_PORT="${node_ports[2]}")
    if ! env "${hx_env[@]}" haproxy -c -q -f "$repo/deploy/haproxy.cfg" >"$state/logs/haproxy.log" 2>&1; then
        err "deploy/haproxy.cfg does not validate"
        last_lines haproxy
        exit 1
    fi
    (
        close_fds
        exec env "${hx_env[@]}" setsid haproxy -db -f "$repo/deploy/haproxy.cfg"
    ) >"$state/logs/haproxy.log" 2>&1 </dev/null &
    pid=$!
    record_pid haproxy "$pid"
    wait_healthy haproxy "http://127.0.0.1:$lb_port/health" "$pid" || exit 1
    log "haproxy  pid $pid  http://127.0.0.1:$lb_port  (a node's /health through it: 200)"

    {
        printf '%s=%q\n' \
            FLOWGATE_CLUSTER_DIR "$state" \
            LB_URL "http://127.0.0.1:$lb_port" \
            LB_PORT "$lb_port" \
            STATS_PORT "$stats_port" \
            REDIS_PORT "$redis_port" \
            REDIS_URL "$redis_url" \
            NODE1_PORT "${node_ports[0]}" \
            NODE2_PORT "${node_ports[1]}" \
            NODE3_PORT "${node_ports[2]}" \
            JWT_ACCESS_TOKEN_SECRET "$jwt_secret" \
            FLOWGATE_SERVICE_TOKEN "$service_token"
    } >"$state/cluster.env"

    up_done=1
    trap - EXIT INT TERM
    cat <<EOF

flowgate cluster is up (state, logs and PIDs in $state)
  load balancer  http://127.0.0.1:$lb_port    socket.io-client: io("http://127.0.0.1:$lb_port/flows", {transports: ["websocket"], auth: {token}})
  stats page     http://127.0.0.1:$stats_port/
  node1          http://127.0.0.1:${node_ports[0]}    log: $state/logs/node1.log
  node2          http://127.0.0.1:${node_ports[1]}    log: $state/logs/node2.log
  node3          http://127.0.0.1:${node_ports[2]}    log: $state/logs/node3.log
  redis          $redis_url$([[ "${FLOWGATE_CLUSTER_NO_REDIS:-0}" == 1 ]] && echo "    (NOT used by the nodes: FLOWGATE_CLUSTER_NO_REDIS=1)")
  JWT secret     $jwt_secret    service token: $service_token
  ports as shell variables: $0 env   (or: source $state/cluster.env)
status: $0 status
stop:   $0 down
EOF
}

# --- status / down / env ---------------------------------------------------------------

cmd_status() {
    if [[ ! -d "$state/pids" ]]; then
        log "not running (no state dir $state)"
        exit 3
    fi
    local name pid port url code dead=0
    declare -A ports=()
    if [[ -f "$state/cluster.env" ]]; then
        # shellcheck disable=SC1091
        while IFS='=' read -r k v; do ports[$k]="$v"; done <"$state/cluster.env"
    fi
    printf '%-8s %-8s %-8s %-7s %s\n' NAME PID STATE PORT HEALTH
    for name in $(recorded_names); do
        pid="$(live_pid "$name")"
        port="" url="" code=""
        case "$name" in
            redis) port="${ports[REDIS_PORT]:-}" ;;
            haproxy) port="${ports[LB_PORT]:-}" ;;
            node*) port="${ports[${name^^}_PORT]:-}" ;;
        esac
        if [[ -z "$pid" ]]; then
            printf '%-8s %-8s %-8s %-7s %s\n' "$name" "$(cut -d' ' -f1 "$state/pids/$name.pid")" dead "${port:--}" -
            dead=1
            continue
        fi
        case "$name" in
            redis) [[ -n "$port" ]] && code="$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)" ;;
            *) [[ -n "$port" ]] && code="GET /health: $(http_status "http://127.0.0.1:$port/health")" ;;
        esac
        printf '%-8s %-8s %-8s %-7s %s\n' "$name" "$pid" running "${port:--}" "${code:--}"
    done
    [[ -n "${ports[STATS_PORT]:-}" ]] && echo "stats page: http://127.0.0.1:${ports[STATS_PORT]}/"
    [[ -f "$state/cluster.env" ]] || echo "(the cluster is starting or failed to start: no cluster.env yet)"
    ((dead)) && exit 1
    return 0
}

cmd_down() {
    if [[ ! -d "$state" ]]; then
        log "not running (no state dir $state)"
        return 0
    fi
    stop_all
    rm -rf "$state"
    log "stopped; removed $state"
}

cmd_env() {
    [[ -f "$state/cluster.env" ]] || {
        err "no cluster is up ($state/cluster.env missing)"
        exit 3
    }
    sed 's/^/export /' "$state/cluster.env" # values are already shell-quoted (%q)
}

# --- main ----------------------------------------------------------------------------

lock() {
    mkdir -p "$(dirname "$state")"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$(dirname "$state")/.$(basename "$state").lock"
        flock -n 9 || {
            err "another $0 is running on $state"
            exit 1
        }
    fi
}

case "${1:-}" in
    up) lock; cmd_up ;;
    down) lock; cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 up|down|status|env" >&2
        exit 2
        ;;
esac
