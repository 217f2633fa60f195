"""Task results and how they are written.

Formats:

* ``jsonl``: one JSON object per task with ``seq`` (1-based line number),
  ``command``, ``host``, ``exit_status`` (None when a signal ended it),
  ``signal`` (name such as ``"TERM"``, or None), ``stdout``, ``stderr``
  (text; ``stdout_b64``/``stderr_b64`` instead when the bytes are not valid
  UTF-8; likewise ``command_b64`` for a batch line that is not UTF-8),
  ``start``, ``end`` (epoch seconds, the host's clock),
  ``attempts``, and ``timed_out`` / ``error`` when they apply.  With
  ``--output-dir`` the output is in files and the object names them
  (``stdout_file``, ``stderr_file``).  Without it, a stream longer than
  :data:`INLINE_MAX` is in a file too, ``<state dir>/farm/<run>/output/
  <seq>.stdout`` (or ``.stderr``), named the same way: the client never
  holds a task's whole output in memory, whatever the task prints.
* ``anet``: the ANet seed's binary framing, per task: request id (the seq)
  as a 32-bit little-endian integer, the length as a 32-bit little-endian
  integer, then the task's stdout bytes (copied from its file in chunks when
  it is in one).

Memory: one stream of one task is held in memory up to :data:`INLINE_MAX`
bytes, and all tasks' output held at once up to :data:`MEMORY_BUDGET`
bytes (a :class:`Budget`); past either, the output goes to a file as it
arrives (:class:`StreamBuffer`).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal as signal_mod
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

__all__ = ["TaskResult", "ResultWriter", "ResultSink", "make_writer", "signal_name",
           "INLINE_MAX", "MEMORY_BUDGET", "Budget", "StreamBuffer", "TaskOutput",
           "result_fields", "spill_note", "printable"]

#: Bytes of one stream (stdout or stderr) of one task carried in its result;
#: a longer stream is written to a file and the result names the file.
INLINE_MAX = 4 << 20
#: Bytes of task output one client holds in memory at once, over every task
#: in flight or waiting to be reported (``--keep-order``); past it, output
#: goes to files as it arrives and is read back when it is reported.
MEMORY_BUDGET = 64 << 20
_COPY_CHUNK = 1 << 20


def signal_name(num: int | None) -> str | None:
    """``15`` -> ``"TERM"``; None stays None."""
    if not num:
        return None
    try:
        return signal_mod.Signals(num).name.removeprefix("SIG")
    except ValueError:
        return str(num)


@dataclass(slots=True, kw_only=True)
class TaskResult:
    """The reported result of one task.

    Attributes:
        seq: 1-based line number in the batch file.
        command: the shell command.
        host: label of the host whose copy produced this result.
        exit_status: the command's exit status; None if a signal ended it.
        signal: the signal's name, or None.
        stdout, stderr: the output (bytes; empty when written to files).
        start, end: epoch seconds on the host's clock (None if never started).
        attempts: how many times the task was started.
        timed_out: ``--timeout`` ended it.
        error: why sshq gave up on the task (e.g. it kept losing its host).
        stdout_file, stderr_file: with ``--output-dir``, where the output is.
    """

    seq: int
    command: str
    host: str | None
    exit_status: int | None
    signal: str | None
    stdout: bytes = b""
    stderr: bytes = b""
    start: float | None = None
    end: float | None = None
    attempts: int = 0
    timed_out: bool = False
    error: str | None = None
    stdout_file: str | None = None
    stderr_file: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.signal is None and self.error is None

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"seq": self.seq}
        try:
            self.command.encode("utf-8")
            d["command"] = self.command
        except UnicodeEncodeError:  # not UTF-8 in the batch file: keep it exact
            d["command_b64"] = base64.b64encode(
                self.command.encode("utf-8", "surrogateescape")).decode("ascii")
        d.update(host=self.host, exit_status=self.exit_status, signal=self.signal)
        for name, data, path in (("stdout", self.stdout, self.stdout_file),
                                 ("stderr", self.stderr, self.stderr_file)):
            if path is not None:
                d[f"{name}_file"] = path
                continue
            try:
                d[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                d[f"{name}_b64"] = base64.b64encode(data).decode("ascii")
        d.update(start=self.start, end=self.end, attempts=self.attempts)
        if self.timed_out:
            d["timed_out"] = True
        if self.error:
            d["error"] = self.error
        return d


class ResultWriter:
    """Writes results to a binary stream in the chosen format.

    Args:
        out: the stream (stdout's buffer).
        fmt: ``jsonl`` or ``anet``.
    """

    def __init__(self, out: BinaryIO, fmt: str = "jsonl") -> None:
        if fmt not in ("jsonl", "anet"):
            raise ValueError(f"unknown format {fmt!r}")
        self.out = out
        self.fmt = fmt

    def write(self, r: TaskResult) -> None:
        """Write one result and flush it."""
        if self.fmt == "jsonl":
            line = json.dumps(r.to_json(), ensure_ascii=False, separators=(", ", ": "))
            self.out.write(line.encode("utf-8") + b"\n")
        elif r.stdout_file is None:
            data = r.stdout
            self.out.write(struct.pack("<II", r.seq & 0xFFFFFFFF, len(data)) + data)
        else:   # copied in chunks: memory stays bounded whatever the file's size
            with open(r.stdout_file, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > 0xFFFFFFFF:
                    raise ValueError(f"task {r.seq}: {size} bytes of stdout do not fit in"
                                     " an anet frame (4 GiB at most)")
                self.out.write(struct.pack("<II", r.seq & 0xFFFFFFFF, size))
                left = size
                while left > 0:
                    chunk = fh.read(min(_COPY_CHUNK, left))
                    if not chunk:   # the file shrank: keep the frame's length
                        chunk = bytes(min(_COPY_CHUNK, left))
                    self.out.write(chunk)
                    left -= len(chunk)
        self.out.flush()


def output_paths(directory: Path, seq: int) -> tuple[Path, Path]:
    """``(stdout_path, stderr_path)`` of a task in ``--output-dir``."""
    return directory / f"{seq}.stdout", directory / f"{seq}.stderr"


def ensure_dir(directory: Path) -> Path:
    os.makedirs(directory, exist_ok=True)
    return directory


class Budget:
    """Bytes of task output held in memory by one client, shared by its buffers.

    Args:
        limit: bytes (default :data:`MEMORY_BUDGET`).
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = MEMORY_BUDGET) -> None:
        self.limit = limit
        self.used = 0


