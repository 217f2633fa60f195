"""The sshq client: submit, poll, wait, kill, cat_log, retrieve, jobs.

:class:`AsyncClient` is the API; :class:`Client` is a synchronous facade with
every public method of it, with the same signatures (tests/test_api_parity.py
keeps them so).  The CLI is a thin layer over them.

Every operation costs one SSH command per host, whatever the number of
jobs.  Connections are opened once per host and reused by every operation
of a client.

:class:`AsyncClient` is assembled from private parts in :mod:`sshq._client`:
``core`` (configuration, state, transports, failover, agent calls), ``jobs``
(submit, poll, kill, wait, jobs), ``logs`` (cat_log, follow_log, ssh_to_job),
``staging`` (install, retrieve, tidy) and ``farm`` (farm, farm_attach).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ._client.farm import FarmClient
from ._client.logs import LOG_FILES, LogFile, LogsClient
from ._client.staging import StagingClient
from .config import Config
from .model import Job, JobSpec, JobState
from .remote.staging import Installation
from .transport import CommandResult

__all__ = ["AsyncClient", "Client", "LOG_FILES"]

_T = TypeVar("_T")


class AsyncClient(LogsClient, StagingClient, FarmClient):
    """Manage jobs on platforms over SSH.

    Args:
        config: a :class:`Config`, a platforms file path, or None for the
            default file (the built-in ``localhost`` platform always exists).
        state_dir: directory of the state database; None for the user state
            dir (platformdirs).

    Use as ``async with AsyncClient() as client: ...`` or call :meth:`close`.
    """


class Client:
    """Synchronous facade over :class:`AsyncClient`: every public method, same signature.

    Each method runs its :class:`AsyncClient` counterpart to completion on an
    event loop the client owns; :meth:`follow_log` returns a plain iterator
    that drives that loop one item at a time.  Connections persist across
    calls until :meth:`close` (or the end of a ``with`` block).  Not
    thread-safe, and not for use inside a running event loop (use
    :class:`AsyncClient` there).

    The one method left out is ``AsyncClient.transport`` (plumbing: the
    transport it returns is usable only inside the client's event loop).

    Args:
        config: as for :class:`AsyncClient`.
        state_dir: as for :class:`AsyncClient`.
    """

    def __init__(
        self, config: Config | str | Path | None = None, *, state_dir: str | Path | None = None
    ) -> None:
        self._runner = asyncio.Runner()
        self._closed = False
        self._async = AsyncClient(config, state_dir=state_dir)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def aclient(self) -> AsyncClient:
        """The underlying :class:`AsyncClient`."""
        return self._async

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._runner.run(coro)

    def _iterate(self, agen: AsyncIterator[_T]) -> Iterator[_T]:
        """Drive an async iterator from synchronous code, one item per loop run.

        Leaving the iteration early (``break``, an exception, garbage
        collection) closes an async generator on the loop, which ends its
        remote stream.
        """

        async def step() -> list[_T]:  # [] at the end, else [item]
            try:
                return [await anext(agen)]
            except StopAsyncIteration:
                return []

        try:
            while item := self._run(step()):
                yield item[0]
        finally:
            # (not when collected inside another call: Runner.close closes it)
            if (isinstance(agen, AsyncGenerator) and not self._closed
                    and asyncio._get_running_loop() is None):
                self._run(agen.aclose())

    def close(self) -> None:
        """Close every connection, the database and the event loop."""
        if self._closed:
            return
        try:
            self._run(self._async.close())
        finally:
            self._closed = True
            self._runner.close()

    # ---- jobs (see sshq._client.jobs)

    def submit(
        self, specs: JobSpec | Sequence[JobSpec], *, platform: str = "localhost"
    ) -> list[Job]:
        """See :meth:`AsyncClient.submit`."""
        return self._run(self._async.submit(specs, platform=platform))

    def poll(self, ids: Sequence[int] | None = None, *, all: bool = False) -> list[Job]:
        """See :meth:`AsyncClient.poll`."""
        return self._run(self._async.poll(ids, all=all))

    def kill(self, ids: Sequence[int], *, settle: float = 5.0) -> list[Job]:
        """See :meth:`AsyncClient.kill`."""
        return self._run(self._async.kill(ids, settle=settle))

    def wait(
        self,
        ids: Sequence[int],
        *,
        timeout: float | None = None,
        interval: float = 1.0,
        max_interval: float = 10.0,
        on_poll: Any = None,
    ) -> list[Job]:
        """See :meth:`AsyncClient.wait`."""
        return self._run(self._async.wait(ids, timeout=timeout, interval=interval,
                                          max_interval=max_interval, on_poll=on_poll))

    def jobs(
        self, ids: Sequence[int] | None = None, *, platform: str | None = None,
        state: JobState | str | None = None, limit: int | None = None,
    ) -> list[Job]:
        """See :meth:`AsyncClient.jobs`."""
        return self._run(self._async.jobs(ids, platform=platform, state=state, limit=limit))

    # ---- logs and ssh to job (see sshq._client.logs)

    def cat_log(self, job_id: int, file: LogFile = "out", *, offset: int = 0) -> bytes:
        """See :meth:`AsyncClient.cat_log`."""
        return self._run(self._async.cat_log(job_id, file, offset=offset))

    def follow_log(
        self, job_id: int, files: Sequence[LogFile] = ("out", "err"), *, poll_every: float = 10.0
    ) -> Iterator[tuple[str, bytes]]:
        """See :meth:`AsyncClient.follow_log`; a plain iterator of ``(file, bytes)``.

        Nothing is sent until the first item is asked for.  Other methods of
        this client may be called between items.
        """
        return self._iterate(self._async.follow_log(job_id, files, poll_every=poll_every))

    def ssh_to_job(self, job_id: int, command: str, *,
                   timeout: float | None = None) -> CommandResult:
        """See :meth:`AsyncClient.ssh_to_job`."""
        return self._run(self._async.ssh_to_job(job_id, command, timeout=timeout))

    def ssh_to_job_argv(self, job_id: int) -> list[str]:
        """See :meth:`AsyncClient.ssh_to_job_argv`."""
        return self._run(self._async.ssh_to_job_argv(job_id))

    # ---- run files and results (see sshq._client.staging)

    def retrieve(self, ids: Sequence[int], *, dest: str | Path = ".") -> list[Path]:
        """See :meth:`AsyncClient.retrieve`."""
        return self._run(self._async.retrieve(ids, dest=dest))

    def install(self, src_dir: str | Path, *, platform: str,
                excludes: Sequence[str] = ()) -> Installation:
        """See :meth:`AsyncClient.install`."""
        return self._run(self._async.install(src_dir, platform=platform, excludes=excludes))

    def tidy(self, *, platform: str) -> list[str]:
        """See :meth:`AsyncClient.tidy`."""
        return self._run(self._async.tidy(platform=platform))

    # ---- task farm (see sshq._client.farm)

    def farm(
        self, batch_file: str | Path | None = None, *, hosts: Sequence[str] = (),
        out: Any, run: str | None = None, resume: str | None = None,
        slots: int | None = None, retries: int = 0, timeout: float | None = None,
        speculate: bool = True, keep_order: bool = False,
        output_dir: str | Path | None = None, deps: str | Path | None = None,
        detach: bool = False, via: str | None = None, nodes: int = 1,
        walltime: str | None = None, fmt: str = "jsonl",
        on_name: Any = None, warn: Any = None,
    ) -> Any:
        """See :meth:`AsyncClient.farm`."""
        return self._run(self._async.farm(
            batch_file, hosts=hosts, out=out, run=run, resume=resume, slots=slots,
            retries=retries, timeout=timeout, speculate=speculate, keep_order=keep_order,
            output_dir=output_dir, deps=deps, detach=detach, via=via, nodes=nodes,
            walltime=walltime, fmt=fmt, on_name=on_name, warn=warn))

    def farm_attach(self, name: str, *, out: Any, fmt: str | None = None,
                    warn: Any = None) -> Any:
        """See :meth:`AsyncClient.farm_attach`."""
        return self._run(self._async.farm_attach(name, out=out, fmt=fmt, warn=warn))
