# shellcheck shell=bash
# Sourced by prosody-test/docker/images and check: what the stack's images need on a machine that cannot pull
# from any image registry. Each function says why it failed in $DK_WHY and returns non-zero.
#   dk_ensure_engine    Docker Engine (Debian's docker.io) installed, dockerd running
#   dk_ensure_compose   the compose v2 CLI plugin (`docker compose`), from Debian trixie's docker-compose package
#   dk_ensure_base      debian:bookworm-slim (and :bookworm), made with debootstrap + docker import if missing
# Everything downloaded is kept under prosody-test/.cache/docker (git-ignored), so a second run is fast.

DK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PT_DIR="$(cd "$DK_DIR/.." && pwd)"
REPO="$(cd "$PT_DIR/.." && pwd)"
DK_CACHE="${DK_CACHE:-$PT_DIR/.cache/docker}"
DK_BASE_IMAGE="${BASE_IMAGE:-debian:bookworm-slim}"
DK_WHY=""

dk_log() { echo "docker: $*" >&2 || true; }
dk_fail() { DK_WHY="$*"; dk_log "$*"; return 1; }
dk_root() { [ "$(id -u)" = 0 ]; }

# The machine's own Debian mirror (deb822 sources first, then a one-line sources.list).
dk_debian_uri() {
    local uri
    uri="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)"
    if [ -z "$uri" ]; then
        uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' \
            /etc/apt/sources.list 2>/dev/null)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

dk_apt_install() {  # package...
    dk_root || { dk_fail "missing $* and not root: sudo apt-get install -y $*"; return 1; }
    dk_log "installing from Debian's packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "$@" </dev/null >&2 \
        || { apt-get update -q </dev/null >&2 && apt-get install -y -q --no-install-recommends "$@" </dev/null >&2; } \
        || { dk_fail "apt-get install $* failed"; return 1; }
}

dk_engine_up() { timeout 20 docker info >/dev/null 2>&1; }

dk_ensure_engine() {
    if command -v docker >/dev/null && dk_engine_up; then return 0; fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        dk_apt_install docker.io || return 1
    fi
    dk_engine_up && return 0
    dk_root || { dk_fail "dockerd is not running and this is not root (start it: sudo dockerd &)"; return 1; }
    mkdir -p "$DK_CACHE"
    dk_log "starting dockerd (log: $DK_CACHE/dockerd.log)"
    # its own session, so it outlives this script (the stack is left to the tester or stopped by check)
    setsid nohup dockerd >"$DK_CACHE/dockerd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 60); do
        dk_engine_up && { dk_log "dockerd is up after ${i}s"; return 0; }
        sleep 1
    done
    dk_fail "dockerd did not come up within 60 s: $(tail -n 3 "$DK_CACHE/dockerd.log" | tr '\n' ' ')"
}

# trixie's docker-compose .deb holds the v2 plugin (a static Go binary: runs on bookworm). Fetched with a private
# apt configuration: the machine's own mirror, a trixie source list and lists in the cache; the system's apt
# sources and lists are left alone.
# shellcheck source=../lib/private-apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/private-apt.sh"

dk_trixie_apt() {  # apt-get arguments...
    private_apt "$DK_CACHE/apt" "$@"
}

dk_ensure_compose() {
    if docker compose version >/dev/null 2>&1; then return 0; fi
    local plugin="$DK_CACHE/compose/usr/libexec/docker/cli-plugins/docker-compose"
    if ! [ -x "$plugin" ]; then
        dk_log "fetching Debian trixie's docker-compose (the compose v2 plugin) into $DK_CACHE (once)"
        local c="$DK_CACHE/apt"
        rm -rf "$c" "$DK_CACHE/compose"
        mkdir -p "$c/lists/partial" "$c/cache/archives/partial" "$c/dl"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(dk_debian_uri) trixie main" \
            > "$c/trixie.list"
        dk_trixie_apt update >&2 || { dk_fail "apt-get update for trixie failed"; return 1; }
        (cd "$c/dl" && dk_trixie_apt download docker-compose >&2) \
            || { dk_fail "downloading trixie's docker-compose failed"; return 1; }
        dpkg -x "$(ls "$c"/dl/docker-compose_*.deb | head -n1)" "$DK_CACHE/compose"
        [ -x "$plugin" ] || { dk_fail "trixie's docker-compose has no $plugin"; return 1; }
    fi
    # a directory the docker CLI searches for plugins
    local dir=/usr/local/lib/docker/cli-plugins
    dk_root || dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    mkdir -p "$dir" && install -m 0755 "$plugin" "$dir/docker-compose"
    docker compose version >/dev/null 2>&1 || { dk_fail "docker compose does not run after installing $dir/docker-compose"; return 1; }
    dk_log "installed $(docker compose version) at $dir/docker-compose"
}

# debian:bookworm-slim from the host's mirror: debootstrap --variant=minbase, slimmed like Docker's own image
# (no docs, man pages or locales installed by later apt-get installs; no apt lists), then docker import.
# The rootfs tarball is kept in the cache: a second import needs no debootstrap.
dk_ensure_base() {
    if docker image inspect "$DK_BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
    case "$DK_BASE_IMAGE" in
        debian:bookworm-slim|debian:bookworm) ;;
        *) dk_fail "base image $DK_BASE_IMAGE is missing, and only debian:bookworm-slim can be made here"; return 1 ;;
    esac
    local tarball="$DK_CACHE/bookworm-minbase.tar"
    if ! [ -s "$tarball" ]; then
        dk_root || { dk_fail "debootstrap needs root"; return 1; }
        command -v debootstrap >/dev/null || dk_apt_install debootstrap || return 1
        local root="$DK_CACHE/rootfs" uri
        uri="$(dk_debian_uri)"
        rm -rf "$root" && mkdir -p "$DK_CACHE"
        dk_log "debootstrap --variant=minbase bookworm from $uri (once)"
        debootstrap --variant=minbase bookworm "$root" "$uri" >"$DK_CACHE/debootstrap.log" 2>&1 \
            || { dk_fail "debootstrap failed: $(tail -n 3 "$DK_CACHE/debootstrap.log" | tr '\n' ' ')"; return 1; }
        # what Docker's debian:*-slim images do: later installs leave out docs and man pages; apt cleans up after
        # itself; package scripts do not try to start services (no init in a container)
        cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
