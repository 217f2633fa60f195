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
  (``stdout_file``, ``stderr_file``).
* ``anet``: the ANet seed's binary framing, per task: request id (the seq)
  as a 32-bit little-endian integer, the length as a 32-bit little-endian
  integer, then the task's stdout bytes.
"""

from __future__ import annotations

import base64
import json
import os
import signal as signal_mod
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = ["TaskResult", "ResultWriter", "ResultSink", "make_writer", "signal_name"]


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
        else:
            data = r.stdout
            if r.stdout_file is not None:
                data = Path(r.stdout_file).read_bytes()
            self.out.write(struct.pack("<II", r.seq & 0xFFFFFFFF, len(data)) + data)
        self.out.flush()


def output_paths(directory: Path, seq: int) -> tuple[Path, Path]:
    """``(stdout_path, stderr_path)`` of a task in ``--output-dir``."""
    return directory / f"{seq}.stdout", directory / f"{seq}.stderr"


def ensure_dir(directory: Path) -> Path:
    os.makedirs(directory, exist_ok=True)
    return directory


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
