#!/usr/bin/env bash
# A local flowgate cluster on loopback: one redis-server, PostgreSQL 15 with
# PgBouncer in front of it (transaction pooling, deploy/pgbouncer.ini), three
# flowgate nodes and HAProxy (deploy/haproxy.cfg) in front of them, all as
# child processes with free ports, their state, logs and PIDs in one directory.
# Postgres and PgBouncer refuse to run as root: they run as the `postgres`
# system user (setpriv, no PAM: the PID we record is the server's own) in
# <state>/pg, which that user owns. `flowgate migrate` runs over
# DATABASE_DIRECT_URL (straight to Postgres) before any node starts; the nodes
# get DATABASE_URL through PgBouncer.
#
#   scripts/cluster.sh up       start everything, wait until healthy, print the ports
#   scripts/cluster.sh status   show what runs (PIDs, ports, health)
#   scripts/cluster.sh down     stop exactly the recorded PIDs, remove the state dir
#   scripts/cluster.sh env      print the cluster's ports and URLs as shell assignments
#   scripts/cluster.sh scale N  run N nodes (1..16) while clients stay connected:
#                               new nodes start, become healthy and are put
#                               into HAProxy through its runtime API; removed
#                               ones (the highest-numbered) stop getting new
#                               connections, then drain (SIGTERM): their
#                               clients reconnect through HAProxy to the
#                               others and recover what they missed
#
# Environment (all optional):
#   FLOWGATE_CLUSTER_DIR       state dir (default: <repo>/.tmp/cluster); the
#                              `postgres` user must be able to traverse it
#   FLOWGATE_BIN               flowgate binary (default: target/release/flowgate,
#                              built with cargo when missing)
#   FLOWGATE_CLUSTER_NO_DB     1: no Postgres/PgBouncer, no DATABASE_URL for the
#                              nodes (the old topology; access policy then
#                              defaults to open)
#   FLOWGATE_CLUSTER_NO_REDIS  1: do not give the nodes REDIS_URL (each node then
#                              runs its own in-memory engine: NOT a real cluster;
#                              for testing this script's mechanics). Implies
#                              FLOWGATE_CLUSTER_NO_DB=1 (without Redis each node
#                              would keep its own in-memory event-log queue).
#   FLOWGATE_ACCESS_POLICY     passed to the nodes when set; unset, a node with
#                              DATABASE_URL uses `members` (a user joins a flow
#                              only with a membership row: grant one with
#                              PUT /v1/flows/F/members/USER and the service token)
#   FLOWGATE_CLUSTER_SKIP_DEPS 1: do not run scripts/deps.sh first
#   FLOWGATE_CLUSTER_WAIT_SECS how long to wait for health (default 30)
#   LB_PORT, STATS_PORT        fixed ports for the load balancer and its stats
#                              page (default: free ports)
#   JWT_ACCESS_TOKEN_SECRET    default "dev-secret"
#   FLOWGATE_SERVICE_TOKEN     default "dev-service-token"
#   Any other variable (RUST_LOG, FLOWGATE_*, ...) is passed to the nodes as
#   is (DATABASE_URL too with FLOWGATE_CLUSTER_NO_DB=1; otherwise the script
#   sets it).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${FLOWGATE_CLUSTER_DIR:-$repo/.tmp/cluster}"
wait_secs="${FLOWGATE_CLUSTER_WAIT_SECS:-30}"
stop_wait_secs=15
# A drained node exits after its notice, its drain window and the flush of
# its event log (FLOWGATE_SHUTDOWN_DEADLINE_MS, 12 s below, at most).
scale_stop_wait_secs=30
max_nodes=16 # node4..node16 are deploy/haproxy.cfg's spare slots
PATH="$PATH:/usr/sbin:/usr/local/sbin"
PG_BIN=/usr/lib/postgresql/15/bin
PG_USER=postgres

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