SLIM
        cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CLEAN'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
CLEAN
        printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod 0755 "$root/usr/sbin/policy-rc.d"
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$uri" "$uri" > "$root/etc/apt/sources.list"
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
            "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/log/apt/*
        tar --numeric-owner -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    dk_log "docker import $tarball as debian:bookworm-slim and debian:bookworm"
    docker import "$tarball" debian:bookworm-slim >/dev/null || { dk_fail "docker import failed"; return 1; }
    docker tag debian:bookworm-slim debian:bookworm
    docker image inspect "$DK_BASE_IMAGE" >/dev/null 2>&1 || { dk_fail "$DK_BASE_IMAGE still missing after import"; return 1; }
}

dk_ensure_all() { dk_ensure_engine && dk_ensure_compose && dk_ensure_base; }

# knock and the mocks built on the host, handed to the images as PREBUILT (a directory of the build context, which
# is the repository: the top-level .dockerignore lets target/{debug,release}/{knock,mock-apns,mock-fcm} through;
# the e2e image needs mock-fcm too).
# Sets PREBUILT and RUST_IMAGE (the build stage then only copies: the base image serves) unless RUST_IMAGE is
# set and PREBUILT is not (then the images compile).
dk_build_bins() {
    if [ -n "${RUST_IMAGE:-}" ] && [ -z "${PREBUILT:-}" ]; then
        dk_log "RUST_IMAGE=$RUST_IMAGE and no PREBUILT: the images compile knock and mock-apns themselves"
        return 0
    fi
    local target="${CARGO_TARGET_DIR:-$REPO/target}"
    if [ "${KNOCK_TEST_NO_BUILD:-0}" != 1 ]; then
        dk_log "cargo build --bin knock --bin mock-apns --bin mock-fcm (debug; reused by prosody-test/run)"
        (cd "$REPO" && cargo build --workspace --bin knock --bin mock-apns --bin mock-fcm) >&2 \
            || { dk_fail "cargo build failed"; return 1; }
    fi
    local b
    for b in knock mock-apns mock-fcm; do
        [ -x "$target/debug/$b" ] || { dk_fail "no $target/debug/$b (KNOCK_TEST_NO_BUILD=1 but nothing built?)"; return 1; }
        # a target directory outside the repository: copy the binaries where the build context has them
        if [ "$(realpath "$target/debug/$b")" != "$(realpath -m "$REPO/target/debug/$b")" ]; then
            install -D -m 0755 "$target/debug/$b" "$REPO/target/debug/$b"
        fi
    done
    export PREBUILT=target/debug RUST_IMAGE="$DK_BASE_IMAGE"
}

# docker compose on the stack's file; builds use BASE_IMAGE (default debian:bookworm-slim)
dk_compose() {
    BASE_IMAGE="$DK_BASE_IMAGE" docker compose -f "$PT_DIR/docker-compose.yml" "$@"
}
