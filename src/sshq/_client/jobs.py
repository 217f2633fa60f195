"""Jobs: submit, poll, kill, wait and the local job list (part of :class:`sshq.AsyncClient`)."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from ..config import Platform
from ..exceptions import (
    JobRunnerError,
    RemoteError,
    RestrictedError,
    SshqError,
    TransportError,
    WaitTimeoutError,
)
from ..job_runners import HANDLERS, JobRunnerHandler, RunnerJobState, get_handler
from ..jobscript import render_job_script
from ..model import Job, JobSpec, JobState
from ..remote.installed import refuse_if_restricted
from ..remote.operations import runner_templates
from ..remote.staging import (
    input_files,
)
from ..remote.status import JobStatus, decide
from ..shipped import sshq_jobstatus as js
from ..store import Store
from ..transport import Transport
from .core import HostPool

log = logging.getLogger("sshq.client")


def _utc(s: object) -> datetime | None:
    t: datetime | None = js.parse_time(s)
    return t


@dataclass(frozen=True, slots=True)
class LogRead:
    """A file of a job's log directory that :meth:`Jobs.poll_reading` brings
    home with the job's status (the agent's ``read_many`` form).

    Attributes:
        name: the file's name in the job log directory.
        max_bytes: the most bytes read (the agent caps it too).
        tail: read the file's last ``max_bytes`` (else from its start).
    """

    name: str
    max_bytes: int
    tail: bool = False

    def wire(self, job: Job) -> dict[str, Any]:
        """The agent's file item for ``job``."""
        item: dict[str, Any] = {"path": f"{job.job_log_dir}/{self.name}",
                                "max_bytes": self.max_bytes}
        if self.tail:
            item["tail"] = True
        else:
            item["offset"] = 0
        return item


