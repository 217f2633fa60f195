"""Farm runs over HTTP: ``/api/v1/farm`` (issue 11, section 1).

A client POSTs shell command lines and hosts; the server runs them as a
task farm (:mod:`sshq.farm`, as ``sshq farm`` does), one asyncio task per
run, and keeps every result, so that a client connecting at any time gets
all of them, from the first or from where it stopped:

- ``POST /farm``: create and start a run (202, its status, ``Location``);
- ``GET /farm``: the runs the token may see;
- ``GET /farm/{name}``: a run's status (counts, finished or not);
- ``GET /farm/{name}/results``: the results as JSON lines (the objects of
  ``sshq farm --format jsonl``), or server-sent events with
  ``Accept: text/event-stream`` or ``?format=sse`` (``id:`` per result, so
  ``Last-Event-ID`` resumes); ``?after=N`` skips the first N results;
  the stream follows the run until it ends (``?follow=false``: only the
  results there are now);
- ``GET /farm/{name}/output/{seq}/{stdout|stderr}``: a stream of a task
  longer than :data:`sshq.farm.output.INLINE_MAX` (4 MiB), which the farm
  put in a file instead of the result (the result names the file and
  carries ``stdout_url``/``stderr_url``);
- ``DELETE /farm/{name}``: stop a run (its running tasks are killed; the
  results so far are kept).

Where things live: the run itself in the farm's run directory
(``<state dir>/farm/<name>/``: batch, options, journal, long outputs);
the server's view in the state database (step 4 of
:data:`sshq.store.MIGRATIONS`): ``api_farms`` (one row per run: the token
that made it, hosts, options, state) and ``api_farm_results`` (each
result, numbered 1, 2, ... in the order it was reported: the event ids).

A run that ended (finished, failed or stopped) is deleted, its rows and
its run directory, once it ended more than the retention ago
(:data:`~sshq.server.DEFAULT_FARM_RETENTION`, ``sshq serve
--farm-retention DAYS``); the server looks for such runs periodically.  A
running run is never deleted.  A request for a deleted run is 404, saying
the run may have expired.

A result is written to the database before the farm journals it, and a
task's second result (a task re-run after a crash between the two) is
ignored, so each task has exactly one result.  A server stopped mid-run
(SIGTERM or SIGKILL) resumes the run when it starts again: the farm
re-runs only the tasks without a journalled result (those running at the
stop are killed by their dispatchers when the SSH connection goes); a
pilot-job run (``via``) is attached again (its workers went on meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..exceptions import (
    ConfigError,
    InvalidInputError,
    RemoteError,
    RestrictedError,
    SshqError,
    TransportError,
)
from ..farm.engine import FarmOptions
from ..farm.journal import RunDir, check_run_name, new_run_name
from ..farm.output import TaskResult
from ..farm.run import FarmRequest, attach_run, parse_destination, run_farm
from ..model.resources import parse_walltime
from ..remote.installed import refuse_restricted_hosts
from . import DEFAULT_FARM_RETENTION
from .api import Token
from .gateway import ApiError, Gateway
from .state import TokenInfo

__all__ = ["router", "FarmIn", "FarmRuns", "FarmTable", "MAX_COMMANDS", "MAX_COMMAND_BYTES",
           "MAX_HOSTS"]

log = logging.getLogger("sshq.server")

#: The most commands one POST may carry (413 beyond).
MAX_COMMANDS = 100_000
#: The longest command line, in UTF-8 bytes (413 beyond; Linux takes up to
#: 128 KiB for one argument of ``sh -c``).
MAX_COMMAND_BYTES = 64 * 1024
#: The most hosts one run may name.
MAX_HOSTS = 256
#: Warnings kept per run (the newest), and their length in characters.
MAX_WARNINGS = 50
_WARNING_CHARS = 500
#: Bytes of results read from the database at once by a results stream.
_READ_BYTES = 4 << 20

#: The states of a run: ``running`` (also while it resumes after a restart),
#: ``finished`` (every task has its result), ``failed`` (it ended without
#: every result: ``error`` says why), ``stopped`` (``DELETE``).
STATES = ("running", "finished", "failed", "stopped")


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _span(seconds: float) -> str:
    """A duration for messages: ``7 days``, ``1 day``, ``12 h``, ``2.5 s``."""
    if seconds >= 86400:
        days = seconds / 86400
        return f"{days:g} day" + ("" if days == 1 else "s")
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:1000]


# ---------------------------------------------------------------- the tables


@dataclass(frozen=True, slots=True, kw_only=True)
class FarmRecord:
    """A run as the server recorded it (``api_farms``).

    Attributes:
        name: the run's name (its directory under ``<state dir>/farm``).
        token: the name of the token that created it.
        hosts: host specs as posted (platform names or destinations).
        options: ``slots``, ``retries``, ``timeout`` (s), ``speculate``,
            ``keep_order``, ``via``, ``nodes``, ``walltime``.
        total: the number of tasks.
        state: one of :data:`STATES`.
        error: why a ``failed`` run ended, or None.
        warnings: the newest warnings of the run (hosts dropped, ...).
        created, ended: seconds since the epoch (ended: None while running).
    """

    name: str
    token: str
    hosts: tuple[str, ...]
    options: dict[str, Any]
    total: int
    state: str
    error: str | None
    warnings: tuple[str, ...]
    created: float
    ended: float | None

    @property
    def via(self) -> str | None:
        via = self.options.get("via")
        return via if isinstance(via, str) else None

    @property
    def specs(self) -> list[str]:
        """Every platform or destination the run uses (``via`` included)."""
        return [*self.hosts, *([self.via] if self.via else [])]


class FarmTable:
    """``api_farms`` and ``api_farm_results`` in the state database at ``db_path``
    (its own connection; nothing but the database is touched).

    Args:
        db_path: the state database, migrated (``Store.path``).
    """

    _COLS = "name, token, hosts, options, total, state, error, warnings, created, ended"

    def __init__(self, db_path: str | Path) -> None:
        self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @staticmethod
    def _record(row: Sequence[Any]) -> FarmRecord:
        return FarmRecord(name=row[0], token=row[1], hosts=tuple(json.loads(row[2])),
                          options=json.loads(row[3]), total=row[4], state=row[5],
                          error=row[6], warnings=tuple(json.loads(row[7])), created=row[8],
                          ended=row[9])

    def insert(self, name: str, token: str, hosts: Sequence[str], options: dict[str, Any],
               total: int) -> FarmRecord:
        """Record a new run, ``running``.

        Raises:
            sqlite3.IntegrityError: a run of that name exists.
        """
        self._db.execute(f"INSERT INTO api_farms ({self._COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (name, token, json.dumps(list(hosts)), json.dumps(options), total,
                          "running", None, "[]", time.time(), None))
        rec = self.get(name)
        assert rec is not None
        return rec

    def delete(self, name: str) -> None:
        """Forget a run and its results (a run that never started, or expired)."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM api_farm_results WHERE farm=?", (name,))
        self._db.execute("DELETE FROM api_farms WHERE name=?", (name,))
        self._db.execute("COMMIT")

    def ended_before(self, when: float) -> list[str]:
        """The names of the runs that are not running and ended before ``when``
        (seconds since the epoch), the oldest end first."""
        return [str(r[0]) for r in self._db.execute(
            "SELECT name FROM api_farms WHERE state != 'running' AND ended IS NOT NULL"
            " AND ended < ? ORDER BY ended, name", (when,))]

    def get(self, name: str) -> FarmRecord | None:
        """The run named ``name``, or None."""
        row = self._db.execute(f"SELECT {self._COLS} FROM api_farms WHERE name=?",
                               (name,)).fetchone()
        return None if row is None else self._record(row)

    def runs(self, *, state: str | None = None, limit: int = 100000) -> list[FarmRecord]:
        """Runs, oldest first (the newest ``limit``), optionally in one state."""
        where, args = ("WHERE state=?", [state]) if state else ("", [])
        rows = self._db.execute(
            f"SELECT {self._COLS} FROM (SELECT * FROM api_farms {where} ORDER BY created DESC,"
            f" name DESC LIMIT ?) ORDER BY created, name", [*args, int(limit)]).fetchall()
        return [self._record(r) for r in rows]

    def end(self, name: str, state: str, error: str | None = None) -> None:
        """Record the end of a run (``finished``, ``failed`` or ``stopped``)."""
        self._db.execute("UPDATE api_farms SET state=?, error=?, ended=? WHERE name=?",
                         (state, error, time.time(), name))

    def add_warning(self, name: str, message: str) -> None:
        """Keep a warning of the run (the newest :data:`MAX_WARNINGS`, cut to 500
        characters)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT warnings FROM api_farms WHERE name=?",
                                   (name,)).fetchone()
            if row is not None:
                kept = [*json.loads(row[0]), message[:_WARNING_CHARS]][-MAX_WARNINGS:]
                self._db.execute("UPDATE api_farms SET warnings=? WHERE name=?",
                                 (json.dumps(kept), name))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add_result(self, name: str, seq: int, ok: bool, data: str) -> bool:
        """Keep a task's result, numbered after the run's last one.

        Returns:
            False if the task has a result already (it is kept; this one is not).
        """
        cur = self._db.execute(
            "INSERT OR IGNORE INTO api_farm_results (farm, n, seq, ok, data)"
            " SELECT ?, COALESCE(MAX(n), 0) + 1, ?, ?, ? FROM api_farm_results WHERE farm=?",
            (name, seq, int(ok), data, name))
        return cur.rowcount > 0

    def counts(self, name: str) -> tuple[int, int]:
        """``(succeeded, failed)`` results of a run."""
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(ok), 0) FROM api_farm_results"
                               " WHERE farm=?", (name,)).fetchone()
        return int(row[1]), int(row[0]) - int(row[1])

    def results_after(self, name: str, after: int,
                      max_bytes: int = _READ_BYTES) -> tuple[list[tuple[int, str]], bool]:
        """Results numbered above ``after``, in order, about ``max_bytes`` of them
        (at least one).

        Returns:
            ``([(n, result JSON), ...], more)``: ``more`` when results beyond
            these are there already.
        """
        sizes = self._db.execute(
            "SELECT n, length(data) FROM api_farm_results WHERE farm=? AND n>? ORDER BY n"
            " LIMIT 500", (name, after)).fetchall()
        if not sizes:
            return [], False
        last, total = sizes[0][0], 0
        for n, size in sizes:
            if total and total + size > max_bytes:
                break
            last, total = n, total + size
        rows = self._db.execute(
            "SELECT n, data FROM api_farm_results WHERE farm=? AND n>? AND n<=? ORDER BY n",
            (name, after, last)).fetchall()
        return [(int(n), str(d)) for n, d in rows], last != sizes[-1][0] or len(sizes) == 500

    def result(self, name: str, seq: int) -> dict[str, Any] | None:
        """The result of task ``seq``, or None."""
        row = self._db.execute("SELECT data FROM api_farm_results WHERE farm=? AND seq=?",
                               (name, seq)).fetchone()
        return None if row is None else dict(json.loads(row[0]))


# ---------------------------------------------------------------- the request


class FarmIn(BaseModel):
    """A farm run: shell command lines, where to run them, and how."""

    model_config = ConfigDict(extra="forbid")

    commands: list[str] = Field(
        min_length=1, description="Shell command lines, one task each (run by /bin/sh on a"
        " host); a task's seq is its 1-based index here.  At most 100,000, each one line of"
        " at most 64 KiB (UTF-8), not blank and not a comment.")
    hosts: list[str] = Field(
        default_factory=list, max_length=MAX_HOSTS,
        description="Platform names (403 outside the token's platforms), or SSH destinations"
        " [user@]host[:port] reached with the server's own SSH configuration and keys: only"
        " when sshq serve was started with --allow-farm-destinations, and with a token not"
        " limited to platforms (403 otherwise).")
    via: str | None = Field(None, description="Instead of hosts: a platform whose job runner"
                            " runs `nodes` pilot jobs that run the tasks.")
    nodes: int | None = Field(None, ge=1, le=1000, description="With via: pilot jobs (1).")
    walltime: str | None = Field(None, max_length=32,
                                 description="With via: the pilot jobs' walltime, HH:MM:SS.")
    name: str | None = Field(None, description="The run's name (1-64 letters, digits, '.',"
                             " '_', '-'); default: generated.  A name in use is 409.")
    slots: int | None = Field(None, ge=1, le=65536,
                              description="Tasks at once per host (default: its cores).")
    retries: int = Field(0, ge=0, le=100, description="Re-runs of a failed task.")
    timeout: float | None = Field(None, gt=0, le=1e8, allow_inf_nan=False,
                                  description="Seconds before a task is killed.")
    speculate: bool = Field(True, description="Start stragglers again on idle hosts.")
    keep_order: bool = Field(False, description="Report results in input order.")


def _batch(commands: list[str]) -> bytes:
    """The batch file of the commands (one a line: seq = index + 1).

    Raises:
        ApiError: 413 too many or too long; 422 a command that is not one
            runnable line.
    """
    if len(commands) > MAX_COMMANDS:
        raise ApiError(413, f"{len(commands)} commands in one run; at most {MAX_COMMANDS}")
    lines = []
    for i, cmd in enumerate(commands):
        try:
            raw = cmd.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, f"commands[{i}]: not valid Unicode") from None
        if len(raw) > MAX_COMMAND_BYTES:
            raise ApiError(413, f"commands[{i}]: {len(raw)} bytes; at most {MAX_COMMAND_BYTES}")
        if b"\n" in raw or b"\r" in raw or b"\0" in raw:
            raise ApiError(422, f"commands[{i}]: a command is one line (no newline, carriage"
                           " return or NUL)")
        stripped = raw.strip()   # as the batch reader sees it (sshq.farm.batch)
        if not stripped or stripped.startswith(b"#"):
            raise ApiError(422, f"commands[{i}]: blank or a comment: nothing to run")
        lines.append(raw)
    return b"\n".join(lines) + b"\n"


def _specs(body: FarmIn) -> list[str]:
    """The host specs of the request, checked for shape.

    Raises:
        ApiError: 422.
    """
    if body.via is not None and body.hosts:
        raise ApiError(422, "give hosts or via, not both")
    if body.via is None:
        if not body.hosts:
            raise ApiError(422, "hosts (or via) is required")
        if body.nodes is not None or body.walltime is not None:
            raise ApiError(422, "nodes and walltime go with via")
    else:
        if body.keep_order:
            raise ApiError(422, "keep_order is not available with via")
        if body.walltime is not None:
            try:
                parse_walltime(body.walltime)
            except InvalidInputError as exc:
                raise ApiError(422, f"walltime: {exc}") from None
    specs = [body.via] if body.via is not None else body.hosts
    for i, spec in enumerate(specs):
        where = "via" if body.via is not None else f"hosts[{i}]"
        if not spec or len(spec) > 255 or any(c in spec for c in ", \t\r\n\0"):
            raise ApiError(422, f"{where}: {spec[:100]!r}: a platform name or"
                           " [user@]host[:port]")
    if len(set(specs)) != len(specs):
        raise ApiError(422, "hosts: a host is given more than once")
    return list(specs)


def may_see(token: TokenInfo, specs: Sequence[str]) -> bool:
    """Whether a token may see a run on these hosts: every one is a platform it
    may use (a token limited to platforms sees no run on an SSH destination)."""
    return all(token.allows(s) for s in specs)


# ---------------------------------------------------------------- the runs


#: The ``sshq serve`` option that lets farm runs name SSH destinations.
ALLOW_DESTINATIONS_FLAG = "--allow-farm-destinations"


class FarmRuns:
    """Every farm run of a server: one asyncio task per running run.

    Args:
        gateway: the server's core (its client runs the farms; its state
            database keeps the runs).
        allow_destinations: runs may name SSH destinations (hosts that are
            not platforms), reached with the server's own SSH configuration
            and keys, for tokens not limited to platforms (``sshq serve
            --allow-farm-destinations``).  Off: only platforms; a run on
            destinations left by an earlier server is not resumed.  Settable
            until the application starts.
        retention: seconds a run that ended is kept (with its results and
            run directory) before :meth:`expire` deletes it; checked every
            tenth of it (at most hourly, at least every 0.1 s) while the
            application runs.  Settable until the application starts.
    """

    def __init__(self, gateway: Gateway, *, allow_destinations: bool = False,
                 retention: float = DEFAULT_FARM_RETENTION) -> None:
        self.gw = gateway
        self.client = gateway.client
        self.allow_destinations = allow_destinations
        self.retention = retention
        self.table = FarmTable(gateway.store.path)
        self._expiry: asyncio.Task[None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stats: dict[str, Any] = {}
        self._stopping: set[str] = set()
        self._changed = asyncio.Event()

    @property
    def _incoming(self) -> Path:
        """Where a posted batch waits until the farm copies it into its run
        (not a run name: those start with a letter or digit)."""
        return Path(self.client.state_dir) / "farm" / ".serve-incoming"

    def close(self) -> None:
        """Close the database connection."""
        self.table.close()

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Resume the runs a previous server left running (in the running loop)."""
        shutil.rmtree(self._incoming, ignore_errors=True)
        for rec in self.table.runs(state="running"):
            dest = self.destinations(rec.specs)
            if dest and not self.allow_destinations:
                error = (f"not resumed: host {dest[0]!r} is an SSH destination, and this"
                         f" server was started without {ALLOW_DESTINATIONS_FLAG}")
                log.warning("farm run %s: %s", rec.name, error)
                self.table.end(rec.name, "failed", error)
                continue
            log.info("farm run %s: resuming after a restart", rec.name)
            self._spawn(rec, None, None)
        self._expiry = asyncio.create_task(self._run_expiry(), name="farm expiry")

    async def stop(self) -> None:
        """Stop the runs' tasks; the runs stay ``running`` (resumed at the next start)."""
        tasks = list(self._tasks.values())
        if self._expiry is not None:
            tasks.append(self._expiry)
            self._expiry = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_expiry(self) -> None:
        every = min(3600.0, max(0.1, self.retention / 10))
        while True:
            try:
                await self.expire()
            except Exception:  # the check must not die
                log.exception("deleting expired farm runs failed")
            await asyncio.sleep(every)

    async def expire(self, now: float | None = None) -> list[str]:
        """Delete the runs that ended more than :attr:`retention` seconds
        before ``now`` (default: the time now): their ``api_farms`` row, their
        results and their run directory (journal, long outputs).  A running
        run is never deleted, nor one whose run directory another process
        holds locked (``sshq farm attach``: kept until a later check).

        Returns:
            The names of the runs deleted.
        """
        now = time.time() if now is None else now
        gone = []
        for name in self.table.ended_before(now - self.retention):
            if name in self._tasks:
                continue
            rd = RunDir(self.client.state_dir, name)
            if rd.path.is_dir():
                try:
                    rd.lock()
                except (ConfigError, OSError) as exc:
                    log.info("farm run %s expired but is kept for now: %s", name, exc)
                    continue
                try:
                    self.table.delete(name)
                    await asyncio.to_thread(shutil.rmtree, rd.path, True)
                finally:
                    rd.close()
            else:
                self.table.delete(name)
            log.info("farm run %s: deleted (ended more than %s ago: --farm-retention)",
                     name, _span(self.retention))
            gone.append(name)
        if gone:
            self._notify()
        return gone

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float) -> bool:
        """Wait for a new result or the end of a run; False after ``timeout`` seconds."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ requests

    def destinations(self, specs: Sequence[str]) -> list[str]:
        """The specs that are SSH destinations (not platforms of the server's
        platforms file), in order."""
        return [s for s in specs if s not in self.client.config.platforms]

    def check_hosts(self, token: TokenInfo, specs: Sequence[str]) -> None:
        """Refuse hosts the token may not use.

        A spec naming a platform must be one the token may use (403) and the
        server serves (404); any other spec is an SSH destination
        ``[user@]host[:port]`` (422 if malformed), reached with the server's
        own SSH configuration and keys: refused (403) unless the server
        allows destinations (:attr:`allow_destinations`), and then only a
        token not limited to platforms may name one (403).

        Raises:
            ApiError: 403, 404 or 422.
        """
        for spec in specs:
            if spec in self.client.config.platforms:
                self.gw.check_platform(token, spec)
                continue
            try:
                parse_destination(spec)
            except ConfigError as exc:
                raise ApiError(422, f"hosts: {exc}") from None
            if not self.allow_destinations:
                raise ApiError(403, f"host {spec!r} is not a platform of this server; SSH"
                               " destinations (reached with the server's own SSH keys) are"
                               f" refused unless sshq serve runs with {ALLOW_DESTINATIONS_FLAG}")
            if token.platforms:
                raise ApiError(403, f"host {spec!r}: this token may use only its platforms"
                               " (an SSH destination needs a token not limited to platforms)")

    def record(self, token: TokenInfo, name: str) -> FarmRecord:
        """A run the token may see.

        Raises:
            ApiError: 404 unknown, 403 on hosts the token may not use.
        """
        try:
            check_run_name(name)
        except ConfigError:
            raise ApiError(404, f"unknown farm run {name[:100]!r}") from None
        rec = self.table.get(name)
        if rec is None:
            raise ApiError(404, f"unknown farm run {name!r}: never made, or expired (a run"
                           f" is deleted {_span(self.retention)} after it ended: sshq serve"
                           " --farm-retention)")
        if not may_see(token, rec.specs):
            raise ApiError(403, f"farm run {name!r} uses hosts this token may not use")
        return rec

    def status(self, rec: FarmRecord) -> dict[str, Any]:
        """The API's status object of a run.

        Returns:
            ``name``, ``state`` (:data:`STATES`), ``finished`` (not running),
            ``hosts``, ``options``, ``total``, ``done`` (succeeded),
            ``failed``, ``reported`` (done + failed), ``running`` (task
            copies running now, as far as the server sees), ``created``,
            ``ended``, ``expires`` (when the run will be deleted, None while
            it runs; all three ISO 8601 UTC), ``error``, ``warnings``,
            ``results`` (the results' URL path).
        """
        done, failed = self.table.counts(rec.name)
        stats = self._stats.get(rec.name)
        running = int(getattr(stats, "running", 0) or 0) if rec.state == "running" else 0
        return {"name": rec.name, "state": rec.state, "finished": rec.state != "running",
                "hosts": list(rec.hosts), "options": rec.options, "total": rec.total,
                "done": done, "failed": failed, "reported": done + failed, "running": running,
                "created": _iso(rec.created), "ended": _iso(rec.ended),
                "expires": None if rec.ended is None else _iso(rec.ended + self.retention),
                "error": rec.error,
                "warnings": list(rec.warnings), "results": f"/api/v1/farm/{rec.name}/results"}

    async def create(self, token: TokenInfo, body: FarmIn) -> FarmRecord:
        """Record and start a run; return once the farm has created it.

        Raises:
            ApiError: 403/404 hosts; 403 a direct run on a restricted
                platform (``agent = "installed"``: its key may only manage
                jobs; ``via`` works), or its agent refused; 409 the name is
                taken; 413/422 the request; 502/503 the hosts could not be
                reached before the run was made.
        """
        specs = _specs(body)
        batch = _batch(body.commands)
        if body.via is not None:
            self.gw.check_platform(token, body.via)   # a platform, not a destination
        self.check_hosts(token, specs)
        if body.via is None:
            try:
                refuse_restricted_hosts(self.client.config.platforms, specs,
                                        "a direct farm run (hosts; use via)")
            except InvalidInputError as exc:
                raise ApiError(403, _one_line(exc)) from None
        options = {"slots": body.slots, "retries": body.retries, "timeout": body.timeout,
                   "speculate": body.speculate, "keep_order": body.keep_order,
                   "via": body.via, "nodes": (body.nodes or 1) if body.via else None,
                   "walltime": body.walltime}
        hosts = [] if body.via is not None else specs
        rec = None
        for _attempt in range(5):
            name = body.name if body.name is not None else new_run_name()
            try:
                check_run_name(name)
            except ConfigError as exc:
                raise ApiError(422, f"name: {exc}") from None
            if not RunDir(self.client.state_dir, name).exists():
                try:
                    rec = self.table.insert(name, token.name, hosts, options,
                                            len(body.commands))
                    break
                except sqlite3.IntegrityError:
                    pass
            if body.name is not None:
                raise ApiError(409, f"a farm run named {name!r} exists already")
        if rec is None:
            raise ApiError(503, "no free run name; try again")
        self._incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._incoming / f"{rec.name}.batch"
        path.write_bytes(batch)
        named: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._spawn(rec, path, named)
        try:
            await asyncio.shield(named)
        except (ConfigError, InvalidInputError) as exc:
            raise ApiError(422, _one_line(exc)) from None
        except TransportError as exc:
            raise ApiError(503, _one_line(exc)) from None
        except RestrictedError as exc:
            raise ApiError(403, _one_line(exc)) from None
        except RemoteError as exc:
            raise ApiError(502, _one_line(exc)) from None
        except SshqError as exc:
            raise ApiError(500, _one_line(exc)) from None
        return self.table.get(rec.name) or rec

    async def stop_run(self, rec: FarmRecord) -> FarmRecord:
        """Stop a running run (``stopped``): its tasks are killed, its pilot
        jobs too (``via``); the results so far stay.  A run that ended stays
        as it is."""
        task = self._tasks.get(rec.name)
        if task is not None:
            self._stopping.add(rec.name)
            task.cancel()
            await asyncio.wait({task}, timeout=60)
        elif rec.state == "running":
            self.table.end(rec.name, "stopped")
        if rec.state == "running" and rec.via:
            await self._kill_pilots(rec.name)
        self._notify()
        return self.table.get(rec.name) or rec

    async def _kill_pilots(self, name: str) -> None:
        """Kill the pilot jobs of a ``via`` run (the farm journals each as
        ``pilot`` with its sshq job id)."""
        ids: list[int] = []
        with contextlib.suppress(OSError):
            for line in (RunDir(self.client.state_dir, name).path / "journal").read_bytes(
                    ).splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                job = ev.get("job") if isinstance(ev, dict) and ev.get("e") == "pilot" else None
                if isinstance(job, int) and not isinstance(job, bool):
                    ids.append(job)
        if not ids:
            return
        try:
            await self.client.kill(ids, settle=0)
        except SshqError as exc:
            self.table.add_warning(name, f"killing the pilot jobs: {_one_line(exc)}")
        self.gw.observe_ids(ids)

    # ------------------------------------------------------------ the run's task

    def _spawn(self, rec: FarmRecord, batch: Path | None,
               named: asyncio.Future[str] | None) -> None:
        task = asyncio.create_task(self._run(rec, batch, named), name=f"farm {rec.name}")
        self._tasks[rec.name] = task

    def _sink(self, name: str) -> Any:
        url = f"/api/v1/farm/{name}/output/{{seq}}/{{stream}}"

        def report(r: TaskResult) -> None:
            obj = r.to_json()
            for stream in ("stdout", "stderr"):
                if f"{stream}_file" in obj:
                    obj[f"{stream}_url"] = url.format(seq=r.seq, stream=stream)
            data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            try:
                data.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate in a message: escaped
                data = json.dumps(obj, separators=(",", ":"))
            if not self.table.add_result(name, r.seq, r.ok, data):
                log.info("farm run %s: task %d reported again (after a restart); the first"
                         " result is kept", name, r.seq)
            self._notify()

        return report

    def _options(self, rec: FarmRecord) -> FarmOptions:
        o = rec.options
        return FarmOptions(slots=o.get("slots"), retries=int(o.get("retries") or 0),
                           timeout=o.get("timeout"), speculate=bool(o.get("speculate", True)),
                           keep_order=bool(o.get("keep_order")))

    async def _run(self, rec: FarmRecord, batch: Path | None,
                   named: asyncio.Future[str] | None) -> None:
        """Run (``batch``) or resume (None) a run, and record how it ended."""
        name = rec.name
        sink = self._sink(name)

        def on_name(_n: str) -> None:
            if named is not None and not named.done():
                named.set_result(name)

        def on_start(farm: Any) -> None:
            self._stats[name] = farm.stats

        def warn(msg: str) -> None:
            log.warning("farm run %s: %s", name, msg[:_WARNING_CHARS])
            self.table.add_warning(name, msg)

        try:
            if batch is not None:
                req = FarmRequest(batch=batch, hosts=list(rec.hosts), run=name,
                                  via=rec.via, nodes=int(rec.options.get("nodes") or 1),
                                  walltime=rec.options.get("walltime"),
                                  options=self._options(rec))
                await run_farm(self.client, req, sink, on_name=on_name, warn=warn,
                               on_start=on_start)
            else:
                rd = RunDir(self.client.state_dir, name)
                if not rd.exists():
                    raise ConfigError("the server stopped before the run was created")
                if rd.options().get("spools"):
                    await attach_run(self.client, name, sink, warn=warn, on_start=on_start)
                elif rec.via:
                    raise ConfigError("the server stopped while the pilot jobs were being"
                                      " submitted; post the run again")
                else:
                    req = FarmRequest(hosts=list(rec.hosts), resume=name,
                                      options=self._options(rec))
                    await run_farm(self.client, req, sink, warn=warn, on_start=on_start)
        except asyncio.CancelledError:
            if named is not None and not named.done():
                named.cancel()
            if name in self._stopping:
                self.table.end(name, "stopped")
            raise
        except Exception as exc:
            if named is not None and not named.done():
                # refused before anything was made: the POST says why
                self.table.delete(name)
                named.set_exception(exc)
                return
            if not isinstance(exc, SshqError | OSError):
                log.exception("farm run %s failed", name)
            self.table.end(name, "failed", _one_line(exc))
        else:
            done, failed = self.table.counts(name)
            missing = rec.total - done - failed
            if missing > 0:
                self.table.end(name, "failed", f"{missing} task(s) have no result")
            else:
                self.table.end(name, "finished")
        finally:
            if batch is not None:
                batch.unlink(missing_ok=True)
            self._tasks.pop(name, None)
            self._stats.pop(name, None)
            self._stopping.discard(name)
            self._notify()

    # ------------------------------------------------------------ results

    async def stream(self, request: Request, rec: FarmRecord, *, after: int, follow: bool,
                     sse: bool) -> AsyncIterator[bytes]:
        """The run's results numbered above ``after``: JSON lines, or server-sent
        events (``id: n``, ``event: result``; at the end ``event: end`` with
        the status object).  With ``follow``, until the run has ended."""
        name = rec.name
        last = after
        if sse:
            yield b"retry: 2000\n\n"
        while True:
            current = self.table.get(name)
            ended = current is None or current.state != "running"
            rows, more = self.table.results_after(name, last)
            for n, data in rows:
                if sse:
                    yield f"id: {n}\nevent: result\ndata: {data}\n\n".encode()
                else:
                    yield data.encode() + b"\n"
                last = n
            if more:
                continue
            if ended or not follow:
                if sse and current is not None:
                    status = json.dumps(self.status(current), separators=(",", ":"))
                    yield f"event: end\ndata: {status}\n\n".encode()
                return
            if not await self.wait_changed(10.0) and sse:
                yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return


# ---------------------------------------------------------------- the routes

router = APIRouter()


async def farms_of(request: Request) -> FarmRuns:
    """The application's :class:`FarmRuns`."""
    farms: FarmRuns = request.app.state.farms
    return farms


@router.post("/farm", status_code=202, summary="Start a farm run (in the background)")
async def create_farm(body: FarmIn, token: Token, request: Request,
                      response: Response) -> dict[str, Any]:
    """Start running the commands over the hosts; returns the run's status
    (202: it goes on in the server) and ``Location``, once the run exists.
    Its results: ``GET /api/v1/farm/{name}/results``."""
    farms = await farms_of(request)
    rec = await farms.create(token, body)
    response.headers["Location"] = f"/api/v1/farm/{rec.name}"
    return farms.status(rec)


@router.get("/farm", summary="The farm runs this token may see")
async def list_farms(token: Token, request: Request,
                     state: Literal["running", "finished", "failed", "stopped"] | None = None,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 100
                     ) -> list[dict[str, Any]]:
    """Status objects, oldest first (the newest ``limit`` runs)."""
    farms = await farms_of(request)
    return [farms.status(r) for r in farms.table.runs(state=state, limit=limit)
            if may_see(token, r.specs)]


@router.get("/farm/{name}", summary="A farm run's status")
async def get_farm(name: str, token: Token, request: Request) -> dict[str, Any]:
    """The run's status.  A run is deleted, with its results, once it ended
    more than the server's retention ago (``expires``; ``sshq serve
    --farm-retention``): then 404."""
    farms = await farms_of(request)
    return farms.status(farms.record(token, name))


@router.delete("/farm/{name}", summary="Stop a farm run")
async def stop_farm(name: str, token: Token, request: Request) -> dict[str, Any]:
    """Stop the run: its running tasks are killed (its pilot jobs with
    ``via``), no more start; the results so far stay.  A run that has
    ended is left as it is.  Returns its status."""
    farms = await farms_of(request)
    return farms.status(await farms.stop_run(farms.record(token, name)))


@router.get("/farm/{name}/results", summary="A farm run's results: JSON lines or SSE",
            response_class=StreamingResponse)
async def farm_results(
    name: str, token: Token, request: Request,
    format: Literal["jsonl", "sse"] | None = None,
    after: Annotated[int | None, Query(ge=0)] = None,
    follow: bool = True,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """The results, in the order they were reported: JSON lines (the objects of
    ``sshq farm --format jsonl``; ``application/x-ndjson``), or server-sent
    events with ``Accept: text/event-stream`` or ``?format=sse``
    (``id: n`` for the n-th result, ``event: result``, ``data: <object>``;
    then ``event: end`` with the run's status).  ``Last-Event-ID: n`` or
    ``?after=n`` starts after the n-th result.  With ``follow`` (default)
    the response goes on until the run has ended; ``follow=false`` gives
    the results there are now.  Only the event stream has keep-alives (a
    comment every 10 s): a client whose read timeout is shorter than its
    tasks should read that one."""
    farms = await farms_of(request)
    rec = farms.record(token, name)
    sse = format == "sse" or (format is None and "text/event-stream" in (accept or ""))
    start = after or 0
    if last_event_id is not None:
        if not last_event_id.isdigit() or len(last_event_id) > 18:
            raise ApiError(422, "Last-Event-ID: a result number")
        start = int(last_event_id)
    media = "text/event-stream" if sse else "application/x-ndjson"
    return StreamingResponse(farms.stream(request, rec, after=start, follow=follow, sse=sse),
                             media_type=media,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/farm/{name}/output/{seq}/{stream}", summary="A task's long output (a file)",
            response_class=FileResponse)
async def farm_output(name: str, seq: int, stream: Literal["stdout", "stderr"], token: Token,
                      request: Request) -> FileResponse:
    """A stream of task ``seq`` that was too long (over 4 MiB) to be carried in
    its result; the result names it (``stdout_url``, ``stderr_url``)."""
    farms = await farms_of(request)
    rec = farms.record(token, name)
    result = farms.table.result(rec.name, seq)
    if result is None:
        raise ApiError(404, f"farm run {rec.name!r} has no result for task {seq}")
    recorded = result.get(f"{stream}_file")
    if not isinstance(recorded, str):
        raise ApiError(404, f"task {seq}'s {stream} is carried in its result")
    base = RunDir(farms.client.state_dir, rec.name).output_dir.resolve()
    path = Path(recorded).resolve()
    if base not in path.parents or not path.is_file():
        raise ApiError(404, f"task {seq}'s {stream} file is gone")
    return FileResponse(path, media_type="application/octet-stream")
