# sshq process listing: the remote half of `sshq farm find` and `farm killall`.
#
# Shipped to remote hosts inside the agent bundle (sshq.remote.protocol puts
# it ahead of agent.py); the agent's "procs" operation calls reply().  The
# client half (checks, reply validation) is sshq.farm.procs.
#
# Python 3.6+, standard library only.
#
# The request's pattern arrives as hex in the JSON request on stdin, so it
# never appears in any command line, is never seen by a shell, and cannot
# match the agent itself.
#
# How processes are listed:
#
# - On Linux, from /proc: the real uid from the "Uid:" line of
#   /proc/PID/status, the parent pid and start time (clock ticks since boot,
#   field 22) from /proc/PID/stat (see proc(5)), the command line from
#   /proc/PID/cmdline with NULs shown as spaces, as `ps -o args` shows it
#   ("[comm]" when empty, plus " <defunct>" for a zombie).  Elapsed time is
#   /proc/uptime minus the start time.
# - Elsewhere (no /proc: BSD, macOS), from `ps -A -ww -o pid= -o ppid= -o
#   ruid= -o etime= -o args=`; etime ([[dd-]hh:]mm:ss, POSIX) is used rather
#   than the non-POSIX etimes.  ps is found on the agent's PATH (after the
#   platform's path_prepend).
#
# A process is a match when its real uid is this process's real uid (the
# login user's, as `id -u` says, whatever name the config gives) and the
# pattern, a plain substring compared byte for byte (no regex, no glob),
# occurs in its command line.  Never matched: this process, its ancestors
# (login shell, sshd session, a wrapper of the interpreter that did not
# exec), its own children (ps), and processes with exactly this process's
# command line (another sshq agent call: every one is `python3 -c
# <BOOTSTRAP>`, so another `farm find`/`killall` is never listed).
#
# Killing lists and signals in this one process, so no pid can be reused
# between two SSH round trips; on Linux each pid's start time is checked
# again right before kill(2), which leaves a window of microseconds.  A
# process that ended meanwhile is simply not reported.

import os
import signal
import subprocess

TYPE_CHECKING = False  # typing is not imported at run time: 4 ms of every agent call
if TYPE_CHECKING:
    from typing import Any, Dict, Tuple  # noqa: F401  (type comments)

PS_ARGV = ["ps", "-A", "-ww", "-o", "pid=", "-o", "ppid=", "-o", "ruid=",
           "-o", "etime=", "-o", "args="]


class Failure(Exception):
    """The request cannot be carried out (reported as the reply's "fatal")."""

    def __init__(self, message, bad_signal=False):
        Exception.__init__(self, message)
        self.bad_signal = bad_signal