class Jobs:
    """Submit, poll, kill, wait, jobs: the job part of :class:`sshq.AsyncClient`.

    Args:
        pool: the host pool (transports, failover, agent calls).
        store: the state database.
    """

    def __init__(self, pool: HostPool, store: Store) -> None:
        self.pool = pool
        self.store = store

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
        plat = self.pool.config.platform(platform)
        handler = get_handler(plat.job_runner)
        normalized = []
        for s in specs:
            n = s.normalized()
            handler.check_array(n)
            if n.work_dir and ".." in n.work_dir.split("/"):  # the agent's rule: never inside
                refuse_if_restricted(plat, f"work directory {n.work_dir!r} (a '..' component)")
            normalized.append(n)
        # (the directives are rendered once, with the job's real paths, by
        # _submit_on: what the runner cannot express is refused there, before
        # anything is sent, and the jobs reserved for the batch are forgotten)
        if not normalized:
            return []

        async def op(host: str, t: Transport) -> list[Job]:
            return await self._submit_on(plat, handler, host, t, normalized)

        result: list[Job] = await self.pool.with_failover(plat, op)
        return result

    async def _submit_on(
        self,
        plat: Platform,
        handler: JobRunnerHandler,
        host: str,
        t: Transport,
        specs: list[JobSpec],
    ) -> list[Job]:
        # Without remote-init's facts cached, remote-init travels in the submit
        # call itself: the scripts name the run dir by a random placeholder that
        # the agent replaces (or, for a run dir it cannot put there verbatim,
        # asks for the scripts again).  One SSH command either way.
        info = self.store.remote_init(plat.name, plat.run_dir)
        run_dir = info.run_dir if info is not None else _run_dir_token()
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
            rounds = 0
            while True:
                jobs_req = []
                for job_id, spec in todo:
                    nn = nums[job_id]
                    log_dir = js.job_log_dir(run_dir, spec.job_name, nn)
                    work_dir = spec.work_dir or js.default_work_dir(run_dir, spec.job_name)
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
                        "submit_argv": handler.submit_argv(f"{log_dir}/{js.JOB_FILE}", log_dir),
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
                        (row, {"job_log_dir": (log_dir if i is None
                                               else js.element_log_dir(log_dir, i)),
                               "work_dir": work_dir, "submit_num": nn})
                        for row, i in zip(elements[job_id], indices, strict=True))
                sent_any = True
                payload: dict[str, Any] = {"jobs": jobs_req,
                                           "concurrency": plat.submit_concurrency}
                if info is None:
                    payload["init"] = {"run_dir": plat.run_dir, "token": run_dir}
                reply = await self.pool.agent(plat, t, "submit", payload,
                                          timeout=max(300.0, 2.0 * len(jobs_req)))
                if info is None:
                    info = self.pool.record_remote_init(plat, t, reply.get("init"))
                    self._resolve_run_dir(ids, run_dir, info.run_dir)
                    run_dir = info.run_dir
                    if reply.get("render_again"):  # nothing was sent to the runner
                        continue
                rounds += 1
                retry = self._record_submissions(reply["results"], plat, handler, elements,
                                                 {k: sp for k, sp in todo})
                if not retry:
                    break
                if rounds == 5:
                    self.store.update_jobs(
                        (row, {"state": JobState.SUBMIT_FAILED,
                               "message": "job log directories exist already"})
                        for i in retry for row in elements[i])
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
        except BaseException as exc:
            if (not sent_any or isinstance(exc, RestrictedError)
                    or (isinstance(exc, TransportError) and not exc.command_sent)):
                # provably nothing was submitted (a restricted agent refuses a
                # request before doing any of it)
                self.store.delete_jobs(ids)
            else:
                pending = [j.id for j in self.store.get(ids) if not j.job_id]
                self.store.update_jobs(
                    (i, {"message": f"submission outcome unknown ({exc}); `sshq poll` adopts"
                                    " the job if its job runner accepted it"})
                    for i in pending)
            raise
        return self.store.get(ids)

    async def _resolve_tokens(self, plat: Platform, host_label: str,
                              group: list[Job]) -> list[Job]:
        """Give intents whose submission sshq did not see through (it stopped
        between sending and the reply) their real paths, from remote-init."""
        tokens = {j.job_log_dir.split("/", 2)[1] for j in group
                  if j.job_log_dir.startswith(RUN_DIR_TOKEN_PREFIX)}
        if not tokens:
            return group
        host = self.pool.host_of(plat, host_label)
        info = await self.pool.remote_init(plat, host, self.pool.transport(plat, host))
        ids = [j.id for j in group]
        for token in tokens:
            self._resolve_run_dir(ids, "/" + token, info.run_dir)
        return self.store.get(ids)

    def _resolve_run_dir(self, ids: Sequence[int], token: str, run_dir: str) -> None:
        """Replace a run-dir placeholder in the stored paths of jobs."""
        self.store.update_jobs(
            (j.id, {"job_log_dir": j.job_log_dir.replace(token, run_dir, 1),
                    "work_dir": j.work_dir.replace(token, run_dir, 1)})
            for j in self.store.get(list(ids)) if token in j.job_log_dir + j.work_dir)

    def _record_submissions(
        self, results: list[dict[str, Any]], plat: Platform, handler: JobRunnerHandler,
        elements: dict[int, list[int]], specs: dict[int, JobSpec],
    ) -> dict[int, int]:
        """Record the agent's submit results; return {sshq id: highest NN} to retry."""
        retry: dict[int, int] = {}
        updates: list[tuple[int, dict[str, Any]]] = []
        for r in results:
            job_id = int(r["key"])
            if r.get("ok") and not js.valid_job_id(r.get("job_id")):
                r = {"ok": False, "code": "reply",
                     "error": f"the agent reported an invalid job id {r.get('job_id')!r:.60}"}
            if r.get("ok"):
                indices = specs[job_id].array_indices
                groups = dict(r.get("groups") or {"id": r["job_id"]})
                for row, index in zip(elements[job_id], indices or (None,), strict=True):
                    if index is not None:
                        groups["id"] = js.array_element_id(handler.array_element_id,
                                                           r["job_id"], index)
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

    def _apply(
        self, jobs: list[Job], reply: dict[str, Any], queried: set[str]
    ) -> dict[int, str]:
        """Decide states from a poll/kill reply; returns per-job runner errors.

        Raises:
            RemoteError: the reply is malformed (no state changed).
        """
        try:
            return self._apply_reply(jobs, reply, queried)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RemoteError(f"malformed agent reply ({type(exc).__name__}: {exc})"[:300]
                              ) from None

    def _apply_reply(
        self, jobs: list[Job], reply: dict[str, Any], queried: set[str]
    ) -> dict[int, str]:
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
        statuses = reply["status"]
        if not isinstance(statuses, dict):
            raise TypeError("status is not an object")
        for j in jobs:
            status = JobStatus.from_wire(statuses.get(str(j.id)))
            job_id = j.job_id
            if not job_id and j.state.is_final:
                continue  # refused at submission: nothing to poll
            if not job_id:  # an intent: sshq stopped between sending and recording
                adopted = self._adopt(j, status, str(j.id) in missing)
                if adopted is None:
                    continue
                updates.append((j.id, adopted))
                job_id = adopted.get("job_id", "")
                if not job_id:
                    continue
            d = decide(
                status,
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
    def _adopt(job: Job, st: JobStatus, log_dir_missing: bool) -> dict[str, Any] | None:
        """Resolve a submission intent from its job status file.

        Returns the fields to record, or None while the outcome is still open.
        """
        if st.job_id:
            groups = dict(st.job_id_groups, id=st.job_id)
            job_id = HANDLERS[job.job_runner].job_id_from_submit(groups)
            return {"job_id": job_id, "state": JobState.SUBMITTED,
                    "submit_time": st.submit_time,
                    "message": "adopted: submitted before sshq could record it"}
        if st.submit_failed:
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

    async def poll_report(
        self, ids: Sequence[int] | None = None, *, all: bool = False,
    ) -> tuple[list[Job], list[str]]:
        """:meth:`poll`, also saying what failed (for a caller that must know
        whether the states it reads are fresh, e.g. ``sshq serve``'s poller).

        One SSH command per (platform, login host) of the jobs, as
        :meth:`poll`.  A failure raises nothing and changes no job's state:
        a host that cannot be reached, an agent that refuses or fails, or a
        job runner whose status command fails is a message in ``errors``
        (and a logged warning); the other hosts' jobs are updated.

        Args:
            ids: sshq ids to poll (duplicates count once).
            all: poll every job not yet final (when ``ids`` is empty).

        Returns:
            ``(jobs, errors)``: ``jobs`` as :meth:`poll` returns them (in the
            order asked, with their states after the poll); ``errors`` one
            line per failure, ``"<platform> on <host>: <why>"``, empty when
            every host answered and every job runner query worked.

        Raises:
            UnknownJobError: an id is not known (nothing is polled).
            RemoteError: a host's agent replied nonsense (a malformed reply:
                no state of that host's jobs changed), as :meth:`poll`.
        """
        jobs = self._select(ids, all)
        errors = await self._poll_jobs(jobs)
        return self.store.get([j.id for j in jobs]), errors

    async def poll_reading(
        self, ids: Sequence[int], reads: Mapping[int, Sequence[LogRead]], *,
        now: Collection[int] = (),
    ) -> tuple[list[Job], dict[int, list[Any]]]:
        """:meth:`poll`, and files of the jobs' log directories in the same
        agent call (one SSH command per host): :class:`sshq.Executor`'s
        results and ``job.err`` tails.

        A job's files are read once its status file records an exit, or at
        once for the ids in ``now`` (jobs known to be final already); all the
        files of one host within the agent's budget (``MAX_POLL_FILES``
        bytes): a file that did not fit comes back short (read on with the
        agent's ``read_many``).  A host that does not answer, or an agent
        that does not know the ``files`` field (an installed agent older
        than this sshq), gives no files.

        Args:
            ids: sshq ids to poll.
            reads: per sshq id, the files to bring home.
            now: ids whose files are read without an exit recorded.

        Returns:
            ``(jobs, files)``: the jobs as :meth:`poll` returns them, and per
            sshq id whose files were read, one item per :class:`LogRead`
            asked, in order, as the agent sent it (untrusted: the
            ``read_many`` item's fields, unchecked).

        Raises:
            UnknownJobError: an id is not known.
        """
        jobs = self._select(ids, False)
        got: dict[int, list[Any]] = {}
        await self._poll_jobs(jobs, reads=reads, now=frozenset(now), got=got)
        return self.store.get([j.id for j in jobs]), got

    async def _poll_jobs(
        self, jobs: list[Job], *, reads: Mapping[int, Sequence[LogRead]] | None = None,
        now: Collection[int] = (), got: dict[int, list[Any]] | None = None,
    ) -> list[str]:
        """Poll ``jobs`` (one agent call per host); with ``reads``, ``got``
        receives their files (:meth:`poll_reading`).  Returns the errors
        logged, ``"<platform> on <host>: <why>"`` (:meth:`poll_report`)."""
        errors: list[str] = []

        async def one(key: tuple[str, str], group: list[Job]) -> None:
            plat = self.pool.config.platform(key[0])
            try:
                group = await self._resolve_tokens(plat, key[1], group)
            except SshqError as exc:
                log.warning("poll of %s on %s failed (no state changed): %s", key[0], key[1], exc)
                errors.append(f"{key[0]} on {key[1]}: {exc}")
                return
            payload = _jobs_payload(group)
            if reads:
                _ask_files(group, payload, reads, now)
            # Job status files are cheap; the job runner's status command is
            # rate-limited per host, across processes sharing this state.
            if not self.store.claim_runner_query(key[0], key[1], plat.min_poll_interval):
                payload["skip_runner"] = True
            try:
                reply = await self.pool.agent_on_group(key[0], key[1], "poll", payload,
                                                   runners={j.job_runner for j in group})
            except SshqError as exc:
                log.warning("poll of %s on %s failed (no state changed): %s", key[0], key[1], exc)
                errors.append(f"{key[0]} on {key[1]}: {exc}")
                return
            errs = self._apply(group, reply, set(reply.get("queried", [])))
            if reads and got is not None:
                _take_files(group, reply.get("files"), reads, got)
            for err in sorted(set(errs.values())):
                log.warning("poll of %s on %s: job runner query failed (no state changed):"
                            " %s", key[0], key[1], err)
                errors.append(f"{key[0]} on {key[1]}: {err}")

        await asyncio.gather(*(one(k, g) for k, g in self._group(jobs).items()))
        return errors

    async def kill(self, ids: Sequence[int], *, settle: float = 5.0) -> list[Job]:
        """Kill jobs with their job runner: one SSH command per host.

        The agent runs the job runner's kill command (``scancel``, ``qdel``,
        ``kill -s TERM`` ...) once for all of a host's jobs, then waits up to
        ``settle`` seconds for their job status files to record how they
        ended.  Jobs already final, and jobs with no job id yet, are left
        alone.  A kill command that fails does not raise: the jobs it was
        for keep their state, their ``message`` says ``kill failed: ...``
        and a warning is logged.

        Args:
            ids: sshq ids (duplicates count once); empty kills nothing.
            settle: seconds to wait for the job wrappers to record the end
                (0: return at once; a later poll sees the end).

        Returns:
            The jobs (:class:`~sshq.model.Job`), in the order of ``ids``
            (duplicates removed), with their states after the kill: final
            once the wrapper recorded the end (usually ``failed``, with
            ``signal`` set), else their previous state.

        Raises:
            UnknownJobError: an id is not in the local store (nothing is killed).
            ConfigError: a job's platform is no longer in the platforms file.
            TransportError: no host of a job's platform could be reached.
            RemoteError: a host's agent failed or replied nonsense.  (With
                jobs on several hosts, those on other hosts may be killed.)
        """
        jobs = self._select(ids, False)
        live = [j for j in jobs if not j.state.is_final and j.job_id]

        async def one(key: tuple[str, str], group: list[Job]) -> None:
            payload = dict(_jobs_payload(group), settle=settle)
            reply = await self.pool.agent_on_group(key[0], key[1], "kill", payload,
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
        on_poll: Callable[[list[Job]], None] | None = None,
    ) -> list[Job]:
        """Poll until every job is final.

        Each round is one poll (one SSH command per host, only for the jobs
        not yet final).  A host that cannot be reached, or a job runner
        query that fails, changes no state and is logged; the wait goes on.

        Args:
            ids: sshq ids (duplicates count once).
            timeout: seconds; None waits for ever.
            interval: first pause between polls, in seconds; each pause is
                1.5 times the previous one, up to ``max_interval``.
            max_interval: longest pause between polls, in seconds.
            on_poll: optional ``callable(list[Job])`` called after each poll
                with the jobs in the order of ``ids`` (progress display).

        Returns:
            The jobs (:class:`~sshq.model.Job`), all final, in the order of
            ``ids`` (duplicates removed).

        Raises:
            WaitTimeoutError: ``timeout`` passed first (its ``jobs`` attribute
                holds the latest states, as the returned list would).
            UnknownJobError: an id is not in the local store.
            ConfigError: a job's platform is no longer in the platforms file.
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


#: Stands for the run dir in scripts sent before remote-init's facts are known
#: (a path, so that every job runner's path checks apply to it).
RUN_DIR_TOKEN_PREFIX = "/SSHQ-RUN-DIR-"


def _run_dir_token() -> str:
    return RUN_DIR_TOKEN_PREFIX + secrets.token_hex(8)


def _jobs_payload(group: Sequence[Job]) -> dict[str, Any]:
    """The ``jobs`` and ``runners`` fields of an agent poll or kill request."""
    runners = sorted({HANDLERS[j.job_runner] for j in group}, key=lambda h: h.name)
    jobs = []
    for j in group:
        words, bare = HANDLERS[j.job_runner].job_id_parts(j.job_id)
        jobs.append({"key": str(j.id), "log_dir": j.job_log_dir, "job_id": j.job_id,
                     "bare_id": bare, "group": list(words), "runner": j.job_runner})
    return {"jobs": jobs, "runners": runner_templates(runners)}


def _ask_files(group: Sequence[Job], payload: dict[str, Any],
               reads: Mapping[int, Sequence[LogRead]], now: Collection[int]) -> None:
    """Add the files of :meth:`Jobs.poll_reading` to a poll request."""
    for j, item in zip(group, payload["jobs"], strict=True):
        asked = reads.get(j.id)
        if asked:
            item["files"] = [r.wire(j) for r in asked]
            if j.id in now:
                item["files_now"] = True


def _take_files(group: Sequence[Job], files: object, reads: Mapping[int, Sequence[LogRead]],
                got: dict[int, list[Any]]) -> None:
    """The files of a poll reply (untrusted): a job's list of items only
    when it has one item per file asked."""
    if not isinstance(files, dict):
        return
    for j in group:
        asked = reads.get(j.id)
        items = files.get(str(j.id))
        if asked and isinstance(items, list) and len(items) == len(asked):
            got[j.id] = items


def _spec_summary(spec: JobSpec) -> dict[str, Any]:
    d = asdict(spec)
    d.pop("script", None)
    d["environment"] = sorted(spec.environment)  # keys only: values may be secrets
    if spec.walltime is not None:
        d["walltime"] = spec.walltime.total_seconds()
    return d
