# lib.sh - shell functions shared by .ci/setup-testbed.sh and .ci/setup-sge.sh
# (sourced, not run). Set LOG_TAG before sourcing: it prefixes every message.

LOG_TAG=${LOG_TAG:-setup}

log() { echo "[$LOG_TAG $(date +%T)] $*"; }
die() { echo "[$LOG_TAG] ERROR: $*" >&2; exit 1; }

# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
    local n=$(( $1 * 5 )) i; shift
    for ((i = 0; i < n; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# pid_alive PIDFILE COMM: the pid in PIDFILE is a live (not zombie) process
# named COMM. (A daemon that exited may stay a zombie where nothing reaps
# orphans: a zombie counts as gone, as `kill -0` would not.)
pid_alive() {
    local pid st
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$st" != Z ]
}

# ------------------------------------------------------------------ packages
# pkgs_installed PKG...: every PKG is installed.
pkgs_installed() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || return 1
    done
}

# ensure_packages PKG...: install those of PKG that are missing, after an
# `apt-get update` (once per run: SSHQ_APT_UPDATED is exported to the scripts
# this one starts). NO_RECOMMENDS=1: --no-install-recommends.
ensure_packages() {
    local p missing=()
    for p in "$@"; do pkgs_installed "$p" || missing+=("$p"); done
    if [ "${#missing[@]}" = 0 ]; then
        log "packages already installed: $*"
        return 0
    fi
    log "installing packages (missing: ${missing[*]})"
    if [ "${SSHQ_APT_UPDATED:-0}" != 1 ]; then
        apt-get update -o DPkg::Lock::Timeout=600 || return 1
        export SSHQ_APT_UPDATED=1
    fi
    apt-get install -y -o DPkg::Lock::Timeout=600 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        ${NO_RECOMMENDS:+--no-install-recommends} "$@"
}
