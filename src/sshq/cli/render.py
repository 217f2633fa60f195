"""Output for the CLI: JSON for scripts, tables and progress for people.

Progress is drawn on stderr only when stderr is a terminal; stdout carries
results only.

Every text built from data (a job's fields, remote paths, error messages:
anything a remote host or a job could have written) goes through
:func:`clean` on its way to a table cell or a line, and rich is given
:class:`rich.text.Text` objects, never markup strings: ``[/bold]`` in a
job's signal is shown as written, and no escape sequence or control
character from the remote side reaches the terminal.  JSON output needs
neither (``json.dumps`` escapes every control character).  ``cat-log`` and
``ssh-to-job --command`` pass the job's own output through, as ``cat`` would.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from ..model import Job

__all__ = ["CleanFormatter", "Renderer", "clean"]

#: Terminal escape sequences: CSI (7- and 8-bit), the string sequences (OSC,
#: DCS, SOS, PM, APC: up to their terminator, or the end), and the other
#: ESC sequences (an ESC, intermediates, a final byte).
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
)
#: C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str, *, keep: str = "") -> str:
    """Text from data, made safe to show on a terminal.

    Escape sequences are removed whole (a colour, a window title, a cursor
    move); what remains of C0 controls, DEL and C1 controls becomes U+FFFD,
    except tab, newline and carriage return, which become a space, and the
    characters in ``keep``, which stay.  Rich markup is not touched here:
    give rich the result as :class:`rich.text.Text`.

    Args:
        text: any text.
        keep: control characters to keep as they are (e.g. ``"\\t"`` in a
            tab-separated line, ``"\\n"`` in a traceback).

    Returns:
        The text without escape sequences or other control characters.
    """
    def one(m: re.Match[str]) -> str:
        c = m.group()
        if c in keep:
            return c
        return " " if c in "\t\n\r" else "\ufffd"

    return _CONTROL.sub(one, _SEQUENCE.sub("", text))


class CleanFormatter(logging.Formatter):
    """A log formatter whose lines are :func:`clean` (newlines and tabs kept:
    tracebacks)."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record), keep="\n\t")


def _text(value: str, style: str | None = None) -> Any:
    """A rich Text of data: shown as written, never parsed as markup."""
    from rich.text import Text

    return Text(clean(value), style=style or "")

_COLUMNS = ("id", "platform", "name", "job_runner", "job_id", "submit_num", "state",
            "exit_status", "signal")
_STYLE = {"succeeded": "green", "failed": "red", "submit-failed": "red",
          "running": "cyan", "submitted": "yellow"}


class Renderer:
    """Writes command results in the chosen form.

    Args:
        as_json: print JSON arrays instead of tables.
    """

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.out_tty = sys.stdout.isatty()
        self.err: Any = None
        if sys.stderr.isatty():
            from rich.console import Console  # only for people at a terminal

            self.err = Console(stderr=True)

    def jobs(self, jobs: Sequence[Job], *, title: str | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Print jobs: a JSON array, a rich table (terminal) or tab-separated lines."""
        self.jobs_with(jobs, [extra or {} for _ in jobs], title=title)

    def jobs_with(self, jobs: Sequence[Job], extras: Sequence[dict[str, Any]],
                  *, title: str | None = None) -> None:
        """Like :meth:`jobs`, merging one extra dict into each job object."""
        if self.as_json:
            click.echo(json.dumps([dict(j.to_dict(), **e) for j, e in zip(jobs, extras,
                                                                            strict=True)],
                                  indent=2))
            return
        if self.out_tty:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=_text(title) if title else None, title_justify="left")
            for c in _COLUMNS:
                table.add_column(c.replace("_", " "))
            for j in jobs:
                state = j.state.value
                table.add_row(*(_text(cell, _STYLE.get(state) if c == "state" else None)
                                for c, cell in zip(_COLUMNS, _cells(j), strict=True)))
            Console().print(table)
            return
        click.echo("\t".join(_COLUMNS))
        for j in jobs:
            click.echo("\t".join(_cells(j)))

    def host_result(self, result: dict[str, Any], text: str) -> None:
        """Print the outcome of a host operation (``text``: :func:`clean`)."""
        if self.as_json:
            click.echo(json.dumps([result], indent=2))
        else:
            self.line(text)

    def line(self, text: str) -> None:
        """Print one line on stdout (:func:`clean`, tabs kept)."""
        click.echo(clean(text, keep="\t"))

    def raw(self, data: bytes) -> None:
        """Write log bytes: raw when piped, decoded with replacement on a terminal."""
        if self.out_tty:
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def stream(self, data: bytes, decoder: codecs.IncrementalDecoder, *, err: bool) -> None:
        """Write a chunk of a followed log (job.err goes to stderr)."""
        if self.as_json:
            return
        target = sys.stderr if err else sys.stdout
        if target.isatty():
            target.write(decoder.decode(data))
            target.flush()
        else:
            target.buffer.write(data)
            target.buffer.flush()

    def error(self, text: str) -> None:
        """One line on stderr (embedded newlines become " | "; :func:`clean`)."""
        one = " | ".join(part.strip() for part in text.splitlines() if part.strip())
        click.echo(f"sshq: {clean(one)}", err=True)

    @contextlib.contextmanager
    def progress(self, text: str) -> Iterator[None]:
        """A spinner on stderr while a long operation runs (terminal only)."""
        if self.err is None:
            yield
            return
        with self.err.status(_text(text)):
            yield

    @contextlib.contextmanager
    def wait_progress(self) -> Iterator[Callable[[list[Job]], None] | None]:
        """A live "n running, n done" line for ``wait``; yields the poll callback."""
        if self.err is None:
            yield None
            return
        with self.err.status(_text("waiting")) as status:

            def on_poll(jobs: list[Job]) -> None:
                counts = Counter(j.state.value for j in jobs)
                done = sum(1 for j in jobs if j.state.is_final)
                parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                status.update(_text(f"waiting: {done}/{len(jobs)} final ({parts})"))

            yield on_poll


def _cells(job: Job) -> list[str]:
    """A job's table cells, :func:`clean` (tabs and newlines become spaces)."""
    d = job.to_dict()
    return ["" if d[c] is None else clean(str(d[c])) for c in _COLUMNS]
