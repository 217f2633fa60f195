#!/usr/bin/env bash
# setup-testbed.sh - stand up sshq's integration test bed on Debian 12:
#   * a real sshd on 127.0.0.1:2222 for the unprivileged user `sshqtest`
#     (key login only, strict host-key checking through a test known_hosts);
#   * a real single-node Slurm (munge + slurmctld + slurmd) on this host;
#   * a real single-node Grid Engine (.ci/setup-sge.sh) and its own test user
#     `sshqsge`, whose login shell is tcsh (remote commands must not assume
#     bash), reached through the same sshd with the same key;
#   * rootless podman for `sshqtest` and a tiny local image built offline
#     (localhost/sshq-test:latest); optional: SSHQ_TEST_PODMAN=0 if it fails.
# Recipes: shared/TESTBED.md. Must run as root. No systemd needed: daemons are
# started directly; under systemd, those that packages start on install and
# that would clash with ours (munge, slurmctld, slurmd; gridengine in
# setup-sge.sh) are stopped and disabled first. The packaged sshd on port 22
# is left alone (ours listens on 2222; stopping ssh.service would remove
# /run/sshd, which every sshd needs).
#
# Idempotent: re-running on a live test bed changes nothing and leaves the
# daemons running; daemons that died (or were killed) are started again.
# Everything lives in /var/lib/sshq-testbed; the tests read testbed.env there.
set -euo pipefail

TB=/var/lib/sshq-testbed
PORT=2222
ADDR=127.0.0.1
TUSER=sshqtest
SGEUSER=sshqsge
SLURM_CONF=/etc/slurm/slurm.conf
# chromium: the headless browser of sshq serve's page tests (tests/test_serve_page.py)
PKGS=(openssh-server openssh-client rsync slurm-wlm munge iproute2 parallel tmux procps
      python3-venv chromium)

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

LOG_TAG=setup-testbed
# shellcheck source=.ci/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root"

# write_if_changed FILE MODE: replace FILE with stdin if the content differs.
# Returns 0 if the file was (re)written, 1 if it was already up to date.
write_if_changed() {
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat > "$tmp"
    if [ -f "$f" ] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        chmod "$mode" "$f"
        return 1
    fi
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$f"
    return 0
}

# ------------------------------------------------------------------ packages
ensure_packages "${PKGS[@]}" || die "cannot install ${PKGS[*]}"
for b in /usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen /usr/sbin/munged \
         /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/sinfo; do
    [ -x "$b" ] || die "$b missing after package install"
done
# Under systemd, munge's package starts munged (and removes /run/munge when
# it is stopped: done before ours is set up), and slurmctld/slurmd start as
# soon as a slurm.conf exists: ours are started below, from this script.
stop_packaged_services slurmd.service slurmctld.service munge.service

# ------------------------------------------------------------------ hostname
# slurmd finds its NodeName from the short host name; it must resolve.
H=$(hostname -s 2>/dev/null || hostname)
[ -n "$H" ] || die "empty hostname"
if ! getent hosts "$H" >/dev/null; then
    log "hostname $H does not resolve; adding '127.0.1.1 $H' to /etc/hosts"
    echo "127.0.1.1 $H" >> /etc/hosts
fi

# ------------------------------------------------------------------ test user
if ! id -u "$TUSER" >/dev/null 2>&1; then
    log "creating user $TUSER"
    useradd -m -s /bin/bash "$TUSER"
fi
# useradd makes a locked account ('!'), which sshd refuses even for keys.
if [ "$(getent shadow "$TUSER" | cut -d: -f2)" != '*' ]; then
    log "unlocking $TUSER for key logins"
    usermod -p '*' "$TUSER"
fi
THOME=$(getent passwd "$TUSER" | cut -d: -f6)
[ -n "$THOME" ] || die "no home directory for $TUSER"
[ -d "$THOME" ] || install -d -m 0755 -o "$TUSER" -g "$TUSER" "$THOME"

