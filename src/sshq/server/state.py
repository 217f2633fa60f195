"""What ``sshq serve`` keeps in the state database (the ``api_*`` tables).

The tables are created by steps 2 and 3 of :data:`sshq.store.MIGRATIONS`; this
module reads and writes them through its own SQLite connection to the same
file (WAL mode: readers never wait for the job store's writers).

- ``api_tokens``: API tokens, stored as SHA-256 hashes (a token is 256
  random bits, so a fast hash is enough), the platforms each may use and
  its webhook secret (kept to sign webhooks: the database file is 0600);
- ``api_requests`` and ``api_jobs``: each submit request, its
  ``Idempotency-Key`` and ``callback_url``, and the jobs it reserved
  (written by :meth:`sshq.store.Store.reserve_jobs` in the same transaction
  as the job rows, through :data:`sshq.store.API_REQUEST`);
- ``api_seen`` and ``api_events``: the last state the server saw of each
  job, the time of its last successful poll, and one event per state
  change (the ids of the event stream);
- ``api_deliveries``: webhook deliveries not yet made, with their retry
  times;
- ``api_kills``: the jobs whose kill the server was asked for.

Nothing here does I/O beyond the database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..exceptions import InvalidInputError
from ..model import Job

__all__ = ["ServerState", "TokenInfo", "Delivery", "job_object", "TOKEN_PREFIX"]

#: Every token starts with this (so that secret scanners can find leaked ones).
TOKEN_PREFIX = "sshq_"
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenInfo:
    """An API token as the server knows it (never the token itself).

    Attributes:
        name: the token's name.
        platforms: the platforms it may use; empty: every platform.
        webhook_secret: the key of its webhooks' HMAC signatures.
        created: creation time, seconds since the epoch.
        expires: expiry time, seconds since the epoch, or None.
    """

    name: str
    platforms: tuple[str, ...]
    webhook_secret: str
    created: float
    expires: float | None

    def allows(self, platform: str) -> bool:
        """True if the token may use ``platform``."""
        return not self.platforms or platform in self.platforms


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """A webhook delivery to make: POST ``body`` to ``url``, signed with ``secret``."""

    id: int
    event: int
    url: str
    body: bytes
    secret: str
    attempts: int


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def job_object(job: Job, polled: float | None) -> dict[str, Any]:
    """The API's job object: :meth:`Job.to_dict` (the CLI's ``--json``) and
    ``last_poll``, the ISO 8601 UTC time of the job's last successful poll
    (None if it was never polled by the server)."""
    return dict(job.to_dict(), last_poll=_iso(polled))


class ServerState:
    """The server's tables in the state database at ``db_path``.

    Args:
        db_path: the state database (``Store.path``), already migrated.
    """

    def __init__(self, db_path: str | Path) -> None:
        self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def _write(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    # ------------------------------------------------------------ tokens

    def create_token(self, name: str, platforms: Sequence[str] = (),
                     expires_days: float | None = None) -> tuple[str, str]:
        """Create a token.

        Args:
            name: a unique name (letters, digits, ``_.-``, at most 64).
            platforms: the platforms it may use (empty: every one).
            expires_days: lifetime in days, or None for no expiry.

        Returns:
            ``(token, webhook_secret)``: both shown once; only the token's
            hash is stored.

        Raises:
            InvalidInputError: a bad or taken name, or a lifetime not > 0.
        """
        if not _TOKEN_NAME.fullmatch(name):
            raise InvalidInputError(
                f"token name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
                " (starting with a letter or digit)")
        if expires_days is not None and not expires_days > 0:
            raise InvalidInputError(f"--expires {expires_days}: a number of days > 0")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        expires = None if expires_days is None else now + expires_days * 86400
        try:
            self._write("INSERT INTO api_tokens (name, hash, platforms, webhook_secret,"
                        " created, expires) VALUES (?,?,?,?,?,?)",
                        (name, _hash(token), json.dumps(sorted(set(platforms))), secret,
                         now, expires))
        except sqlite3.IntegrityError:
            raise InvalidInputError(f"a token named {name!r} exists already"
                                    " (sshq token revoke it first)") from None
        return token, secret

    def tokens(self) -> list[TokenInfo]:
        """Every token, by name."""
        return [self._token(r) for r in self._db.execute(
            "SELECT name, platforms, webhook_secret, created, expires FROM api_tokens"
            " ORDER BY name")]

    @staticmethod
    def _token(row: Sequence[Any]) -> TokenInfo:
        return TokenInfo(name=row[0], platforms=tuple(json.loads(row[1])),
                         webhook_secret=row[2], created=row[3], expires=row[4])

    def revoke_token(self, name: str) -> bool:
        """Delete a token (its idempotency keys are forgotten with it).

        Returns:
            False if no token has that name.
        """
        self._write("BEGIN IMMEDIATE")
        try:
            n = self._write("DELETE FROM api_tokens WHERE name=?", (name,)).rowcount
            self._write("UPDATE api_requests SET idempotency_key=NULL WHERE token=?", (name,))
        except BaseException:
            self._write("ROLLBACK")
            raise
        self._write("COMMIT")
        return n > 0

    def authenticate(self, presented: str) -> TokenInfo | None:
        """The token whose hash matches ``presented``, unless expired.

        Every stored hash is compared in constant time (no early exit, no
        index lookup on the secret).
        """
        digest = _hash(presented)
        found = None
        for row in self._db.execute(
                "SELECT name, platforms, webhook_secret, created, expires, hash"
                " FROM api_tokens"):
            if hmac.compare_digest(digest, row[5]):
                found = row
        if found is None:
            return None
        info = self._token(found)
        if info.expires is not None and info.expires <= time.time():
            return None
        return info

    # ------------------------------------------------------------ submit requests

    def begin_request(self, token: str, key: str | None, body_hash: str, platform: str,
                      callback_url: str | None) -> tuple[int, str | None]:
        """Record a submit request, or find the earlier one with the same key.

        Returns:
            ``(request id, None)`` for a new request; ``(earlier id, its
            body hash)`` when ``token`` already used ``key``.
        """
        self._write("BEGIN IMMEDIATE")
        try:
            if key is not None:
                row = self._db.execute(
                    "SELECT id, body_hash FROM api_requests WHERE token=? AND"
                    " idempotency_key=?", (token, key)).fetchone()
                if row is not None:
                    self._write("COMMIT")
                    return int(row[0]), str(row[1])
            cur = self._write(
                "INSERT INTO api_requests (token, idempotency_key, body_hash, platform,"
                " callback_url, created) VALUES (?,?,?,?,?,?)",
                (token, key, body_hash, platform, callback_url, time.time()))
        except BaseException:
            self._write("ROLLBACK")
            raise
        self._write("COMMIT")
        assert cur.lastrowid is not None
        return cur.lastrowid, None

    def request_jobs(self, request: int) -> list[int]:
        """The sshq ids of the jobs a request reserved, in order."""
        return [r[0] for r in self._db.execute(
            "SELECT a.job FROM api_jobs a JOIN jobs j ON j.id = a.job WHERE a.request=?"
            " ORDER BY a.job", (request,))]

    def request_done(self, request: int) -> bool:
        """True once the request's submission returned."""
        row = self._db.execute("SELECT done FROM api_requests WHERE id=?",
                               (request,)).fetchone()
        return bool(row and row[0])

    def finish_request(self, request: int) -> None:
        """Mark a request's submission as returned."""
        self._write("UPDATE api_requests SET done=1 WHERE id=?", (request,))

    def unfinished_requests(self) -> list[int]:
        """Requests whose submission never returned (the server stopped)."""
        return [r[0] for r in self._db.execute(
            "SELECT id FROM api_requests WHERE done=0 ORDER BY id")]

    def unlink_jobs(self, request: int) -> None:
        """Forget which jobs a request reserved (they were deleted: never sent)."""
        self._write("DELETE FROM api_jobs WHERE request=?", (request,))

    def forget_request(self, request: int) -> None:
        """Drop a request that submitted nothing (refused before sending)."""
        self._write("BEGIN IMMEDIATE")
        self._write("DELETE FROM api_jobs WHERE request=?", (request,))
        self._write("DELETE FROM api_requests WHERE id=?", (request,))
        self._write("COMMIT")

    def record_kill(self, job: int) -> None:
        """Remember that a kill of ``job`` was asked for (FirecREST: CANCELLED)."""
        self._write("INSERT OR REPLACE INTO api_kills (job, time) VALUES (?,?)",
                    (job, time.time()))

    def killed(self, ids: Iterable[int]) -> set[int]:
        """Which of these jobs the server was asked to kill."""
        ids = list(ids)
        out: set[int] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            out.update(r[0] for r in self._db.execute(
                f"SELECT job FROM api_kills WHERE job IN ({marks})", chunk))
        return out

    def token_work_dirs(self, token: str, platform: str, limit: int = 1000) -> list[str]:
        """The work directories of the jobs ``token`` submitted on ``platform``
        (the newest ``limit``)."""
        return [r[0] for r in self._db.execute(
            "SELECT j.work_dir FROM jobs j JOIN api_jobs a ON a.job = j.id"
            " JOIN api_requests r ON r.id = a.request WHERE r.token=? AND j.platform=?"
            " AND j.work_dir != '' GROUP BY j.work_dir ORDER BY MAX(j.id) DESC LIMIT ?",
            (token, platform, int(limit)))]

    # ------------------------------------------------------------ polls and events

    def polled(self, ids: Iterable[int]) -> dict[int, float | None]:
        """The time of each job's last successful poll (absent: never)."""
        ids = list(ids)
        out: dict[int, float | None] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                    f"SELECT job, polled FROM api_seen WHERE job IN ({marks})", chunk):
                out[row[0]] = row[1]
        return out

    def set_polled(self, ids: Iterable[int], when: float) -> None:
        """Record a successful poll of jobs (one transaction)."""
        self._write("BEGIN IMMEDIATE")
        try:
            self._db.executemany("UPDATE api_seen SET polled=? WHERE job=?",
                                 [(when, i) for i in ids])
        except BaseException:
            self._write("ROLLBACK")
            raise
        self._write("COMMIT")

    def observe(self, jobs: Sequence[Job]) -> int:
        """Record an event for each job whose state differs from the last one seen.

        Each event's data is the job object; a job submitted through a
        request with a ``callback_url`` also gets a webhook delivery, in the
        same transaction.

        Returns:
            The number of events recorded.
        """
        if not jobs:
            return 0
        now = time.time()
        n = 0
        self._write("BEGIN IMMEDIATE")
        try:
            seen = self._seen_states([j.id for j in jobs])
            for j in jobs:
                prev = seen.get(j.id)
                if prev is not None and prev[0] == j.state.value:
                    continue
                polled = prev[1] if prev is not None else None
                data = json.dumps(job_object(j, polled), separators=(",", ":"))
                cur = self._write(
                    "INSERT INTO api_events (job, platform, state, time, data)"
                    " VALUES (?,?,?,?,?)", (j.id, j.platform, j.state.value, now, data))
                self._write("INSERT INTO api_seen (job, state, polled) VALUES (?,?,?)"
                            " ON CONFLICT (job) DO UPDATE SET state=excluded.state",
                            (j.id, j.state.value, polled))
                self._write(
                    "INSERT INTO api_deliveries (event, url, token, next_try)"
                    " SELECT ?, r.callback_url, r.token, ? FROM api_jobs a"
                    " JOIN api_requests r ON r.id = a.request"
                    " WHERE a.job=? AND r.callback_url IS NOT NULL",
                    (cur.lastrowid, now, j.id))
                n += 1
        except BaseException:
            self._write("ROLLBACK")
            raise
        self._write("COMMIT")
        return n

    def _seen_states(self, ids: list[int]) -> dict[int, tuple[str, float | None]]:
        out: dict[int, tuple[str, float | None]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                    f"SELECT job, state, polled FROM api_seen WHERE job IN ({marks})", chunk):
                out[row[0]] = (row[1], row[2])
        return out

    def last_event_id(self) -> int:
        """The id of the newest event (0 if none)."""
        row = self._db.execute("SELECT MAX(id) FROM api_events").fetchone()
        return int(row[0] or 0)

    def events_after(self, after: int, platforms: Sequence[str],
                     limit: int = 500) -> list[tuple[int, str]]:
        """Events with an id above ``after``, oldest first: ``(id, job object JSON)``.

        Args:
            platforms: only events of these platforms (none if empty).
        """
        if not platforms:
            return []
        sql = (f"SELECT id, data FROM api_events WHERE id>? AND platform IN"
               f" ({','.join('?' * len(platforms))}) ORDER BY id LIMIT ?")
        args: list[Any] = [after, *platforms]
        args.append(int(limit))
        return [(int(r[0]), str(r[1])) for r in self._db.execute(sql, args)]

    # ------------------------------------------------------------ webhooks

    def due_deliveries(self, now: float, limit: int = 100) -> list[Delivery]:
        """Deliveries whose time has come, oldest event first.

        A delivery waits behind an earlier one to the same URL that is still
        pending (each URL receives its events in order).
        """
        rows = self._db.execute(
            "SELECT d.id, d.event, d.url, e.data, t.webhook_secret, d.attempts, d.token"
            " FROM api_deliveries d JOIN api_events e ON e.id = d.event"
            " LEFT JOIN api_tokens t ON t.name = d.token"
            " WHERE d.done IS NULL AND d.next_try <= ? AND NOT EXISTS"
            " (SELECT 1 FROM api_deliveries b WHERE b.url = d.url AND b.done IS NULL"
            " AND b.event < d.event AND b.next_try > ?)"
            " ORDER BY d.event LIMIT ?",
            (now, now, int(limit))).fetchall()
        out = []
        for r in rows:
            if r[4] is None:  # the token was revoked: nobody to sign for
                self.delivery_failed(r[0], "token revoked", None)
                continue
            out.append(Delivery(id=r[0], event=r[1], url=r[2], body=r[3].encode(),
                                secret=r[4], attempts=r[5]))
        return out

    def next_delivery_time(self) -> float | None:
        """When the next pending delivery is due (None: none pending)."""
        row = self._db.execute(
            "SELECT MIN(next_try) FROM api_deliveries WHERE done IS NULL").fetchone()
        return None if row[0] is None else float(row[0])

    def delivered(self, delivery: int) -> None:
        """Mark a delivery made."""
        self._write("UPDATE api_deliveries SET done=?, attempts=attempts+1 WHERE id=?",
                    (time.time(), delivery))

    def delivery_failed(self, delivery: int, error: str, next_try: float | None) -> None:
        """Record a failed attempt; ``next_try`` None: give up."""
        if next_try is None:
            self._write("UPDATE api_deliveries SET done=?, attempts=attempts+1,"
                        " last_error=? WHERE id=?",
                        (time.time(), ("gave up: " + error)[:500], delivery))
        else:
            self._write("UPDATE api_deliveries SET next_try=?, attempts=attempts+1,"
                        " last_error=? WHERE id=?", (next_try, error[:500], delivery))
