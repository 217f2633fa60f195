"""Local state: an SQLite database (WAL mode, file mode 0600).

The schema is versioned (SQLite's ``PRAGMA user_version``): :data:`MIGRATIONS`
lists the steps from an empty database to the current version, and opening a
database runs the steps it has not had yet, in one transaction.  A database
written by a newer sshq (a version beyond ours) is refused, not guessed at.

Tables: ``jobs`` (every submitted job and its latest state), ``remote_init``
(per platform: the absolute run directory and home found by remote-init),
``bad_hosts`` (hosts skipped until a time, after a connection failure),
``runner_queries`` (when each host's job runner was last asked for job states).
Step 2 adds the tables of ``sshq serve`` (``api_*``: tokens, API requests and
their idempotency keys, which request reserved which job, job state events,
the last successful poll of each job, pending webhook deliveries), step 3
``api_kills`` (the jobs the server was asked to kill); they are read and
written by :mod:`sshq.server.state`.  Step 4 adds the server's farm runs
(``api_farms``) and their results (``api_farm_results``), read and written
by :mod:`sshq.server.farm`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

from .exceptions import ConfigError, UnknownJobError
from .model import Job, JobState
from .shipped import sshq_jobstatus as js

__all__ = ["Store", "RemoteInit", "API_REQUEST"]

#: The ``sshq serve`` API request (an ``api_requests`` id) on whose behalf
#: jobs are being submitted, or None: set around a submit, it makes
#: :meth:`Store.reserve_jobs` link the reserved rows to that request in the
#: same transaction (table ``api_jobs``), so that a server killed mid-submit
#: knows, after a restart, which jobs a retried request already reserved.
API_REQUEST: ContextVar[int | None] = ContextVar("sshq_api_request", default=None)

#: The schema, as migration steps: step N (1-based) brings a database from
#: version N-1 to N.  Append new steps; never edit one that has shipped.
#: (Databases from before versioning have version 0 and step 1's tables, which
#: step 1 creates only if missing.)
MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    host TEXT NOT NULL,
    name TEXT NOT NULL,
    job_runner TEXT NOT NULL,
    job_id TEXT NOT NULL DEFAULT '',
    submit_num INTEGER NOT NULL,
    state TEXT NOT NULL,
    exit_status INTEGER,
    signal TEXT,
    job_log_dir TEXT NOT NULL DEFAULT '',
    work_dir TEXT NOT NULL DEFAULT '',
    submit_time TEXT,
    start_time TEXT,
    exit_time TEXT,
    message TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_platform_name ON jobs (platform, name);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS remote_init (
    platform TEXT NOT NULL,
    run_dir_spec TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    home TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (platform, run_dir_spec)
);
CREATE TABLE IF NOT EXISTS runner_queries (
    platform TEXT NOT NULL,
    host TEXT NOT NULL,
    last REAL NOT NULL,
    PRIMARY KEY (platform, host)
);
CREATE TABLE IF NOT EXISTS bad_hosts (
    platform TEXT NOT NULL,
    host TEXT NOT NULL,
    until REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (platform, host)
);
""", """
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    platforms TEXT NOT NULL DEFAULT '[]',
    webhook_secret TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL
);
CREATE TABLE api_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL,
    idempotency_key TEXT,
    body_hash TEXT NOT NULL,
    platform TEXT NOT NULL,
    callback_url TEXT,
    created REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    UNIQUE (token, idempotency_key)
);
CREATE TABLE api_jobs (
    job INTEGER PRIMARY KEY,
    request INTEGER NOT NULL
);
CREATE INDEX api_jobs_request ON api_jobs (request);
CREATE TABLE api_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    platform TEXT NOT NULL,
    state TEXT NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE api_seen (
    job INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    polled REAL
);
CREATE TABLE api_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event INTEGER NOT NULL,
    url TEXT NOT NULL,
    token TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    done REAL
);
CREATE INDEX api_deliveries_due ON api_deliveries (done, next_try);
""", """
CREATE TABLE api_kills (
    job INTEGER PRIMARY KEY,
    time REAL NOT NULL
);
""", """
CREATE TABLE api_farms (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    hosts TEXT NOT NULL,
    options TEXT NOT NULL,
    total INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    ended REAL
);
CREATE TABLE api_farm_results (
    farm TEXT NOT NULL,
    n INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (farm, n),
    UNIQUE (farm, seq)
);
""")
SCHEMA_VERSION = len(MIGRATIONS)