# ------------------------------------------------------------------ keys
install -d -m 0755 -o root -g root "$TB"

# gen_key PATH COMMENT: ed25519 key pair, generated once.
gen_key() {
    local k=$1 c=$2
    if [ ! -s "$k" ]; then
        log "generating ed25519 key $k"
        rm -f "$k" "$k.pub"
        ssh-keygen -q -t ed25519 -N '' -C "$c" -f "$k"
    elif [ ! -s "$k.pub" ]; then
        ssh-keygen -y -f "$k" > "$k.pub"
    fi
    chown root:root "$k" "$k.pub"
    chmod 0600 "$k"
    chmod 0644 "$k.pub"
}
gen_key "$TB/hostkey" "sshq-testbed-host"
gen_key "$TB/id_ed25519" "sshq-testbed-client"

# known_hosts: host-key checking stays strict in the tests.
awk -v h="[$ADDR]:$PORT" '{print h, $1, $2}' "$TB/hostkey.pub" \
    | write_if_changed "$TB/known_hosts" 0644 || true

# authorized_keys of the test user: add the client key if it is not there.
install -d -m 0700 -o "$TUSER" -g "$TUSER" "$THOME/.ssh"
AK=$THOME/.ssh/authorized_keys
touch "$AK"
client_key=$(awk '{print $2}' "$TB/id_ed25519.pub")
if ! awk -v k="$client_key" '$2 == k || $3 == k {f = 1} END {exit !f}' "$AK"; then
    log "installing the client key into $AK"
    cat "$TB/id_ed25519.pub" >> "$AK"
fi
chown "$TUSER:$TUSER" "$AK"
chmod 0600 "$AK"

# ------------------------------------------------------------------ sshd
SSHD_CONF=$TB/sshd_config
SSHD_PID=$TB/sshd.pid
SSHD_LOG=$TB/sshd.log
sshd_changed=0
write_if_changed "$SSHD_CONF" 0644 <<EOF && sshd_changed=1 || true
# sshq test bed (written by .ci/setup-testbed.sh)
Port $PORT
ListenAddress $ADDR
HostKey $TB/hostkey
PidFile $SSHD_PID
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
MaxStartups 100:30:200
MaxSessions 64
EOF

mkdir -p /run/sshd
chmod 0755 /run/sshd
/usr/sbin/sshd -t -f "$SSHD_CONF" || die "sshd rejects $SSHD_CONF"

sshd_gone() { ! pid_alive "$SSHD_PID" sshd; }
port_open() { (exec 3<>"/dev/tcp/$ADDR/$PORT") 2>/dev/null; }
sshd_fail() {
    tail -n 20 "$SSHD_LOG" >&2 2>/dev/null || true
    die "$1"
}

if pid_alive "$SSHD_PID" sshd && port_open; then
    if [ "$sshd_changed" = 1 ]; then
        log "sshd_config changed: reloading sshd (SIGHUP)"
        kill -HUP "$(cat "$SSHD_PID")"
        sleep 0.5
    else
        log "sshd already running (pid $(cat "$SSHD_PID"))"
    fi
else
    if pid_alive "$SSHD_PID" sshd; then
        log "sshd pid $(cat "$SSHD_PID") is alive but not listening: restarting it"
        kill "$(cat "$SSHD_PID")" || true
        wait_for 5 sshd_gone || kill -9 "$(cat "$SSHD_PID")" 2>/dev/null || true
    fi
    port_open && die "port $ADDR:$PORT is taken by another process"
    rm -f "$SSHD_PID"
    log "starting sshd on $ADDR:$PORT"
    /usr/sbin/sshd -f "$SSHD_CONF" -E "$SSHD_LOG" </dev/null || sshd_fail "sshd failed to start"