def parse_etime(text):
    """Seconds (float) from ps's etime, [[dd-]hh:]mm:ss; None if unreadable."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            return None
        days = int(d)
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    secs = 0
    for p in parts:
        secs = secs * 60 + int(p)
    return float(days * 86400 + secs)


def parse_ps(out):
    """{pid: record} from the output (bytes) of PS_ARGV; unreadable lines are skipped.

    A record is {"ppid": int, "uid": int, "elapsed": float, "args": bytes,
    "start": None}.
    """
    table = {}
    for line in out.splitlines():
        fields = line.split(None, 4)
        if len(fields) < 4:
            continue
        try:
            pid, ppid, uid = int(fields[0]), int(fields[1]), int(fields[2])
        except ValueError:
            continue
        elapsed = parse_etime(fields[3].decode("ascii", "replace"))
        if elapsed is None:
            continue
        args = fields[4].rstrip(b"\r\n") if len(fields) > 4 else b""
        table[pid] = {"ppid": ppid, "uid": uid, "elapsed": elapsed, "args": args,
                      "start": None}
    return table


def ps_table():
    """({pid: record}, pid of the ps child) from ps.

    Raises:
        Failure: ps could not be run or failed.
    """
    try:
        p = subprocess.Popen(PS_ARGV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    except OSError as e:
        raise Failure("cannot run ps: %s" % (e.strerror or e))
    out, err = p.communicate()
    if p.returncode != 0:
        raise Failure("ps failed (exit %d): %s"
                      % (p.returncode, err.decode("utf-8", "replace").strip()[:1000]))
    return parse_ps(out), p.pid


def read(path):
    with open(path, "rb") as f:
        return f.read()


def parse_stat(stat):
    """(comm, state, ppid, start ticks) from /proc/PID/stat (comm may hold ')')."""
    lp, rp = stat.find(b"("), stat.rfind(b")")
    fields = stat[rp + 2:].split()
    return stat[lp + 1:rp], fields[0], int(fields[1]), int(fields[19])


def real_uid(status):
    """The real uid from /proc/PID/status (bytes)."""
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    raise ValueError("no Uid line")


def proc_record(pid, uptime, hz):
    comm, state, ppid, start = parse_stat(read("/proc/%d/stat" % pid))
    uid = real_uid(read("/proc/%d/status" % pid))
    cmdline = read("/proc/%d/cmdline" % pid)
    args = cmdline.rstrip(b"\0").replace(b"\0", b" ")
    if not args:
        args = b"[" + comm + b"]"
        if state == b"Z":
            args += b" <defunct>"
    elapsed = max(0.0, round(uptime - start / hz, 2))
    return {"ppid": ppid, "uid": uid, "elapsed": elapsed, "args": args, "start": start}


def proc_table():
    """{pid: record} from /proc (records as parse_ps's, "start" in clock ticks)."""
    uptime = float(read("/proc/uptime").split()[0])
    hz = float(os.sysconf("SC_CLK_TCK"))
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            table[int(name)] = proc_record(int(name), uptime, hz)
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile, or hidden (hidepid)
    return table


def start_ticks(pid):
    """The start time of ``pid`` in clock ticks since boot; None if it is gone."""
    try:
        return parse_stat(read("/proc/%d/stat" % pid))[3]
    except (OSError, ValueError, IndexError):
        return None


def resolve_signal(name):
    """The number of signal ``name`` (without SIG) or of a decimal number.

    Raises:
        Failure: no such signal here.
    """
    if name.isdigit():
        return int(name)
    num = getattr(signal, "SIG" + name, None)
    if not isinstance(num, int) or name.startswith("_"):
        raise Failure("unknown signal %r" % name, bad_signal=True)
    return int(num)


def ancestors(pid, table):
    """pid and every ancestor of it found in table (a set)."""
    seen = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        rec = table.get(pid)
        if rec is None:
            break
        pid = rec["ppid"]
    return seen


def select(table, pattern, uid, me, children=()):
    """The records (with "pid") of uid whose args hold pattern, sorted by pid.

    Never: me, its ancestors, ``children``, and records with me's args.
    """
    skip = ancestors(me, table) | set(children)
    own = table.get(me, {}).get("args")
    found = []
    for pid in sorted(table):
        rec = table[pid]
        if pid in skip or rec["uid"] != uid or pattern not in rec["args"]:
            continue
        if own is not None and rec["args"] == own:
            continue  # another sshq agent call (farm find/killall among them)
        found.append(dict(rec, pid=pid))
    return found


def send(procs, signum, errors):
    """Signal each process; return those signalled (vanished ones are skipped).

    A failure other than "no such process" is appended to ``errors`` (str).
    """
    done = []
    for rec in procs:
        if rec["start"] is not None and start_ticks(rec["pid"]) != rec["start"]:
            continue  # ended, and maybe its pid reused
        try:
            os.kill(rec["pid"], signum)
        except ProcessLookupError:
            continue
        except OSError as e:
            errors.append("pid %d: %s" % (rec["pid"], e.strerror or e))
            continue
        done.append(rec)
    return done


def user_name(uid):
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def reply(pattern_hex, signal_name=None):
    """List (and signal) this user's processes whose command line holds the pattern.

    Args:
        pattern_hex: the pattern's bytes, as hex (str).
        signal_name: None to list only; else a signal name without SIG or a
            decimal number (str), sent to every match.

    Returns:
        A JSON-ready dict: {"uid": int, "user": str, "procs": [{"pid": int,
        "elapsed": float seconds, "args": hex of the command line bytes}],
        "errors": [str]} (procs sorted by pid; when signalling, only those
        signalled), or {"fatal": str, "bad_signal": bool, "errors": []}.
    """
    out = {"errors": []}  # type: Dict[str, Any]
    try:
        signum = resolve_signal(signal_name) if signal_name else None
        try:
            pattern = bytes.fromhex(pattern_hex)
        except (TypeError, ValueError):
            raise Failure("the pattern is not hex")
        if not pattern:
            raise Failure("the pattern is empty")
        uid = os.getuid()
        children = ()  # type: Tuple[int, ...]
        if os.path.isfile("/proc/uptime") and os.path.isdir("/proc/self"):
            table = proc_table()
        else:
            table, ps_pid = ps_table()
            children = (ps_pid,)
        procs = select(table, pattern, uid, os.getpid(), children)
        if signum is not None:
            procs = send(procs, signum, out["errors"])
        out["uid"] = uid
        out["user"] = user_name(uid)
        out["procs"] = [{"pid": r["pid"], "elapsed": r["elapsed"], "args": r["args"].hex()}
                        for r in procs]
    except Failure as e:
        out["fatal"] = str(e)
        out["bad_signal"] = e.bad_signal
    return out
