"""Output for the CLI: JSON for scripts, tables and progress for people.

Progress is drawn on stderr only when stderr is a terminal; stdout carries
results only.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from ..model import Job

__all__ = ["Renderer"]

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

            table = Table(title=title, title_justify="left")
            for c in _COLUMNS:
                table.add_column(c.replace("_", " "))
            for j in jobs:
                d = j.to_dict()
                cells = ["" if d[c] is None else str(d[c]) for c in _COLUMNS]
                style = _STYLE.get(d["state"])
                cells[_COLUMNS.index("state")] = f"[{style}]{d['state']}[/]" if style else d[
                    "state"]
                table.add_row(*cells)
            Console().print(table)
            return
        click.echo("\t".join(_COLUMNS))
        for j in jobs:
            d = j.to_dict()
            click.echo("\t".join("" if d[c] is None else str(d[c]) for c in _COLUMNS))

    def host_result(self, result: dict[str, Any], text: str) -> None:
        """Print the outcome of a host operation."""
        if self.as_json:
            click.echo(json.dumps([result], indent=2))
        else:
            click.echo(text)

    def line(self, text: str) -> None:
        """Print one line on stdout."""
        click.echo(text)

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
        """One line on stderr (embedded newlines become " | ")."""
        one = " | ".join(part.strip() for part in text.splitlines() if part.strip())
        click.echo(f"sshq: {one}", err=True)

    @contextlib.contextmanager
    def progress(self, text: str) -> Iterator[None]:
        """A spinner on stderr while a long operation runs (terminal only)."""
        if self.err is None:
            yield
            return
        with self.err.status(text):
            yield

    @contextlib.contextmanager
    def wait_progress(self) -> Iterator[Callable[[list[Job]], None] | None]:
        """A live "n running, n done" line for ``wait``; yields the poll callback."""
        if self.err is None:
            yield None
            return
        with self.err.status("waiting") as status:

            def on_poll(jobs: list[Job]) -> None:
                counts = Counter(j.state.value for j in jobs)
                done = sum(1 for j in jobs if j.state.is_final)
                parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                status.update(f"waiting: {done}/{len(jobs)} final ({parts})")

            yield on_poll
