"""Find, and kill, the login user's own processes matching a pattern on a host.

The library half of ``sshq farm find PATTERN`` and ``sshq farm killall
PATTERN`` (ANet seed: ``anet --find <match-string>``, ``anet --killall
<match-string>``).  One SSH command per host and per call: a small
stdlib-only Python 3.6+ program (:data:`REMOTE_PROGRAM`) is sent on stdin,
with the request (pattern as hex, signal name) after it, so the pattern never
appears in any command line, is never seen by a shell, and cannot match the
program itself.

How the remote program lists processes:

* On Linux it reads ``/proc``: the real uid from the ``Uid:`` line of
  ``/proc/PID/status``, the parent pid and start time (clock ticks since boot,
  field 22) from ``/proc/PID/stat`` (see ``proc(5)``), the command line from
  ``/proc/PID/cmdline`` with NULs shown as spaces, as ``ps -o args`` shows
  it (``[comm]`` when empty, plus `` <defunct>`` for a zombie).  Elapsed
  time is ``/proc/uptime`` minus the start time.
* Elsewhere (no ``/proc``: BSD, macOS) it runs ``ps -A -ww -o pid= -o ppid=
  -o ruid= -o etime= -o args=``; ``etime`` (``[[dd-]hh:]mm:ss``, POSIX) is
  used rather than the non-POSIX ``etimes``.

A process is a match when its real uid is the remote program's own real uid
(the login user's, as ``id -u`` says, whatever name the config gives) and
PATTERN, a plain substring compared byte for byte (UTF-8, no regex, no
glob), occurs in its command line.  Never matched: the program itself, its
ancestors (the login shell, the ``sshd`` session), its own children, and
other running instances of the same program (another ``sshq farm find`` or
``killall``: their command line is identical to ours).

Killing lists and signals in the same remote program, so no pid can be
reused between two SSH round trips; on Linux each pid's start time is
checked again right before ``kill(2)``, which leaves a window of
microseconds.  A process that ended meanwhile is simply not reported.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..exceptions import CommandError, ConfigError, RemoteError
from ..transport import Transport

__all__ = ["RemoteProcess", "find_processes", "kill_processes", "REMOTE_PROGRAM"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteProcess:
    """One process of the login user on a host.

    Attributes:
        host: the transport's host label (``[user@]host[:port]``).
        pid: process id on that host.
        user: the owner's (real uid's) login name; the uid in decimal when
            the remote password database has no name for it.
        elapsed: seconds since the process started (resolution: one clock
            tick on Linux, one second from ``ps``).
        args: the command line as ``ps -o args`` shows it, decoded from UTF-8
            with replacement characters.
    """

    host: str
    pid: int
    user: str
    elapsed: float
    args: str


#: The remote program: standard library only, Python 3.6+ (it runs on old
#: login nodes), reads its JSON request from the rest of stdin and prints one
#: JSON reply between two fences carrying the request's nonce.
REMOTE_PROGRAM = r'''
import json
import os
import signal
import subprocess
import sys

PS_ARGV = ["ps", "-A", "-ww", "-o", "pid=", "-o", "ppid=", "-o", "ruid=",
           "-o", "etime=", "-o", "args="]


def parse_etime(text):
    """Seconds from ps's etime, [[dd-]hh:]mm:ss; None if unreadable."""
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
    """{pid: record} from the output of PS_ARGV; unreadable lines are skipped."""
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
    """({pid: record}, pid of the ps child) from ps."""
    p = subprocess.Popen(PS_ARGV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    out, err = p.communicate()
    if p.returncode != 0:
        raise Failure("ps failed (exit %d): %s"
                      % (p.returncode, err.decode("utf-8", "replace").strip()))
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
    try:
        return parse_stat(read("/proc/%d/stat" % pid))[3]
    except (OSError, ValueError, IndexError):
        return None


class Failure(Exception):
    pass


def resolve_signal(name):
    if name.isdigit():
        return int(name)
    num = getattr(signal, "SIG" + name, None)
    if not isinstance(num, int) or name.startswith("_"):
        raise Failure("unknown signal %r" % name)
    return int(num)


def ancestors(pid, table):
    """pid and every ancestor of it found in table."""
    seen = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        rec = table.get(pid)
        if rec is None:
            break
        pid = rec["ppid"]
    return seen


def select(table, pattern, uid, me, children=()):
    """The records (with "pid") of uid whose args hold pattern, sorted by pid."""
    skip = ancestors(me, table) | set(children)
    own = table.get(me, {}).get("args")
    found = []
    for pid in sorted(table):
        rec = table[pid]
        if pid in skip or rec["uid"] != uid or pattern not in rec["args"]:
            continue
        if own is not None and rec["args"] == own:
            continue  # another sshq farm find/killall
        found.append(dict(rec, pid=pid))
    return found


def send(procs, signum, errors):
    """Signal each process; return those signalled (vanished ones are skipped)."""
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


def main():
    req = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    nonce = req["nonce"]
    reply = {"errors": []}
    try:
        signum = resolve_signal(req["signal"]) if req.get("signal") else None
        pattern = bytes.fromhex(req["pattern"])
        uid = os.getuid()
        children = ()
        if os.path.isfile("/proc/uptime") and os.path.isdir("/proc/self"):
            table = proc_table()
        else:
            table, ps_pid = ps_table()
            children = (ps_pid,)
        procs = select(table, pattern, uid, os.getpid(), children)
        if signum is not None:
            procs = send(procs, signum, reply["errors"])
        reply["uid"] = uid
        reply["user"] = user_name(uid)
        reply["procs"] = [{"pid": r["pid"], "elapsed": r["elapsed"],
                           "args": r["args"].hex()} for r in procs]
    except Failure as e:
        reply["fatal"] = str(e)
    out = sys.stdout.buffer
    out.write(("\n==SSHQ-PROCS-BEGIN %s==\n" % nonce).encode("ascii"))
    out.write(json.dumps(reply).encode("utf-8"))
    out.write(("\n==SSHQ-PROCS-END %s==\n" % nonce).encode("ascii"))
    out.flush()


if __name__ == "__main__":
    main()
'''

#: Reads the length-prefixed program from stdin and runs it; the rest of
#: stdin is the request.  Fixed text: every instance has the same command line.
_BOOTSTRAP = (
    "import sys;b=sys.stdin.buffer;"
    "exec(compile(b.read(int(b.readline())),'<sshq-farm-procs>','exec'))"
)

_SIGNAL_RE = re.compile(r"(?:[0-9]{1,3}|[A-Z][A-Z0-9]*)\Z")


def check_pattern(pattern: str) -> bytes:
    """The pattern's bytes as matched remotely (UTF-8; surrogate escapes kept).

    Raises:
        ConfigError: the pattern is empty, holds a NUL or a line break, or
            cannot be encoded.
    """
    if not pattern:
        raise ConfigError("the process pattern is empty (it would match everything)")
    if "\0" in pattern or "\n" in pattern or "\r" in pattern:
        raise ConfigError(f"the process pattern {pattern!r} holds a NUL or a line break")
    try:
        return pattern.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ConfigError(f"the process pattern {pattern!r} cannot be encoded: {e}") from e


def check_signal(signal: str) -> str:
    """A signal name without ``SIG``, upper case (``"term"`` → ``"TERM"``), or a number.

    The name is resolved on the remote host (signal numbers differ between
    systems).

    Raises:
        ConfigError: not a signal name or a number from 1 to 127.
    """
    name = signal.strip().upper()
    if name.startswith("SIG"):
        name = name[3:]
    if not _SIGNAL_RE.match(name) or (name.isdigit() and not 1 <= int(name) <= 127):
        raise ConfigError(f"invalid signal {signal!r}")
    return name


def _request(pattern: bytes, signal: str | None) -> tuple[str, bytes]:
    nonce = secrets.token_hex(12)
    program = REMOTE_PROGRAM.encode("utf-8")
    req = {"nonce": nonce, "pattern": pattern.hex(), "signal": signal}
    return nonce, b"%d\n" % len(program) + program + json.dumps(req).encode("utf-8")


def parse_reply(host: str, nonce: str, stdout: bytes) -> dict[str, Any] | None:
    """The remote program's reply between its fences; None if there is none.

    Bytes outside the fences (login banners) are ignored.

    Raises:
        RemoteError: the fenced text is not a JSON object.
    """
    begin = f"\n==SSHQ-PROCS-BEGIN {nonce}==\n".encode("ascii")
    end = f"\n==SSHQ-PROCS-END {nonce}==\n".encode("ascii")
    i = stdout.find(begin)
    if i < 0:
        return None
    j = stdout.find(end, i + len(begin))
    if j < 0:
        return None
    try:
        reply = json.loads(stdout[i + len(begin):j].decode("utf-8", "replace"))
    except ValueError as e:
        raise RemoteError(f"{host}: unreadable process list: {e}") from e
    if not isinstance(reply, dict):
        raise RemoteError(f"{host}: unreadable process list: not an object")
    return reply


def _processes(host: str, reply: dict[str, Any]) -> list[RemoteProcess]:
    try:
        user = str(reply["user"])
        return [
            RemoteProcess(
                host=host,
                pid=int(p["pid"]),
                user=user,
                elapsed=float(p["elapsed"]),
                args=bytes.fromhex(p["args"]).decode("utf-8", "replace"),
            )
            for p in reply["procs"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise RemoteError(f"{host}: unreadable process list: {e!r}") from e


async def _run(
    transport: Transport, pattern: str, signal: str | None, python: str, timeout: float | None
) -> list[RemoteProcess]:
    pat = check_pattern(pattern)
    sig = check_signal(signal) if signal is not None else None
    nonce, stdin = _request(pat, sig)
    host = transport.host
    result = await transport.run([python, "-c", _BOOTSTRAP], stdin=stdin, timeout=timeout)
    reply = parse_reply(host, nonce, result.stdout)
    if reply is None:
        err = result.stderr.decode("utf-8", "replace").strip() or "no output"
        if result.exit_status == 127 or "not found" in err.lower() or "No such file" in err:
            raise CommandError(
                f"{host}: cannot start {python!r} (exit {result.exit_status}): {err}",
                host=host,
            )
        raise RemoteError(
            f"{host}: the process lister gave no reply (exit {result.exit_status}): {err}"
        )
    if "fatal" in reply:
        msg = f"{host}: {reply['fatal']}"
        if str(reply["fatal"]).startswith("unknown signal"):
            raise ConfigError(msg)
        raise RemoteError(msg)
    for e in reply.get("errors") or []:
        log.warning("%s: could not signal %s", host, e)
    procs = _processes(host, reply)
    log.debug("%s: %d process(es) match %r%s", host, len(procs), pattern,
              f", sent SIG{sig}" if sig else "")
    return procs


async def find_processes(
    transport: Transport, pattern: str, *, python: str = "python3",
    timeout: float | None = 60.0,
) -> list[RemoteProcess]:
    """The login user's processes on the host whose command line contains ``pattern``.

    One SSH command.  Only processes whose real uid is the login user's are
    listed; never this command itself, its ancestors (login shell, ``sshd``
    session) nor another ``find``/``kill`` in progress.

    Args:
        transport: the host's transport.
        pattern: a plain substring (not a regex) of the command line as
            ``ps -o args`` shows it (arguments joined by single spaces).
        python: the remote Python 3.6+ interpreter.
        timeout: seconds for the whole remote command; None for no limit.

    Returns:
        The matching processes, sorted by pid; ``[]`` when none match.

    Raises:
        ConfigError: the pattern is empty or holds a NUL or a line break
            (raised before anything is sent).
        TransportError: the host could not be reached.
        CommandError: ``python`` could not be started on the host.
        RemoteError: the remote program failed or replied nonsense.
    """
    return await _run(transport, pattern, None, python, timeout)


async def kill_processes(
    transport: Transport, pattern: str, *, signal: str = "TERM", python: str = "python3",
    timeout: float | None = 60.0,
) -> list[RemoteProcess]:
    """Send ``signal`` to the processes :func:`find_processes` would list.

    Listing and signalling happen in one remote program (one SSH command),
    so a pid cannot be reused in between.  A process that ended meanwhile is
    not an error: it is left out of the result.  One that could not be
    signalled for another reason is logged as a warning and left out.

    Args:
        transport: the host's transport.
        pattern: a plain substring of the command line (see
            :func:`find_processes`).
        signal: a signal name with or without ``SIG`` (``TERM``, ``sigkill``,
            ``USR1``), resolved on the remote host, or a number from 1 to 127.
        python: the remote Python 3.6+ interpreter.
        timeout: seconds for the whole remote command; None for no limit.

    Returns:
        The processes that were signalled, sorted by pid (as they were just
        before the signal).

    Raises:
        ConfigError: the pattern is empty or holds a NUL or a line break, or
            the signal is not a valid name (before anything is sent) or is
            unknown on the host.
        TransportError: the host could not be reached.
        CommandError: ``python`` could not be started on the host.
        RemoteError: the remote program failed or replied nonsense.
    """
    return await _run(transport, pattern, signal, python, timeout)