# The signal that shuts NAME down cleanly: SIGINT is Postgres' "fast"
# shutdown (what `pg_ctl stop -m fast` sends: roll back, disconnect, write a
# checkpoint, exit; SIGTERM would be "smart" and wait for every client).
# SIGTERM for PgBouncer (immediate shutdown; its clients are gone by then),
# the nodes (drain), HAProxy and Redis.
stop_signal() {
    case "$1" in
        postgres) echo INT ;;
        *) echo TERM ;;
    esac
}

# Signal the given names (stop_signal), wait up to $stop_wait_secs, then SIGKILL.
stop_names() {
    local name pid sig pids=() names=()
    for name in "$@"; do
        pid="$(live_pid "$name")"
        if [[ -n "$pid" ]]; then
            sig="$(stop_signal "$name")"
            kill -"$sig" "$pid" 2>/dev/null && { pids+=("$pid"); names+=("$name(SIG$sig)"); }
        fi
    done
    ((${#pids[@]})) || return 0
    log "stopping ${names[*]}"
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
# drain, and flush their event log, while Redis and the database are still
# there), then PgBouncer, Postgres, Redis last.
stop_all() {
    local names=() others=() name
    mapfile -t names < <(recorded_names)
    for name in "${names[@]}"; do
        case "$name" in
            redis | postgres | pgbouncer) ;;
            *) others+=("$name") ;;
        esac
    done
    ((${#others[@]})) && stop_names "${others[@]}"
    for name in pgbouncer postgres redis; do
        [[ -f "$state/pids/$name.pid" ]] && stop_names "$name"
    done
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

# --- Postgres and PgBouncer ------------------------------------------------------
# Both refuse to run as root. setpriv switches to the postgres user and execs
# (no fork, no PAM session: unlike runuser it neither leaves a parent process
# in between nor resets the open-files limit), so $! is the server itself;
# the PID is still checked against postmaster.pid / PgBouncer's pidfile.
as_pg=(setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups
    env -i PATH=/usr/bin:/bin LANG=C.UTF-8)

psql_super() { # psql as the superuser over the Unix socket; extra args follow
    "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$pg_sock" -p "$pg_port" \
        -U postgres "$@"
}

# Waits until CMD... succeeds, while PID lives; NAME for messages.
wait_until() { # NAME PID CMD...
    local name="$1" pid="$2" why
    shift 2
    local deadline=$(($(now_us) + wait_secs * 1000000))
    while (($(now_us) < deadline)); do
        "$@" >/dev/null 2>&1 && return 0
        why="$(exit_status_of "$pid")"
        if [[ -n "$why" ]]; then
            err "$name (pid $pid) $why before it became ready"
            last_lines "$name"
            return 1
        fi
        sleep 0.1
    done
    err "$name (pid $pid) not ready within ${wait_secs}s"
    last_lines "$name"
    return 1
}

# Records NAME's PID from the server's own pidfile (first line) if it
# differs from the launcher's $! (it does not with setpriv; belt and braces).
record_server_pid() { # NAME LAUNCHER_PID PIDFILE
    local real=""
    if [[ -f "$3" ]]; then read -r real <"$3" || true; fi
    if [[ -n "$real" && "$real" != "$2" && -d "/proc/$real" ]]; then
        record_pid "$1" "$real"
        echo "$real"
    else
        echo "$2"
    fi
}

# initdb, Postgres, role and database, PgBouncer. Sets db_password,
# direct_url and database_url. Uses pg_port, bouncer_port.
start_db() {
    pg_dir="$state/pg"
    pg_sock="$pg_dir/run"
    local data="$pg_dir/data" pid
    if ! id -u "$PG_USER" >/dev/null 2>&1; then
        err "no '$PG_USER' system user (run scripts/deps.sh; or FLOWGATE_CLUSTER_NO_DB=1)"
        exit 1
    fi
    # Unix socket paths are limited to 107 bytes.
    if ((${#pg_sock} + 14 > 107)); then
        err "state dir path too long for a Unix socket ($pg_sock); set FLOWGATE_CLUSTER_DIR to a shorter path"
        exit 1
    fi
    mkdir -p "$pg_sock"
    chown -R "$PG_USER:$PG_USER" "$pg_dir"
    chmod 700 "$pg_dir"
    if ! "${as_pg[@]}" test -w "$pg_dir"; then
        err "the $PG_USER user cannot reach $pg_dir (a parent directory is not traversable); set FLOWGATE_CLUSTER_DIR, e.g. to /tmp/flowgate-cluster"
        exit 1
    fi
    db_password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"

    if ! (close_fds; exec "${as_pg[@]}" "$PG_BIN/initdb" -D "$data" -U postgres \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync) \
        >"$state/logs/initdb.log" 2>&1 </dev/null; then
        err "initdb failed"
        last_lines initdb
        exit 1
    fi

    (
        close_fds
        exec setsid "${as_pg[@]}" "$PG_BIN/postgres" -D "$data" -p "$pg_port" \
            -k "$pg_sock" -c listen_addresses=127.0.0.1
    ) >"$state/logs/postgres.log" 2>&1 </dev/null &
    pid=$!
    record_pid postgres "$pid"
    wait_until postgres "$pid" psql_super -d postgres -c 'SELECT 1' || exit 1
    pid="$(record_server_pid postgres "$pid" "$data/postmaster.pid")"
    if ! psql_super -d postgres -v pw="$db_password" >>"$state/logs/initdb.log" 2>&1 <<'SQL'; then
CREATE ROLE flowgate LOGIN PASSWORD :'pw';
CREATE DATABASE flowgate OWNER flowgate;
SQL
        err "creating the flowgate role and database failed"
        last_lines initdb
        exit 1
    fi
    direct_url="postgres://flowgate:$db_password@127.0.0.1:$pg_port/flowgate"
    log "postgres  pid $pid  127.0.0.1:$pg_port  socket dir $pg_sock"

    # PgBouncer: deploy/pgbouncer.ini with its placeholder keys rewritten.
    local ini="$pg_dir/pgbouncer.ini"
    if ! awk -v pgport="$pg_port" -v port="$bouncer_port" -v dir="$pg_dir" '
        BEGIN { n = split("flowgate listen_addr listen_port auth_file logfile pidfile unix_socket_dir", want, " ") }
        {
            k = $0; sub(/=.*/, "", k); gsub(/[ \t]/, "", k)
            if (k == "flowgate") v = "host=127.0.0.1 port=" pgport " dbname=flowgate"
            else if (k == "listen_addr") v = "127.0.0.1"
            else if (k == "listen_port") v = port
            else if (k == "auth_file") v = dir "/userlist.txt"
            else if (k == "logfile") v = ""            # stderr: logs/pgbouncer.log
            else if (k == "pidfile") v = dir "/pgbouncer.pid"
            else if (k == "unix_socket_dir") v = dir "/run"
            else { print; next }
            seen[k]++
            print k " = " v
        }
        END { for (i = 1; i <= n; i++) if (seen[want[i]] != 1) { print "placeholder " want[i] " found " seen[want[i]] + 0 " times" > "/dev/stderr"; bad = 1 }; exit bad }
    ' "$repo/deploy/pgbouncer.ini" >"$ini" 2>"$state/logs/pgbouncer.log"; then
        err "rewriting deploy/pgbouncer.ini failed"
        last_lines pgbouncer
        exit 1
    fi
    printf '"flowgate" "%s"\n' "$db_password" >"$pg_dir/userlist.txt"
    chmod 600 "$pg_dir/userlist.txt" "$ini"
    chown "$PG_USER:$PG_USER" "$pg_dir/userlist.txt" "$ini"
    (
        close_fds
        exec setsid "${as_pg[@]}" /usr/sbin/pgbouncer "$ini"
    ) >"$state/logs/pgbouncer.log" 2>&1 </dev/null &
    pid=$!
    record_pid pgbouncer "$pid"
    database_url="postgres://flowgate:$db_password@127.0.0.1:$bouncer_port/flowgate"
    # A real login through PgBouncer (SCRAM) to Postgres.
    wait_until pgbouncer "$pid" env PGCONNECT_TIMEOUT=2 "$PG_BIN/psql" -X -At \
        -d "$database_url" -c 'SELECT 1' || exit 1
    pid="$(record_server_pid pgbouncer "$pid" "$pg_dir/pgbouncer.pid")"
    log "pgbouncer pid $pid  127.0.0.1:$bouncer_port  (transaction pooling; SELECT 1 through it: ok)"
}

# --- nodes and the load balancer's runtime API -----------------------------------

# Starts node NAME on PORT with the environment `up` saved (node.env).
start_node() { # NAME PORT
    local name="$1" port="$2" bin
    bin="$(<"$state/node.bin")"
    (
        close_fds
        mapfile -d '' node_env <"$state/node.env"
        exec setsid env -i "${node_env[@]}" PORT="$port" FLOWGATE_NODE_ID="$name" "$bin" serve
    ) >"$state/logs/$name.log" 2>&1 </dev/null &
    record_pid "$name" $!
}

wait_node_healthy() { # NAME PORT
    local pid
    pid="$(live_pid "$1")"
    [[ -n "$pid" ]] || pid="$(cut -d' ' -f1 "$state/pids/$1.pid")"
    wait_healthy "$1" "http://127.0.0.1:$2/health" "$pid" || return 1
    log "$1     pid $pid  http://127.0.0.1:$2  (health 200)"
}

# One command on HAProxy's runtime API (LB_ADMIN_SOCKET); fails when
# HAProxy answers with an error.
lb_cmd() { # COMMAND
    local out
    out="$(python3 - "$state/haproxy.sock" "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
out = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    out += chunk
print(out.decode().strip())
EOF
)" || {
        err "haproxy runtime API: '$1' failed (no socket at $state/haproxy.sock?)"
        return 1
    }
    if grep -qiE 'no such|unknown|require|invalid|error|not found' <<<"$out"; then
        err "haproxy runtime API: '$1': $out"
        return 1
    fi
    [[ -z "$out" ]] || log "haproxy: $out"
}

# Rewrites KEY in cluster.env (removes it when no VALUE is given).
env_set() { # KEY [VALUE]
    local f="$state/cluster.env"
    grep -v "^$1=" "$f" >"$f.new" || true
    if (($# > 1)); then printf '%s=%q\n' "$1" "$2" >>"$f.new"; fi
    mv "$f.new" "$f"
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

    local no_db=0
    [[ "${FLOWGATE_CLUSTER_NO_DB:-0}" == 1 ]] && no_db=1
    if [[ "${FLOWGATE_CLUSTER_NO_REDIS:-0}" == 1 && $no_db == 0 ]]; then
        log "FLOWGATE_CLUSTER_NO_REDIS=1 implies FLOWGATE_CLUSTER_NO_DB=1 (without Redis each node would keep its own in-memory event-log queue)"
        no_db=1
    fi

    local ports
    mapfile -t ports < <(free_ports 8)
    local redis_port="${ports[0]}"
    local node_ports=("${ports[1]}" "${ports[2]}" "${ports[3]}")
    local lb_port="${LB_PORT:-${ports[4]}}"
    local stats_port="${STATS_PORT:-${ports[5]}}"
    # globals: start_db and the summary use them
    pg_port="${ports[6]}" bouncer_port="${ports[7]}"
    pg_dir="" pg_sock="" db_password="" direct_url="" database_url=""

    # Redis: loopback only, foreground (we hold its PID), with the
    # append-only file docs/operations.md asks of a self-managed Redis: the
    # event-log queue holds acknowledged events during a database outage,
    # and a restarted Redis must not lose them.
    (
        close_fds
        exec setsid redis-server --bind 127.0.0.1 --port "$redis_port" \
            --save '' --appendonly yes --appendfsync everysec --daemonize no \
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
    log "redis     pid $pid  redis://127.0.0.1:$redis_port"

    local redis_url="redis://127.0.0.1:$redis_port"

    local access_policy
    if ((no_db)); then
        log "no Postgres/PgBouncer (FLOWGATE_CLUSTER_NO_DB=1 or NO_REDIS=1)"
        access_policy="${FLOWGATE_ACCESS_POLICY:-$([[ -n "${DATABASE_URL:-}" ]] && echo members || echo open)}"
    else
        start_db
        # Migrations: straight to Postgres, with nothing but DATABASE_DIRECT_URL.
        if ! env -i PATH="$PATH" DATABASE_DIRECT_URL="$direct_url" ${RUST_LOG:+RUST_LOG="$RUST_LOG"} \
            "$bin" migrate >"$state/logs/migrate.log" 2>&1 </dev/null; then
            err "flowgate migrate failed"
            last_lines migrate
            exit 1
        fi
        log "migrate   $(tail -n 1 "$state/logs/migrate.log")"
        access_policy="${FLOWGATE_ACCESS_POLICY:-members}"
    fi

    local jwt_secret="${JWT_ACCESS_TOKEN_SECRET:-dev-secret}"
    local service_token="${FLOWGATE_SERVICE_TOKEN:-dev-service-token}"
    if [[ "${FLOWGATE_CLUSTER_NO_REDIS:-0}" == 1 ]]; then
        log "FLOWGATE_CLUSTER_NO_REDIS=1: nodes start WITHOUT REDIS_URL (separate in-memory engines, not a real cluster)"
    fi

    # Every node's environment but its port and id, kept for `scale`: a
    # node added later gets the same settings as the first three, whatever
    # the environment of the shell that runs `scale`.
    (
        if [[ "${FLOWGATE_CLUSTER_NO_REDIS:-0}" == 1 ]]; then
            unset REDIS_URL
        else
            export REDIS_URL="$redis_url"
        fi
        export HOST=127.0.0.1
        export JWT_ACCESS_TOKEN_SECRET="$jwt_secret"
        export FLOWGATE_SERVICE_TOKEN="$service_token"
        if ((!no_db)); then
            # shellcheck disable=SC2030 # this subshell only writes the file
            export DATABASE_URL="$database_url" # through PgBouncer
            unset DATABASE_DIRECT_URL           # migrations only, done above
        fi
        # FLOWGATE_ACCESS_POLICY: inherited when set (e.g. open);
        # unset, a node with DATABASE_URL uses members.
        export FLOWGATE_LOG_FORMAT=json
        # Drain: 5 s notice (HAProxy marks a node down after ~4 s),
        # then exit well within the 15 s that `down` waits.
        export FLOWGATE_DRAIN_NOTICE_MS="${FLOWGATE_DRAIN_NOTICE_MS:-5000}"
        export FLOWGATE_DRAIN_WINDOW_MS="${FLOWGATE_DRAIN_WINDOW_MS:-4000}"
        export FLOWGATE_SHUTDOWN_DEADLINE_MS="${FLOWGATE_SHUTDOWN_DEADLINE_MS:-12000}"
        unset PORT FLOWGATE_NODE_ID FLOWGATE_CLUSTER_DIR
        umask 077 # it holds the secrets
        env -0 >"$state/node.env"
    )
    echo "$bin" >"$state/node.bin"

    local n
    for n in 1 2 3; do
        start_node "node$n" "${node_ports[$((n - 1))]}"
    done
    for n in 1 2 3; do
        wait_node_healthy "node$n" "${node_ports[$((n - 1))]}" || exit 1
    done

    # HAProxy
    local hx_env=(LB_ADDR=127.0.0.1 LB_PORT="$lb_port"
        STATS_ADDR=127.0.0.1 STATS_PORT="$stats_port"
        LB_ADMIN_SOCKET="$state/haproxy.sock"
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
    log "haproxy   pid $pid  http://127.0.0.1:$lb_port  (a node's /health through it: 200)"

    {
        printf '%s=%q\n' \
            FLOWGATE_CLUSTER_DIR "$state" \
            LB_URL "http://127.0.0.1:$lb_port" \
            LB_PORT "$lb_port" \
            STATS_PORT "$stats_port" \
            LB_ADMIN_SOCKET "$state/haproxy.sock" \
            REDIS_PORT "$redis_port" \
            REDIS_URL "$redis_url" \
            CLUSTER_ACCESS_POLICY "$access_policy" \
            NODE1_PORT "${node_ports[0]}" \
            NODE2_PORT "${node_ports[1]}" \
            NODE3_PORT "${node_ports[2]}" \
            JWT_ACCESS_TOKEN_SECRET "$jwt_secret" \
            FLOWGATE_SERVICE_TOKEN "$service_token"
        if ((!no_db)); then
            printf '%s=%q\n' \
                PG_PORT "$pg_port" \
                PGBOUNCER_PORT "$bouncer_port" \
                PG_SOCKET_DIR "$pg_sock" \
                DATABASE_URL "$database_url" \
                DATABASE_DIRECT_URL "$direct_url"
        fi
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
$(if ((no_db)); then
        echo "  postgres       none (FLOWGATE_CLUSTER_NO_DB=1)"
    else
        echo "  postgres       127.0.0.1:$pg_port    log: $state/logs/postgres.log    (superuser: psql -h $pg_sock -p $pg_port -U postgres flowgate)"
        echo "  pgbouncer      127.0.0.1:$bouncer_port    log: $state/logs/pgbouncer.log    (transaction pooling)"
        echo "  DATABASE_URL          $database_url    (nodes, through PgBouncer)"
        echo "  DATABASE_DIRECT_URL   $direct_url    (flowgate migrate, straight to Postgres)"
    fi)
  access policy  $access_policy$([[ "$access_policy" == members ]] && echo "    grant: curl -X PUT -H \"Authorization: Bearer $service_token\" http://127.0.0.1:$lb_port/v1/flows/FLOW/members/USER")
  JWT secret     $jwt_secret    service token: $service_token
  ports as shell variables: $0 env   (or: source $state/cluster.env)
status: $0 status
scale:  $0 scale N    (1..$max_nodes nodes, while clients stay connected)
stop:   $0 down
EOF
}

# --- status / down / env ---------------------------------------------------------------

# shellcheck disable=SC2031 # ports[DATABASE_URL] is a key, not the variable
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
    printf '%-10s %-8s %-8s %-7s %s\n' NAME PID STATE PORT HEALTH
    for name in $(recorded_names); do
        pid="$(live_pid "$name")"
        port="" url="" code=""
        case "$name" in
            redis) port="${ports[REDIS_PORT]:-}" ;;
            haproxy) port="${ports[LB_PORT]:-}" ;;
            node*) port="${ports[${name^^}_PORT]:-}" ;;
            postgres) port="${ports[PG_PORT]:-}" ;;
            pgbouncer) port="${ports[PGBOUNCER_PORT]:-}" ;;
        esac
        if [[ -z "$pid" ]]; then
            printf '%-10s %-8s %-8s %-7s %s\n' "$name" "$(cut -d' ' -f1 "$state/pids/$name.pid")" dead "${port:--}" -
            dead=1
            continue
        fi
        case "$name" in
            redis) [[ -n "$port" ]] && code="$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)" ;;
            postgres) [[ -n "$port" ]] && code="$("$PG_BIN/pg_isready" -t 2 -h 127.0.0.1 -p "$port" 2>&1 || true)" ;;
            pgbouncer)
                if [[ -n "${ports[DATABASE_URL]:-}" ]]; then
                    if [[ "$(PGCONNECT_TIMEOUT=2 "$PG_BIN/psql" -X -At -d "${ports[DATABASE_URL]}" -c 'SELECT 1' 2>/dev/null)" == 1 ]]; then
                        code="SELECT 1 through it: ok"
                    else
                        code="SELECT 1 through it: FAILED"
                    fi
                fi
                ;;
            *) [[ -n "$port" ]] && code="GET /health: $(http_status "http://127.0.0.1:$port/health")" ;;
        esac
        printf '%-10s %-8s %-8s %-7s %s\n' "$name" "$pid" running "${port:--}" "${code:--}"
    done
    [[ -n "${ports[STATS_PORT]:-}" ]] && echo "stats page: http://127.0.0.1:${ports[STATS_PORT]}/"
    [[ -n "${ports[CLUSTER_ACCESS_POLICY]:-}" ]] && echo "access policy: ${ports[CLUSTER_ACCESS_POLICY]}"
    [[ -n "${ports[DATABASE_URL]:-}" ]] && echo "DATABASE_URL (nodes): ${ports[DATABASE_URL]}    DATABASE_DIRECT_URL (migrate): ${ports[DATABASE_DIRECT_URL]:-}"
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

# --- scale -------------------------------------------------------------------------

cmd_scale() { # N
    local want="${1:-}" i name pid port
    if [[ ! "$want" =~ ^[0-9]+$ ]] || ((want < 1 || want > max_nodes)); then
        err "scale N: N must be a number of nodes from 1 to $max_nodes (got '${want}')"
        exit 2
    fi
    [[ -f "$state/cluster.env" && -f "$state/node.env" ]] || {
        err "no cluster is up in $state (start one with: $0 up)"
        exit 3
    }
    [[ -S "$state/haproxy.sock" ]] || {
        err "HAProxy has no runtime API socket in $state (a cluster started by an older $0: down, then up)"
        exit 1
    }
    local live=() free=()
    for ((i = 1; i <= max_nodes; i++)); do
        if [[ -n "$(live_pid "node$i")" ]]; then live+=("$i"); else free+=("$i"); fi
    done
    local have=${#live[@]}
    log "scale: $have node(s) running, $want wanted"

    if ((want > have)); then
        raise_nofile
        local add=("${free[@]:0:want-have}") ports
        mapfile -t ports < <(free_ports "${#add[@]}")
        for i in "${!add[@]}"; do
            name="node${add[$i]}"
            rm -f "$state/pids/$name.pid" # a dead node's stale record
            start_node "$name" "${ports[$i]}"
        done
        for i in "${!add[@]}"; do
            name="node${add[$i]}" port="${ports[$i]}"
            if ! wait_node_healthy "$name" "$port"; then
                stop_names "$name"
                rm -f "$state/pids/$name.pid"
                exit 1
            fi
            # Healthy first, then in the balancer: no client is sent to a
            # node that cannot take it yet.
            lb_cmd "set server flowgate_nodes/$name addr 127.0.0.1 port $port" || exit 1
            lb_cmd "set server flowgate_nodes/$name state ready" || exit 1
            env_set "${name^^}_PORT" "$port"
        done
    elif ((want < have)); then
        # The highest-numbered nodes go. HAProxy stops sending them new
        # connections first (drain: established ones stay), then each node
        # drains itself (SIGTERM): /health 503, sockets closed spread over
        # its drain window, event log flushed. Their clients reconnect
        # through HAProxy to the remaining nodes and recover what they missed.
        local drop=("${live[@]:want}") names=()
        for i in "${drop[@]}"; do
            name="node$i"
            names+=("$name")
            lb_cmd "set server flowgate_nodes/$name state drain" || exit 1
        done
        local stop_wait_secs=$scale_stop_wait_secs # read by stop_names
        stop_names "${names[@]}"
        for name in "${names[@]}"; do
            lb_cmd "set server flowgate_nodes/$name state maint" || exit 1
            rm -f "$state/pids/$name.pid"
            env_set "${name^^}_PORT"
            log "$name removed (log kept: $state/logs/$name.log)"
        done
    fi
    for ((i = 1; i <= max_nodes; i++)); do
        pid="$(live_pid "node$i")"
        [[ -n "$pid" ]] && log "node$i     pid $pid  running"
    done
    return 0
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
    scale) lock; cmd_scale "${2:-}" ;;
    *)
        echo "usage: $0 up|down|status|env|scale N" >&2
        exit 2
        ;;
esac
