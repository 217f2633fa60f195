# shellcheck shell=bash
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

# proc_alive PID COMM: PID is a live (not zombie) process named COMM. (A
# daemon that exited may stay a zombie where nothing reaps orphans: a zombie
# counts as gone, as `kill -0` would not.)
proc_alive() {
    local st
    [[ "$1" =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$st" != Z ]
}
# pid_alive PIDFILE COMM: the pid in PIDFILE is a live process named COMM.
pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    proc_alive "$pid" "$2"
}
proc_gone() { ! proc_alive "$@"; }
# stop_pid PID COMM: SIGTERM, then SIGKILL if PID still lives after 30 s.
stop_pid() {
    proc_alive "$1" "$2" || return 0
    kill "$1" 2>/dev/null || true
    wait_for 30 proc_gone "$1" "$2" && return 0
    kill -9 "$1" 2>/dev/null || true
    wait_for 10 proc_gone "$1" "$2"
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
    # Under systemd the maintainer scripts start some packages' own daemons:
    # stop_packaged_services below deals with those.
    apt-get install -y -o DPkg::Lock::Timeout=600 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        ${NO_RECOMMENDS:+--no-install-recommends} "$@"
}

# ------------------------------------------------------------------ systemd
# systemd_running: systemd is the init system (sd_booted(3)'s test).
systemd_running() { [ -d /run/systemd/system ]; }

# unit_cgroup_pids CGROUP: pids in a unit's control group (cgroup v2, or the
# v1 name=systemd hierarchy); nothing if the group is gone.
unit_cgroup_pids() {
    local f
    [ -n "$1" ] || return 0
    for f in "/sys/fs/cgroup$1/cgroup.procs" "/sys/fs/cgroup/unified$1/cgroup.procs" \
             "/sys/fs/cgroup/systemd$1/cgroup.procs"; do
        [ -r "$f" ] && { cat "$f" 2>/dev/null; return 0; }
    done
    return 0
}
unit_cgroup_empty() { [ -z "$(unit_cgroup_pids "$1")" ]; }

# stop_packaged_services UNIT...: under systemd, stop and disable each UNIT
# that a package started or enabled on install: these scripts start the test
# bed's daemons themselves, and a second copy cannot bind the first one's
# ports. What the stop leaves in the unit's control group is stopped too
# (SysV-script units such as gridengine's, whose scripts do not find their
# own daemons, and KillMode=process leave processes behind). A unit that is
# neither active nor enabled is left alone, so a re-run changes nothing.
# Without systemd there is nothing to do.
stop_packaged_services() {
    systemd_running || return 0
    local u cg pids
    for u in "$@"; do
        [ "$(systemctl show -p LoadState --value "$u" 2>/dev/null)" = loaded ] || continue
        if ! systemctl -q is-active "$u" 2>/dev/null \
                && ! systemctl -q is-enabled "$u" 2>/dev/null; then
            continue
        fi
        log "systemd: stopping and disabling the packaged $u (this set-up runs its own)"
        cg=$(systemctl show -p ControlGroup --value "$u" 2>/dev/null || true)
        systemctl disable --now -q "$u" || systemctl stop "$u" || true
        pids=$(unit_cgroup_pids "$cg")
        if [ -n "$pids" ]; then
            log "systemd: stopping what $u left behind (pids ${pids//$'\n'/ })"
            # shellcheck disable=SC2086
            kill $pids 2>/dev/null || true
            if ! wait_for 30 unit_cgroup_empty "$cg"; then
                # shellcheck disable=SC2046
                kill -9 $(unit_cgroup_pids "$cg") 2>/dev/null || true
                wait_for 10 unit_cgroup_empty "$cg" || die "cannot stop the processes of $u"
            fi
        fi
        systemctl reset-failed "$u" 2>/dev/null || true
    done
}