fi
wait_for 10 port_open || sshd_fail "sshd does not accept connections on $ADDR:$PORT"
wait_for 5 pid_alive "$SSHD_PID" sshd || sshd_fail "sshd pid file $SSHD_PID not written"

# ensure_daemon COMM CHECK START: make CHECK succeed within 60 s. Start COMM
# whenever no process of that name exists (one that was just killed may take
# seconds to save its state and exit); SIGKILL one that lives on for 20 s
# without CHECK succeeding. Sets STARTED=1 if it started COMM.
ensure_daemon() {
    local comm=$1 check=$2 start=$3 t0=$SECONDS since=$SECONDS pids
    STARTED=0
    while ! $check >/dev/null 2>&1; do
        pids=$(pgrep -x "$comm" || true)
        if [ -z "$pids" ]; then
            log "starting $comm"
            $start </dev/null || return 1
            STARTED=1
            since=$SECONDS
        elif (( SECONDS - since >= 20 )); then
            log "$comm (pid $pids) runs but does not answer: killing it"
            # shellcheck disable=SC2086
            kill -9 $pids 2>/dev/null || true
            since=$SECONDS
        fi
        (( SECONDS - t0 < 60 )) || return 1
        sleep 0.5
    done
    [ "$STARTED" = 1 ] || log "$comm already running"
}

# ------------------------------------------------------------------ munge
mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
start_munged() {
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
}
ensure_daemon munged munge_ok start_munged || {
    tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true
    die "munge does not work"
}

# ------------------------------------------------------------------ slurm
# Node topology as slurmd detects it (a node configured bigger than it is
# gets drained); memory capped at 4000 MB (memory is not a consumable here).
node_hw=$(slurmd -C 2>/dev/null | head -n 1 || true)
cpus_spec=$(sed -n 's/.*\(CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*\).*/\1/p' <<<"$node_hw")
[ -n "$cpus_spec" ] || cpus_spec="CPUs=$(nproc)"
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_hw")
if [ -z "$mem" ] || [ "$mem" -gt 4000 ]; then mem=4000; fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
slurm_changed=0
write_if_changed "$SLURM_CONF" 0644 <<EOF && slurm_changed=1 || true
# sshq test bed: single-node Slurm (written by .ci/setup-testbed.sh)
ClusterName=test
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
MpiDefault=none
# forget finished jobs after 10 s (the job status file is the authority then)
MinJobAge=10
# SIGTERM, then SIGKILL 5 s later, on scancel / time limit
KillWait=5
InactiveLimit=0
NodeName=$H $cpus_spec RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF

proc_gone() { ! pgrep -x "$1"; }
# stop_proc COMM: stop the process(es) named COMM, SIGKILL after 10 s.
stop_proc() {
    local pids
    pids=$(pgrep -x "$1" || true)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    wait_for 10 proc_gone "$1" && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    wait_for 5 proc_gone "$1" || die "cannot stop $1"
}
if [ "$slurm_changed" = 1 ] && { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null; then
    log "slurm.conf changed: restarting slurmctld and slurmd"
    stop_proc slurmd
    stop_proc slurmctld
fi

slurm_fail() {
    {
        echo "---- sinfo"; sinfo -N -l 2>&1 || true
        echo "---- sinfo -R"; sinfo -R 2>&1 || true
        echo "---- tail /var/log/slurm/slurmctld.log"; tail -n 30 /var/log/slurm/slurmctld.log 2>&1 || true
        echo "---- tail /var/log/slurm/slurmd.log"; tail -n 30 /var/log/slurm/slurmd.log 2>&1 || true
    } >&2
    die "$1"
}

ctld_ok() { scontrol ping; }
slurmd_ok() { scontrol show slurmd; }   # asks the local slurmd itself

ensure_daemon slurmctld ctld_ok slurmctld || slurm_fail "slurmctld does not answer"
if [ "$STARTED" = 1 ] && pgrep -x slurmd >/dev/null; then
    # a fresh slurmctld learns of a running slurmd only at its next ping
    # (minutes); a restarted slurmd registers at once (jobs survive it).
    log "restarting slurmd so that it registers with the new slurmctld"
    stop_proc slurmd
fi
ensure_daemon slurmd slurmd_ok slurmd || slurm_fail "slurmd does not answer"

node_state() { sinfo -h -n "$H" -o %t 2>/dev/null | head -n 1; }
node_ready=0
for ((i = 0; i < 150; i++)); do
    st=$(node_state || true)
    case "$st" in
        idle|mix|alloc|comp) node_ready=1; break ;;
        down|drain|drng|fail|failg)   # responding but out of service
            log "node $H is $st: resuming it"
            scontrol update nodename="$H" state=resume >/dev/null 2>&1 || true
            sleep 1 ;;
        *) sleep 0.2 ;;                # '', unk*, idle*, down* ...: not yet registered
    esac
