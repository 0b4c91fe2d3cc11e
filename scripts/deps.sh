#!/usr/bin/env bash
# Installs the system programs that flowgate's tests and the local cluster
# (scripts/cluster.sh) spawn as child processes: redis-server (>= 7, for
# sharded pub/sub), haproxy, pgbouncer and the PostgreSQL 15 server binaries;
# Debian's chromium (driven headless by the demo's browser test; no browser
# is ever downloaded from npm); plus the npm packages of the interop and
# browser tests.
#
# Idempotent: installs only what is missing, runs `apt-get update` at most
# once, and never starts a system service (a policy-rc.d that exits 101 is in
# place for the duration of the install; whatever was there before is put
# back). Needs root (or sudo) only when something has to be installed.
#
# Usage: scripts/deps.sh            (install what is missing, then check)
#        scripts/deps.sh --check    (check only; exit non-zero if anything is missing)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
check_only=0
[[ "${1:-}" == "--check" ]] && check_only=1

PG_BIN=/usr/lib/postgresql/15/bin
MIN_REDIS_MAJOR=7

log() { printf 'deps: %s\n' "$*"; }
die() { printf 'deps: ERROR: %s\n' "$*" >&2; exit 1; }

have() {
    # command -v, plus the sbin paths a non-root PATH may lack.
    command -v "$1" >/dev/null 2>&1 && return 0
    local d
    for d in /usr/bin /usr/sbin /usr/local/bin /usr/local/sbin; do
        [[ -x "$d/$1" ]] && return 0
    done
    return 1
}

# --- what is missing -------------------------------------------------------
missing=()
have redis-server || missing+=(redis-server)
have haproxy || missing+=(haproxy)
have pgbouncer || missing+=(pgbouncer)
[[ -x "$PG_BIN/initdb" && -x "$PG_BIN/postgres" ]] || missing+=(postgresql-15)
# The browser test launches /usr/bin/chromium; a font keeps the text of its
# screenshot readable on a minimal image.
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
[[ -d /usr/share/fonts/truetype/dejavu ]] || missing+=(fonts-dejavu-core)
# scripts/cluster.sh picks free ports with python3 and checks health with curl.
have python3 || missing+=(python3)
have curl || missing+=(curl)

interop="$repo/crates/gateway/tests/interop"
need_npm=0
if [[ -f "$interop/package.json" && ! -d "$interop/node_modules" ]]; then
    need_npm=1
    have npm || missing+=(nodejs npm)
fi
browser="$repo/crates/gateway/tests/browser"
need_browser_npm=0
if [[ -f "$browser/package.json" && ! -d "$browser/node_modules" ]]; then
    need_browser_npm=1
    have npm || missing+=(nodejs npm)
fi

if ((check_only)); then
    if ((${#missing[@]})); then
        die "missing: ${missing[*]} (run scripts/deps.sh to install)"
    fi
    ((need_npm)) && die "missing: $interop/node_modules (run scripts/deps.sh)"
    ((need_browser_npm)) && die "missing: $browser/node_modules (run scripts/deps.sh)"
fi

# --- apt install, without starting services --------------------------------
installed=()
if ((${#missing[@]})); then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "need root to install: ${missing[*]}"
        SUDO=(sudo)
    fi
    log "installing: ${missing[*]}"

    # Debian's maintainer scripts start services through invoke-rc.d /
    # deb-systemd-invoke, which ask /usr/sbin/policy-rc.d first; 101 means
    # "action not allowed". Put ours in place and restore the previous state.
    policy=/usr/sbin/policy-rc.d
    backup=""
    if [[ -e "$policy" || -L "$policy" ]]; then
        backup="$policy.flowgate-deps.$$"
        "${SUDO[@]}" mv "$policy" "$backup"
    fi
    restore_policy() {
        "${SUDO[@]}" rm -f "$policy"
        if [[ -n "$backup" ]]; then "${SUDO[@]}" mv "$backup" "$policy"; fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# scripts/deps.sh: do not start services during the install\nexit 101\n' |
        "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"

    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    installed+=("${missing[@]}")

    restore_policy
    trap - EXIT
fi

# --- interop test packages --------------------------------------------------
if ((need_npm)); then
    log "npm ci in ${interop#"$repo"/}"
    (cd "$interop" && npm ci --no-audit --no-fund)
    installed+=("npm packages of ${interop#"$repo"/}")
fi
if ((need_browser_npm)); then
    # puppeteer-core never downloads a browser; the variable makes sure that
    # nothing else in the tree does either (the test uses /usr/bin/chromium).
    log "npm ci in ${browser#"$repo"/}"
    (cd "$browser" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund)
    installed+=("npm packages of ${browser#"$repo"/}")
fi

# --- check ------------------------------------------------------------------
have redis-server || die "redis-server still missing"
have haproxy || die "haproxy still missing"
have pgbouncer || die "pgbouncer still missing"
[[ -x "$PG_BIN/initdb" ]] || die "$PG_BIN/initdb still missing"
[[ -x /usr/bin/chromium ]] || die "/usr/bin/chromium still missing"

PATH="$PATH:/usr/sbin:/usr/local/sbin"
redis_version_line="$(redis-server --version)"
redis_version="$(sed -n 's/.* v=\([0-9][0-9.]*\).*/\1/p' <<<"$redis_version_line")"
redis_major="${redis_version%%.*}"

if ((${#installed[@]})); then
    log "installed: ${installed[*]}"
else
    log "installed: nothing (everything was already present)"
fi
log "$redis_version_line"
log "$(haproxy -v 2>&1 | head -n1)"
log "$(pgbouncer --version 2>&1 | head -n1)"
log "$("$PG_BIN/postgres" --version)"
log "$(/usr/bin/chromium --version 2>/dev/null | head -n1)"

if [[ -z "$redis_major" || "$redis_major" -lt "$MIN_REDIS_MAJOR" ]]; then
    cat >&2 <<EOF

deps: ************************************************************************
deps: ERROR: redis-server ${redis_version:-?} is too old.
deps: flowgate needs Redis >= $MIN_REDIS_MAJOR (sharded pub/sub: SSUBSCRIBE/SPUBLISH).
deps: ************************************************************************
EOF
    exit 1
fi
log "ok"
