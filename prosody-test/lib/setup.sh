# shellcheck shell=bash
# Shared by prosody-test/run and prosody-test/demo: build the binaries, install what is missing, make the venv,
# make the run directory, and stop everything by PID on exit. Sourced, not run.

PT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "$PT_DIR/.." && pwd)"
VENV="${KNOCK_TEST_VENV:-$PT_DIR/.venv}"
# the harness's Python packages (PyPI): the XMPP client, and AES for reading encrypted (Tigase dialect) pushes
PT_REQUIREMENTS="$PT_DIR/harness/requirements.txt"

pt_log() { echo "prosody-test: $*" >&2 || true; }

pt_build() {
    if [ "${KNOCK_TEST_NO_BUILD:-0}" = 1 ]; then return 0; fi   # binaries built elsewhere (the Docker image)
    pt_log "building knock, mock-apns and mock-fcm (cargo build --workspace --bins)"
    (cd "$REPO" && cargo build --workspace --bins) >&2
}

pt_apt_install() {  # package...
    [ $# -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        pt_log "missing Debian packages: $* — run as root, or first: sudo apt-get install -y $*"
        return 1
    fi
    pt_log "installing from Debian's packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    # The package scripts try to start the system services; ours never use them (own config, own ports).
    if ! apt-get install -y -q --no-install-recommends "$@" </dev/null >&2; then
        apt-get update -q </dev/null >&2
        apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
    fi
}

pt_have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

pt_ensure_servers() {  # prosody|ejabberd|all
    local want="$1" missing=()
    if [ "$want" = prosody ] || [ "$want" = all ]; then
        command -v prosody >/dev/null || missing+=(prosody)
        [ -f /usr/lib/prosody/modules/mod_cloud_notify/mod_cloud_notify.lua ] || missing+=(prosody-modules)
    fi
    if [ "$want" = ejabberd ] || [ "$want" = all ]; then
        command -v ejabberdctl >/dev/null || missing+=(ejabberd)
    fi
    pt_apt_install "${missing[@]}"
    if [ "$want" = prosody ] || [ "$want" = all ]; then
        pt_ensure_trixie_modules
    fi
}

# Debian's PostgreSQL server for scenarios 19-20 (each starts a throwaway cluster with testkit's pg-cluster,
# which `pt_build` builds): installed without a system cluster if missing (root). Without it those two fail,
# saying why; the others run.
pt_ensure_postgres() {
    pg_ensure_installed || pt_log "no PostgreSQL server: scenarios 19-20 will fail"
}

pt_python() {
    # Debian's python3 if it can make venvs, else whatever python3 is on PATH.
    for py in /usr/bin/python3 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import venv, ensurepip' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    pt_apt_install python3 python3-venv >/dev/null && echo /usr/bin/python3
}

pt_ensure_venv() {
    # up to date when pip finds every requirement satisfied without installing anything
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import slixmpp, cryptography' 2>/dev/null \
        && "$VENV/bin/pip" install --dry-run --no-index --disable-pip-version-check -q -r "$PT_REQUIREMENTS" \
            </dev/null >/dev/null 2>&1; then
        return 0
    fi
    local py
    py="$(pt_python)" || { pt_log "no python3 with venv support"; return 1; }
    if ! [ -x "$VENV/bin/pip" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        pt_log "making a venv at $VENV"
        rm -rf "$VENV"
        "$py" -m venv "$VENV" >&2
    fi
    pt_log "installing $(grep -v '^#' "$PT_REQUIREMENTS" | xargs) into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$PT_REQUIREMENTS" </dev/null >&2
}

# The run directory and the fallback trap. The harness stops what it started itself; this catches the rest
# (harness killed): every process it started leads its own process group, listed in $RUN_DIR/pids.
pt_make_run_dir() {
    RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/knock-prosody-test.XXXXXX")"
    chmod 755 "$RUN_DIR"   # ejabberd runs as its own user and must reach its directory inside
    trap pt_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Run the harness (python) so that Ctrl-C or a SIGTERM to this script reaches it as SIGTERM: it then stops
# everything it started, in order, and exits; the EXIT trap above cleans up whatever is left.
pt_run_harness() {
    "$VENV/bin/python" "$@" &
    PT_CHILD=$!
    trap 'kill -TERM "$PT_CHILD" 2>/dev/null || true' INT TERM
    local rc=0
    while :; do
        if wait "$PT_CHILD"; then rc=0; else rc=$?; fi
        kill -0 "$PT_CHILD" 2>/dev/null || break
    done
    trap 'exit 130' INT
    trap 'exit 143' TERM
    return "$rc"
}

pt_cleanup() {
    local rc=$?
    trap '' PIPE   # the terminal or a pipe reader may be gone already: never die half-way through cleanup
    if [ -n "${RUN_DIR:-}" ] && [ -s "$RUN_DIR/pids" ]; then
        local id name
        while read -r id name; do
            if kill -0 -- "$id" 2>/dev/null; then
                pt_log "stopping leftover $name ($id)"
                kill -TERM -- "$id" 2>/dev/null || true
            fi
        done < "$RUN_DIR/pids"
        sleep 1
        while read -r id name; do
            kill -KILL -- "$id" 2>/dev/null || true
        done < "$RUN_DIR/pids"
    fi
    if [ -n "${RUN_DIR:-}" ] && [ -d "$RUN_DIR" ]; then
        if [ "${KEEP:-0}" = 1 ]; then
            pt_log "KEEP=1: run directory kept at $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    exit "$rc"
}

source "$PT_DIR/lib/trixie-modules.sh"
source "$PT_DIR/lib/postgres.sh"
