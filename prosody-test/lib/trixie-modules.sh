# shellcheck shell=bash
# Sourced by lib/setup.sh. Debian trixie's prosody-modules for Prosody 0.12 (bookworm):
# mod_cloud_notify_encrypted, mod_cloud_notify_priority_tag and mod_cloud_notify_filters, the server side of
# the Tigase push dialect (Siskin, Snikket iOS). Bookworm's prosody-modules (2023-02) has none of them, and
# trixie's package depends on Prosody 13, so it is not installed: it is downloaded with a private apt
# configuration (the machine's own Debian mirror, a trixie source list and its package lists kept in the cache
# directory; the system's apt sources and lists are left alone), unpacked with `dpkg -x`, and Prosody 0.12 is
# pointed at it with `plugin_paths`. Reused across runs; delete the cache directory to fetch it again.
#
# Layout of $PT_TRIXIE_CACHE (default prosody-test/.cache/trixie-modules, git-ignored):
#   apt/            trixie.list, package lists, apt's caches
#   dl/             the .deb
#   pm/             the .deb unpacked (usr/lib/prosody/modules/...)
#   plugins/        what Prosody's plugin_paths names: symlinks to the three modules in pm/, except
#                   mod_cloud_notify_encrypted, which is a corrected copy (see pt_patch_encrypted)
#   ready           written last: the .deb's file name; its presence means everything above is complete

PT_TRIXIE_CACHE="${PT_TRIXIE_CACHE:-$PT_DIR/.cache/trixie-modules}"
PT_TRIXIE_MODULES=(cloud_notify_encrypted cloud_notify_priority_tag cloud_notify_filters)

# shellcheck source=private-apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/private-apt.sh"

pt_trixie_apt() {  # apt-get arguments...
    private_apt "$PT_TRIXIE_CACHE/apt" "$@"
}

# The packaged module crashes on Prosody 0.12 at the first push: without util.crypto (Prosody 13 has it) it
# falls back to luaossl, binds the cipher module as `ossl_ciphers`, and then calls `ciphers.new(...)`
# ("attempt to index a nil value (global 'ciphers')"). The copy in plugins/ calls `ossl_ciphers.new(...)`.
# Nothing else changes: with luaossl the module still appends 16 zero bytes instead of a real GCM tag (its
# own FIXME; Siskin does not check the tag), which the tests' decryption knows.
pt_patch_encrypted() {  # src dst
    local src="$1" dst="$2"
    mkdir -p "$(dirname "$dst")"
    if grep -q 'ossl_ciphers\.new(' "$src" && ! grep -Eq '(^|[^_[:alnum:]])ciphers\.new\(' "$src"; then
        cp "$src" "$dst"
        pt_log "mod_cloud_notify_encrypted: the packaged copy already calls ossl_ciphers.new; used unchanged"
        return 0
    fi
    sed -E 's/(^|[^_[:alnum:]])ciphers\.new\(/\1ossl_ciphers.new(/' "$src" > "$dst.tmp"
    if ! grep -q 'ossl_ciphers\.new("AES-128-GCM")' "$dst.tmp" || grep -Eq '(^|[^_[:alnum:]])ciphers\.new\(' "$dst.tmp" \
        || [ "$(diff "$src" "$dst.tmp" | grep -c '^>')" != 1 ]; then
        rm -f "$dst.tmp"
        pt_log "mod_cloud_notify_encrypted: the expected one-name fix (ciphers.new -> ossl_ciphers.new) did not apply"
        pt_log "to $src; the module changed upstream, look at it before these tests can use it"
        return 1
    fi
    mv "$dst.tmp" "$dst"
    pt_log "patched for Prosody 0.12: mod_cloud_notify_encrypted calls ossl_ciphers.new instead of the undefined"
    pt_log "  ciphers.new in its luaossl fallback (copy at $dst; the packaged file is unchanged)"
}

pt_ensure_trixie_modules() {
    local c="$PT_TRIXIE_CACHE"
    export PT_TRIXIE_PLUGINS="$c/plugins"
    # luaossl: the encrypted module's cipher on Prosody 0.12 (checked every run, it is cheap)
    pt_have_pkg lua-luaossl || pt_apt_install lua-luaossl || return 1
    if [ -s "$c/ready" ] && [ -f "$c/plugins/mod_cloud_notify_encrypted/mod_cloud_notify_encrypted.lua" ]; then
        return 0
    fi
    pt_log "fetching Debian trixie's prosody-modules into $c (once; reused by later runs)"
    rm -rf "$c"
    mkdir -p "$c/apt/lists/partial" "$c/apt/cache/archives/partial" "$c/dl" "$c/plugins"
    local uri
    uri="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)"
    if [ -z "$uri" ]; then  # a one-line-style sources.list instead
        uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' \
            /etc/apt/sources.list 2>/dev/null)"
    fi
    uri="${uri:-http://deb.debian.org/debian}"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$c/apt/trixie.list"
    pt_trixie_apt update >&2 || { pt_log "apt-get update for trixie ($uri) failed"; return 1; }
    (cd "$c/dl" && pt_trixie_apt download prosody-modules >&2) || { pt_log "downloading trixie's prosody-modules failed"; return 1; }
    local deb
    deb="$(ls "$c"/dl/prosody-modules_*.deb 2>/dev/null | head -n1)"
    [ -n "$deb" ] || { pt_log "no prosody-modules .deb in $c/dl"; return 1; }
    dpkg -x "$deb" "$c/pm"
    local m src
    for m in "${PT_TRIXIE_MODULES[@]}"; do
        src="$c/pm/usr/lib/prosody/modules/mod_$m/mod_$m.lua"
        [ -f "$src" ] || { pt_log "$(basename "$deb") has no mod_$m"; return 1; }
        if [ "$m" = cloud_notify_encrypted ]; then
            pt_patch_encrypted "$src" "$c/plugins/mod_$m/mod_$m.lua" || return 1
        else
            ln -sfn "../pm/usr/lib/prosody/modules/mod_$m" "$c/plugins/mod_$m"
        fi
    done
    basename "$deb" > "$c/ready"
    pt_log "trixie modules ready: $(cat "$c/ready") -> $c/plugins (${PT_TRIXIE_MODULES[*]})"
}
