"""The batch file: one shell command per line (the ANet seed's format).

Read lazily, so memory does not grow with the number of tasks.  A task's
``seq`` is its 1-based line number; blank lines and lines starting with
``#`` are skipped (their numbers are not reused).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ..exceptions import ConfigError

__all__ = ["read_batch", "count_tasks", "count_lines"]


def _command(raw: bytes) -> str | None:
    line = raw.rstrip(b"\r\n")
    stripped = line.strip()
    if not stripped or stripped.startswith(b"#"):
        return None
    return line.decode("utf-8", "surrogateescape")


def read_batch(path: str | os.PathLike[str], *, skip: bytearray | None = None,
               ) -> Iterator[tuple[int, str]]:
    """Yield ``(seq, command)`` for each task of the batch file, in order.

    Args:
        path: the batch file.
        skip: a bitmap indexed by seq; tasks whose byte is non-zero are skipped.

    Raises:
        ConfigError: a line holds a NUL byte (no shell can run it), or the
            file cannot be read.
    """
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read the batch file {path}: {exc.strerror}") from None
    with fh:
        for seq, raw in enumerate(fh, 1):
            if skip is not None and seq < len(skip) and skip[seq]:
                continue
            if b"\0" in raw:
                raise ConfigError(f"{path}:{seq}: a command cannot contain a NUL byte")
            cmd = _command(raw)
            if cmd is not None:
                yield seq, cmd


def count_tasks(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(number of tasks, number of lines)`` of a batch file.

    Raises:
        ConfigError: as :func:`read_batch`.
    """
    n = 0
    for _ in read_batch(Path(path)):
        n += 1
    return n, count_lines(path)


def count_lines(path: str | os.PathLike[str]) -> int:
    """The number of lines of a batch file (the largest possible seq).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)
