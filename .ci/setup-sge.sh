#!/usr/bin/env bash
# setup-sge.sh - a real single-node Grid Engine (Son of Grid Engine 8.1.9,
# Debian 12 packages gridengine-master/-exec/-client) for sshq's test bed.
# Called by .ci/setup-testbed.sh; may also be run on its own. Root only,
# non-interactive. The daemons are started directly by this script; under
# systemd, the ones the packages start on install are stopped and disabled
# first (a second sge_execd cannot bind the first one's port).
#
# Result: sge_qmaster + sge_execd on this host, the host an admin, submit and
# execution host, queue all.q (every core, load_thresholds NONE, /bin/sh in
# posix_compliant mode), parallel environment smp ($pe_slots), a scheduler
# that runs every 2 s, and unbuffered accounting (qacct sees a job as soon
# as it ends).
#
# Idempotent: on a live cluster it changes nothing (each configuration object
# is compared first and written only when it differs) and leaves the daemons
# running; daemons that died (even by kill -9) are started again.
#
# Recipe and its pitfalls: shared/TESTBED.md, "A real single-node Grid Engine".
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C
export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
PKGS=(gridengine-master gridengine-exec gridengine-client gridengine-common tcsh iproute2)
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOLDB=/var/spool/gridengine/spooldb
QSPOOL=/var/spool/gridengine/qmaster
ESPOOL=/var/spool/gridengine/execd
SLOTS=$(nproc)

