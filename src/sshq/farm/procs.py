"""Find, and kill, the login user's own processes matching a pattern on a host.

The client half of ``sshq farm find PATTERN`` and ``sshq farm killall
PATTERN`` (ANet seed: ``anet --find <match-string>``, ``anet --killall
<match-string>``).  One agent call per host and per call (the agent's
``procs`` operation, through :func:`~sshq.remote.operations.call_agent`, like
every other remote operation), so the platform's ``python``, ``login_shell``
and ``path_prepend`` apply.  The remote half is the shipped module
``sshq/shipped/sshq_procs.py``, bundled with the agent; its header says how
processes are listed.

The request (pattern as hex, signal name) travels in the agent's JSON request
on stdin, so the pattern never appears in any command line, is never seen by
a shell, and cannot match the agent itself.

A process is a match when its real uid is the agent's own real uid (the
login user's, as ``id -u`` says, whatever name the config gives) and
PATTERN, a plain substring compared byte for byte (UTF-8, no regex, no
glob), occurs in its command line (as ``ps -o args`` shows it).  Never
matched: the agent itself, its ancestors (the login shell, the ``sshd``
session), its own children (``ps``, where there is no ``/proc``), and
processes with exactly the agent's command line (other agent calls, another
``sshq farm find`` or ``killall`` among them: every agent call is ``python3
-c <BOOTSTRAP>``).

Killing lists and signals in the same agent call, so no pid can be reused
between two SSH round trips; on Linux each pid's start time is checked again
right before ``kill(2)``, which leaves a window of microseconds.  A process
that ended meanwhile is simply not reported.

The reply is untrusted: it is validated field by field into
:class:`RemoteProcess` (bounded numbers, hex command lines) and a bad reply
is a :class:`~sshq.exceptions.RemoteError` naming the host.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..exceptions import ConfigError, RemoteError
from ..remote.operations import call_agent
from ..transport import Transport

__all__ = ["RemoteProcess", "find_processes", "kill_processes", "check_pattern",
           "check_signal", "processes_from_reply"]

log = logging.getLogger(__name__)

#: The most per-process signalling errors logged for one host.
_MAX_LOGGED_ERRORS = 20
#: The most characters of one remote string (user name, error) kept.
_MAX_TEXT = 1000


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


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value[:_MAX_TEXT]


def _process(host: str, user: str, p: Any) -> RemoteProcess:
    if not isinstance(p, dict):
        raise ValueError("a process is not an object")
    pid, elapsed, args = p.get("pid"), p.get("elapsed"), p.get("args")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        raise ValueError(f"bad pid {pid!r:.40}")
    if (not isinstance(elapsed, int | float) or isinstance(elapsed, bool)
            or not math.isfinite(elapsed) or not 0 <= elapsed < 1e10):
        raise ValueError(f"bad elapsed time {elapsed!r:.40}")
    if not isinstance(args, str):
        raise ValueError("a command line is not hex text")
    return RemoteProcess(host=host, pid=pid, user=user, elapsed=float(elapsed),
                         args=bytes.fromhex(args).decode("utf-8", "replace"))


def processes_from_reply(host: str, reply: dict[str, Any]) -> list[RemoteProcess]:
    """The processes of the agent's ``procs`` reply, validated.

    Args:
        host: the host label, for the processes and for messages.
        reply: the agent's reply frame (untrusted).

    Returns:
        The processes in the reply's order (the agent sorts them by pid).

    Raises:
        ConfigError: the host does not know the signal.
        RemoteError: the agent reported a failure, or the reply is malformed.
    """
    fatal = reply.get("fatal")
    if fatal is not None:
        msg = f"{host}: {str(fatal)[:_MAX_TEXT]}"
        if reply.get("bad_signal") is True:
            raise ConfigError(msg)
        raise RemoteError(msg)
    try:
        user = _text(reply.get("user"), "the user name")
        procs = reply.get("procs")
        if not isinstance(procs, list):
            raise ValueError("no process list")
        found = [_process(host, user, p) for p in procs]
        errors = reply.get("errors", [])
        if not isinstance(errors, list):
            raise ValueError("errors is not a list")
    except ValueError as e:
        raise RemoteError(f"{host}: unreadable process list: {e}") from e
    for err in errors[:_MAX_LOGGED_ERRORS]:
        log.warning("%s: could not signal %s", host, str(err)[:_MAX_TEXT])
    if len(errors) > _MAX_LOGGED_ERRORS:
        log.warning("%s: ... and %d more signalling errors", host,
                    len(errors) - _MAX_LOGGED_ERRORS)
    return found


async def _run(
    transport: Transport, pattern: str, signal: str | None, *, python: str,
    login_shell: bool, path_prepend: Sequence[str], timeout: float | None,
) -> list[RemoteProcess]:
    pat = check_pattern(pattern)
    sig = check_signal(signal) if signal is not None else None
    reply = await call_agent(transport, python, "procs", {"pattern": pat.hex(), "signal": sig},
                             timeout=timeout, login_shell=login_shell,
                             path_prepend=path_prepend)
    procs = processes_from_reply(transport.host, reply)
    log.debug("%s: %d process(es) match %r%s", transport.host, len(procs), pattern,
              f", sent SIG{sig}" if sig else "")
    return procs


async def find_processes(
    transport: Transport, pattern: str, *, python: str = "python3",
    login_shell: bool = False, path_prepend: Sequence[str] = (),
    timeout: float | None = 60.0,
) -> list[RemoteProcess]:
    """The login user's processes on the host whose command line contains ``pattern``.

    One agent call (one SSH command).  Only processes whose real uid is the
    login user's are listed; never the agent itself, its ancestors (login
    shell, ``sshd`` session), its children, nor another agent call in
    progress (another ``find``/``kill`` among them).

    Args:
        transport: the host's transport.
        pattern: a plain substring (not a regex) of the command line as
            ``ps -o args`` shows it (arguments joined by single spaces).
        python: the remote Python 3.6+ interpreter (the platform's ``python``).
        login_shell: start the agent from ``bash -l`` (the platform's
            ``login_shell``).
        path_prepend: absolute remote directories put before the agent's
            PATH (the platform's ``path_prepend``; ``ps`` is looked up there
            on hosts without ``/proc``).
        timeout: seconds for the whole remote command; None for no limit.

    Returns:
        The matching processes, sorted by pid; ``[]`` when none match.

    Raises:
        ConfigError: the pattern is empty or holds a NUL or a line break
            (raised before anything is sent).
        TransportError: the host could not be reached.
        CommandError: ``python`` could not be started on the host.
        RemoteError: the agent failed or replied nonsense.
    """
    return await _run(transport, pattern, None, python=python, login_shell=login_shell,
                      path_prepend=path_prepend, timeout=timeout)


async def kill_processes(
    transport: Transport, pattern: str, *, signal: str = "TERM", python: str = "python3",
    login_shell: bool = False, path_prepend: Sequence[str] = (),
    timeout: float | None = 60.0,
) -> list[RemoteProcess]:
    """Send ``signal`` to the processes :func:`find_processes` would list.

    Listing and signalling happen in one agent call (one SSH command), so a
    pid cannot be reused in between.  A process that ended meanwhile is not
    an error: it is left out of the result.  One that could not be signalled
    for another reason is logged as a warning and left out.

    Args:
        transport: the host's transport.
        pattern: a plain substring of the command line (see
            :func:`find_processes`).
        signal: a signal name with or without ``SIG`` (``TERM``, ``sigkill``,
            ``USR1``), resolved on the remote host, or a number from 1 to 127.
        python: the remote Python 3.6+ interpreter (the platform's ``python``).
        login_shell: start the agent from ``bash -l``.
        path_prepend: absolute remote directories put before the agent's PATH.
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
        RemoteError: the agent failed or replied nonsense.
    """
    return await _run(transport, pattern, signal, python=python, login_shell=login_shell,
                      path_prepend=path_prepend, timeout=timeout)