class StreamBuffer:
    """One stream of one copy of a task: memory, then a file.

    The bytes stay in memory while the stream is at most :data:`INLINE_MAX`
    bytes long and ``budget`` has room; past that they go to ``part`` (created
    then, mode 0600), and so does all that follows.

    Args:
        part: the file to spill to (its directory is created when needed).
        budget: the client's :class:`Budget`.
        to_file: write everything to ``part`` (``--output-dir``).
    """

    __slots__ = ("_budget", "_fh", "buf", "part", "size", "spilled", "to_file")

    def __init__(self, part: Path, budget: Budget, *, to_file: bool = False) -> None:
        self.part = part
        self._budget = budget
        self.to_file = to_file
        self.buf = bytearray()
        self._fh: BinaryIO | None = None
        self.spilled = False
        self.size = 0

    def add(self, data: bytes) -> None:
        """Append bytes.

        Raises:
            OSError: the spill file cannot be written.
        """
        self.size += len(data)
        if not self.spilled:
            n = len(self.buf) + len(data)
            if (not self.to_file and n <= INLINE_MAX
                    and self._budget.used + len(data) <= self._budget.limit):
                self.buf += data
                self._budget.used += len(data)
                return
            self._spill()
        assert self._fh is not None
        self._fh.write(data)

    def _spill(self) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fh = open(fd, "wb")
        self._fh.write(self.buf)
        self._release()
        self.spilled = True

    def _release(self) -> None:
        self._budget.used -= len(self.buf)
        self.buf = bytearray()

    def close(self) -> None:
        """No more bytes come: close the spill file (its bytes stay in it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def in_file(self) -> bool:
        """Whether the result names a file for this stream rather than carry it."""
        return self.to_file or self.size > INLINE_MAX

    def place(self, final: Path) -> str:
        """Move the stream (a file stream, see :attr:`in_file`) to ``final``; its path."""
        if not self.spilled:
            self._spill()
        self.close()
        os.replace(self.part, final)
        return str(final)

    def take(self) -> bytes:
        """The bytes of a stream carried in the result (at most :data:`INLINE_MAX`),
        read back from the spill file if the budget had sent them there."""
        self.close()
        if self.spilled:
            data = self.part.read_bytes()[:INLINE_MAX]
            self.part.unlink(missing_ok=True)
            self.spilled = False
            return data
        data = bytes(self.buf)
        self._release()
        return data

    def discard(self) -> None:
        """Forget the bytes (a lost or losing copy)."""
        self.close()
        if self.spilled:
            self.part.unlink(missing_ok=True)
            self.spilled = False
        self._release()


class TaskOutput:
    """Both streams of one copy of a task (see :class:`StreamBuffer`).

    Args:
        directory: where the part files go (``--output-dir``, or the run's
            ``output`` directory).
        stem: a name unique to the copy, e.g. ``"12.7"`` (seq, copy id).
        budget: the client's :class:`Budget`.
        to_files: write both streams to files (``--output-dir``).
    """

    __slots__ = ("streams",)

    def __init__(self, directory: Path, stem: str, budget: Budget, *,
                 to_files: bool = False) -> None:
        self.streams = tuple(StreamBuffer(directory / f".{stem}.{name}.part", budget,
                                          to_file=to_files) for name in ("stdout", "stderr"))

    def add(self, stream: int, data: bytes) -> None:
        """Append ``data`` to stream 1 (stdout) or 2 (stderr)."""
        self.streams[stream - 1].add(data)

    def close(self) -> None:
        for s in self.streams:
            s.close()

    def discard(self) -> None:
        for s in self.streams:
            s.discard()

    def settle(self, r: TaskResult, directory: Path) -> None:
        """The task's result is decided: move the streams that go to files to
        ``directory/<seq>.stdout`` and ``.stderr`` and name them in ``r``."""
        out, err = output_paths(directory, r.seq)
        if self.streams[0].in_file:
            r.stdout_file = self.streams[0].place(out)
        if self.streams[1].in_file:
            r.stderr_file = self.streams[1].place(err)

    def fill(self, r: TaskResult) -> None:
        """Put the streams carried in the result into ``r`` (just before it is written)."""
        if r.stdout_file is None:
            r.stdout = self.streams[0].take()
        if r.stderr_file is None:
            r.stderr = self.streams[1].take()


def spill_note(r: TaskResult, *, output_dir: bool = False) -> str | None:
    """A line for the user when a stream of ``r`` went to a file because it is
    long (not because of ``--output-dir``); None otherwise."""
    if output_dir:
        return None
    files = [(name, path) for name, path in (("stdout", r.stdout_file),
                                             ("stderr", r.stderr_file)) if path]
    if not files:
        return None
    what = "; ".join(f"{name} ({_size(path)}) is in {path}" for name, path in files)
    return (f"task {r.seq}: output over {INLINE_MAX >> 20} MiB is not carried in the"
            f" result: {what}")


def _size(path: str) -> str:
    try:
        n = os.stat(path).st_size
    except OSError:
        return "? bytes"
    return f"{n} bytes"


def copy_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` in chunks."""
    with open(src, "rb") as a, open(dest, "wb") as b:
        shutil.copyfileobj(a, b, _COPY_CHUNK)


