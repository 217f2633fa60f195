"""The sshq client: submit, poll, wait, kill, cat_log, retrieve, jobs.

:class:`AsyncClient` is the API; :class:`Client` is a synchronous facade with
the same method names.  The CLI is a thin layer over them.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._client.farm import FarmClient
from ._client.logs import LOG_FILES, LogFile, LogsClient
from ._client.staging import StagingClient
from .config import Config
from .model import Job, JobSpec, JobState

__all__ = ["AsyncClient", "Client", "LOG_FILES"]


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
    """Synchronous facade over :class:`AsyncClient`, with the same method names.

    It owns an event loop; connections persist across calls until
    :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(
        self, config: Config | str | Path | None = None, *, state_dir: str | Path | None = None
    ) -> None:
        self._runner = asyncio.Runner()
        self._async = AsyncClient(config, state_dir=state_dir)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def aclient(self) -> AsyncClient:
        """The underlying :class:`AsyncClient`."""
        return self._async

    def _run(self, coro: Any) -> Any:
        return self._runner.run(coro)

    def close(self) -> None:
        """Close connections and the event loop."""
        try:
            self._run(self._async.close())
        finally:
            self._runner.close()

    def submit(
        self, specs: JobSpec | Sequence[JobSpec], *, platform: str = "localhost"
    ) -> list[Job]:
        """See :meth:`AsyncClient.submit`."""
        result: list[Job] = self._run(self._async.submit(specs, platform=platform))
        return result

    def poll(self, ids: Sequence[int] | None = None, *, all: bool = False) -> list[Job]:
        """See :meth:`AsyncClient.poll`."""
        result: list[Job] = self._run(self._async.poll(ids, all=all))
        return result

    def wait(self, ids: Sequence[int], *, timeout: float | None = None,
             interval: float = 1.0) -> list[Job]:
        """See :meth:`AsyncClient.wait`."""
        result: list[Job] = self._run(self._async.wait(ids, timeout=timeout, interval=interval))
        return result

    def kill(self, ids: Sequence[int], *, settle: float = 5.0) -> list[Job]:
        """See :meth:`AsyncClient.kill`."""
        result: list[Job] = self._run(self._async.kill(ids, settle=settle))
        return result

    def cat_log(self, job_id: int, file: LogFile = "out", *, offset: int = 0) -> bytes:
        """See :meth:`AsyncClient.cat_log`."""
        result: bytes = self._run(self._async.cat_log(job_id, file, offset=offset))
        return result

    def retrieve(self, ids: Sequence[int], *, dest: str | Path = ".") -> list[Path]:
        """See :meth:`AsyncClient.retrieve`."""
        result: list[Path] = self._run(self._async.retrieve(ids, dest=dest))
        return result

    def jobs(self, ids: Sequence[int] | None = None, *, platform: str | None = None,
             state: JobState | str | None = None, limit: int | None = None) -> list[Job]:
        """See :meth:`AsyncClient.jobs`."""
        result: list[Job] = self._run(self._async.jobs(ids, platform=platform, state=state,
                                                       limit=limit))
        return result

    def farm(self, batch_file: str | Path | None = None, **kwargs: Any) -> Any:
        """See :meth:`AsyncClient.farm`."""
        return self._run(self._async.farm(batch_file, **kwargs))

    def farm_attach(self, name: str, **kwargs: Any) -> Any:
        """See :meth:`AsyncClient.farm_attach`."""
        return self._run(self._async.farm_attach(name, **kwargs))