U=/usr/lib/gridengine
# sge_alias_line HOST: the host_aliases line SGE needs for HOST ("HOST NAME..."),
# nothing if none. Names as SGE's own resolver (gethostbyname/gethostbyaddr,
# no AI_ADDRCONFIG) gives them.
sge_alias_line() {
    local host=$1 addrs a b src rev names=" "
    addrs=$("$U/gethostbyname" -all "$host" 2>/dev/null | sed -n 's/^Host Address(es): *//p')
    for a in $addrs; do
        src=$(ip -4 -o route get "$a" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
        for b in "$a" $src; do
            rev=$("$U/gethostbyaddr" -name "$b" 2>/dev/null || true)
            [ -n "$rev" ] && [ "$rev" != "$host" ] || continue
            [[ "$names" == *" $rev "* ]] || names+="$rev "
        done
    done
    [ "$names" = " " ] || echo "$host${names% }"
}
# `setup-sge.sh --host-aliases`: print that line for this host, change nothing.
if [ "${1:-}" = --host-aliases ]; then
    sge_alias_line "$(hostname)"
    exit 0
fi

LOG_TAG=setup-sge
# shellcheck source=.ci/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root"

W=$(mktemp -d /tmp/setup-sge.XXXXXX)
trap 'rm -rf "$W"' EXIT

# ------------------------------------------------------------------ hostname
# SGE needs the host name to resolve (setup-testbed.sh checks this too).
HOST=$(hostname)
[ -n "$HOST" ] || die "empty hostname"
if ! getent hosts "$HOST" >/dev/null; then
    log "hostname $HOST does not resolve; adding '127.0.1.1 $HOST' to /etc/hosts"
    echo "127.0.1.1 $HOST" >> /etc/hosts
fi

# ------------------------------------------------------------------ packages
if ! pkgs_installed "${PKGS[@]}"; then
    # Without these answers the packages ask (or skip creating the cell).
    for owner in gridengine-common gridengine-master gridengine-exec gridengine-client; do
        echo "$owner shared/gridengineconfig boolean true"
        echo "$owner shared/gridenginecell string $SGE_CELL"
        echo "$owner shared/gridenginemaster string $HOST"
    done | debconf-set-selections
fi
NO_RECOMMENDS=1 ensure_packages "${PKGS[@]}" || die "cannot install ${PKGS[*]}"
for b in /usr/sbin/sge_qmaster /usr/sbin/sge_execd /usr/bin/qsub /usr/bin/qstat \
         /usr/bin/qdel /usr/bin/qacct /usr/bin/qconf /usr/bin/tcsh; do
    [ -x "$b" ] || die "$b missing after package install"
done
# Under systemd, the packages started their own qmaster and execd (pid files
# in /run/gridengine, which the checks below do not look at).
stop_packaged_services gridengine-exec.service gridengine-master.service

# ------------------------------------------------------------------ cell
# An earlier install with gridengineconfig=false never created the cell.
if [ ! -e "$SPOOLDB/sge" ]; then
    log "initialising the cell (init_cluster)"
    mkdir -p "$COMMON" "$QSPOOL/job_scripts" "$SPOOLDB" "$ESPOOL"
    chown sgeadmin:sgeadmin "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$COMMON" "$QSPOOL" \
        "$QSPOOL/job_scripts" "$SPOOLDB" "$ESPOOL"
    [ -e "$COMMON/bootstrap" ] || install -m 0644 -o sgeadmin -g sgeadmin \
        /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
    runuser -u sgeadmin -- /usr/share/gridengine/scripts/init_cluster \
        "$SGE_ROOT" "$SGE_CELL" "$SPOOLDB" sgeadmin
fi
if [ ! -s "$COMMON/act_qmaster" ]; then
    echo "$HOST" > "$COMMON/act_qmaster"
    chown sgeadmin:sgeadmin "$COMMON/act_qmaster"
fi

# ------------------------------------------------------------------ host_aliases
# SGE's commlib refuses a connection whose source address reverse-resolves to
# another name than the one the peer gives for itself ("client IP resolved
# to host name localhost. This is not identical to clients host name vm").
# Local clients and daemons connect to the address of $HOST (127.0.1.1 with
# Debian's default /etc/hosts, 127.0.0.1 on some machines) from the source
# address the kernel picks for it (127.0.0.1, the loopback's own, in both
# cases), which reverse-resolves to "localhost". SGE's own alias file maps
# every such name back to $HOST (sge_alias_line, above), without touching
# /etc/hosts. The daemons read it at start only: they are restarted if it
# changes.
aliases_changed=0
want=$(sge_alias_line "$HOST")
if [ -n "$want" ]; then
    if ! grep -qxF "$want" "$COMMON/host_aliases" 2>/dev/null; then
        log "host_aliases: '$want' (names of the addresses of $HOST and of their source addresses)"
        echo "$want" > "$COMMON/host_aliases"
        aliases_changed=1
    fi
    chown sgeadmin:sgeadmin "$COMMON/host_aliases"
    chmod 0644 "$COMMON/host_aliases"
fi

# ------------------------------------------------------------------ daemons
# execd names its spool directory after the local name it resolves (it may
# be the unaliased one, e.g. localhost): look in every one.
execd_pidfile() {
    local f
    for f in "$ESPOOL"/*/execd.pid; do
        pid_alive "$f" sge_execd && { echo "$f"; return 0; }
    done
    return 1
}
# stop_daemon PIDFILE COMM: TERM, then KILL after 30 s.
stop_daemon() {
    pid_alive "$1" "$2" || return 0
    log "stopping $2 (pid $(cat "$1"))"
    stop_pid "$(cat "$1")" "$2"
}
# stop_strays COMM PIDFILE...: stop every COMM that none of PIDFILE names: the
# packages' own daemons (the execd they start keeps retrying a qmaster that
# refuses it, holding its port, before it writes any pid file), or one whose
# pid file is gone. Ours could not bind its port next to it.
stop_strays() {
    local comm=$1 f pid known=" "
    shift
    for f in "$@"; do pid_alive "$f" "$comm" && known+="$(cat "$f") "; done
    for pid in $(pgrep -x "$comm" || true); do
        [[ "$known" == *" $pid "* ]] && continue
        log "$comm pid $pid is not this set-up's (no pid file of ours names it): stopping it"
        stop_pid "$pid" "$comm"
    done
}

mkdir -p /var/run/gridengine
chown sgeadmin:sgeadmin /var/run/gridengine
# Jobs inherit sge_execd's environment: start the daemons with the bare one
# an init system gives, not with this script's.
start_daemon() {
    ( cd / && env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
          LANG=C.UTF-8 "$@" ) </dev/null
}
stop_strays sge_execd "$ESPOOL"/*/execd.pid
stop_strays sge_qmaster "$QSPOOL/qmaster.pid"
if [ "$aliases_changed" = 1 ]; then
    if f=$(execd_pidfile); then stop_daemon "$f" sge_execd; fi
    stop_daemon "$QSPOOL/qmaster.pid" sge_qmaster
fi

if pid_alive "$QSPOOL/qmaster.pid" sge_qmaster; then
    log "sge_qmaster already running (pid $(cat "$QSPOOL/qmaster.pid"))"
else
    log "starting sge_qmaster"
    # Run directly: the init script's pid file and --exec checks do not match
    # what the daemon really writes and runs.
    start_daemon /usr/sbin/sge_qmaster
fi
wait_for 60 qconf -sh || {
    tail -n 20 "$QSPOOL/messages" >&2 2>/dev/null || true
    die "sge_qmaster does not answer"
}

# ------------------------------------------------------------------ configuration
# same_conf DESIRED CURRENT: every key of DESIRED has the same value in
# CURRENT (values compared with blanks collapsed; qconf folds long lines
# with a trailing backslash).
conf_norm() {
    perl -0pe 's/\\\n\s*/ /g' "$1" \
        | awk 'NF && $1 !~ /^#/ {k = $1; $1 = ""; sub(/^ +/, ""); print k "\t" $0}' | sort
}
same_conf() {
    local want have
    want=$(conf_norm "$1")
    have=$(conf_norm "$2")
    [ -z "$(comm -23 <(echo "$want") <(echo "$have"))" ]
}
# ensure_obj WHAT NAME FILE SHOW ADD MOD: create or modify a configuration
# object from FILE unless it is up to date already.
ensure_obj() {
    local what=$1 name=$2 file=$3 show=$4 add=$5 mod=$6
    if qconf "$show" "$name" > "$W/current" 2>/dev/null; then
        if same_conf "$file" "$W/current"; then
            log "$what $name up to date"
            return 0
        fi
        log "updating $what $name"
        qconf "$mod" "$file" >/dev/null
    else
        log "creating $what $name"
        qconf "$add" "$file" >/dev/null
    fi
}

if ! qconf -sh 2>/dev/null | grep -qxF "$HOST"; then
    log "adding $HOST as an admin host"
    qconf -ah "$HOST" >/dev/null
fi
if ! qconf -ss 2>/dev/null | grep -qxF "$HOST"; then
    log "adding $HOST as a submit host"
    qconf -as "$HOST" >/dev/null
fi

# Global configuration: accounting written at once (qacct sees a job as soon
# as it ends), load reports every 10 s.
qconf -sconf global > "$W/global.cur"
perl -0pe 's/\\\n\s*/ /g' "$W/global.cur" > "$W/global"
perl -pi -e '
    s/^(reporting_params\s+).*/${1}accounting=true reporting=false flush_time=00:00:15 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00/;
    s/^(load_report_time\s+).*/${1}00:00:10/' "$W/global"
if same_conf "$W/global" "$W/global.cur"; then
    log "global configuration up to date"
else
    log "updating the global configuration"
    qconf -Mconf "$W/global" >/dev/null
fi

# Scheduler: every 2 s and right after submits and job ends (default: 15 s).
qconf -ssconf > "$W/sconf.cur"
perl -pe 's/^(schedule_interval\s+).*/${1}0:0:2/;
          s/^(flush_submit_sec\s+).*/${1}1/;
          s/^(flush_finish_sec\s+).*/${1}1/' "$W/sconf.cur" > "$W/sconf"
if same_conf "$W/sconf" "$W/sconf.cur"; then
    log "scheduler configuration up to date"
else
    log "updating the scheduler configuration"
    qconf -Msconf "$W/sconf" >/dev/null
fi

cat > "$W/exechost" <<EOF
hostname              $HOST
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
ensure_obj "execution host" "$HOST" "$W/exechost" -se -Ae -Me

cat > "$W/allhosts" <<EOF
group_name @allhosts
hostlist $HOST
EOF
ensure_obj "host group" @allhosts "$W/allhosts" -shgrp -Ahgrp -Mhgrp

# smp: all slots of a job on one host, as sshq's `cpus` means.
cat > "$W/smp" <<EOF
pe_name            smp
slots              9999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
ensure_obj "parallel environment" smp "$W/smp" -sp -Ap -Mp

# all.q: load_thresholds NONE, else a busy 2-core host puts the queue in
# alarm and jobs wait in qw. terminate_method NONE: qdel sends SIGKILL, the
# default that sites run with.
cat > "$W/all.q" <<EOF
qname                 all.q
hostlist              @allhosts
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               smp
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
ensure_obj queue all.q "$W/all.q" -sq -Aq -Mq

# ------------------------------------------------------------------ execd
if f=$(execd_pidfile); then
    log "sge_execd already running (pid $(cat "$f"))"
else
    log "starting sge_execd"
    start_daemon /usr/sbin/sge_execd
fi

# The queue instance's state column: '' when usable; u(nknown) until execd
# reports; E(rror) after a job failed to start; d(isabled) by an admin.
qi_state() {
    qstat -f -q "all.q@$HOST" 2>/dev/null \
        | awk -v q="all.q@$HOST" '$1 == q {print ($6 == "" ? "ok" : $6); f = 1}
                                  END {if (!f) print "missing"}'
}
ready=0
for ((i = 0; i < 180; i++)); do
    st=$(qi_state)
    case "$st" in
        ok) ready=1; break ;;
        *E*) log "queue all.q@$HOST in error state ($st): clearing it"
             qmod -c "all.q@$HOST" >/dev/null 2>&1 || true ;;
        *d*) log "queue all.q@$HOST disabled ($st): enabling it"
             qmod -e "all.q@$HOST" >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