_MAX_INT = 1 << 62


def _int(v: Any, lo: int, hi: int) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
        return v
    return None


def _time(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and 0 <= v < 1e11:
        return float(v)
    return None


def printable(v: object, limit: int) -> str:
    """``v`` as text for a message: at most ``limit`` characters, control
    characters (and anything not printable) replaced by ``?``."""
    text = v if isinstance(v, str) else repr(v)
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


def _label(v: Any) -> str | None:
    if isinstance(v, str) and 0 < len(v) <= 255:
        return printable(v, 255)
    return None


def result_fields(head: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``done`` frame (from a dispatcher, untrusted), checked.

    A value of the wrong type or out of range becomes None (``attempt``: 1);
    nothing raises.

    Returns:
        ``{"exit_status", "signal" (name), "start", "end", "timed_out",
        "killed", "attempt", "node", "host"}``.
    """
    sig = _int(head.get("signal"), 0, 255)
    rc = _int(head.get("exit_status"), -(1 << 31), (1 << 31) - 1)
    return {
        "exit_status": None if sig else rc,
        "signal": signal_name(sig),
        "start": _time(head.get("start")),
        "end": _time(head.get("end")),
        "timed_out": head.get("timed_out") is True,
        "killed": head.get("killed") is True,
        "attempt": _int(head.get("attempt"), 1, _MAX_INT) or 1,
        "node": _label(head.get("node")),
        "host": _label(head.get("host")),
    }


class _Writes(Protocol):
    def write(self, r: TaskResult) -> None: ...


#: Where results go: a binary stream (written in ``fmt``) or a callable.
ResultSink = BinaryIO | Callable[[TaskResult], None]


class _CallbackWriter:
    def __init__(self, fn: Callable[[TaskResult], None]) -> None:
        self.write = fn


def make_writer(out: ResultSink, fmt: str = "jsonl") -> _Writes:
    """A writer for ``out``: a :class:`ResultWriter` for a stream, else the callable."""
    if callable(out) and not hasattr(out, "write"):
        return _CallbackWriter(out)
    return ResultWriter(out, fmt)  # type: ignore[arg-type]
