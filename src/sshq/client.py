"""The sshq client: submit, poll, wait, kill, cat_log, retrieve, jobs.

:class:`AsyncClient` is the API; :class:`Client` is a synchronous facade with
the same method names.  The CLI is a thin layer over them.

Every operation costs one SSH command per host, whatever the number of
jobs.  Connections are opened once per host and reused by every operation
of a client.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from .config import Config, Platform, default_state_dir, load_config
from .exceptions import (
    HostUnreachableError,
    InvalidInputError,
    JobNotRunningError,
    JobRunnerError,
    RemoteError,
    SshqError,
    TransportError,
    WaitTimeoutError,
)
from .job_runners import HANDLERS, JobRunnerHandler, RunnerJobState, get_handler
from .jobscript import render_job_script
from .model import Job, JobSpec, JobState
from .quoting import check_directive_value
from .remote.attach import HOP_MARK, NO_ENV_MARK, hop_argv, launch_argv
from .remote.operations import call_agent, runner_templates, stream_agent
from .remote.protocol import LOGIN_SHELL
from .remote.staging import (
    CYLC_EXCLUDES,
    Installation,
    input_files,
    is_shared_filesystem,
    rsync_pull,
    rsync_push,
    sftp_push,
)
from .remote.status import decide, parse_status
from .store import RemoteInit, Store
from .transport import CommandResult, Transport, check_host
from .transport.local import LocalTransport
from .transport.openssh import OpenSSHTransport

__all__ = ["AsyncClient", "Client", "LOG_FILES"]

log = logging.getLogger(__name__)

#: ``cat_log`` file names: short name -> file in the job log directory.
LOG_FILES = {"out": "job.out", "err": "job.err", "status": "job.status", "job": "job"}

LogFile = Literal["out", "err", "status", "job"]
T = TypeVar("T")


def _utc(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(UTC)


class AsyncClient:
    """Manage jobs on platforms over SSH.

    Args:
        config: a :class:`Config`, a platforms file path, or None for the
            default file (the built-in ``localhost`` platform always exists).
        state_dir: directory of the state database; None for the user state
            dir (platformdirs).

    Use as ``async with AsyncClient() as client: ...`` or call :meth:`close`.
    """

    def __init__(
        self, config: Config | str | Path | None = None, *, state_dir: str | Path | None = None
    ) -> None:
        if isinstance(config, Config):
            self.config = config
        else:
            self.config = load_config(config, must_exist=config is not None)
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.store = Store(self.state_dir)
        self._transports: dict[tuple[str, str], Transport] = {}
        self._init_lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection and the database."""
        transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            try:
                await t.close()
            except Exception:  # closing must not mask the real outcome
                log.debug("closing %s failed", t.host, exc_info=True)
        self.store.close()

    # ------------------------------------------------------------ plumbing

    def transport(self, platform: Platform, host: str) -> Transport:
        """The (cached) transport to one host of a platform."""
        key = (platform.name, host)
        t = self._transports.get(key)
        if t is None:
            params = platform.host_params(host)
            if platform.transport == "local":
                t = LocalTransport(params)
            elif platform.transport == "openssh":
                t = OpenSSHTransport(
                    params, control_dir=str(self.state_dir / "cm"),
                    batch_mode=platform.batch_mode,
                )
            else:
                from .transport.asyncssh_ import AsyncSSHTransport  # 0.1 s to import

                t = AsyncSSHTransport(params)
            self._transports[key] = t
        return t

    async def _with_failover(self, platform: Platform, op: Any, prefer: str | None = None) -> Any:
        """Run ``op(host, transport)`` on the first usable host of the platform.

        A host whose connection fails before the command was sent goes on the
        bad-host list for ``platform.bad_host_seconds`` (Cylc's behaviour) and
        the next is tried; ``prefer`` is tried first.
        """
        bad = self.store.bad_hosts(platform.name)
        hosts = [h for h in platform.hosts if h not in bad] or list(platform.hosts)
        if prefer in hosts:
            hosts.remove(prefer)
            hosts.insert(0, prefer)
        last: TransportError | None = None
        for n, host in enumerate(hosts):
            try:
                return await op(host, self.transport(platform, host))
            except TransportError as exc:
                if not exc.transient or exc.command_sent:
                    raise
                last = exc
                self.store.mark_bad_host(platform.name, host, platform.bad_host_seconds, str(exc))
                if n + 1 < len(hosts):
                    log.warning("%s: %s; trying %s", platform.name, exc, hosts[n + 1])
        assert last is not None
        raise last

    async def _remote_init(self, platform: Platform, host: str, t: Transport) -> RemoteInit:
        cached = self.store.remote_init(platform.name, platform.run_dir)
        if cached is not None:
            return cached
        async with self._init_lock:
            reply = await self._agent(platform, t, "init", {"run_dir": platform.run_dir})
            info = RemoteInit(reply["run_dir"], reply["home"])
            self.store.set_remote_init(platform.name, platform.run_dir, info)
            return info

    # ------------------------------------------------------------ submit

    async def submit(
        self, specs: JobSpec | Sequence[JobSpec], *, platform: str = "localhost"
    ) -> list[Job]:
        """Submit jobs to a platform's job runner, all in one SSH command.

        Args:
            specs: one spec or several.
            platform: platform name.

        Returns:
            The jobs, in the order of ``specs``.  A job the runner refused is
            ``submit-failed`` with the runner's stderr in ``message``.

        Raises:
            InvalidInputError: a spec was refused (nothing was sent).
            ConfigError: unknown platform.
            TransportError: no host of the platform could be reached.
            RemoteError: the agent failed for the whole batch.
        """
        if isinstance(specs, JobSpec):
            specs = [specs]
        plat = self.config.platform(platform)
        handler = get_handler(plat.job_runner)
        normalized = []
        for s in specs:
            n = s.normalized()
            handler.check_array(n)
            handler.directives(n, "/")  # refuses what the runner cannot express
            normalized.append(n)
        if not normalized:
            return []

        async def op(host: str, t: Transport) -> list[Job]:
            info = await self._remote_init(plat, host, t)
            return await self._submit_on(plat, handler, host, t, info, normalized)

        result: list[Job] = await self._with_failover(plat, op)
        return result

    async def _submit_on(
        self,
        plat: Platform,
        handler: JobRunnerHandler,
        host: str,
        t: Transport,
        info: RemoteInit,
        specs: list[JobSpec],
    ) -> list[Job]:
        summaries = [_spec_summary(s) for s in specs]
        counts = [len(s.array_indices) or 1 for s in specs]
        reserved = self.store.reserve_jobs(
            plat.name, t.host, handler.name, [s.job_name for s in specs], summaries, counts
        )
        ids = [r[0] for r in reserved]
        nums = {r[0]: r[1] for r in reserved}
        # one submission per spec, keyed by its first row; an array's rows are its elements
        elements: dict[int, list[int]] = {}
        pos = 0
        for count in counts:
            elements[ids[pos]] = ids[pos:pos + count]
            pos += count
        todo = list(zip(elements, specs, strict=True))
        sent_any = False
        try:
            for _round in range(5):
                jobs_req = []
                for job_id, spec in todo:
                    nn = nums[job_id]
                    log_dir = f"{info.run_dir}/log/job/{spec.job_name}/{nn:02d}"
                    work_dir = spec.work_dir or f"{info.run_dir}/work/{spec.job_name}"
                    extra = {"SSHQ_PLATFORM": plat.name, "SSHQ_SUBMIT_NUM": str(nn)}
                    if spec.array is None:
                        extra["SSHQ_ID"] = str(job_id)
                    script = render_job_script(
                        spec, handler, job_log_dir=log_dir, work_dir=work_dir,
                        extra_env=extra, container_runtime=plat.container_runtime,
                    )
                    jobs_req.append({
                        "key": str(job_id),
                        "log_dir": log_dir,
                        "work_dir": work_dir,
                        "job_b64": base64.b64encode(script).decode(),
                        "submit_argv": handler.submit_argv(f"{log_dir}/job", log_dir),
                        "id_regex": handler.job_id_regex,
                        "stdin_job_file": handler.submit_stdin,
                        "inputs": input_files(spec),
                        "runner": handler.name,
                        "timeout": 120,
                        "array": list(spec.array_indices),
                        "array_element_id": handler.array_element_id,
                    })
                    indices = spec.array_indices or (None,)
                    self.store.update_jobs(
                        (row, {"job_log_dir": log_dir if i is None else f"{log_dir}/{i}",
                               "work_dir": work_dir, "submit_num": nn})
                        for row, i in zip(elements[job_id], indices, strict=True))
                sent_any = True
                reply = await self._agent(
                    plat, t, "submit",
                    {"jobs": jobs_req, "concurrency": plat.submit_concurrency},
                    timeout=max(300.0, 2.0 * len(jobs_req)),
                )
                retry = self._record_submissions(reply["results"], plat, handler, elements,
                                                 {k: sp for k, sp in todo})
                if not retry:
                    break
                # Another client (or a lost local state) used these submit
                # numbers: continue after the highest one on the remote side.
                todo = [(i, s) for i, s in todo if i in retry]
                taken: dict[str, int] = {}
                for i, s in todo:
                    base = max(taken.get(s.job_name, 0), retry[i])
                    for row in elements[i]:
                        nums[row] = base + 1
                    taken[s.job_name] = nums[i]
            else:
                self.store.update_jobs(
                    (row, {"state": JobState.SUBMIT_FAILED,
                           "message": "job log directories exist already"})
                    for i, _s in todo for row in elements[i])
        except BaseException as exc:
            if not sent_any or (isinstance(exc, TransportError) and not exc.command_sent):
                self.store.delete_jobs(ids)  # provably nothing was submitted
            else:
                pending = [j.id for j in self.store.get(ids) if not j.job_id]
                self.store.update_jobs(
                    (i, {"message": f"submission outcome unknown ({exc}); `sshq poll` adopts"
                                    " the job if its job runner accepted it"})
                    for i in pending)
            raise
        return self.store.get(ids)

    def _record_submissions(
        self, results: list[dict[str, Any]], plat: Platform, handler: JobRunnerHandler,
        elements: dict[int, list[int]], specs: dict[int, JobSpec],
    ) -> dict[int, int]:
        """Record the agent's submit results; return {sshq id: highest NN} to retry."""
        retry: dict[int, int] = {}
        updates: list[tuple[int, dict[str, Any]]] = []
        for r in results:
            job_id = int(r["key"])
            if r.get("ok"):
                indices = specs[job_id].array_indices
                groups = dict(r.get("groups") or {"id": r["job_id"]})
                for row, index in zip(elements[job_id], indices or (None,), strict=True):
                    if index is not None:
                        groups["id"] = (handler.array_element_id.replace("{id}", r["job_id"])
                                        .replace("{index}", str(index)))
                    element_id = handler.job_id_from_submit(groups)
                    updates.append((row, {
                        "state": JobState.SUBMITTED, "job_id": element_id,
                        "submit_time": _utc(r.get("submit_time")), "message": "",
                    }))
            elif r.get("code") == "exists":
                retry[job_id] = int(r.get("max_submit_num") or 0)
            else:
                detail = (r.get("stderr") or r.get("error") or "").strip()
                if r.get("code") == "runner" and r.get("exit") == 0:
                    detail = (f"no job id in the output of {handler.name} submit:"
                              f" {r.get('stdout', '').strip()!r} {detail}").strip()
                elif r.get("code") == "runner":
                    detail = f"{handler.name} submit failed (exit {r.get('exit')}): {detail}"
                updates.extend((row, {
                    "state": JobState.SUBMIT_FAILED, "message": detail,
                    "submit_time": datetime.now(UTC),
                }) for row in elements[job_id])
        self.store.update_jobs(updates)
        return retry

    # ------------------------------------------------------------ poll / kill

    def _select(self, ids: Sequence[int] | None, all_active: bool) -> list[Job]:
        if ids:
            return self.store.get(list(dict.fromkeys(ids)))
        if all_active:
            return self.store.query(states=[JobState.SUBMITTED, JobState.RUNNING])
        return []

    @staticmethod
    def _group(jobs: Iterable[Job]) -> dict[tuple[str, str], list[Job]]:
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for j in jobs:
            if j.job_log_dir:
                groups[(j.platform, j.host)].append(j)
        return groups

    def _host_of(self, plat: Platform, job_host: str) -> str:
        # job.host is a transport label ([user@]host[:port]); map back to the platform host.
        for h in plat.hosts:
            if self.transport(plat, h).host == job_host:
                return h
        return plat.hosts[0]

    async def _agent_on_group(
        self, plat_name: str, host_label: str, op: str, payload: dict[str, Any],
        timeout: float = 120.0, *, runners: Iterable[str] = (),
    ) -> dict[str, Any]:
        """One agent call for jobs submitted through ``host_label``.

        Jobs of batch systems can be reached from any login host of the
        platform (shared filesystem), so a host that is down fails over to
        the next; background jobs only from the host they run on.
        """
        plat = self.config.platform(plat_name)
        host = self._host_of(plat, host_label)
        if any(HANDLERS[r].runs_on_submit_host for r in runners):
            return await self._agent(plat, self.transport(plat, host), op, payload,
                                     timeout=timeout)

        async def op_on(h: str, t: Transport) -> dict[str, Any]:
            return await self._agent(plat, t, op, payload, timeout=timeout)

        result: dict[str, Any] = await self._with_failover(plat, op_on, prefer=host)
        return result

    @staticmethod
    async def _agent(platform: Platform, t: Transport, op: str, payload: dict[str, Any],
                     timeout: float = 120.0) -> dict[str, Any]:
        """One agent call with the platform's interpreter, login shell and PATH."""
        if platform.path_prepend:
            payload = dict(payload, path_prepend=list(platform.path_prepend))
        return await call_agent(t, platform.python, op, payload, timeout=timeout,
                                login_shell=platform.login_shell)

    def _apply(
        self, jobs: list[Job], reply: dict[str, Any], queried: set[str]
    ) -> dict[int, str]:
        """Decide states from a poll/kill reply; returns per-job runner errors."""
        known_by_runner: dict[str, dict[str, RunnerJobState]] = {}
        failed_runners: dict[str, str] = {}
        for runner, results in reply.get("runners", {}).items():
            handler = HANDLERS[runner]
            known: dict[str, RunnerJobState] = {}
            try:
                for r in results:
                    group = tuple(r.get("group") or ())
                    for bare, st in handler.parse_poll(r["exit"], r["stdout"],
                                                       r["stderr"]).items():
                        full = handler.job_id_join(group, bare)
                        known[full] = RunnerJobState(full, st.running, st.raw)
            except JobRunnerError as exc:
                failed_runners[runner] = str(exc)
            known_by_runner[runner] = known
        updates: list[tuple[int, dict[str, Any]]] = []
        errors: dict[int, str] = {}
        missing = set(reply.get("missing", []))
        for j in jobs:
            text = reply["status"].get(str(j.id), "")
            job_id = j.job_id
            if not job_id and j.state.is_final:
                continue  # refused at submission: nothing to poll
            if not job_id:  # an intent: sshq stopped between sending and recording
                adopted = self._adopt(j, text, str(j.id) in missing)
                if adopted is None:
                    continue
                updates.append((j.id, adopted))
                job_id = adopted.get("job_id", "")
                if not job_id:
                    continue
            d = decide(
                text,
                job_id=job_id,
                queried=str(j.id) in queried,
                runner_ok=j.job_runner not in failed_runners,
                known=known_by_runner.get(j.job_runner, {}),
                runner_name=j.job_runner,
            )
            if j.job_runner in failed_runners and str(j.id) in queried:
                errors[j.id] = failed_runners[j.job_runner]
            fields = dict(d.fields)
            if d.state is not None:
                fields["state"] = d.state
            if j.state.is_final and d.state is None:
                continue
            changed = {k: v for k, v in fields.items() if getattr(j, k) != v}
            if changed:  # most polls change nothing: write only what moved
                updates.append((j.id, changed))
        self.store.update_jobs(updates)
        return errors

    @staticmethod
    def _adopt(job: Job, status_text: str, log_dir_missing: bool) -> dict[str, Any] | None:
        """Resolve a submission intent from its job status file.

        Returns the fields to record, or None while the outcome is still open.
        """
        st = parse_status(status_text)
        if st.get("SSHQ_JOB_ID"):
            groups = {k[len("SSHQ_JOB_ID_"):].lower(): v for k, v in st.items()
                      if k.startswith("SSHQ_JOB_ID_")}
            groups["id"] = st["SSHQ_JOB_ID"]
            job_id = HANDLERS[job.job_runner].job_id_from_submit(groups)
            return {"job_id": job_id, "state": JobState.SUBMITTED,
                    "submit_time": _utc(st.get("SSHQ_JOB_RUNNER_SUBMIT_TIME")),
                    "message": "adopted: submitted before sshq could record it"}
        if "SSHQ_JOB_RUNNER_SUBMIT_FAILED" in st:
            return {"state": JobState.SUBMIT_FAILED,
                    "message": "the job runner refused the job (its error was not recorded"
                               " because sshq stopped during the submission)"}
        if log_dir_missing:
            return {"state": JobState.SUBMIT_FAILED,
                    "message": "never submitted: sshq stopped before sending it"}
        return None

    async def poll(self, ids: Sequence[int] | None = None, *, all: bool = False) -> list[Job]:
        """Update the state of jobs: one SSH command per host.

        Args:
            ids: sshq ids to poll.
            all: poll every job not yet final (when ``ids`` is empty).

        Returns:
            The jobs with their new states, in the order asked.  A host that
            cannot be reached, or a job runner that fails, changes no state
            (transient); the error is logged.

        Raises:
            UnknownJobError: an id is not known.
        """
        jobs = self._select(ids, all)
        await self._poll_jobs(jobs)
        return self.store.get([j.id for j in jobs])

    async def _poll_jobs(self, jobs: list[Job]) -> list[str]:
        errors: list[str] = []

        async def one(key: tuple[str, str], group: list[Job]) -> None:
            plat = self.config.platform(key[0])
            payload = _jobs_payload(group)
            # Job status files are cheap; the job runner's status command is
            # rate-limited per host, across processes sharing this state.
            if not self.store.claim_runner_query(key[0], key[1], plat.min_poll_interval):
                payload["skip_runner"] = True
            try:
                reply = await self._agent_on_group(key[0], key[1], "poll", payload,
                                                   runners={j.job_runner for j in group})
            except SshqError as exc:
                log.warning("poll of %s on %s failed (no state changed): %s", key[0], key[1], exc)
                errors.append(str(exc))
                return
            errs = self._apply(group, reply, set(reply.get("queried", [])))
            for err in sorted(set(errs.values())):
                log.warning("poll of %s on %s: job runner query failed (no state changed):"
                            " %s", key[0], key[1], err)
                errors.append(err)

        await asyncio.gather(*(one(k, g) for k, g in self._group(jobs).items()))
        return errors

    async def kill(self, ids: Sequence[int], *, settle: float = 5.0) -> list[Job]:
        """Kill jobs with their job runner: one SSH command per host.

        Jobs already final are left alone.  The call waits up to ``settle``
        seconds for the killed jobs' status files to record how they ended.

        Returns:
            The jobs with their states after the kill.

        Raises:
            UnknownJobError: an id is not known.
            TransportError, RemoteError: a host could not be reached or its
                agent failed.
        """
        jobs = self._select(ids, False)
        live = [j for j in jobs if not j.state.is_final and j.job_id]

        async def one(key: tuple[str, str], group: list[Job]) -> None:
            payload = dict(_jobs_payload(group), settle=settle)
            reply = await self._agent_on_group(key[0], key[1], "kill", payload,
                                               timeout=120 + settle,
                                               runners={j.job_runner for j in group})
            # (the kill commands' output is no poll output: only statuses count)
            self._apply(group, {"status": reply["status"]}, set())
            # A kill command that failed, for jobs that still record no exit:
            # say so on the job (and in the log), never silently.
            failed = {runner: "; ".join(r["stderr"].strip() or f"exit {r['exit']}"
                                        for r in results if r["exit"] != 0)
                      for runner, results in reply.get("runners", {}).items()}
            updates = []
            for j in self.store.get([j.id for j in group]):
                why = failed.get(j.job_runner)
                if why and not j.state.is_final:
                    log.warning("kill of job %d (%s %s) failed: %s", j.id, j.job_runner,
                                j.job_id, why)
                    updates.append((j.id, {"message": f"kill failed: {why}"}))
            self.store.update_jobs(updates)

        await asyncio.gather(*(one(k, g) for k, g in self._group(live).items()))
        return self.store.get([j.id for j in jobs])

    async def wait(
        self,
        ids: Sequence[int],
        *,
        timeout: float | None = None,
        interval: float = 1.0,
        max_interval: float = 10.0,
        on_poll: Any = None,
    ) -> list[Job]:
        """Poll until every job is final.

        Args:
            ids: sshq ids.
            timeout: seconds; None waits for ever.
            interval: first poll interval in seconds (grows by half each poll
                up to ``max_interval``).
            on_poll: optional ``callable(list[Job])`` called after each poll
                (progress display).

        Returns:
            The final jobs.

        Raises:
            WaitTimeoutError: ``timeout`` passed first (its ``jobs`` attribute
                holds the latest states).
            UnknownJobError: an id is not known.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = list(dict.fromkeys(ids))
        jobs = self.store.get(ids)
        delay = interval
        while True:
            pending = [j for j in jobs if not j.state.is_final]
            if pending:
                await self._poll_jobs(pending)
                jobs = self.store.get(ids)
            if on_poll is not None:
                on_poll(jobs)
            if all(j.state.is_final for j in jobs):
                return jobs
            if deadline is not None and time.monotonic() >= deadline:
                err = WaitTimeoutError(
                    f"timed out after {timeout} s; not final: "
                    + ", ".join(f"{j.id} ({j.state.value})" for j in jobs if not j.state.is_final)
                )
                err.jobs = jobs  # type: ignore[attr-defined]
                raise err
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)
            delay = min(delay * 1.5, max_interval)

    # ------------------------------------------------------------ logs

    async def cat_log(self, job_id: int, file: LogFile = "out", *, offset: int = 0) -> bytes:
        """Read a file of a job's log directory.

        Args:
            job_id: sshq id.
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
        (job,) = self.store.get([job_id])
        reply = await self._agent_on_group(
            job.platform, job.host, "read",
            {"path": f"{job.job_log_dir}/{LOG_FILES[file]}", "offset": offset},
            runners=[job.job_runner],
        )
        if not reply.get("ok"):
            raise RemoteError(f"job {job_id}: {reply.get('error')}")
        return base64.b64decode(reply["data_b64"])

    async def follow_log(
        self, job_id: int, files: Sequence[LogFile] = ("out", "err"), *, poll_every: float = 10.0
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Stream a job's log files as they grow, until the job is final.

        Yields ``(file, bytes)`` pairs (``file`` is ``out`` or ``err``).  The
        stream ends when the job status file records an exit, or when a poll
        (every ``poll_every`` seconds) finds the job final otherwise.
        """
        (job,) = self.store.get([job_id])
        plat = self.config.platform(job.platform)
        t = self.transport(plat, self._host_of(plat, job.host))
        payload = {
            "files": {f: f"{job.job_log_dir}/{LOG_FILES[f]}" for f in files},
            "log_dir": job.job_log_dir,
            "interval": 0.2,
        }
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for frame in stream_agent(t, plat.python, "follow", payload,
                                                login_shell=plat.login_shell):
                    if "file" in frame:
                        await queue.put((frame["file"], base64.b64decode(frame["data_b64"])))
                    elif frame.get("done"):
                        break
            finally:
                await queue.put(None)

        async def watch() -> None:
            while True:
                await asyncio.sleep(poll_every)
                (j,) = await self.poll([job_id])
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
        await self.poll([job_id])

    # ------------------------------------------------------------ ssh to job

    async def _running_job(self, job_id: int) -> tuple[Job, Platform, Transport]:
        (job,) = await self.poll([job_id])
        if job.state is not JobState.RUNNING:
            detail = f" ({job.message})" if job.message else ""
            raise JobNotRunningError(f"job {job_id} is {job.state.value}, not running{detail}")
        plat = self.config.platform(job.platform)
        return job, plat, self.transport(plat, self._host_of(plat, job.host))

    async def _attach_remote_argv(self, job: Job, command: str | None, *,
                                  tty: bool) -> list[str]:
        inner = launch_argv(f"{job.job_log_dir}/job.env", job.work_dir, command)
        handler = HANDLERS[job.job_runner]
        if handler.attach_via_exec_host:
            status = parse_status((await self.cat_log(job.id, "status")).decode(
                "utf-8", "replace"))
            exec_host = status.get("SSHQ_JOB_HOST", "")
            if not exec_host:
                raise JobNotRunningError(
                    f"job {job.id} is running for {job.job_runner} but its script has not"
                    " started yet (no execution host recorded); try again in a moment")
            check_host(exec_host)
            return hop_argv(exec_host, inner, tty=tty)
        return handler.attach_argv(job.job_id, inner, tty=tty)

    async def ssh_to_job(self, job_id: int, command: str, *,
                         timeout: float | None = None) -> CommandResult:
        """Run one command inside a running job's environment (non-interactive).

        The command runs with the job's environment variables, in its work
        directory, on its execution host (for Slurm, as a step of the job:
        ``srun --jobid=ID --overlap``).

        Args:
            job_id: sshq id.
            command: a shell command line (run by ``/bin/bash -c``).
            timeout: seconds; None for no limit.

        Returns:
            The command's exit status and output.

        Raises:
            JobNotRunningError: the job is not running (the message says its state).
            JobRunnerError: the job runner refused to step into the job.
            TransportError: the host could not be reached.
        """
        job, plat, t = await self._running_job(job_id)
        argv = await self._attach_remote_argv(job, command, tty=False)
        if plat.login_shell:
            argv = [*LOGIN_SHELL, *argv]
        result = await t.run(argv, timeout=timeout)
        if HOP_MARK.encode() in result.stderr:
            raise HostUnreachableError(
                f"job {job_id}: its execution host is unreachable from the login node:"
                f" {result.stderr.decode('utf-8', 'replace').strip()}", host=job.host)
        if result.exit_status == 125 and NO_ENV_MARK.encode() in result.stderr:
            what = ("its container is not running (yet)" if b"container" in result.stderr
                    else "its script has not started yet (no job.env)")
            raise JobNotRunningError(
                f"job {job_id} is running for {job.job_runner} but {what};"
                " try again in a moment")
        why = HANDLERS[job.job_runner].attach_error(
            result.exit_status, result.stderr.decode("utf-8", "replace"))
        if result.exit_status != 0 and why:
            raise JobRunnerError(f"job {job_id}: {why}",
                                 stderr=result.stderr.decode("utf-8", "replace"))
        return result

    async def ssh_to_job_argv(self, job_id: int) -> list[str]:
        """The local argv of an interactive terminal inside a running job.

        For a platform reached by SSH this is a system ``ssh -t`` command
        (terminal handling, window-size changes and Ctrl-C are OpenSSH's);
        for the local transport, the shell itself.  Run it with the terminal
        attached; its exit status is the remote shell's.

        Raises:
            JobNotRunningError: the job is not running.
            JobRunnerError: the job runner cannot step into the job.
        """
        job, plat, t = await self._running_job(job_id)
        handler = HANDLERS[job.job_runner]
        probe = handler.attach_argv(job.job_id, ["true"], tty=False)
        if probe[0] != "true":  # a job runner step: check it is allowed, cheaply
            result = await t.run(probe, timeout=60)
            why = handler.attach_error(result.exit_status,
                                       result.stderr.decode("utf-8", "replace"))
            if why:
                raise JobRunnerError(f"job {job_id}: {why}")
        argv = await self._attach_remote_argv(job, None, tty=True)
        if plat.login_shell:
            argv = [*LOGIN_SHELL, *argv]
        return t.interactive_argv(argv)

    async def retrieve(self, ids: Sequence[int], *, dest: str | Path = ".") -> list[Path]:
        """Copy job log directories back with rsync (Cylc's log retrieval).

        Each job's directory lands in ``DEST/<name>/<NN>/``.

        Returns:
            The local directories, in the order of ``ids``.

        Raises:
            RemoteError: rsync failed (its stderr in the message).
        """
        jobs = self.store.get(list(ids))
        out: list[Path] = []
        for job in jobs:
            plat = self.config.platform(job.platform)
            t = self.transport(plat, self._host_of(plat, job.host))
            local = Path(dest) / job.name / f"{job.submit_num:02d}"
            await rsync_pull(t, job.job_log_dir, local)
            if job.state is JobState.SUCCEEDED:
                for rel in self.store.spec(job.id).get("outputs") or ():
                    await rsync_pull(t, f"{job.work_dir}/./{rel}", local / "outputs",
                                     relative=True)
            out.append(local)
        return out

    # ------------------------------------------------------------ staging

    async def install(self, src_dir: str | Path, *, platform: str,
                      excludes: Sequence[str] = ()) -> Installation:
        """Install a source tree into the platform's run directory.

        rsync with Cylc's excludes (:data:`CYLC_EXCLUDES`) plus ``excludes``;
        only changed files travel.  If remote-init finds a shared filesystem
        the copy is local (and skipped when the source is the run directory);
        if the remote side has no rsync, changed files go by SFTP.

        Args:
            src_dir: local directory.
            platform: platform name.
            excludes: more rsync exclude patterns (``/x`` anchors at the top).

        Returns:
            What was done (:class:`Installation`).

        Raises:
            InvalidInputError: ``src_dir`` is not a directory.
            TransportError, RemoteError: the copy failed.
        """
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidInputError(f"{str(src)!r} is not a directory")
        for e in excludes:
            check_directive_value("exclude", e)
        plat = self.config.platform(platform)
        patterns = [*CYLC_EXCLUDES, *excludes]

        async def op(host: str, t: Transport) -> Installation:
            init = await self._agent(plat, t, "init", {"run_dir": plat.run_dir})
            remote_dir = init["run_dir"]
            shared = is_shared_filesystem(init)
            done = {"platform": platform, "host": t.host, "source": str(src),
                    "remote_dir": remote_dir, "shared_filesystem": shared}
            if shared or isinstance(t, LocalTransport):
                if src.resolve() == Path(remote_dir).resolve():
                    return Installation(method="skipped", files_transferred=0, **done)
                n = await rsync_push(None, src, remote_dir, patterns)
                return Installation(method="local", files_transferred=n, **done)
            if init.get("rsync") and shutil.which("rsync"):
                n = await rsync_push(t, src, remote_dir, patterns)
                return Installation(method="rsync", files_transferred=n, **done)
            listing = await self._agent(plat, t, "listing", {"path": remote_dir})
            n = await sftp_push(t, src, remote_dir, patterns, listing["files"])
            return Installation(method="sftp", files_transferred=n, **done)

        result: Installation = await self._with_failover(plat, op)
        return result

    async def tidy(self, *, platform: str) -> list[str]:
        """Remove what sshq left on the platform: its service directory
        (``<run_dir>/.sshq``: remote-init's UUID file) and links an interrupted
        submission left.  Job logs, work directories and installed files stay.

        Returns:
            The remote paths removed.
        """
        plat = self.config.platform(platform)

        async def op(host: str, t: Transport) -> list[str]:
            info = await self._remote_init(plat, host, t)
            reply = await self._agent(plat, t, "tidy", {"run_dir": info.run_dir})
            removed: list[str] = reply["removed"]
            return removed

        result: list[str] = await self._with_failover(plat, op)
        return result

    async def jobs(
        self, ids: Sequence[int] | None = None, *, platform: str | None = None,
        state: JobState | str | None = None, limit: int | None = None,
    ) -> list[Job]:
        """Jobs in the local store (no SSH), oldest first.

        Args:
            ids: only these sshq ids (in this order).
            platform: only this platform's jobs.
            state: only jobs in this state.
            limit: only the newest ``limit`` jobs.

        Raises:
            UnknownJobError: an id in ``ids`` is not known.
        """
        if ids is not None:
            return self.store.get(list(ids))
        states = [JobState(state)] if state else None
        return self.store.query(platform=platform, states=states, limit=limit)

    # ------------------------------------------------------------ farm

    async def farm(
        self, batch_file: str | Path | None = None, *, hosts: Sequence[str] = (),
        out: Any, run: str | None = None, resume: str | None = None,
        slots: int | None = None, retries: int = 0, timeout: float | None = None,
        speculate: bool = True, keep_order: bool = False,
        output_dir: str | Path | None = None, deps: str | Path | None = None,
        detach: bool = False, via: str | None = None, nodes: int = 1,
        walltime: str | None = None, fmt: str = "jsonl",
        on_name: Any = None, warn: Any = None,
    ) -> Any:
        """Run a batch of shell commands over hosts' cores (``sshq farm``).

        Args:
            batch_file: one shell command per line (None with ``resume``).
            hosts: platform names or ``[user@]host[:port]`` destinations.
            out: a binary stream for results in ``fmt`` (``jsonl``, ``anet``),
                or a callable given each :class:`sshq.farm.output.TaskResult`
                as soon as it is final.
            run: the run's name (default: generated).
            resume: resume this run: only tasks without a reported result.
            slots: tasks at once per host (default: its cores).
            retries: re-runs of a failed task.
            timeout: seconds before a task is killed.
            speculate: start stragglers again on idle hosts.
            keep_order: report in input order.
            output_dir: write outputs to files there.
            deps: directory rsynced to every host first; tasks run in its copy.
            detach: leave the tasks with detached workers (see :meth:`farm_attach`).
            via: a platform whose job runner runs ``nodes`` pilot jobs
                (walltime ``walltime``) instead of ``hosts``.
            on_name: called with the run's name before anything runs.
            warn: called with warnings (a host dropped, ...).

        Returns:
            ``(run name, sshq.farm.engine.FarmStats)``.

        Raises:
            ConfigError: bad options, unknown hosts or run.
            SshqError: every host failed (resume later).
        """
        from .farm.engine import FarmOptions
        from .farm.run import FarmRequest, run_farm

        req = FarmRequest(
            batch=Path(batch_file) if batch_file is not None else None, hosts=list(hosts),
            run=run, resume=resume, fmt=fmt, deps=Path(deps) if deps is not None else None,
            detach=detach, via=via, nodes=nodes, walltime=walltime,
            options=FarmOptions(slots=slots, retries=retries, timeout=timeout,
                                speculate=speculate, keep_order=keep_order,
                                output_dir=Path(output_dir) if output_dir else None))
        return await run_farm(self, req, out, on_name=on_name or (lambda n: None),
                              warn=warn or (lambda m: None))

    async def farm_attach(self, name: str, *, out: Any, warn: Any = None) -> Any:
        """Collect the results of detached farm run ``name`` (each reported once).

        Args:
            name: the run.
            out: as for :meth:`farm`.
            warn: called with warnings.

        Returns:
            The run's ``sshq.farm.engine.FarmStats``.

        Raises:
            ConfigError: no such run, or it was not detached.
            SshqError: a host stayed unreachable (attach again later).
        """
        from .farm.run import attach_run

        return await attach_run(self, name, out, warn=warn or (lambda m: None))


def _jobs_payload(group: Sequence[Job]) -> dict[str, Any]:
    """The ``jobs`` and ``runners`` fields of an agent poll or kill request."""
    runners = sorted({HANDLERS[j.job_runner] for j in group}, key=lambda h: h.name)
    jobs = []
    for j in group:
        words, bare = HANDLERS[j.job_runner].job_id_parts(j.job_id)
        jobs.append({"key": str(j.id), "log_dir": j.job_log_dir, "job_id": j.job_id,
                     "bare_id": bare, "group": list(words), "runner": j.job_runner})
    return {"jobs": jobs, "runners": runner_templates(runners)}


def _spec_summary(spec: JobSpec) -> dict[str, Any]:
    d = asdict(spec)
    d.pop("script", None)
    d["environment"] = sorted(spec.environment)  # keys only: values may be secrets
    if spec.walltime is not None:
        d["walltime"] = spec.walltime.total_seconds()
    return d


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
