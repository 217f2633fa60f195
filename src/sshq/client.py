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
the parts that take it and the state database: ``Jobs`` (submit, poll,
poll_report, kill, wait, jobs), ``Logs`` (cat_log, follow_log, ssh_to_job),
``Staging`` (install, retrieve, tidy) and ``Farm`` (farm, farm_attach).
Each public method is written once, in its part; :class:`AsyncClient`
exposes it unchanged (same signature, same docstring).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from ._client.core import HostPool
from ._client.farm import Farm
from ._client.jobs import Jobs
from ._client.logs import LOG_FILES, Logs
from ._client.staging import Staging
from .config import Config, Platform, default_state_dir, load_config
from .store import Store
from .transport import Transport

if TYPE_CHECKING:  # (the farm is imported only when used: CLI start-up)
    pass

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
    poll_report = _part("_jobs", Jobs.poll_report)
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


def _sync(method: Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _R]]
          ) -> Callable[Concatenate[Client, _P], _R]:
    """An AsyncClient ``method`` run to completion on the Client's loop."""

    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self._run(method(self._async, *args, **kwargs))

    functools.update_wrapper(call, method)  # name, docstring, signature
    return call


def _sync_iter(method: Callable[Concatenate[AsyncClient, _P], AsyncIterator[_R]]
               ) -> Callable[Concatenate[Client, _P], Iterator[_R]]:
    """An async-iterator AsyncClient ``method`` as a plain iterator (see ``_iterate``)."""

    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[_R]:
        return self._iterate(method(self._async, *args, **kwargs))

    functools.update_wrapper(call, method)
    sig = inspect.signature(method)
    ret = str(sig.return_annotation)
    call.__signature__ = sig.replace(  # type: ignore[attr-defined]
        return_annotation=ret[len("Async"):] if ret.startswith("AsyncIterator[") else ret)
    return call


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

    # ---- every method of AsyncClient but transport, run to completion
    submit = _sync(AsyncClient.submit)
    poll = _sync(AsyncClient.poll)
    poll_report = _sync(AsyncClient.poll_report)
    kill = _sync(AsyncClient.kill)
    wait = _sync(AsyncClient.wait)
    jobs = _sync(AsyncClient.jobs)
    cat_log = _sync(AsyncClient.cat_log)
    follow_log = _sync_iter(AsyncClient.follow_log)
    ssh_to_job = _sync(AsyncClient.ssh_to_job)
    ssh_to_job_argv = _sync(AsyncClient.ssh_to_job_argv)
    retrieve = _sync(AsyncClient.retrieve)
    install = _sync(AsyncClient.install)
    tidy = _sync(AsyncClient.tidy)
    farm = _sync(AsyncClient.farm)
    farm_attach = _sync(AsyncClient.farm_attach)
