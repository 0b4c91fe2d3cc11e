#!/usr/bin/env bash
# What Redis spends per call of the publish script (crates/redis/src/scripts.rs)
# and of its parts, measured alone: one Redis, three connections subscribed
# to the room's shard channel (a room with members on three nodes), and
# redis-benchmark sending each variant with 4 clients, one call per round
# trip (as a node does when calls are not batched). The figure is Redis's
# CPU (INFO cpu, user + sys) over the calls, divided by the calls.
#
#   loadtest/redis-script-cost.sh            N=100000 calls per variant
#
# Variants: the script as shipped; without its PTTL (the idle expiry's
# check); without PTTL and TIME (the deadline check); the least a script can
# do (XADD, SPUBLISH of the frame with its offset); a script that only
# publishes; then SPUBLISH, XADD and PING as plain commands. Stops what it
# started, by PID. Needs redis-server, redis-cli, redis-benchmark, python3.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${REDIS_PORT:-26999}"
n="${N:-100000}"
dir="$(mktemp -d)"
subs=()
rpid=""
cleanup() {
    [[ ${#subs[@]} -gt 0 ]] && kill "${subs[@]}" 2>/dev/null || true
    if [[ -n "$rpid" ]]; then
        kill "$rpid" 2>/dev/null || true
        while kill -0 "$rpid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

# The variants, cut out of the shipped script so they follow it.
python3 - "$repo/crates/redis/src/scripts.rs" "$dir" <<'EOF'
import re, sys
src = open(sys.argv[1]).read()
out = sys.argv[2]
s = re.search(r'const PUBLISH: &str = r#"(.*?)"#;', src, re.S).group(1)
renew = re.search(r"\n    if not renewed\[stream\] then.*?\n    end\n(?=    if binary)", s, re.S)
deadline = re.search(r"local t = redis.call\('TIME'\)\n.*?\nend\n", s, re.S)
if not renew or not deadline:
    sys.exit("the publish script changed shape: update loadtest/redis-script-cost.sh")
no_pttl = s.replace(renew.group(0), "\n")
no_time = no_pttl.replace(deadline.group(0), "")
variants = {
    "1-shipped": s,
    "2-no-pttl": no_pttl,
    "3-no-pttl-no-time": no_time,
    "4-xadd-spublish": "local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[6])\n"
                       "redis.call('SPUBLISH', KEYS[2], ARGV[6] .. ',\"' .. id .. '\"]')\nreturn {id}\n",
    "5-spublish-only": "redis.call('SPUBLISH', KEYS[2], ARGV[6])\nreturn {''}\n",
}
for name, body in variants.items():
    open(f"{out}/{name}.lua", "w").write(body)
EOF

redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --logfile "$dir/redis.log" &
rpid=$!
R=(redis-cli -p "$port")
for _ in $(seq 50); do "${R[@]}" ping >/dev/null 2>&1 && break; sleep 0.1; done
for _ in 1 2 3; do
    "${R[@]}" ssubscribe '{f}:c' >/dev/null &
    subs+=($!)
done
sleep 0.3
msg="$(head -c 190 /dev/zero | tr '\0' x)"
cpu() { "${R[@]}" info cpu | grep -E 'used_cpu_(sys|user):' | cut -d: -f2 | tr -d '\r' | paste -sd+ | bc; }
run() {
    local name=$1 c0 c1
    shift
    c0=$(cpu)
    redis-benchmark -p "$port" -c 4 -n "$n" -q "$@" >/dev/null 2>&1
    c1=$(cpu)
    printf '| %-28s | %6.1f |\n' "$name" "$(echo "($c1 - $c0) * 1000000 / $n" | bc -l)"
}
echo "| call ($n each, 3 subscribers, 190-byte message) | Redis CPU µs per call |"
echo "|---|---:|"
for f in "$dir"/*.lua; do
    sha=$("${R[@]}" script load "$(cat "$f")")
    # KEYS: stream, channel. ARGV: deadline (far), MAXLEN, TTL ms, binary, kind, message.
    run "script $(basename "$f" .lua)" EVALSHA "$sha" 2 '{f}:s' '{f}:c' 99999999999999 1000 600000 1 l "$msg"
done
run "SPUBLISH" SPUBLISH '{f}:c' "$msg"
run "XADD MAXLEN ~ 1000" XADD '{f}:s2' MAXLEN '~' 1000 '*' m "$msg"
run "PING" PING
