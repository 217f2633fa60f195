"""A farm run's local state: the journal and the run directory.

``<state_dir>/farm/<run>/`` holds ``batch`` (a copy of the batch file, so
``--resume`` runs exactly what was asked), ``options.json``, ``journal``
(one JSON object per line, appended at every state change), ``output/``
(task output too long to be carried in a result), ``lock`` (held by the
client working on the run: pid and host) and, while the run is paused,
``paused``.

Journal events (``e``): ``run`` (start of an invocation), ``start`` (a copy
of task ``seq`` started on ``host``), ``lost`` (its host went away),
``result`` (the task's result was written to the output: it is reported),
``host`` (a host was dropped).  A task is reported exactly once: the
``result`` line is appended right after the result is written, with no
pause in between, and ``--resume`` skips reported tasks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..exceptions import ConfigError
from .batch import count_lines

__all__ = ["RunDir", "check_run_name", "new_run_name"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_run_name(name: str) -> str:
    """Refuse a run name that is not a plain file name.

    Raises:
        ConfigError: naming the problem.
    """
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid run name {name!r}: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit")
    return name


def new_run_name() -> str:
    """A fresh run name: ``farm-YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("farm-%Y%m%d-%H%M%S-", time.localtime()) + secrets.token_hex(2)


class RunDir:
    """One run's directory in the state dir.

    Args:
        state_dir: sshq's state directory.
        name: the run name (checked).
    """

    def __init__(self, state_dir: Path, name: str) -> None:
        self.name = check_run_name(name)
        self.path = Path(state_dir) / "farm" / name
        self._fh: Any = None
        self._lock_fd: int | None = None

    @property
    def batch(self) -> Path:
        return self.path / "batch"

    @property
    def paused_flag(self) -> Path:
        return self.path / "paused"

    @property
    def output_dir(self) -> Path:
        """Where output too long to be carried in a result goes (``<seq>.stdout``,
        ``<seq>.stderr``)."""
        return self.path / "output"

    def exists(self) -> bool:
        return (self.path / "options.json").is_file()

    def create(self, batch_file: Path, options: dict[str, Any]) -> None:
        """Make the directory, copy the batch file, record the options.

        Raises:
            ConfigError: the run exists already.
        """
        if self.exists():
            raise ConfigError(
                f"a farm run named {self.name!r} exists already; resume it with"
                f" `sshq farm --resume {self.name}` or choose another --run name")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.batch.with_suffix(".tmp")
        try:
            shutil.copyfile(batch_file, tmp)
        except OSError as exc:
            raise ConfigError(f"cannot read the batch file {batch_file}: {exc.strerror}") from None
        os.replace(tmp, self.batch)
        (self.path / "options.json").write_text(json.dumps(options, indent=1))

    def options(self) -> dict[str, Any]:
        """The options recorded when the run was created.

        Raises:
            ConfigError: no such run.
        """
        try:
            data: dict[str, Any] = json.loads((self.path / "options.json").read_text())
        except (OSError, ValueError):
            raise ConfigError(f"no farm run named {self.name!r}") from None
        return data

    def replay(self) -> tuple[bytearray, int]:
        """Read the journal.

        A ``result`` line whose seq is not a line of the run's batch file (a
        journal written before such results were refused, or damaged) is
        skipped, as are lines that do not parse.

        Returns:
            ``(reported, starts)``: a bitmap indexed by seq, one byte per line
            of the batch file plus one (non-zero: the task's result was
            reported), and the number of starts recorded.
        """
        try:
            lines = count_lines(self.batch)
        except OSError:
            lines = 0
        reported = bytearray(lines + 1)
        starts = 0
        for ev in self.events():
            if ev.get("e") == "result":
                seq = ev.get("seq")
                if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq <= lines:
                    reported[seq] = 1
            elif ev.get("e") == "start":
                starts += 1
        return reported, starts

    def events(self) -> Iterator[dict[str, Any]]:
        """The journal's events in order (objects; a line that does not parse,
        e.g. cut short by a crash, is skipped; none without a journal)."""
        try:
            fh = open(self.path / "journal", "rb")
        except FileNotFoundError:
            return
        with fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(ev, dict):
                    yield ev

    def results(self) -> dict[int, dict[str, Any]]:
        """The journalled ``result`` events by seq (> 0): their ``host``,
        ``exit_status`` and ``signal``."""
        out: dict[int, dict[str, Any]] = {}
        for ev in self.events():
            seq = ev.get("seq") if ev.get("e") == "result" else None
            if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
                out[seq] = {k: ev.get(k) for k in ("host", "exit_status", "signal")}
        return out

    def lock(self) -> None:
        """Take the run's lock, held until :meth:`close` (or this process ends).

        One client works on a run at a time: a second ``--resume`` or
        ``attach`` would run or report its tasks again.  The lock is an
        ``flock`` on ``<run>/lock``, which the kernel releases when its holder
        dies; the file names the holder (pid and host) for the message.

        Raises:
            ConfigError: another live client holds the lock (naming its pid
                and host).
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise ConfigError(f"farm run {self.name!r}: cannot lock"
                                  f" {self.path / 'lock'}: {exc.strerror}") from None
            holder = os.read(fd, 256).decode("utf-8", "replace").split()
            os.close(fd)
            pid = holder[0] if holder else "?"
            host = holder[1] if len(holder) > 1 else "?"
            raise ConfigError(
                f"farm run {self.name!r} is in use by another sshq client (pid {pid} on"
                f" {host}); wait for it to end, or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def open_journal(self) -> None:
        self._fh = open(self.path / "journal", "a", buffering=1, encoding="utf-8")

    def log(self, event: str, **fields: Any) -> None:
        """Append one event (one line, flushed at once)."""
        if self._fh is not None:
            fields["e"] = event
            fields["t"] = round(time.time(), 3)
            self._fh.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Close the journal and release the lock (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None