done
[ "$node_ready" = 1 ] || slurm_fail "node $H not ready after 30 s (state: '${st:-}')"
log "slurm node $H is $st"

# ------------------------------------------------------------------ end to end
SSH=(ssh -F /dev/null -i "$TB/id_ed25519" -p "$PORT" -o BatchMode=yes
     -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes
     -o UserKnownHostsFile="$TB/known_hosts" -o ConnectTimeout=10)
out=$("${SSH[@]}" "$TUSER@$ADDR" sbatch --output=/dev/null --wrap true </dev/null 2>&1) \
    || { echo "$out" >&2; sshd_fail "ssh + sbatch as $TUSER failed"; }
[[ "$out" =~ ^Submitted\ batch\ job\ ([0-9]+)$ ]] || die "unexpected sbatch output: $out"
job=${BASH_REMATCH[1]}
log "ssh $TUSER@$ADDR:$PORT + sbatch: $out"
# ... and the job really runs (a dead slurmd can hide behind an 'idle' node).
for ((i = 0; i < 150; i++)); do
    st=$(squeue -h -t all -o %T -j "$job" 2>/dev/null || true)
    case "$st" in
        COMPLETED) break ;;
        PENDING|CONFIGURING|RUNNING|COMPLETING) sleep 0.2 ;;
        *) slurm_fail "test job $job ended in state '$st'" ;;
    esac
done
[ "$st" = COMPLETED ] || slurm_fail "test job $job did not complete within 30 s (state: '$st')"
log "test job $job completed"

# ------------------------------------------------------------------ grid engine
bash "$(dirname "${BASH_SOURCE[0]}")/setup-sge.sh" </dev/null || die "Grid Engine set-up failed"

# The SGE test user: tcsh as login shell, key login with the test key.
TCSH=$(command -v tcsh || true)
[ -x "$TCSH" ] || die "tcsh missing (setup-sge.sh installs it)"
if ! id -u "$SGEUSER" >/dev/null 2>&1; then
    log "creating user $SGEUSER (login shell $TCSH)"
    useradd -m -s "$TCSH" "$SGEUSER"
fi
if [ "$(getent passwd "$SGEUSER" | cut -d: -f7)" != "$TCSH" ]; then
    log "setting the login shell of $SGEUSER to $TCSH"
    usermod -s "$TCSH" "$SGEUSER"
fi
if [ "$(getent shadow "$SGEUSER" | cut -d: -f2)" != '*' ]; then
    log "unlocking $SGEUSER for key logins"
    usermod -p '*' "$SGEUSER"
fi
SHOME=$(getent passwd "$SGEUSER" | cut -d: -f6)
[ -n "$SHOME" ] || die "no home directory for $SGEUSER"
[ -d "$SHOME" ] || install -d -m 0755 -o "$SGEUSER" -g "$SGEUSER" "$SHOME"
install -d -m 0700 -o "$SGEUSER" -g "$SGEUSER" "$SHOME/.ssh"
SAK=$SHOME/.ssh/authorized_keys
touch "$SAK"
if ! awk -v k="$client_key" '$2 == k || $3 == k {f = 1} END {exit !f}' "$SAK"; then
    log "installing the client key into $SAK"
    cat "$TB/id_ed25519.pub" >> "$SAK"
