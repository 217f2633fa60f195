"""Job logs and SSH to job (part of :class:`sshq.AsyncClient`)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from ..config import Platform
from ..exceptions import (
    HostUnreachableError,
    InvalidInputError,
    JobNotRunningError,
    JobRunnerError,
    RemoteError,
)
from ..job_runners import HANDLERS
from ..model import Job, JobState
from ..remote.attach import HOP_MARK, NO_ENV_MARK, hop_argv, launch_argv
from ..remote.installed import refuse_if_restricted
from ..remote.protocol import LOGIN_SHELL
from ..remote.status import JobStatus
from ..shipped import sshq_jobstatus as js
from ..store import Store
from ..transport import CommandResult, Transport, check_host
from .core import HostPool
from .jobs import Jobs

log = logging.getLogger("sshq.client")


#: ``cat_log`` file names: short name -> file in the job log directory.
LOG_FILES = js.LOG_FILES

LogFile = Literal["out", "err", "status", "job"]


class Logs:
    """cat_log, follow_log, ssh_to_job: the log part of :class:`sshq.AsyncClient`.

    Args:
        pool: the host pool.
        store: the state database.
        jobs: the job part (logs poll jobs).
    """

    def __init__(self, pool: HostPool, store: Store, jobs: Jobs) -> None:
        self.pool = pool
        self.store = store
        self.jobs = jobs

    async def cat_log(self, id: int, file: LogFile = "out", *, offset: int = 0) -> bytes:
        """Read a file of a job's log directory.

        Args:
            id: sshq id.
            file: ``out`` (job.out), ``err`` (job.err), ``status`` (job.status)
                or ``job`` (the job script).
            offset: first byte to read.

        Returns:
            The raw bytes (decode with ``errors="replace"`` to display).

        Raises:
            InvalidInputError: unknown file name.
            RemoteError: the file cannot be read.
        """
        if file not in LOG_FILES:
            raise InvalidInputError(f"unknown log file {file!r}; use {', '.join(LOG_FILES)}")
        (job,) = self.store.get([id])
        path = f"{job.job_log_dir}/{LOG_FILES[file]}"
        data = bytearray()
        while True:  # the agent reads at most 16 MiB per call
            reply = await self.pool.agent_on_group(
                job.platform, job.host, "read", {"path": path, "offset": offset + len(data)},
                runners=[job.job_runner],
            )
            if not reply.get("ok"):
                raise RemoteError(f"job {id}: {reply.get('error')}")
            try:
                chunk = base64.b64decode(reply["data_b64"], validate=True)
                size = int(reply["size"])
            except (KeyError, TypeError, ValueError):
                raise RemoteError(f"job {id}: malformed agent reply to a log read"
                                  ) from None
            data += chunk
            if not chunk or offset + len(data) >= size:
                return bytes(data)

    async def follow_log(
        self, id: int, files: Sequence[LogFile] = ("out", "err"), *, poll_every: float = 10.0
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Stream a job's log files as they grow, until the job is final.

        One streaming agent call (``follow``) on the host the job was
        submitted through sends the bytes appended to each file, from the
        start of the file.  The stream ends when the job status file records
        an exit (after the last bytes), or when a poll (every ``poll_every``
        seconds) finds the job final otherwise (e.g. killed before it
        started); the job is polled once more at the end, so the store holds
        its final state.  Closing the iterator early (``aclose``, ``break``
        in ``async for``) ends the remote stream and leaves the job alone.

        Args:
            id: sshq id.
            files: short names of :data:`LOG_FILES` to follow, ``out``
                (job.out) and ``err`` (job.err) by default.
            poll_every: seconds between the polls that notice a job final
                without a recorded exit.

        Yields:
            ``(file, data)``: the short name and the raw bytes appended since
            the previous chunk of that file (decode with ``errors="replace"``
            to display; a chunk may end inside a UTF-8 character).

        Raises:
            UnknownJobError: ``id`` is not in the local store.
            ConfigError: the job's platform is no longer in the platforms file.
            TransportError: the host could not be reached (also mid-stream).
            CommandError: the agent could not start (no such ``python``).
            RemoteError: the agent failed, or its stream was cut short.
        """
        bad = [f for f in files if f not in LOG_FILES]
        if bad:
            raise InvalidInputError(f"unknown log file {bad[0]!r}; use {', '.join(LOG_FILES)}")
        (job,) = self.store.get([id])
        plat = self.pool.config.platform(job.platform)
        t = self.pool.transport(plat, self.pool.host_of(plat, job.host))
        payload = {
            "files": {f: f"{job.job_log_dir}/{LOG_FILES[f]}" for f in files},
            "log_dir": job.job_log_dir,
            "interval": 0.2,
        }
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for frame in self.pool.agent_stream(plat, t, "follow", payload):
                    if "file" in frame:
                        await queue.put((frame["file"], base64.b64decode(frame["data_b64"])))
                    elif frame.get("done"):
                        break
            finally:
                await queue.put(None)

        async def watch() -> None:
            while True:
                await asyncio.sleep(poll_every)
                (j,) = await self.jobs.poll([id])
                if j.state.is_final:
                    await asyncio.sleep(1.0)  # let the last bytes arrive
                    await queue.put(None)
                    return

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(watch())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
            if pump_task.done() and pump_task.exception() is not None:
                raise pump_task.exception()  # type: ignore[misc]
        finally:
            for task in (pump_task, watch_task):
                task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
        await self.jobs.poll([id])

    async def _running_job(self, id: int) -> tuple[Job, Platform, Transport]:
        (known,) = self.store.get([id])
        refuse_if_restricted(self.pool.config.platform(known.platform), "ssh-to-job")
        (job,) = await self.jobs.poll([id])
        if job.state is not JobState.RUNNING:
            detail = f" ({job.message})" if job.message else ""
            raise JobNotRunningError(f"job {id} is {job.state.value}, not running{detail}")
        plat = self.pool.config.platform(job.platform)
        return job, plat, self.pool.transport(plat, self.pool.host_of(plat, job.host))

    async def _attach_remote_argv(self, job: Job, command: str | None, *,
                                  tty: bool) -> list[str]:
        inner = launch_argv(f"{job.job_log_dir}/{js.ENV_FILE}", job.work_dir, command)
        handler = HANDLERS[job.job_runner]
        if handler.attach_via_exec_host:
            status = JobStatus.parse(await self.cat_log(job.id, "status"))
            exec_host = status.host or ""
            if not exec_host:
                raise JobNotRunningError(
                    f"job {job.id} is running for {job.job_runner} but its script has not"
                    " started yet (no execution host recorded); try again in a moment")
            check_host(exec_host)
            return hop_argv(exec_host, inner, tty=tty)
        return handler.attach_argv(job.job_id, inner, tty=tty)

    async def ssh_to_job(self, id: int, command: str, *,
                         timeout: float | None = None) -> CommandResult:
        """Run one command inside a running job's environment (non-interactive).

        The command runs with the job's environment variables, in its work
        directory, on its execution host (for Slurm, as a step of the job:
        ``srun --jobid=ID --overlap``).

        Args:
            id: sshq id.
            command: a shell command line (run by ``/bin/bash -c``).
            timeout: seconds; None for no limit.

        Returns:
            The command's exit status and output.

        Raises:
            JobNotRunningError: the job is not running (the message says its state).
            JobRunnerError: the job runner refused to step into the job.
            TransportError: the host could not be reached.
        """
        job, plat, t = await self._running_job(id)
        argv = await self._attach_remote_argv(job, command, tty=False)
        if plat.login_shell:
            argv = [*LOGIN_SHELL, *argv]
        result = await t.run(argv, timeout=timeout)
        if HOP_MARK.encode() in result.stderr:
            raise HostUnreachableError(
                f"job {id}: its execution host is unreachable from the login node:"
                f" {result.stderr.decode('utf-8', 'replace').strip()}", host=job.host)
        if result.exit_status == 125 and NO_ENV_MARK.encode() in result.stderr:
            what = ("its container is not running (yet)" if b"container" in result.stderr
                    else "its script has not started yet (no job.env)")
            raise JobNotRunningError(
                f"job {id} is running for {job.job_runner} but {what};"
                " try again in a moment")
        why = HANDLERS[job.job_runner].attach_error(
            result.exit_status, result.stderr.decode("utf-8", "replace"))
        if result.exit_status != 0 and why:
            raise JobRunnerError(f"job {id}: {why}",
                                 stderr=result.stderr.decode("utf-8", "replace"))
        return result

    async def ssh_to_job_argv(self, id: int) -> list[str]:
        """The local argv of an interactive terminal inside a running job.

        For a platform reached by SSH this is a system ``ssh -t`` command
        (terminal handling, window-size changes and Ctrl-C are OpenSSH's);
        for the local transport, the shell itself.  Run it with the terminal
        attached; its exit status is the remote shell's.

        Raises:
            JobNotRunningError: the job is not running.
            JobRunnerError: the job runner cannot step into the job.
            AuthenticationError: the platform's SSH certificate expired and no
                ``identity_command`` renews it, or the command failed (a
                certificate about to expire is renewed first: the ``ssh`` of
                the argv is a new connection).
            InvalidInputError: the platform is restricted (nothing was sent).
        """
        job, plat, t = await self._running_job(id)
        handler = HANDLERS[job.job_runner]
        probe = handler.attach_argv(job.job_id, ["true"], tty=False)
        if probe[0] != "true":  # a job runner step: check it is allowed, cheaply
            result = await t.run(probe, timeout=60)
            why = handler.attach_error(result.exit_status,
                                       result.stderr.decode("utf-8", "replace"))
            if why:
                raise JobRunnerError(f"job {id}: {why}")
        argv = await self._attach_remote_argv(job, None, tty=True)
        if plat.login_shell:
            argv = [*LOGIN_SHELL, *argv]
        # The system ssh that runs it is a new connection (unless an openssh
        # ControlMaster carries it): a short-lived certificate is renewed first.
        await t.ensure_credentials()
        return t.interactive_argv(argv)