_COLS = (
    "id, platform, host, name, job_runner, job_id, submit_num, state, exit_status, signal,"
    " job_log_dir, work_dir, submit_time, start_time, exit_time, message"
)
#: The columns :meth:`Store.update_job` may set.
UPDATABLE_COLUMNS = frozenset(_COLS.replace(" ", "").split(",")) - {"id"}


def _ts(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _dt(s: str | None) -> datetime | None:
    t: datetime | None = js.parse_time(s)
    return t


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        platform=row["platform"],
        host=row["host"],
        name=row["name"],
        job_runner=row["job_runner"],
        job_id=row["job_id"],
        submit_num=row["submit_num"],
        state=JobState(row["state"]),
        exit_status=row["exit_status"],
        signal=row["signal"],
        job_log_dir=row["job_log_dir"],
        work_dir=row["work_dir"],
        submit_time=_dt(row["submit_time"]),
        start_time=_dt(row["start_time"]),
        exit_time=_dt(row["exit_time"]),
        message=row["message"],
    )


class RemoteInit:
    """What remote-init learned of a platform: absolute run dir and home."""

    __slots__ = ("home", "run_dir")

    def __init__(self, run_dir: str, home: str) -> None:
        self.run_dir = run_dir
        self.home = home


class Store:
    """The state database.

    Args:
        state_dir: directory for ``sshq.db`` (created 0700).
    """

    def __init__(self, state_dir: str | Path) -> None:
        d = Path(state_dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = d / "sshq.db"
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def _migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` (see :data:`MIGRATIONS`).

        Raises:
            ConfigError: the database was written by a newer sshq.
        """
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path}: state database schema version {version} is newer than this"
                f" sshq's ({SCHEMA_VERSION}); upgrade sshq or use another --state-dir")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # another process may have migrated while we waited for the lock
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for step in MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        """The database's schema version (``PRAGMA user_version``)."""
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------- jobs

    def reserve_jobs(
        self, platform: str, host: str, job_runner: str, names: Sequence[str],
        specs: Sequence[dict[str, Any]], elements: Sequence[int] | None = None,
    ) -> list[tuple[int, int]]:
        """Create rows for jobs about to be submitted.

        The rows start as ``submitted`` with no job id and the message
        "submission in progress" (the intent) until :meth:`update_job`
        records the outcome.  If sshq dies in between, a later poll reads the
        job status file of the reserved job log directory and adopts the job
        (or finds it was never sent): a job is never submitted twice.
        With :data:`API_REQUEST` set, the rows are linked to that request
        (``api_jobs``) in the same transaction.

        Args:
            elements: rows per job (an array job has one per element, all
                with the same submit number); default one each.

        Returns:
            ``(id, submit_num)`` per row (elements of one job consecutive),
            submit numbers counting on from the highest one recorded for that
            platform and name.
        """
        out: list[tuple[int, int]] = []
        with self.transaction() as db:
            nums: dict[str, int] = {}
            counts = elements or [1] * len(names)
            for name, spec, count in zip(names, specs, counts, strict=True):
                if name not in nums:
                    row = db.execute(
                        "SELECT MAX(submit_num) FROM jobs WHERE platform=? AND name=?",
                        (platform, name),
                    ).fetchone()
                    nums[name] = row[0] or 0
                nums[name] += 1
                for _ in range(count):
                    cur = db.execute(
                        "INSERT INTO jobs (platform, host, name, job_runner, submit_num,"
                        " state, message, spec) VALUES (?,?,?,?,?,?,?,?)",
                        (platform, host, name, job_runner, nums[name],
                         JobState.SUBMITTED.value, "submission in progress",
                         json.dumps(spec)),
                    )
                    assert cur.lastrowid is not None
                    out.append((cur.lastrowid, nums[name]))
            request = API_REQUEST.get()
            if request is not None:
                db.executemany("INSERT INTO api_jobs (job, request) VALUES (?,?)",
                               [(row_id, request) for row_id, _ in out])
        return out

    def update_job(self, sshq_id: int, /, **fields: Any) -> None:
        """Set columns of one job (datetimes and JobStates converted).

        Raises:
            ValueError: a field is not a column of :data:`UPDATABLE_COLUMNS`.
        """
        if not fields:
            return
        unknown = set(fields) - UPDATABLE_COLUMNS
        if unknown:
            raise ValueError(f"not job columns: {', '.join(sorted(unknown))}")
        conv: dict[str, Any] = {}
        for k, v in fields.items():
            if isinstance(v, datetime):
                v = _ts(v)
            elif isinstance(v, JobState):
                v = v.value
            conv[k] = v
        sets = ", ".join(f"{k}=?" for k in conv)
        self._db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*conv.values(), sshq_id))

    def update_jobs(self, updates: Iterable[tuple[int, dict[str, Any]]]) -> None:
        """Several :meth:`update_job` calls in one transaction."""
        with self.transaction():
            for sshq_id, fields in updates:
                self.update_job(sshq_id, **fields)

    def delete_jobs(self, ids: Iterable[int]) -> None:
        """Forget jobs (used when a submission provably sent nothing)."""
        with self.transaction() as db:
            db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])

    def get(self, ids: Sequence[int]) -> list[Job]:
        """Jobs by sshq id, in the order asked.

        Raises:
            UnknownJobError: an id is not in the database.
        """
        if not ids:
            return []
        rows: dict[int, Job] = {}
        for i in range(0, len(ids), 500):
            chunk = list(ids[i:i + 500])
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT {_COLS} FROM jobs WHERE id IN ({marks})", chunk):
                rows[row["id"]] = _job(row)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise UnknownJobError(
                f"unknown job id{'s' if len(missing) > 1 else ''}:"
                f" {', '.join(map(str, missing))} (see `sshq jobs`)"
            )
        return [rows[i] for i in ids]

    def spec(self, job_id: int) -> dict[str, Any]:
        """The stored job spec summary of a job."""
        row = self._db.execute("SELECT spec FROM jobs WHERE id=?", (job_id,)).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def query(
        self, *, platform: str | None = None, states: Sequence[JobState] | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        """Jobs filtered by platform and states, oldest first."""
        where, args = [], []
        if platform:
            where.append("platform=?")
            args.append(platform)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        sql = f"SELECT {_COLS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY id"
        return [_job(r) for r in self._db.execute(sql, args)]

    # ---------------------------------------------------------------- remote init

    def remote_init(self, platform: str, run_dir_spec: str) -> RemoteInit | None:
        """The cached remote-init result, if any."""
        row = self._db.execute(
            "SELECT run_dir, home FROM remote_init WHERE platform=? AND run_dir_spec=?",
            (platform, run_dir_spec),
        ).fetchone()
        return RemoteInit(row[0], row[1]) if row else None

    def set_remote_init(self, platform: str, run_dir_spec: str, info: RemoteInit) -> None:
        """Cache a remote-init result."""
        self._db.execute(
            "INSERT OR REPLACE INTO remote_init VALUES (?,?,?,?,?)",
            (platform, run_dir_spec, info.run_dir, info.home, time.time()),
        )

    # ---------------------------------------------------------------- rate limit

    def claim_runner_query(self, platform: str, host: str, min_interval: float) -> bool:
        """Take the right to run a job runner status query on ``host`` now.

        At most one claim per ``min_interval`` seconds succeeds, across every
        process sharing this database.

        Returns:
            True if the caller may query the job runner now.
        """
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT last FROM runner_queries WHERE platform=? AND host=?",
                             (platform, host)).fetchone()
            if row is not None and now - row[0] < min_interval:
                return False
            db.execute("INSERT OR REPLACE INTO runner_queries VALUES (?,?,?)",
                       (platform, host, now))
            return True

    # ---------------------------------------------------------------- bad hosts

    def bad_hosts(self, platform: str) -> set[str]:
        """Hosts of ``platform`` currently skipped."""
        now = time.time()
        return {
            r[0] for r in self._db.execute(
                "SELECT host FROM bad_hosts WHERE platform=? AND until>?", (platform, now)
            )
        }

    def mark_bad_host(self, platform: str, host: str, seconds: float, reason: str) -> None:
        """Skip ``host`` for ``seconds``."""
        self._db.execute(
            "INSERT OR REPLACE INTO bad_hosts VALUES (?,?,?,?)",
            (platform, host, time.time() + seconds, reason),
        )

    def clear_bad_host(self, platform: str, host: str) -> None:
        """Stop skipping ``host``."""
        self._db.execute("DELETE FROM bad_hosts WHERE platform=? AND host=?", (platform, host))