fi
chown "$SGEUSER:$SGEUSER" "$SAK"
chmod 0600 "$SAK"

# End to end: ssh in as $SGEUSER (through tcsh), qsub, and the job really
# runs to exit 0 (qacct: accounting is written as soon as a job ends).
sge_fail() {
    { echo "---- qstat -f"; qstat -f 2>&1 || true
      echo "---- qstat -u $SGEUSER"; qstat -u "$SGEUSER" 2>&1 || true; } >&2
    die "$1"
}
out=$("${SSH[@]}" "$SGEUSER@$ADDR" qsub -b y -j y -o /dev/null -N sshq-setup-check true \
      </dev/null 2>&1) || { echo "$out" >&2; sge_fail "ssh + qsub as $SGEUSER failed"; }
[[ "$out" =~ Your\ job\ ([0-9]+)\ .*has\ been\ submitted ]] \
    || sge_fail "unexpected qsub output: $out"
job=${BASH_REMATCH[1]}
log "ssh $SGEUSER@$ADDR:$PORT (tcsh) + qsub: $out"
sge_done() { qacct -j "$job" 2>/dev/null | grep -q '^exit_status'; }
wait_for 60 sge_done || sge_fail "SGE test job $job did not finish within 60 s"
rc=$(qacct -j "$job" | awk '$1 == "exit_status" {print $2}')
[ "$rc" = 0 ] || sge_fail "SGE test job $job ended with exit status '$rc'"
log "SGE test job $job completed (exit 0)"

# ------------------------------------------------------------------ podman
# Rootless podman for $TUSER (tests/test_containers.py): runc (crun refuses
# hybrid cgroups), cgroupfs, vfs storage, and a tiny local image built here
# without network (busybox + bash).  Optional: if podman cannot work, the
# test bed goes on with SSHQ_TEST_PODMAN=0 and those tests skip.
PODMAN_PKGS=(podman uidmap runc busybox-static)
PODMAN_IMAGE=localhost/sshq-test:latest
PODMAN_IMAGE_REV=1          # bump when the image recipe below changes
PODMAN_OK=0

# tssh CMD...: run CMD as $TUSER through the test bed's sshd, as the tests do
# (a hung podman must not hang the set-up).
tssh() { timeout 180 "${SSH[@]}" "$TUSER@$ADDR" "$@"; }

