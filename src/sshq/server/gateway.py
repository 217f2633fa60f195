"""The server's core, without HTTP: submit with idempotency keys, reads from
the state database, kill, the one background poller, events and webhooks.

One :class:`Gateway` serves every HTTP client of a server.  It holds one
:class:`~sshq.AsyncClient` (so one host pool: one SSH connection per host)
and answers every read from the state database.  Only the poller polls:
each (platform, login host) group of jobs not yet final at most once per the
platform's ``min_poll_interval``, whatever the number of clients watching.

State changes become events (:meth:`ServerState.observe`) after every poll,
submit and kill; waiters of the event stream are woken, and webhook
deliveries are made by :meth:`Gateway.run_webhooks`, at least once, with
exponential backoff, from the database (so they survive a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..client import AsyncClient
from ..config import LOCALHOST, Platform
from ..exceptions import (
    ConfigError,
    InvalidInputError,
    RemoteError,
    RestrictedError,
    RestrictedPlatformError,
    SshqError,
    TransportError,
    UnknownJobError,
)
from ..model import Job, JobSpec, JobState
from ..store import API_REQUEST
from .state import Delivery, ServerState, TokenInfo, job_object

__all__ = ["Gateway", "ApiError", "sign"]

log = logging.getLogger("sshq.server")


class ApiError(Exception):
    """An error for the HTTP client: a status code and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sign(secret: str, body: bytes) -> str:
    """The ``X-Sshq-Signature`` header value: ``sha256=<hex HMAC-SHA256 of body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Gateway:
    """Everything the HTTP routes do, over one client and the state database.

    Args:
        client: the client (its pool and store are shared by every request).
        tick: seconds between the poller's looks for groups due a poll.
        webhook_timeout: seconds for one webhook POST.
        webhook_backoff: first retry delay in seconds (doubling, with jitter,
            up to ``webhook_backoff_max``).
        webhook_backoff_max: longest retry delay, in seconds.
        webhook_attempts: attempts before a delivery is given up.
        kill_settle: seconds a kill waits for the job wrappers to record the
            end (see :meth:`AsyncClient.kill`).
    """

    def __init__(self, client: AsyncClient, *, tick: float = 1.0,
                 webhook_timeout: float = 10.0, webhook_backoff: float = 1.0,
                 webhook_backoff_max: float = 300.0, webhook_attempts: int = 20,
                 kill_settle: float = 5.0) -> None:
        self.client = client
        self.store = client.store
        self.state = ServerState(client.store.path)
        self.tick = tick
        self.webhook_timeout = webhook_timeout
        self.webhook_backoff = webhook_backoff
        self.webhook_backoff_max = webhook_backoff_max
        self.webhook_attempts = webhook_attempts
        self.kill_settle = kill_settle
        self._changed = asyncio.Event()
        self._deliveries_due = asyncio.Event()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._polling: set[tuple[str, str]] = set()
        self._last_poll: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: SSH agent calls the poller made (for the benchmark's sessions per minute)
        self.polls_made = 0

    def close(self) -> None:
        """Close the server's database connection (not the client)."""
        self.state.close()

    # ------------------------------------------------------------ auth

    def authenticate(self, authorization: str | None) -> TokenInfo | None:
        """The token of an ``Authorization: Bearer <token>`` header, or None."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        return self.state.authenticate(presented.strip())

    def served(self, platform: str) -> Platform | None:
        """The platform, if the server serves it: every platform of the
        platforms file, but not the built-in ``localhost`` (it would run any
        token's jobs on the server's own machine) unless the file defines it."""
        plat = self.client.config.platforms.get(platform)
        return None if plat is None or plat is LOCALHOST else plat

    def visible_platforms(self, token: TokenInfo) -> list[str]:
        """The names of the served platforms the token may use."""
        return [name for name in self.client.config.platforms
                if token.allows(name) and self.served(name)]

    def check_platform(self, token: TokenInfo, platform: str) -> None:
        """Refuse a platform the token may not use (403) or that does not exist (404).

        Raises:
            ApiError: 403 or 404.
        """
        if not token.allows(platform):
            raise ApiError(403, f"this token may not use platform {platform!r}")
        if self.served(platform) is None:
            raise ApiError(404, f"unknown platform {platform!r}")

    def platforms(self, token: TokenInfo) -> list[dict[str, Any]]:
        """The platforms the token may use: name, job runner, transport."""
        return [{"name": p.name, "job_runner": p.job_runner, "transport": p.transport,
                 "min_poll_interval": p.min_poll_interval}
                for p in self.client.config.platforms.values()
                if token.allows(p.name) and self.served(p.name)]

    # ------------------------------------------------------------ jobs

    def objects(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """The API job objects of jobs (with their last successful poll)."""
        polled = self.state.polled(j.id for j in jobs)
        return [job_object(j, polled.get(j.id)) for j in jobs]

    def job(self, token: TokenInfo, id: int) -> Job:
        """A job the token may see.

        Raises:
            ApiError: 404 unknown, 403 on a platform the token may not use.
        """
        try:
            (job,) = self.store.get([id])
        except SshqError:
            raise ApiError(404, f"unknown job {id}") from None
        if self.served(job.platform) is None:
            raise ApiError(404, f"unknown job {id}")
        if not token.allows(job.platform):
            raise ApiError(403, f"job {id} is on platform {job.platform!r}, which this"
                           " token may not use")
        return job

    def list_jobs(self, token: TokenInfo, *, platform: str | None, state: str | None,
                  limit: int | None) -> list[Job]:
        """Jobs from the state database, oldest first (no SSH).

        Raises:
            ApiError: 403/404 for the platform, 422 for an unknown state.
        """
        if platform:
            self.check_platform(token, platform)
        states = None
        if state:
            try:
                states = [JobState(state)]
            except ValueError:
                raise ApiError(422, f"unknown state {state!r}; use one of"
                               f" {', '.join(s.value for s in JobState)}") from None
        plats = [platform] if platform else self.visible_platforms(token)
        jobs: list[Job] = []
        for p in plats:
            jobs += self.store.query(platform=p, states=states, limit=limit)
        jobs.sort(key=lambda j: j.id)
        return jobs[-limit:] if limit else jobs

    async def submit(self, token: TokenInfo, platform: str, specs: list[JobSpec], *,
                     callback_url: str | None, key: str | None,
                     body_hash: str) -> tuple[list[Job], bool]:
        """Submit a batch in one SSH command, at most once per idempotency key.

        A request whose key the token used before returns the jobs of the
        first request (waiting for it if it is still being submitted), also
        after a restart: the jobs it reserved are linked to it in the
        database before anything is sent.

        Returns:
            ``(jobs, replayed)``: replayed is True when the jobs are those of
            an earlier request with the same key.

        Raises:
            ApiError: 403/404 platform, 422 key reused with another body or
                a spec refused, 403 the restricted agent of the platform
                refused the batch (e.g. a work directory outside its run
                directory), 502/503 SSH or agent failures.
        """
        self.check_platform(token, platform)
        request, earlier = self.state.begin_request(token.name, key, body_hash, platform,
                                                    callback_url)
        if earlier is not None:
            if earlier != body_hash:
                raise ApiError(422, f"Idempotency-Key {key!r} was used before with another"
                               " request body")
            pending = self._inflight.get(request)
            if pending is not None:
                await asyncio.shield(pending)
            ids = self.state.request_jobs(request)
            if ids or self.state.request_done(request):
                return self.store.get(ids), True
            # the first attempt reserved nothing (refused, or stopped before
            # anything was recorded): nothing was sent; submit now
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[request] = done
        ctx = API_REQUEST.set(request)
        try:
            jobs = await self.client.submit(specs, platform=platform)
            self.state.finish_request(request)
        except SshqError as exc:
            if not self.state.request_jobs(request):
                self.state.forget_request(request)
            raise _api_error(exc) from None
        finally:
            API_REQUEST.reset(ctx)
            del self._inflight[request]
            done.set_result(None)
            self.observe_ids(self.state.request_jobs(request))
        return jobs, False

    async def kill(self, token: TokenInfo, id: int) -> Job:
        """Kill a job (its job runner's kill command) and return it.

        Raises:
            ApiError: 403/404; 403 the platform's restricted agent refused;
                502/503 when the host or agent failed.
        """
        self.job(token, id)
        self.state.record_kill(id)
        try:
            (job,) = await self.client.kill([id], settle=self.kill_settle)
        except SshqError as exc:
            raise _api_error(exc) from None
        self.observe_ids([id])
        return job

    async def cat_log(self, token: TokenInfo, id: int, file: str, offset: int) -> bytes:
        """Bytes of a job log file from ``offset``.

        Raises:
            ApiError: 403/404; 502/503 when the host or agent failed.
        """
        self.job(token, id)
        try:
            return await self.client.cat_log(id, file, offset=offset)  # type: ignore[arg-type]
        except SshqError as exc:
            raise _api_error(exc) from None

    async def follow_log(self, token: TokenInfo, id: int, file: str,
                         offset: int) -> AsyncIterator[bytes]:
        """Stream a job log file from ``offset`` until the job is final.

        The end is noticed from the job status file by the stream itself,
        or from the poller's view of the job (never by a poll of its own).
        """
        self.job(token, id)
        skip = offset
        agen = self.client.follow_log(id, [file],  # type: ignore[list-item]
                                      poll_every=86400.0)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

        async def pump() -> None:
            try:
                async for _name, data in agen:
                    await queue.put(data)
            except SshqError as exc:
                log.warning("follow of job %d: %s", id, exc)
            finally:
                await queue.put(None)

        async def watch() -> None:
            while True:
                changed = self._changed
                (job,) = self.store.get([id])
                if job.state.is_final:
                    await asyncio.sleep(2.0)  # let the last bytes arrive
                    await queue.put(None)
                    return
                try:
                    await asyncio.wait_for(changed.wait(), 5.0)
                except TimeoutError:
                    pass

        tasks = [asyncio.create_task(pump()), asyncio.create_task(watch())]
        try:
            while (data := await queue.get()) is not None:
                if skip:
                    cut, skip = min(skip, len(data)), skip - min(skip, len(data))
                    data = data[cut:]
                if data:
                    yield data
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    # ------------------------------------------------------------ events

    def observe_ids(self, ids: Sequence[int]) -> None:
        """Record events for state changes of these jobs and wake the waiters."""
        if not ids:
            return
        try:
            jobs = self.store.get(list(ids))
        except UnknownJobError:  # (rows a refused submission deleted)
            jobs = []
            for i in ids:
                with contextlib.suppress(UnknownJobError):
                    jobs += self.store.get([i])
        if self.state.observe(jobs):
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._deliveries_due.set()

    async def wait_changed(self, timeout: float) -> None:
        """Return when an event is recorded, or after ``timeout`` seconds."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass

    # ------------------------------------------------------------ the poller

    def recover(self) -> None:
        """Settle the submissions a previous server left unfinished (SIGKILL).

        A batch is sent in one agent call, after every job's row has its job
        log directory: a request with a row still without one sent nothing,
        so its rows are deleted and a retry (same key) submits it afresh.
        The other unfinished requests may have been sent: their jobs stay,
        and the poller adopts each from its job status file or finds it was
        never submitted.
        """
        for request in self.state.unfinished_requests():
            ids = self.state.request_jobs(request)
            if ids and any(not j.job_log_dir for j in self.store.get(ids)):
                log.warning("submit request %d was stopped before anything was sent;"
                            " a retry submits it", request)
                self.store.delete_jobs(ids)
                self.state.unlink_jobs(request)

    def start(self) -> None:
        """Settle unfinished submissions (:meth:`recover`), then start the
        poller and the webhook sender (in the running loop)."""
        self.recover()
        for coro in (self.run_poller(), self.run_webhooks()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)

    async def stop(self) -> None:
        """Stop the background tasks."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def run_poller(self) -> None:
        """Poll every group of active jobs once per its platform's ``min_poll_interval``."""
        running: set[asyncio.Task[None]] = set()
        while True:
            try:
                for task in self.poll_due():
                    running.add(task)
                    task.add_done_callback(running.discard)
            except Exception:  # the poller must not die
                log.exception("poller round failed")
            await asyncio.sleep(self.tick)

    def poll_due(self) -> list[asyncio.Task[None]]:
        """Start a poll of each group due one; returns the tasks started."""
        active = [j for j in self.store.query(states=[JobState.SUBMITTED, JobState.RUNNING])
                  if self.served(j.platform)]
        if active:
            # changes written by another process (`sshq poll`) count too
            if self.state.observe(active):
                self._notify()
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for j in active:
            groups[(j.platform, j.host)].append(j.id)
        now = time.monotonic()
        started = []
        for key, ids in groups.items():
            plat = self.client.config.platforms.get(key[0])
            if plat is None or key in self._polling:
                continue
            if now - self._last_poll.get(key, -1e9) < plat.min_poll_interval:
                continue
            self._last_poll[key] = now
            self._polling.add(key)
            started.append(asyncio.create_task(self._poll_group(key, ids)))
        return started

    async def _poll_group(self, key: tuple[str, str], ids: list[int]) -> None:
        try:
            when = time.time()
            self.polls_made += 1
            # (a failure changes no state and is reported, not raised)
            _, errors = await self.client.poll_report(ids)
            if not errors:
                self.state.set_polled(ids, when)
            self.observe_ids(ids)
        except Exception:
            log.exception("poll of %s on %s failed (no state changed)", *key)
        finally:
            self._polling.discard(key)

    # ------------------------------------------------------------ webhooks

    async def run_webhooks(self) -> None:
        """Make due webhook deliveries, for ever (at least once, with backoff)."""
        import httpx

        async with httpx.AsyncClient(timeout=self.webhook_timeout,
                                     follow_redirects=False) as http:
            while True:
                self._deliveries_due.clear()
                try:
                    await self.deliver_due(http)
                    nxt = self.state.next_delivery_time()
                except Exception:
                    log.exception("webhook round failed")
                    nxt = None
                wait = 5.0 if nxt is None else min(5.0, max(0.05, nxt - time.time()))
                try:
                    await asyncio.wait_for(self._deliveries_due.wait(), wait)
                except TimeoutError:
                    pass

    async def deliver_due(self, http: Any) -> None:
        """One round: every due delivery, in event order per URL, URLs in parallel."""
        by_url: dict[str, list[Delivery]] = defaultdict(list)
        for d in self.state.due_deliveries(time.time()):
            by_url[d.url].append(d)

        async def one_url(items: list[Delivery]) -> None:
            for d in items:
                if not await self._deliver(http, d):
                    return  # keep this URL's order: the rest waits for the retry

        await asyncio.gather(*(one_url(items) for items in by_url.values()))

    async def _deliver(self, http: Any, d: Delivery) -> bool:
        headers = {"Content-Type": "application/json", "X-Sshq-Signature": sign(d.secret, d.body),
                   "X-Sshq-Event-Id": str(d.event), "User-Agent": "sshq-webhook"}
        try:
            resp = await http.post(d.url, content=d.body, headers=headers)
            ok, why = 200 <= resp.status_code < 300, f"HTTP {resp.status_code}"
        except Exception as exc:  # any failure of the receiver is retried
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok:
            self.state.delivered(d.id)
            return True
        if d.attempts + 1 >= self.webhook_attempts:
            log.warning("webhook for event %d to %s given up after %d attempts: %s",
                        d.event, d.url, d.attempts + 1, why)
            self.state.delivery_failed(d.id, why, None)
            return False
        delay = min(self.webhook_backoff * 2 ** d.attempts, self.webhook_backoff_max)
        delay *= random.uniform(0.5, 1.0)
        log.info("webhook for event %d to %s failed (%s); retry in %.1f s", d.event, d.url,
                 why, delay)
        self.state.delivery_failed(d.id, why, time.time() + delay)
        return False


def _api_error(exc: SshqError) -> ApiError:
    """The HTTP error of a client error: 422 refused input, 404 unknown job or
    platform, 403 a restricted platform's agent (or the client for it, before
    connecting) refused (its reason in the message), 503 the host could not
    be reached, 502 the agent failed, else 500.  The message is the error's
    first line."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, RestrictedPlatformError):
        return ApiError(403, msg)
    if isinstance(exc, InvalidInputError):
        return ApiError(422, msg)
    if isinstance(exc, UnknownJobError | ConfigError):
        return ApiError(404, msg)
    if isinstance(exc, TransportError):
        return ApiError(503, msg)
    if isinstance(exc, RestrictedError):
        return ApiError(403, msg)
    if isinstance(exc, RemoteError):
        return ApiError(502, msg)
    return ApiError(500, msg)
