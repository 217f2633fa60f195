"""The sshq client: submit, poll, wait, kill, cat_log, retrieve, jobs.

:class:`AsyncClient` is the API; :class:`Client` is a synchronous facade with
every public method of it, with the same signatures (tests/test_api_parity.py
keeps them so).  The CLI is a thin layer over them.

Every operation costs one SSH command per host, whatever the number of
jobs.  Connections are opened once per host and reused by every operation
of a client.

:class:`AsyncClient` is composed of parts in :mod:`sshq._client`, each
holding what it needs: a :class:`~sshq._client.core.HostPool` (transports,
failover, bad hosts, agent calls; shareable by a long-running process), and
the parts that take it and the state database: ``Jobs`` (submit, poll, kill,
wait, jobs), ``Logs`` (cat_log, follow_log, ssh_to_job), ``Staging``
(install, retrieve, tidy) and ``Farm`` (farm, farm_attach).  Each public
method is written once, in its part; :class:`AsyncClient` exposes it
unchanged (same signature, same docstring).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from ._client.core import HostPool
from ._client.farm import Farm
from ._client.jobs import Jobs
from ._client.logs import LOG_FILES, LogFile, Logs
from ._client.staging import Staging
from .config import Config, Platform, default_state_dir, load_config
from .model import Job, JobSpec, JobState
from .remote.staging import Installation
from .store import Store
from .transport import CommandResult, Transport

if TYPE_CHECKING:  # (the farm is imported only when used: CLI start-up)
    from .farm.engine import FarmStats
    from .farm.output import ResultSink

__all__ = ["AsyncClient", "Client", "LOG_FILES"]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _part(attr: str, method: Callable[Concatenate[Any, _P], Coroutine[Any, Any, _R]]
          ) -> Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _R]]:
    """``method`` of the part ``self.<attr>``, as a method of AsyncClient."""

    async def call(self: AsyncClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await method(getattr(self, attr), *args, **kwargs)

    functools.update_wrapper(call, method)  # name, docstring, signature
    return call


def _part_iter(attr: str, method: Callable[Concatenate[Any, _P], AsyncIterator[_R]]
               ) -> Callable[Concatenate[AsyncClient, _P], AsyncIterator[_R]]:
    """An async-iterator ``method`` of the part ``self.<attr>``, as a method."""

    def call(self: AsyncClient, /, *args: _P.args,
             **kwargs: _P.kwargs) -> AsyncIterator[_R]:
        return method(getattr(self, attr), *args, **kwargs)

    functools.update_wrapper(call, method)
    return call


class AsyncClient:
    """Manage jobs on platforms over SSH.

    Args:
        config: a :class:`Config`, a platforms file path, or None for the
            default file (the built-in ``localhost`` platform always exists).
        state_dir: directory of the state database; None for the user state
            dir (platformdirs).
        pool: a :class:`~sshq._client.core.HostPool` to share (a long-running
            process serving many clients); it brings its own config and
            state, and :meth:`close` leaves it open.  None: the client makes
            and owns one.

    Use as ``async with AsyncClient() as client: ...`` or call :meth:`close`.

    Attributes:
        config: the platforms.  state_dir: the state directory.
        store: the state database.  pool: the host pool.
    """

    def __init__(
        self, config: Config | str | Path | None = None, *,
        state_dir: str | Path | None = None, pool: HostPool | None = None,
    ) -> None:
        if pool is None:
            cfg = (config if isinstance(config, Config)
                   else load_config(config, must_exist=config is not None))
            sd = Path(state_dir) if state_dir is not None else default_state_dir()
            pool = HostPool(cfg, Store(sd), sd)
            self._owns_pool = True
        else:
            self._owns_pool = False
        self.pool = pool
        self.config: Config = pool.config
        self.state_dir: Path = pool.state_dir
        self.store: Store = pool.store
        self._jobs = Jobs(pool, self.store)
        self._logs = Logs(pool, self.store, self._jobs)
        self._staging = Staging(pool, self.store)
        self._farm = Farm(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection and the database (not a shared pool's)."""
        if self._owns_pool:
            await self.pool.close()
            self.store.close()

    def transport(self, platform: Platform, host: str) -> Transport:
        """The (cached) transport to one host of a platform (see :class:`HostPool`)."""
        return self.pool.transport(platform, host)

    # ---- jobs (sshq._client.jobs)
    submit = _part("_jobs", Jobs.submit)
    poll = _part("_jobs", Jobs.poll)
    kill = _part("_jobs", Jobs.kill)
    wait = _part("_jobs", Jobs.wait)
    jobs = _part("_jobs", Jobs.jobs)
    # ---- logs and ssh to job (sshq._client.logs)
    cat_log = _part("_logs", Logs.cat_log)
    follow_log = _part_iter("_logs", Logs.follow_log)
    ssh_to_job = _part("_logs", Logs.ssh_to_job)
    ssh_to_job_argv = _part("_logs", Logs.ssh_to_job_argv)
    # ---- run files and results (sshq._client.staging)
    retrieve = _part("_staging", Staging.retrieve)
    install = _part("_staging", Staging.install)
    tidy = _part("_staging", Staging.tidy)
    # ---- task farm (sshq._client.farm)
    farm = _part("_farm", Farm.farm)
    farm_attach = _part("_farm", Farm.farm_attach)


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
        pool: as for :class:`AsyncClient`; its connections belong to the
            event loop that first used them: share one only between clients
            that run on the same loop (not between two :class:`Client`).
    """

    def __init__(
        self, config: Config | str | Path | None = None, *,
        state_dir: str | Path | None = None, pool: HostPool | None = None,
    ) -> None:
        self._runner = asyncio.Runner()
        self._closed = False
        self._async = AsyncClient(config, state_dir=state_dir, pool=pool)

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
        on_poll: Callable[[list[Job]], None] | None = None,
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

    def cat_log(self, id: int, file: LogFile = "out", *, offset: int = 0) -> bytes:
        """See :meth:`AsyncClient.cat_log`."""
        return self._run(self._async.cat_log(id, file, offset=offset))

    def follow_log(
        self, id: int, files: Sequence[LogFile] = ("out", "err"), *, poll_every: float = 10.0
    ) -> Iterator[tuple[str, bytes]]:
        """See :meth:`AsyncClient.follow_log`; a plain iterator of ``(file, bytes)``.

        Nothing is sent until the first item is asked for.  Other methods of
        this client may be called between items.
        """
        return self._iterate(self._async.follow_log(id, files, poll_every=poll_every))

    def ssh_to_job(self, id: int, command: str, *,
                   timeout: float | None = None) -> CommandResult:
        """See :meth:`AsyncClient.ssh_to_job`."""
        return self._run(self._async.ssh_to_job(id, command, timeout=timeout))

    def ssh_to_job_argv(self, id: int) -> list[str]:
        """See :meth:`AsyncClient.ssh_to_job_argv`."""
        return self._run(self._async.ssh_to_job_argv(id))

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
        out: ResultSink, run: str | None = None, resume: str | None = None,
        slots: int | None = None, retries: int = 0, timeout: float | None = None,
        speculate: bool = True, keep_order: bool = False,
        output_dir: str | Path | None = None, deps: str | Path | None = None,
        detach: bool = False, via: str | None = None, nodes: int = 1,
        walltime: str | None = None, fmt: str = "jsonl",
        on_name: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> tuple[str, FarmStats]:
        """See :meth:`AsyncClient.farm`."""
        return self._run(self._async.farm(
            batch_file, hosts=hosts, out=out, run=run, resume=resume, slots=slots,
            retries=retries, timeout=timeout, speculate=speculate, keep_order=keep_order,
            output_dir=output_dir, deps=deps, detach=detach, via=via, nodes=nodes,
            walltime=walltime, fmt=fmt, on_name=on_name, warn=warn))

    def farm_attach(self, name: str, *, out: ResultSink, fmt: str | None = None,
                    warn: Callable[[str], None] | None = None) -> FarmStats:
        """See :meth:`AsyncClient.farm_attach`."""
        return self._run(self._async.farm_attach(name, out=out, fmt=fmt, warn=warn))