# add_subids FILE FLAG: give $TUSER 65536 ids in FILE after the highest used.
add_subids() {
    local f=$1 flag=$2 start
    [ -e "$f" ] || install -m 0644 /dev/null "$f"
    grep -q "^$TUSER:" "$f" 2>/dev/null && return 1
    start=$(awk -F: 'BEGIN {m = 100000} $3 ~ /^[0-9]+$/ && $2 + $3 > m {m = $2 + $3}
                     END {print m}' "$f" 2>/dev/null || echo 100000)
    log "giving $TUSER sub-ids $start-$((start + 65535)) in $f"
    usermod "$flag" "$start-$((start + 65535))" "$TUSER"
}

# build_test_rootfs DIR: busybox (+ applet links), bash and its libraries.
build_test_rootfs() {
    local r=$1 b lib
    mkdir -p "$r"/{bin,etc,tmp,proc,sys,dev,run,root,home,usr}
    chmod 1777 "$r/tmp"
    ln -s ../bin "$r/usr/bin"
    for b in /bin/bash /bin/busybox; do
        cp -L "$b" "$r/bin/" || return 1
        for lib in $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*' || true); do
            [ -e "$r$lib" ] && continue
            mkdir -p "$r$(dirname "$lib")" && cp -L "$lib" "$r$lib" || return 1
        done
    done
    for b in $("$r/bin/busybox" --list); do
        [ -e "$r/bin/$b" ] || ln -s busybox "$r/bin/$b"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
    printf 'root:x:0:\n' >"$r/etc/group"
}

# podman_image_ok: the image exists and is of this recipe's revision.
podman_image_ok() {
    [ "$(tssh "podman image inspect --format '{{index .Config.Labels \"sshq.test-image\"}}'" \
         "$PODMAN_IMAGE" </dev/null 2>/dev/null)" = "$PODMAN_IMAGE_REV" ]
}

# podman_run_ok: a container runs through sshd, detached from the session
# like a background job (setsid, stdin /dev/null), with bash inside.
podman_run_ok() {
    local out err rc=0
    err=$(mktemp) || return 1
    out=$(tssh setsid -w podman run --rm --network=host "$PODMAN_IMAGE" \
          /bin/bash -c "'test -e /run/.containerenv && echo podman-ok'" </dev/null 2>"$err")
    if [ "$out" != podman-ok ]; then
        echo "$out" | cat - "$err" >&2
        rc=1
    fi
    rm -f "$err"
    return "$rc"
}

# podman_image_and_run: import the image unless it is there, then run it.
podman_image_and_run() {
    local tmp
    if ! podman_image_ok; then
        log "podman: building and importing $PODMAN_IMAGE"
        tmp=$(mktemp -d) || return 1
        if ! build_test_rootfs "$tmp/root" \
            || ! tar -C "$tmp/root" --numeric-owner --owner=0 --group=0 -cf "$tmp/root.tar" . \
            || ! tssh podman import -q --change "'LABEL sshq.test-image=$PODMAN_IMAGE_REV'" \
                     --change "'CMD [\"/bin/sh\"]'" - "$PODMAN_IMAGE" <"$tmp/root.tar" >/dev/null
        then
            rm -rf "$tmp"
            return 1
        fi
        rm -rf "$tmp"
        podman_image_ok || { log "podman: $PODMAN_IMAGE missing after import"; return 1; }
    fi
    podman_run_ok
}

setup_podman() {
    local p changed=0
    ensure_packages "${PODMAN_PKGS[@]}" || return 1
    for p in /usr/bin/podman /usr/sbin/runc /bin/busybox /usr/bin/newuidmap; do
        [ -x "$p" ] || { log "podman: $p missing"; return 1; }
    done
    add_subids /etc/subuid --add-subuids && changed=1
    add_subids /etc/subgid --add-subgids && changed=1
    grep -q "^$TUSER:" /etc/subuid && grep -q "^$TUSER:" /etc/subgid || return 1

    local tuid cdir
    tuid=$(id -u "$TUSER")
    cdir=$THOME/.config/containers
    install -d -m 0700 -o "$TUSER" -g "$TUSER" "$THOME/.config" "$cdir" || return 1
    # Paths pinned to podman's defaults without XDG_RUNTIME_DIR (sshd here has
    # no PAM/logind), so that a session that has one sees the same state.
    write_if_changed "$cdir/containers.conf" 0644 <<EOC && changed=1
# sshq test bed (written by .ci/setup-testbed.sh)
[containers]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "/tmp/podman-run-$tuid/libpod/tmp"
EOC
    write_if_changed "$cdir/storage.conf" 0644 <<EOC && changed=1
# sshq test bed (written by .ci/setup-testbed.sh)
[storage]
driver = "vfs"
runroot = "/tmp/podman-run-$tuid/containers"
graphroot = "$THOME/.local/share/containers/storage"
EOC
    chown "$TUSER:$TUSER" "$cdir/containers.conf" "$cdir/storage.conf" || return 1
    if [ "$changed" = 1 ]; then
        log "podman: configuration changed: podman system migrate"
        tssh podman system migrate </dev/null || true
    fi

    if ! podman_image_and_run; then
        log "podman: not working for $TUSER yet: resetting its podman storage, trying again"
        tssh podman system reset --force </dev/null >/dev/null 2>&1 || true
        podman_image_and_run || return 1
    fi
    log "podman: $PODMAN_IMAGE runs as $TUSER through sshd"
}

if setup_podman; then
    PODMAN_OK=1
else
    log "podman does not work here: container tests will skip (SSHQ_TEST_PODMAN=0)"
fi

# ------------------------------------------------------------------ Executor venv
# The remote interpreter of sshq.Executor's tests and benchmark
# (tests/test_executor.py's remote_python fixture, bench/executor_bench.py):
# ~$TUSER/sshq-test-venv, a venv of Debian's python3 (the client's Python
# minor version: CI's venv is made from the same python3) with cloudpickle,
# made as $TUSER. pyproject.toml's cloudpickle requirement is a lower bound,
# so the client's pip install '.[test]' (after this script) gets the newest
# cloudpickle on PyPI, and so does this venv, installed with the same
# requirement. Made once and then kept (as the client's venv keeps its
# version). Optional: a pip failure (no route to PyPI) is logged and the
# venv left out; the fixture makes it on first use, and makes it again when
# its cloudpickle differs from the client's.
EXEC_VENV=$THOME/sshq-test-venv     # the name is tests/test_executor.py's VENV
# as_tuser CMD...: run CMD as $TUSER, in its home (HOME set by runuser).
as_tuser() { (cd "$THOME" && timeout 300 runuser -u "$TUSER" -- "$@" </dev/null); }
exec_venv_version() {
    as_tuser "$EXEC_VENV/bin/python" -c 'import cloudpickle; print(cloudpickle.__version__)' \
        2>/dev/null
}
setup_exec_venv() {
    local req ver
    if ver=$(exec_venv_version); then
        log "Executor venv $EXEC_VENV: cloudpickle $ver (kept)"
        return 0
    fi
    req=$(grep -o '"cloudpickle[^"]*"' "$(dirname "${BASH_SOURCE[0]}")/../pyproject.toml" \
          | head -n 1 | tr -d '"') || true
    log "Executor venv $EXEC_VENV: /usr/bin/python3 -m venv, pip install '${req:=cloudpickle}'"
    rm -rf "$EXEC_VENV"
    as_tuser /usr/bin/python3 -m venv "$EXEC_VENV" || return 1
    as_tuser "$EXEC_VENV/bin/pip" install --disable-pip-version-check --no-cache-dir \
        --progress-bar off --timeout 20 --retries 1 -q "$req" || return 1
    ver=$(exec_venv_version) || return 1
    log "Executor venv $EXEC_VENV: cloudpickle $ver"
}
if ! setup_exec_venv; then
    rm -rf "$EXEC_VENV"
    log "Executor venv $EXEC_VENV not made (pip failed: no PyPI?): the Executor tests" \
        "make it on first use"
fi

# ------------------------------------------------------------------ testbed.env
write_if_changed "$TB/testbed.env" 0644 <<EOF || true
SSHQ_TEST_HOST=$ADDR
SSHQ_TEST_PORT=$PORT
SSHQ_TEST_USER=$TUSER
SSHQ_TEST_KEY=$TB/id_ed25519
SSHQ_TEST_KNOWN_HOSTS=$TB/known_hosts
SSHQ_TEST_HOSTKEY_PUB=$TB/hostkey.pub
SSHQ_TEST_SLURM=1
SSHQ_TEST_SSHD_PIDFILE=$SSHD_PID
SSHQ_TEST_SGE=1
SSHQ_TEST_SGE_USER=$SGEUSER
SSHQ_TEST_PODMAN=$PODMAN_OK
SSHQ_TEST_PODMAN_IMAGE=$PODMAN_IMAGE
EOF
log "test bed ready: $TB/testbed.env"