if [ "$ready" != 1 ]; then
    qstat -f >&2 || true
    tail -n 20 "$ESPOOL"/*/messages >&2 2>/dev/null || true
    die "queue all.q@$HOST not usable after 90 s (state: '$st')"
fi
log "sge_execd up (pid $(cat "$(execd_pidfile)")), queue all.q@$HOST ready"

# ------------------------------------------------------------------ login env
# Debian's SGE commands are wrappers that find the cell without these
# (/usr/share/gridengine/gridengine-wrapper); scripts and users that look for
# them still get them in sh/bash and csh/tcsh login shells (Debian's
# /etc/csh.login sources every file in /etc/csh/login.d).
printf 'export SGE_ROOT=%s\nexport SGE_CELL=%s\n' "$SGE_ROOT" "$SGE_CELL" > "$W/env.sh"
printf 'setenv SGE_ROOT %s\nsetenv SGE_CELL %s\n' "$SGE_ROOT" "$SGE_CELL" > "$W/env.csh"
for pair in "env.sh:/etc/profile.d/gridengine.sh" "env.csh:/etc/csh/login.d/gridengine"; do
    src=$W/${pair%%:*} dst=${pair#*:}
    mkdir -p "$(dirname "$dst")"
    cmp -s "$src" "$dst" 2>/dev/null || install -m 0644 "$src" "$dst"
done

log "single-node SGE ready on $HOST ($SLOTS slots, queue all.q, parallel environment smp)"
