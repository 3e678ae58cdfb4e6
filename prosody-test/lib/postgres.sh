# shellcheck shell=bash
# PostgreSQL for the tests: install Debian's server if it is missing (without a system cluster), and start,
# control and stop a throwaway cluster through testkit's pg-cluster (the same code as TempCluster in cargo test:
# its own directory, a loopback port, a role knock owning a database knock). Sourced, not run; needs bash.
#
#   pg_ensure_installed                 install postgresql if its server binaries are missing (root only)
#   pg_cluster_start [--set NAME=VALUE]...
#                                       start one; sets PG_URL PG_SOCKET_URL PG_PORT PG_SOCKET_DIR PG_DATA_DIR
#                                       PG_PASSWORD PG_CLUSTER_PID (all exported)
#   pg_cluster_ctl stop|start|kill9|"sql STATEMENT"
#                                       prints pg-cluster's JSON answer; fails on {"event":"error"}
#   pg_cluster_stop                     stop it and remove its directory
#
# It never touches a system cluster that was there before, and no test uses port 5432.

PG_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PG_REPO="$(cd "$PG_LIB_DIR/../.." && pwd)"

pg_log() { echo "postgres: $*" >&2 || true; }

# Debian's server binaries, newest version first: what TempCluster looks for too.
pg_have_server() {
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ] && return 0
    done
    if [ -n "${KNOCK_PG_BINDIR:-}" ] && [ -x "$KNOCK_PG_BINDIR/initdb" ]; then return 0; fi
    return 1
}

pg_apt_get() {  # apt-get install arguments...
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "$@" </dev/null >&2; then
        apt-get update -q </dev/null >&2
        apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
    fi
}

pg_ensure_installed() {
    if pg_have_server; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        pg_log "PostgreSQL is not installed — run as root, or first: sudo apt-get install -y postgresql"
        return 1
    fi
    local before after cluster
    before="$(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}' || true)"
    # 1. postgresql-common first, told not to make the "main" cluster the server package would create and
    #    start on port 5432 (what the official Docker image does): the tests make their own.
    pg_log "installing Debian's PostgreSQL (postgresql), without a system cluster"
    pg_apt_get postgresql-common
    if [ -f /etc/postgresql-common/createcluster.conf ]; then
        sed -ri 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*$/create_main_cluster = false/' \
            /etc/postgresql-common/createcluster.conf
    fi
    # 2. The server.
    pg_apt_get postgresql
    # 3. Had a cluster been made and started all the same, it goes: nothing of ours listens outside the tests.
    after="$(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}' || true)"
    for cluster in $after; do
        if ! grep -qxF "$cluster" <<<"$before"; then
            pg_log "dropping the system cluster $cluster the package made"
            pg_dropcluster --stop "${cluster%/*}" "${cluster#*/}" >&2 || true
        fi
    done
    pg_have_server || { pg_log "apt-get install postgresql left no initdb in /usr/lib/postgresql/*/bin"; return 1; }
}

# pg-cluster from the workspace's target directory, built if missing.
pg_cluster_bin() {
    local bin="${PG_CLUSTER_BIN:-${CARGO_TARGET_DIR:-$PG_REPO/target}/debug/pg-cluster}"
    if ! [ -x "$bin" ]; then
        pg_log "building pg-cluster (cargo build -p testkit --bin pg-cluster)"
        (cd "$PG_REPO" && cargo build -q -p testkit --bin pg-cluster) >&2 || return 1
    fi
    echo "$bin"
}

# One field of pg-cluster's JSON line (flat, string or number values without quotes inside).
pg_json_field() {  # line key
    sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" <<<"$1"
}

pg_cluster_start() {  # [--set NAME=VALUE]...
    if [ -n "${PG_CLUSTER_PID:-}" ]; then
        pg_log "a cluster is already running (pg-cluster $PG_CLUSTER_PID)"; return 1
    fi
    pg_ensure_installed || return 1
    local bin
    bin="$(pg_cluster_bin)" || return 1
    PG_CTL_DIR="$(mktemp -d "${TMPDIR:-/tmp}/knock-pg-ctl.XXXXXX")"
    mkfifo "$PG_CTL_DIR/in"
    : >"$PG_CTL_DIR/out"
    # pg-cluster reads commands from the fifo; this shell holds its write end on fd PG_CTL_FD, so pg-cluster
    # sees end of input (and stops) when this shell goes away, however it goes.
    "$bin" --control-stdin "$@" <"$PG_CTL_DIR/in" >"$PG_CTL_DIR/out" 2>"$PG_CTL_DIR/err" &
    PG_CLUSTER_PID=$!
    exec {PG_CTL_FD}>"$PG_CTL_DIR/in"
    local i line=""
    for ((i = 0; i < 600; i++)); do
        line="$(head -n 1 "$PG_CTL_DIR/out")"
        [ -n "$line" ] && break
        if ! kill -0 "$PG_CLUSTER_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    if [ "$(pg_json_field "$line" event)" != ready ]; then
        pg_log "pg-cluster did not start: $(cat "$PG_CTL_DIR/err")"
        pg_cluster_stop
        return 1
    fi
    PG_URL="$(pg_json_field "$line" url)"
    PG_SOCKET_URL="$(pg_json_field "$line" socket_url)"
    PG_PORT="$(pg_json_field "$line" port)"
    PG_SOCKET_DIR="$(pg_json_field "$line" socket_dir)"
    PG_DATA_DIR="$(pg_json_field "$line" data_dir)"
    PG_PASSWORD="$(pg_json_field "$line" password)"
    export PG_URL PG_SOCKET_URL PG_PORT PG_SOCKET_DIR PG_DATA_DIR PG_PASSWORD PG_CLUSTER_PID
    pg_log "cluster ready on 127.0.0.1:$PG_PORT in $PG_SOCKET_DIR ($(pg_json_field "$line" startup_ms) ms)"
}

pg_cluster_ctl() {  # stop|start|kill9|"sql STATEMENT"
    [ -n "${PG_CLUSTER_PID:-}" ] || { pg_log "no cluster running"; return 1; }
    local n i line
    n="$(wc -l <"$PG_CTL_DIR/out")"
    printf '%s\n' "$*" >&"$PG_CTL_FD"
    for ((i = 0; i < 1200; i++)); do
        if [ "$(wc -l <"$PG_CTL_DIR/out")" -gt "$n" ]; then
            line="$(sed -n "$((n + 1))p" "$PG_CTL_DIR/out")"
            echo "$line"
            [ "$(pg_json_field "$line" event)" != error ]
            return
        fi
        kill -0 "$PG_CLUSTER_PID" 2>/dev/null || break
        sleep 0.05
    done
    pg_log "no answer from pg-cluster to: $*"
    return 1
}

pg_cluster_stop() {
    [ -n "${PG_CLUSTER_PID:-}" ] || return 0
    kill -TERM "$PG_CLUSTER_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$PG_CLUSTER_PID" 2>/dev/null || break
        sleep 0.1
    done
    wait "$PG_CLUSTER_PID" 2>/dev/null || true
    if [ -n "${PG_CTL_FD:-}" ]; then exec {PG_CTL_FD}>&-; fi
    rm -rf "$PG_CTL_DIR"
    unset PG_CLUSTER_PID PG_CTL_FD PG_CTL_DIR PG_URL PG_SOCKET_URL PG_PORT PG_SOCKET_DIR PG_DATA_DIR PG_PASSWORD
}
