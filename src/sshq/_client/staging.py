"""Run files and results: install, retrieve, tidy (part of :class:`sshq.AsyncClient`)."""

from __future__ import annotations

import base64
import binascii
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..exceptions import InvalidInputError, RemoteError
from ..model import JobState
from ..quoting import check_directive_value
from ..remote.installed import refuse_if_restricted
from ..remote.staging import (
    CYLC_EXCLUDES,
    Installation,
    rsync_pull,
    rsync_push,
    sftp_push,
    shared_run_dir,
)
from ..store import Store
from ..transport import Transport
from .core import HostPool

log = logging.getLogger("sshq.client")


class Staging:
    """install, retrieve, tidy: the staging part of :class:`sshq.AsyncClient`.

    Args:
        pool: the host pool.
        store: the state database.
    """

    def __init__(self, pool: HostPool, store: Store) -> None:
        self.pool = pool
        self.store = store

    async def retrieve(self, ids: Sequence[int], *, dest: str | Path = ".") -> list[Path]:
        """Copy job log directories back with rsync (Cylc's log retrieval).

        Each job's log directory lands in ``DEST/<name>/<NN>/`` (NN the
        submit number, two digits); for a job that succeeded, the spec's
        ``outputs`` (paths relative to its work directory) land under
        ``DEST/<name>/<NN>/outputs/``.  One rsync per job, from the host the
        job was submitted through; files already there are overwritten.

        Args:
            ids: sshq ids.
            dest: local directory (created if missing).

        Returns:
            The local directories (:class:`~pathlib.Path`), in the order of
            ``ids``.

        Raises:
            UnknownJobError: an id is not in the local store (nothing is copied).
            ConfigError: a job's platform is no longer in the platforms file.
            RemoteError: rsync failed (its stderr in the message); the jobs
                before it were copied.
        """
        jobs = self.store.get(list(ids))
        out: list[Path] = []
        for job in jobs:
            plat = self.pool.config.platform(job.platform)
            t = self.pool.transport(plat, self.pool.host_of(plat, job.host))
            local = Path(dest) / job.name / f"{job.submit_num:02d}"
            await rsync_pull(t, job.job_log_dir, local)
            if job.state is JobState.SUCCEEDED:
                for rel in self.store.spec(job.id).get("outputs") or ():
                    await rsync_pull(t, f"{job.work_dir}/./{rel}", local / "outputs",
                                     relative=True)
            out.append(local)
        return out

    async def install(self, src_dir: str | Path, *, platform: str,
                      excludes: Sequence[str] = ()) -> Installation:
        """Install a source tree into the platform's run directory.

        rsync with Cylc's excludes (:data:`CYLC_EXCLUDES`) plus ``excludes``;
        only changed files travel.  If the run directory is on a file system
        shared with this machine (remote-init's UUID file is here, and a
        random token written here is read back there: one more agent call,
        only then) the copy is local (and skipped when the source is the run
        directory); if the remote side has no rsync, changed files go by SFTP.

        Args:
            src_dir: local directory.
            platform: platform name.
            excludes: more rsync exclude patterns (``/x`` anchors at the top).

        Returns:
            What was done (:class:`Installation`).

        Raises:
            InvalidInputError: ``src_dir`` is not a directory.
            TransportError, RemoteError: the copy failed, or a local platform's
                agent reported a run directory that is not the one here.
            InvalidInputError: a restricted platform's copy would need SFTP
                (no rsync here, or no rrsync there).
        """
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidInputError(f"{str(src)!r} is not a directory")
        for e in excludes:
            check_directive_value("exclude", e)
        plat = self.pool.config.platform(platform)
        patterns = [*CYLC_EXCLUDES, *excludes]

        async def op(host: str, t: Transport) -> Installation:
            init = await self.pool.agent(plat, t, "init", {"run_dir": plat.run_dir})
            remote_dir = init.get("run_dir")
            if not isinstance(remote_dir, str) or not remote_dir.startswith("/"):
                raise RemoteError(f"{t.host}: remote-init reported no absolute run directory")

            async def read(path: str) -> bytes | None:   # the probe, through the agent
                try:
                    reply = await self.pool.agent(plat, t, "read", {"path": path, "max_bytes": 64})
                    data = reply.get("data_b64") if reply.get("ok") is True else None
                    return (base64.b64decode(data, validate=True)
                            if isinstance(data, str) and len(data) <= 128 else None)
                except (RemoteError, binascii.Error, ValueError):
                    return None

            shared = await shared_run_dir(init, read)
            done: dict[str, Any] = {"platform": platform, "host": t.host, "source": str(src),
                    "remote_dir": remote_dir, "shared_filesystem": shared}
            if shared:
                if src.resolve() == Path(remote_dir).resolve():
                    return Installation(method="skipped", files_transferred=0, **done)
                n = await rsync_push(None, src, remote_dir, patterns)
                return Installation(method="local", files_transferred=n, **done)
            if t.is_local:   # this machine, yet not the same directory
                raise RemoteError(f"{t.host}: the run directory the agent reported,"
                                  f" {remote_dir!r}, is not the directory seen here (no token"
                                  " read back); nothing copied")
            if init.get("rsync") and shutil.which("rsync"):
                n = await rsync_push(t, src, remote_dir, patterns)
                return Installation(method="rsync", files_transferred=n, **done)
            # (a restricted key copies only through the host's rrsync: no SFTP)
            refuse_if_restricted(plat, "installing files without rsync here and rrsync on"
                                 f" {t.host} (by SFTP)")
            listing = await self.pool.agent(plat, t, "listing", {"path": remote_dir})
            n = await sftp_push(t, src, remote_dir, patterns, listing["files"])
            return Installation(method="sftp", files_transferred=n, **done)

        result: Installation = await self.pool.with_failover(plat, op)
        return result

    async def tidy(self, *, platform: str) -> list[str]:
        """Remove what sshq left on the platform: its service directory
        (``<run_dir>/.sshq``: remote-init's UUID file) and links an interrupted
        submission left.  Job logs, work directories and installed files stay.

        Runs on the first host of the platform that can be reached.

        Args:
            platform: platform name.

        Returns:
            The absolute remote paths removed (empty when there was nothing
            to remove).

        Raises:
            ConfigError: unknown platform.
            TransportError: no host of the platform could be reached.
            RemoteError: the agent failed or replied nonsense.
        """
        plat = self.pool.config.platform(platform)

        async def op(host: str, t: Transport) -> list[str]:
            info = await self.pool.remote_init(plat, host, t)
            reply = await self.pool.agent(plat, t, "tidy", {"run_dir": info.run_dir})
            removed: list[str] = reply["removed"]
            return removed

        result: list[str] = await self.pool.with_failover(plat, op)
        return result
