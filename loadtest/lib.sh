# Sourced by loadtest/redis-profile.sh and loadtest/idle-rss.sh: one Redis
# and three flowgate nodes of a given build on fixed loopback ports, every
# process stopped by PID when the script exits.
#
# The caller sets rport (Redis's port) and nport0 (node k listens on
# nport0 + k); BIN and OUT come from the environment. It gets: bin, lt
# (the load generator), out (logs), rpid, pids (the nodes'), targets
# (host:port of each node).

bin="${BIN:-target/release/flowgate}"
lt=target/release/flowgate-loadtest
[[ -x "$bin" && -x "$lt" ]] || { echo "build first: cargo build --release -p flowgate-gateway -p flowgate-loadtest" >&2; exit 2; }
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
ulimit -n 20000 2>/dev/null || true

pids=()
rpid=""
targets=()

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

start_redis() {
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --maxclients 100000 --pidfile "$out/redis.pid" --logfile "$out/redis.log"
    for _ in $(seq 50); do [[ -s "$out/redis.pid" ]] && break; sleep 0.1; done
    rpid="$(cat "$out/redis.pid")"
}

# start_nodes [VAR=value ...]: the nodes get these env vars (the fixed
# settings below win over them).
start_nodes() {
    local k port
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
    for p in "${pids[@]}"; do
        kill -0 "$p" || { echo "a node died:" >&2; tail -n 3 "$out"/node*.log >&2; exit 1; }
    done
}
