# shellcheck shell=bash
# apt-get with a private configuration rooted at a directory of its own: a source list, package lists and
# caches there, the system's apt sources, lists and caches left alone. How the tests fetch packages from a
# Debian release the machine does not run (trixie's prosody-modules, its docker-compose) with the machine's
# own mirror. Sourced by lib/trixie-modules.sh and docker/lib.sh.

private_apt() {  # dir apt-get-arguments...   (dir holds trixie.list; lists/ and cache/ are made there)
    local c="$1"; shift
    apt-get -q \
        -o Dir::Etc::SourceList="$c/trixie.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$c/lists" -o Dir::Cache="$c/cache" \
        -o Acquire::Languages=none \
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false \
        -o APT::Sandbox::User="$(id -un)" \
        "$@" </dev/null
}
