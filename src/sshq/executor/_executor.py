"""``sshq.Executor``: Python calls on a platform, as jobs or farm tasks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

from .._client.jobs import LogRead
from ..client import AsyncClient
from ..config import Config, Platform
from ..exceptions import ConfigError, InvalidInputError, RemoteError, SshqError
from ..farm.journal import RunDir, check_run_name
from ..farm.output import TaskResult, output_paths
from ..job_runners import get_handler
from ..model import Job, JobSpec, JobState
from ..model.job_spec import MAX_INPUT_BYTES, default_name
from ..remote.operations import call_agent
from ..shipped import sshq_call
from ..shipped import sshq_jobstatus as js
from ._wire import (
    DEFAULT_MAX_BYTES,
    ERR_TAIL_BYTES,
    PickledCalls,
    check_pyenv,
    job_failed,
    parse_pyenv,
    parse_result,
    pickle_calls,
    runner_command,
    settle,
    task_failed,
)

__all__ = ["CallFuture", "Executor", "MapResults"]

log = logging.getLogger("sshq.executor")

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: JobSpec fields the Executor sets itself.
_OWN_FIELDS = frozenset({"script", "command", "arguments", "array", "work_dir"})

#: Pre-flight checks that passed in this process: (kind, where..., python).
_CHECKED: set[tuple[object, ...]] = set()
_CHECKED_LOCK = threading.Lock()

#: In a farm run's directory (``<state dir>/farm/RUN/``): the calls' files
#: (``calls/RUN/``, the run's ``--deps``: each host's ``farm-deps/RUN``),
#: kept until every task has a result or the run is stopped; the batch as
#: written (copied to ``batch`` by the farm); the mark of a run stopped by
#: :meth:`CallFuture.cancel` (its tasks without a result are cancelled).
_CALLS_DIR = "calls"
_BATCH_IN = "batch.in"
_CANCELLED = "cancelled"

#: Poll rounds a job that succeeded may show no result file before it is
#: failed (a shared file system that shows the file late).
_GRACE_ROUNDS = 2


def _runner_path() -> Path:
    return Path(sshq_call.__file__)


class CallFuture(concurrent.futures.Future[_T], Generic[_T]):
    """The future of one call (a :class:`concurrent.futures.Future`).

    ``result()`` returns the function's value, or raises the function's
    exception (rebuilt, with the remote traceback as a note), a
    :class:`~sshq.RemoteFunctionError` (it could not be rebuilt), or a
    :class:`~sshq.JobFailedError` (the job ended without a result).

    Attributes:
        id: the sshq id of the call's job (an array element for ``map``;
            shared by the calls of one chunk); None for a farm task.
        task: a farm task's handle ``"RUN/SEQ"`` (the farm run's name and the
            task's number; shared by the calls of one chunk); None for a job.
        job: the latest :class:`~sshq.model.Job` the Executor saw (None for a
            farm task).

    Pass ``id`` or ``task`` to :meth:`Executor.attach` to get the result
    from another Executor (after this process died).
    """

    def __init__(self, executor: Executor, *, id: int | None = None,
                 job: Job | None = None, task: str | None = None) -> None:
        super().__init__()
        self._executor = executor
        self._id = id
        self._job = job
        self._task = task

    @property
    def id(self) -> int | None:
        """The sshq id of the call's job; None for a farm task."""
        return self._id

    @property
    def task(self) -> str | None:
        """The farm task's handle ``"RUN/SEQ"``; None for a job."""
        return self._task

    @property
    def job(self) -> Job | None:
        """The latest :class:`~sshq.model.Job` seen by the Executor's polls."""
        return self._job

    def cancel(self) -> bool:
        """Kill the call's job (``sshq kill``) and cancel the future.

        The other calls of the same job (a ``map`` chunk) then fail with
        :class:`~sshq.JobFailedError`.

        A farm task: its farm run (one per :meth:`Executor.submit` or
        :meth:`Executor.map`) is stopped once none of its calls is left
        pending in this Executor: the run's SSH channels are closed and the
        hosts' dispatchers kill its running tasks (no task starts after
        that), as ``sshq serve``'s ``DELETE /farm/{name}`` does.  So
        cancelling a ``submit``'s future, leaving a ``map``'s iteration
        early, or ``shutdown(cancel_futures=True)`` kills the tasks; one call
        of a ``map`` whose other calls are still wanted only drops its result
        (its task runs on with the others).

        Blocks until the kill was sent, or the run stopped (at most about
        a minute), unless called from a done callback.

        Returns:
            False when the future is already done; True once cancelled (a
            kill that fails is logged as a warning: the job may go on).
        """
        if not super().cancel():
            return False
        if self._id is not None:
            self._executor._kill([self], cancelled=True)
        elif self._task is not None:
            self._executor._stop_farms([self])
        return True


class MapResults(Iterator[_T]):
    """What :meth:`Executor.map` returns: the results in order, as they come.

    Leaving the iteration early (``break``, an exception, a timeout) cancels,
    and so kills, the calls not yet done, as
    :meth:`concurrent.futures.Executor.map` cancels its futures.

    Attributes:
        futures: one :class:`CallFuture` per call, in order.
    """

    def __init__(self, executor: Executor, futures: list[CallFuture[_T]],
                 deadline: float | None) -> None:
        self.futures = futures
        self._executor = executor
        self._deadline = deadline
        self._gen: Generator[_T, None, None] = self._results()

    def _results(self) -> Generator[_T, None, None]:
        i = 0
        try:
            for i, f in enumerate(self.futures):  # noqa: B007  (read in finally)
                left = None if self._deadline is None else self._deadline - time.monotonic()
                yield f.result(left)
            i = len(self.futures)
        finally:
            rest = [f for f in self.futures[i:] if not f.done()]
            if rest:
                self._executor._cancel(rest)

    def __iter__(self) -> MapResults[_T]:
        return self

    def __next__(self) -> _T:
        return next(self._gen)

    def close(self) -> None:
        """Stop iterating; calls not done are cancelled (killed)."""
        self._gen.close()
        # (a generator closed before its first step runs no finally)
        rest = [f for f in self.futures if not f.done()]
        if rest:
            self._executor._cancel(rest)


@dataclass(slots=True)
class _Pending:
    """A job whose result is awaited: its futures and their positions in its
    calls (None: the job's whole result, for :meth:`Executor.attach`)."""

    job: Job
    futures: list[tuple[CallFuture[Any], int | None]] = field(default_factory=list)
    calls: int = 1
    empty_rounds: int = 0


@dataclass(slots=True, kw_only=True)
class _FarmRun:
    """A farm run of this Executor: its calls' futures by task (seq) with
    their positions in the task's calls (None: the task's whole result, for
    :meth:`Executor.attach`)."""

    name: str
    dir: Path
    groups: dict[int, list[tuple[CallFuture[Any], int | None]]]
    task: asyncio.Task[None] | None = None
    named: bool = False
    stopped: bool = False
    error: BaseException | None = None

    def futures(self) -> Iterator[CallFuture[Any]]:
        return (f for group in self.groups.values() for f, _ in group)


class _Loop:
    """An event loop in a daemon thread: the Executor's client lives there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.stopped = False
        running = threading.Event()
        self.loop.call_soon(running.set)
        self.thread = threading.Thread(target=self._run, name="sshq-executor", daemon=True)
        self.thread.start()
        running.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.stopped = True
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def on_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and wait for it.

        Raises:
            RuntimeError: called from the loop's own thread (a future's done
                callback), or the loop is closed.
        """
        if self.on_loop():
            coro.close()
            raise RuntimeError("an sshq.Executor cannot be called from its own thread"
                               " (a future's done callback): call it from another thread")
        if self.stopped or self.loop.is_closed():
            coro.close()
            raise RuntimeError("the sshq.Executor is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the loop without waiting for it (any thread)."""
        if self.on_loop():
            self.loop.create_task(coro)
        elif not self.stopped and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(coro, self.loop)
        else:
            coro.close()

    def stop(self) -> None:
        if not self.stopped and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.on_loop():
            self.thread.join()


class Executor(concurrent.futures.Executor):
    """Run Python functions on a platform: one job per call, or one job
    array per :meth:`map`; or, with ``hosts``, as farm tasks.

    The call (the function and its arguments, pickled with cloudpickle)
    travels with the submission, as input files of the job; the job runs
    ``sshq_call.py`` (:mod:`sshq.shipped.sshq_call`) with the remote
    ``python``, which writes the result (or the exception and its traceback)
    atomically into the job's log directory.  A background thread polls the
    pending jobs: one SSH command per host per poll, whose reply brings the
    results of the jobs that ended and the tails of their ``job.err`` (a
    result over the poll's budget is read on with one more command).

    Before the first submission to a platform (and for each ``python``), one
    agent call checks the remote interpreter: its Python major.minor and its
    cloudpickle version must equal this client's, else
    :class:`~sshq.EnvironmentMismatchError` is raised and nothing is queued.
    A check that passed is remembered in this process.

    Args:
        platform: the platform name (jobs go to its job runner; with
            ``hosts``, its ``python`` is the default interpreter).
        python: the remote interpreter for the calls and the pre-flight check
            (a venv's ``bin/python``); None: the platform's ``python``.  The
            agent itself keeps running with the platform's ``python``.
        config: as for :class:`~sshq.AsyncClient`.
        state_dir: as for :class:`~sshq.AsyncClient` (the jobs are recorded
            there: ``sshq jobs`` shows them, :meth:`attach` finds them).
        hosts: run the calls as farm tasks on these hosts (platform names or
            ``[user@]host[:port]``, as ``sshq farm --hosts``) instead of as
            jobs: for many small calls.  Each :meth:`submit` or :meth:`map`
            is then one farm run (named ``exec-...``; a future's ``task`` is
            ``"RUN/SEQ"``), recorded in ``<state dir>/farm/RUN/`` with its
            tasks' output (the results, kept there for :meth:`attach`; delete
            the directory when done with them); needs rsync here and there.
        max_call_bytes: the most bytes of the pickled function, and of the
            pickled arguments of one job, refused before submission
            (default 64 MiB).  All the files of one submission together are
            limited to :data:`sshq.model.job_spec.MAX_INPUT_BYTES` too.
        max_result_bytes: the most bytes of one pickled return value (the
            call then raises :class:`~sshq.RemoteFunctionError`; default 64 MiB).
        poll_interval: seconds before the first poll of new jobs; each pause
            is 1.5 times the last, up to ``max_poll_interval``.
        max_poll_interval: seconds, the longest pause between polls.
        **jobspec_fields: fields of :class:`~sshq.JobSpec` for every job:
            ``walltime``, ``cpus``, ``memory``, ``queue``, ``account``,
            ``environment``, ``container_image``, ``name`` (default: the
            function's name), ``inputs`` (more files for the job's work
            directory, the calls' current directory) ...; not ``script``,
            ``command``, ``arguments``, ``array`` or ``work_dir``.

    Raises:
        ConfigError: unknown platform.
        InvalidInputError: a JobSpec field is unknown, refused or set by the
            Executor itself.

    Use it as a context manager, or call :meth:`shutdown`.  Its futures'
    done callbacks run in the Executor's thread: they must not call the
    Executor (submit from another thread).  :meth:`submit`, :meth:`map` and
    :meth:`attach` block for their SSH round trip; from asyncio code, await
    the futures with :func:`asyncio.wrap_future`.
    """

    def __init__(
        self, platform: str, *, python: str | None = None,
        config: Config | str | Path | None = None, state_dir: str | Path | None = None,
        hosts: Sequence[str] = (), max_call_bytes: int = DEFAULT_MAX_BYTES,
        max_result_bytes: int = DEFAULT_MAX_BYTES, poll_interval: float = 1.0,
        max_poll_interval: float = 10.0, **jobspec_fields: Any,
    ) -> None:
        own = sorted(set(jobspec_fields) & _OWN_FIELDS)
        if own:
            raise InvalidInputError(f"Executor sets {', '.join(own)} itself")
        known = {f.name for f in fields(JobSpec)}
        unknown = sorted(set(jobspec_fields) - known)
        if unknown:
            raise InvalidInputError(f"unknown JobSpec field(s) {', '.join(unknown)}")
        # every field checked now, not at the first submission
        self._template = JobSpec(command="true", **jobspec_fields).normalized()
        if isinstance(hosts, str):
            raise InvalidInputError("hosts must be a sequence of host specs, not one string")
        if max_call_bytes < 1 or max_result_bytes < 1:
            raise InvalidInputError("max_call_bytes and max_result_bytes must be positive")
        self._fields = dict(jobspec_fields)
        self._hosts = list(hosts)
        self._max_call = int(max_call_bytes)
        self._max_result = int(max_result_bytes)
        self._poll_interval = float(poll_interval)
        self._max_poll_interval = max(float(max_poll_interval), self._poll_interval)
        self._delay = self._poll_interval
        self._lock = threading.Lock()
        self._shut = False
        self._live: set[CallFuture[Any]] = set()
        self._pending: dict[int, _Pending] = {}
        self._farms: set[asyncio.Task[None]] = set()
        self._runs: dict[str, _FarmRun] = {}
        self._collector: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop = _Loop()
        try:
            self._client: AsyncClient = self._loop.call(self._open(config, state_dir))
        except BaseException:
            self._loop.stop()
            raise
        try:
            self._platform: Platform = self._client.config.platform(platform)
        except BaseException:
            self._loop.call(self._client.close())
            self._loop.stop()
            raise
        self.python: str = python or self._platform.python

    async def _open(self, config: Config | str | Path | None,
                    state_dir: str | Path | None) -> AsyncClient:
        # (made on the loop's thread: the state database is used from there only)
        self._wake = asyncio.Event()
        return AsyncClient(config, state_dir=state_dir)

    # ---- the public API ---------------------------------------------------------------

    @property
    def platform(self) -> Platform:
        """The platform (:class:`~sshq.Platform`)."""
        return self._platform

    @property
    def client(self) -> AsyncClient:
        """The :class:`~sshq.AsyncClient` the Executor uses, on its own
        thread's event loop: use it only from coroutines run there."""
        return self._client

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> CallFuture[_T]:
        """Run ``fn(*args, **kwargs)`` remotely: one job (or one farm task).

        Blocks for the pre-flight check (the first time) and the submission:
        one SSH command.

        Returns:
            The call's :class:`CallFuture`, with its job's ``id``.

        Raises:
            InvalidInputError: the call cannot be pickled or is over
                ``max_call_bytes`` (nothing sent).
            EnvironmentMismatchError: the remote interpreter does not fit
                (nothing queued).
            JobFailedError: the job runner refused the job.
            TransportError, RemoteError: the submission failed.
            RuntimeError: the Executor is shut down.
        """
        self._check_open()
        pickled = pickle_calls(fn, [(tuple(args), dict(kwargs))], chunksize=1,
                               max_call_bytes=self._max_call)
        groups: list[list[CallFuture[_T]]] = self._loop.call(
            self._launch(fn, pickled, array=False))
        return groups[0][0]

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> MapResults[_T]:
        """``fn`` over the iterables' items: ONE submission, a job array of
        ``ceil(N / chunksize)`` elements (one batch of jobs for a job runner
        without arrays, one farm run with ``hosts``).

        The iterables are read at once (as :meth:`concurrent.futures.Executor.map`
        does); everything is pickled and checked before anything is sent.

        Args:
            fn: the function.
            iterables: its arguments, zipped (the shortest ends the calls).
            timeout: seconds from this call after which iterating raises
                :class:`TimeoutError` (None: no limit).
            chunksize: calls per job (or farm task); a job's calls run one
                after the other.

        Returns:
            A :class:`MapResults`: the N values in order, each yielded when
            its job is done; an exception of a call is raised when its turn
            comes.  ``.futures`` holds the N futures.

        Raises:
            ValueError: ``chunksize`` < 1.
            the errors of :meth:`submit`.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_open()
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (tuple(args), {}) for args in zip(*iterables, strict=False)]
        if not calls:
            return MapResults(self, [], deadline)
        pickled = pickle_calls(fn, calls, chunksize=chunksize, max_call_bytes=self._max_call)
        groups: list[list[CallFuture[_T]]] = self._loop.call(
            self._launch(fn, pickled, array=True))
        return MapResults(self, [f for g in groups for f in g], deadline)

    def attach(self, ids: Sequence[int | str]) -> list[CallFuture[Any]]:
        """Futures for calls an Executor made earlier (by this process or
        one that has died), from the same state directory.

        A job's result is collected by the polls, as for a new job.  A farm
        task's result is in its run's directory here
        (``<state dir>/farm/RUN/output/``) once reported; the tasks of a run
        that have no result (their client died: the hosts' dispatchers
        killed them with its SSH channels) are run again: the run is
        resumed, as ``sshq farm --resume RUN`` does (every task of it without
        a result, on the run's hosts, with the calls' files kept for it),
        so such a call may have started twice.  A task of a run stopped by
        :meth:`CallFuture.cancel` gives a cancelled future.  Blocks until a
        resumed run is recorded (one lock here, no SSH round trip).

        Args:
            ids: sshq ids of jobs (:attr:`CallFuture.id`) and handles of
                farm tasks (:attr:`CallFuture.task`, ``"RUN/SEQ"``), mixed.

        Returns:
            One :class:`CallFuture` per id, in order; the result of a job (or
            farm task) that ran a chunk of a ``map`` is the list of its
            calls' values (an exception of one of them is raised instead).
            A resumed run that cannot start (another live client holds it,
            its hosts are unreachable) fails its futures with that error.

        Raises:
            UnknownJobError: a job id is not in the state database.
            InvalidInputError: a job was not submitted by an Executor; a farm
                handle is malformed, or names no farm run of an Executor in
                this state directory, or no task of it.
            RuntimeError: the Executor is shut down.
        """
        self._check_open()
        return self._loop.call(self._attach(list(ids)))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; close the connections once the futures are done.

        Args:
            wait: block until every future is done, then close.  False:
                return at once; the Executor's thread collects what is
                pending, then closes (the jobs go on either way, and
                :meth:`attach` finds them later).
            cancel_futures: cancel (kill) every call not done first.
        """
        with self._lock:
            first = not self._shut
            self._shut = True
            live = list(self._live)
        if cancel_futures and live:
            self._cancel([f for f in live if not f.done()])
        if not first:
            if wait and not self._loop.on_loop():
                self._loop.thread.join()
            return
        if wait:
            concurrent.futures.wait(live)
            try:
                self._loop.call(self._close())
            except RuntimeError:
                pass
            self._loop.stop()
        else:
            self._loop.spawn(self._close_when_idle())

    # ---- internals: any thread ------------------------------------------------------------

    def _check_open(self) -> None:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")

    def _track(self, fut: CallFuture[Any]) -> None:
        with self._lock:
            self._live.add(fut)

        def done(f: concurrent.futures.Future[Any]) -> None:
            with self._lock:
                self._live.discard(f)

        fut.add_done_callback(done)

    def _kill(self, futs: Sequence[CallFuture[Any]], *, cancelled: bool = False) -> bool:
        """Kill the jobs of ``futs`` (not done, or ``cancelled`` just now);
        False if it failed (logged)."""
        ids = sorted({f.id for f in futs if f.id is not None
                      and (f.cancelled() if cancelled else not f.done())})
        if not ids:
            return True
        if self._loop.on_loop():  # a done callback: cannot wait here
            self._loop.spawn(self._kill_ids(ids))
            return True
        try:
            return self._loop.call(self._kill_ids(ids))
        except RuntimeError:
            return False

    def _cancel(self, futs: Sequence[CallFuture[Any]]) -> None:
        """Cancel many futures, killing their jobs with one kill command per
        host, and stopping the farm runs left with no call pending."""
        done_now = [f for f in futs if concurrent.futures.Future.cancel(f)]
        self._kill(done_now, cancelled=True)
        self._stop_farms(done_now)

    def _stop_farms(self, futs: Sequence[CallFuture[Any]]) -> None:
        """Stop the farm runs of ``futs`` (cancelled) that have no call pending."""
        names = sorted({f._task.rpartition("/")[0] for f in futs
                        if f._task is not None and f.cancelled()})
        if not names:
            return
        if self._loop.on_loop():  # a done callback: cannot wait here
            self._loop.spawn(self._stop_runs(names))
            return
        try:
            self._loop.call(self._stop_runs(names))
        except RuntimeError:
            pass

    # ---- internals: the loop's thread ---------------------------------------------------------

    async def _kill_ids(self, ids: list[int]) -> bool:
        try:
            await self._client.kill(ids, settle=0)
            return True
        except SshqError as exc:
            log.warning("kill of jobs %s failed: %s", ids, exc)
            return False

    async def _stop_runs(self, names: list[str]) -> None:
        """Cancel the runs named that have no call pending, and wait (a
        minute at most) until their channels are closed: the dispatchers then
        kill the runs' tasks."""
        tasks = []
        for name in names:
            run = self._runs.get(name)
            if run is None or run.task is None or run.task.done():
                continue
            if not all(f.done() for f in run.futures()):
                continue
            run.stopped = True
            run.task.cancel()
            tasks.append(run.task)
        if tasks:
            await asyncio.wait(tasks, timeout=60)

    async def _launch(self, fn: Callable[..., Any], pickled: PickledCalls, *,
                      array: bool) -> list[list[CallFuture[Any]]]:
        if self._hosts:
            return await self._launch_farm(pickled)
        return await self._launch_jobs(fn, pickled, array=array)

    def _futures(self, pickled: PickledCalls) -> list[list[CallFuture[Any]]]:
        groups = []
        for n in pickled.counts:
            group: list[CallFuture[Any]] = [CallFuture(self) for _ in range(n)]
            for f in group:
                self._track(f)
            groups.append(group)
        return groups

    async def _launch_jobs(self, fn: Callable[..., Any], pickled: PickledCalls, *,
                           array: bool) -> list[list[CallFuture[Any]]]:
        plat = self._platform
        await self._preflight_jobs()
        run_dir = await self._run_dir()
        name = self._fields.get("name") or default_name(
            getattr(fn, "__name__", "") or "call")
        token = secrets.token_hex(6)
        work_dir = f"{js.default_work_dir(run_dir, name)}/{token}"
        handler = get_handler(plat.job_runner)
        n = len(pickled.jobs)
        user_inputs = tuple(self._template.inputs)
        ours = {sshq_call.RUNNER_FILE, sshq_call.FN_FILE,
                *(sshq_call.calls_file(k) for k in range(1, n + 1))}
        clash = sorted(Path(p).name for p in user_inputs if Path(p).name in ours)
        if clash:
            raise InvalidInputError(f"inputs named {', '.join(clash)} would replace the"
                                    " Executor's own files")
        with tempfile.TemporaryDirectory(prefix="sshq-exec-") as tmp:
            base = Path(tmp)
            (base / sshq_call.FN_FILE).write_bytes(pickled.fn)
            for k, blob in enumerate(pickled.jobs, start=1):
                (base / sshq_call.calls_file(k)).write_bytes(blob)
            common = (str(_runner_path()), str(base / sshq_call.FN_FILE), *user_inputs)
            spec_fields = {k: v for k, v in self._fields.items() if k != "inputs"}
            spec_fields.update(name=name, work_dir=work_dir)

            def spec(index: int | None, inputs: tuple[str, ...], **more: Any) -> JobSpec:
                cmd = runner_command(self.python, "job", max_result_bytes=self._max_result,
                                     index=index)
                return JobSpec(command=cmd, inputs=inputs, **spec_fields, **more)

            calls_paths = [str(base / sshq_call.calls_file(k)) for k in range(1, n + 1)]
            if array and handler.array_index_var is not None:
                specs = [spec(None, (*common, *calls_paths), array=f"1-{n}")]
            else:   # one job per element, one batch; each carries what it reads
                specs = [spec(k, (*common, calls_paths[k - 1])) for k in range(1, n + 1)]
            size = sum(Path(p).stat().st_size for s in specs for p in s.inputs)
            if len(specs) == 1 and size > MAX_INPUT_BYTES:
                raise InvalidInputError(
                    f"the pickled calls total {size} bytes, over the {MAX_INPUT_BYTES} bytes"
                    " one submission may stage: pass large data as files (sshq install)")
            jobs = await self._client.submit(specs, platform=plat.name)
        if all(j.state is JobState.SUBMIT_FAILED for j in jobs):
            raise job_failed(jobs[0], b"")
        groups = self._futures(pickled)
        for job, group, count in zip(jobs, groups, pickled.counts, strict=True):
            for f in group:
                f._id, f._job = job.id, job
            if job.state is JobState.SUBMIT_FAILED:
                err = job_failed(job, b"")
                for f in group:
                    f.set_exception(err)
                continue
            p = self._pending.setdefault(job.id, _Pending(job=job, calls=count))
            p.futures.extend((f, pos) for pos, f in enumerate(group))
        self._start_collector()
        return groups

    async def _attach(self, ids: list[int | str]) -> list[CallFuture[Any]]:
        job_ids = [i for i in ids if not isinstance(i, str)]
        jobs = {j.id: j for j in self._client.store.get(job_ids)} if job_ids else {}
        for j in jobs.values():
            command = self._client.store.spec(j.id).get("command")
            if not (isinstance(command, str) and sshq_call.RUNNER_FILE in command):
                raise InvalidInputError(f"job {j.id} was not submitted by an sshq.Executor")
        # farm tasks: everything checked, and what the journals say read,
        # before any future is made (no await until the futures are placed)
        handles = {i: _parse_handle(i) for i in ids if isinstance(i, str)}
        runs = {run: self._recorded_run(run) for run, _ in handles.values()}
        for handle, (run, seq) in handles.items():
            if seq > runs[run].tasks:
                raise InvalidInputError(f"farm run {run!r} has no task {seq}"
                                        f" (it has {runs[run].tasks}): {handle!r}")
        out: list[CallFuture[Any]] = []
        resume: dict[str, _FarmRun] = {}
        for i in ids:
            if not isinstance(i, str):
                j = jobs[i]
                f: CallFuture[Any] = CallFuture(self, id=j.id, job=j)
                self._track(f)
                p = self._pending.setdefault(j.id, _Pending(job=j))
                p.futures.append((f, None))
                out.append(f)
                continue
            run, seq = handles[i]
            rec = runs[run]
            f = CallFuture(self, task=f"{run}/{seq}")
            self._track(f)
            out.append(f)
            live = self._runs.get(run)
            if seq in rec.results:
                self._settle_task([(f, None)], rec.dir / "output", seq, rec.results[seq])
            elif live is not None and live.task is not None and not live.task.done():
                live.groups.setdefault(seq, []).append((f, None))
            elif rec.cancelled:
                concurrent.futures.Future.cancel(f)
            else:
                r = resume.setdefault(run, _FarmRun(name=run, dir=rec.dir, groups={}))
                r.groups.setdefault(seq, []).append((f, None))
        if jobs:
            self._start_collector()
        for r in resume.values():
            await self._start_farm(r, None)
        return out

    def _recorded_run(self, name: str) -> _Recorded:
        """What the state directory holds of the Executor's farm run ``name``.

        Raises:
            InvalidInputError: no such run, or not an Executor's.
        """
        rd = RunDir(self._client.state_dir, name)
        if not rd.exists():
            raise InvalidInputError(f"no farm run named {name!r} in {rd.path.parent}")
        try:
            lines = rd.batch.read_bytes().splitlines()
        except OSError as exc:
            raise InvalidInputError(f"farm run {name!r}: cannot read its batch: {exc}") from None
        if not lines or not all(sshq_call.RUNNER_FILE.encode() in line for line in lines):
            raise InvalidInputError(f"farm run {name!r} was not made by an sshq.Executor")
        return _Recorded(dir=rd.path, tasks=len(lines), results=rd.results(),
                         cancelled=(rd.path / _CANCELLED).exists())

    # ---- pre-flight ------------------------------------------------------------------------

    async def _preflight_jobs(self) -> None:
        plat = self._platform
        key = ("jobs", plat.name, plat.hosts, plat.user, plat.port, plat.run_dir, self.python)
        with _CHECKED_LOCK:
            if key in _CHECKED:
                return
        pool = self._client.pool
        need_init = self._client.store.remote_init(plat.name, plat.run_dir) is None

        async def op(host: str, t: Any) -> None:
            payload: dict[str, Any] = {"python": self.python}
            if need_init:
                payload["run_dir"] = plat.run_dir
            reply = await pool.agent(plat, t, "pyenv", payload)
            if need_init:
                pool.record_remote_init(plat, t, reply.get("init"))
            check_pyenv(parse_pyenv(reply, host=t.host, python=self.python),
                        host=t.host, python=self.python)

        await pool.with_failover(plat, op)
        with _CHECKED_LOCK:
            _CHECKED.add(key)

    async def _run_dir(self) -> str:
        plat = self._platform
        info = self._client.store.remote_init(plat.name, plat.run_dir)
        if info is None:
            pool = self._client.pool

            async def op(host: str, t: Any) -> Any:
                return await pool.remote_init(plat, host, t)

            info = await pool.with_failover(plat, op)
        assert info is not None
        run_dir: str = info.run_dir
        return run_dir

    async def _preflight_farm(self) -> list[Any]:
        from ..farm.run import resolve_hosts, split_specs
        from ..remote.installed import refuse_restricted_hosts

        # before the pre-flight connects: a restricted key refuses a direct farm
        refuse_restricted_hosts(self._client.config.platforms, split_specs(self._hosts),
                                "a direct farm (Executor hosts=)")
        hosts = resolve_hosts(self._client, self._hosts)

        async def one(h: Any) -> None:
            key = ("farm", h.label, h.transport.host, self.python)
            with _CHECKED_LOCK:
                if key in _CHECKED:
                    return
            reply = await call_agent(h.transport, h.python, "pyenv", {"python": self.python},
                                     timeout=120, login_shell=h.login_shell,
                                     path_prepend=h.path_prepend)
            check_pyenv(parse_pyenv(reply, host=h.label, python=self.python),
                        host=h.label, python=self.python)
            with _CHECKED_LOCK:
                _CHECKED.add(key)

        await asyncio.gather(*(one(h) for h in hosts))
        return hosts

    # ---- the farm ----------------------------------------------------------------------------

    async def _launch_farm(self, pickled: PickledCalls) -> list[list[CallFuture[Any]]]:
        await self._preflight_farm()
        name, rdir = self._new_farm_dir()
        calls = rdir / _CALLS_DIR / name
        batch = rdir / _BATCH_IN
        try:
            calls.mkdir(parents=True, mode=0o700)
            shutil.copyfile(_runner_path(), calls / sshq_call.RUNNER_FILE)
            (calls / sshq_call.FN_FILE).write_bytes(pickled.fn)
            for k, blob in enumerate(pickled.jobs, start=1):
                (calls / sshq_call.calls_file(k)).write_bytes(blob)
            batch.write_text("".join(
                runner_command(self.python, "task", max_result_bytes=self._max_result,
                               index=k) + "\n"
                for k in range(1, len(pickled.jobs) + 1)))
        except BaseException:
            shutil.rmtree(rdir, ignore_errors=True)
            raise
        groups = self._futures(pickled)
        run = _FarmRun(name=name, dir=rdir, groups={})
        for k, group in enumerate(groups, start=1):
            for f in group:
                f._task = f"{name}/{k}"
            run.groups[k] = [(f, pos) for pos, f in enumerate(group)]
        await self._start_farm(run, batch)
        if not run.named:  # refused before it was recorded: nothing ran
            shutil.rmtree(rdir, ignore_errors=True)
            if run.error is not None:
                raise run.error
        return groups

    def _new_farm_dir(self) -> tuple[str, Path]:
        """A new run name and its directory (made: the name is taken)."""
        while True:
            name = time.strftime("exec-%Y%m%d-%H%M%S-") + secrets.token_hex(4)
            path = RunDir(self._client.state_dir, name).path
            try:
                path.mkdir(parents=True, mode=0o700)
            except FileExistsError:
                continue
            return name, path

    async def _start_farm(self, run: _FarmRun, batch: Path | None) -> None:
        """Start farm run ``run`` (new with ``batch``, else resumed) and wait
        until it is recorded and locked, or has failed."""
        loop = asyncio.get_running_loop()
        named: asyncio.Future[None] = loop.create_future()

        def on_name(_name: str) -> None:
            run.named = True
            if not named.done():
                named.set_result(None)

        task = loop.create_task(self._run_farm(run, batch, on_name))
        run.task = task
        self._runs[run.name] = run
        self._farms.add(task)

        def ended(t: asyncio.Task[None]) -> None:
            self._farms.discard(t)
            if self._runs.get(run.name) is run:
                del self._runs[run.name]

        task.add_done_callback(ended)
        await asyncio.wait({named, task}, return_when=asyncio.FIRST_COMPLETED)
        named.cancel()

    async def _run_farm(self, run: _FarmRun, batch: Path | None,
                        on_name: Callable[[str], None]) -> None:
        output = run.dir / "output"

        def on_result(r: TaskResult) -> None:
            group = run.groups.get(r.seq)
            if group:
                self._settle_task(group, output, r.seq, {
                    "host": r.host, "exit_status": r.exit_status, "signal": r.signal,
                    "error": r.error})

        complete = False
        try:
            if batch is None:
                await self._client.farm(resume=run.name, out=on_result, speculate=False,
                                        on_name=on_name)
            else:
                await self._client.farm(batch, hosts=self._hosts, run=run.name, out=on_result,
                                        deps=run.dir / _CALLS_DIR / run.name,
                                        output_dir=output, speculate=False, on_name=on_name)
            complete = True
        except asyncio.CancelledError:
            if run.stopped:
                (run.dir / _CANCELLED).touch()
            raise
        except Exception as exc:
            run.error = exc
            for f in run.futures():
                _set(f, False, exc)
        finally:
            for f in run.futures():
                _set(f, False, task_failed("(not reported)", exit_status=None, signal=None,
                                           error="the farm run ended without its result",
                                           stderr=b""))
            (run.dir / _BATCH_IN).unlink(missing_ok=True)
            if run.named and (complete or run.stopped or self._all_reported(run)):
                # nothing left to resume: the calls' files go, here and there;
                # a cancel (shutdown's close, just as the run ended) does not
                # cut that short: the removal ends (each rm bounded) first
                removal = asyncio.ensure_future(self._remove_run_deps(run))
                try:
                    await asyncio.shield(removal)
                except asyncio.CancelledError:
                    await removal
                    raise

    def _all_reported(self, run: _FarmRun) -> bool:
        """Every task of ``run`` has a journalled result (a run cancelled by
        :meth:`shutdown` just as it finished)."""
        try:
            rec = self._recorded_run(run.name)
        except InvalidInputError:
            return False
        return len(rec.results) >= rec.tasks

    async def _remove_run_deps(self, run: _FarmRun) -> None:
        from ..farm.run import resolve_hosts

        try:
            hosts = resolve_hosts(self._client, list(
                RunDir(self._client.state_dir, run.name).options().get("hosts") or []))
        except SshqError as exc:
            log.warning("farm run %s: cannot remove the calls' files: %s", run.name, exc)
            return
        await self._remove_deps(hosts, run.name)
        shutil.rmtree(run.dir / _CALLS_DIR, ignore_errors=True)

    def _settle_task(self, futures: list[tuple[CallFuture[Any], int | None]], output: Path,
                     seq: int, info: dict[str, Any]) -> None:
        """Settle the futures of farm task ``seq`` from its output files
        (``output/<seq>.stdout``: the result, ``.stderr``) and ``info`` (its
        result's host, exit_status, signal and error)."""
        out, err = output_paths(output, seq)
        data = _read_file(out)
        label = f"{seq} on {info.get('host')}"
        exit_status, sig = info.get("exit_status"), info.get("signal")

        def failed(why: str | None) -> SshqError:
            return task_failed(label, exit_status=exit_status, signal=sig, error=why,
                               stderr=_read_file(err, tail=ERR_TAIL_BYTES) or b"")

        if data is not None and data.startswith(sshq_call.RESULT_MAGIC):
            self._settle_positions(futures, data, f"farm task {label}", failed)
            return
        error = failed(info.get("error") or (None if data is not None
                                             else "its output file is missing"))
        for f, _ in futures:
            _set(f, False, error)

    @staticmethod
    async def _remove_deps(hosts: list[Any], name: str) -> None:
        async def one(h: Any) -> None:
            try:
                await h.transport.run(["rm", "-rf", "--", h.argv_path("farm-deps", name)],
                                      timeout=60)
            except SshqError as exc:
                log.warning("%s: cannot remove the calls' files: %s", h.label, exc)

        await asyncio.gather(*(one(h) for h in hosts))

    # ---- collecting results --------------------------------------------------------------

    def _start_collector(self) -> None:
        self._delay = self._poll_interval
        if self._collector is None or self._collector.done():
            self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        while self._pending:
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 1.5, self._max_poll_interval)
            try:
                await self._round()
            except Exception:  # a bad round must not stop the collection
                log.warning("collecting results failed (will retry)", exc_info=True)
            for jid in [jid for jid, p in self._pending.items()
                        if all(f.done() for f, _ in p.futures)]:
                del self._pending[jid]  # every future cancelled

    def _limit(self, jid: int) -> int:
        """The most bytes job ``jid``'s result file may have."""
        return (self._max_result + (1 << 20)) * max(1, self._pending[jid].calls)

    def _reads(self, jid: int) -> tuple[LogRead, LogRead]:
        """What a poll brings home of job ``jid`` once it ended: its result
        file and the tail of its job.err."""
        return (LogRead(sshq_call.RESULT_FILE, self._limit(jid)),
                LogRead(js.LOG_FILES["err"], ERR_TAIL_BYTES, tail=True))

    async def _round(self) -> None:
        """One poll of the pending jobs: one SSH command per host, which
        brings the results of the jobs that ended along with the states."""
        ids = list(self._pending)
        # jobs seen final already (attach; no exit recorded last round): their
        # files now, whether or not their status file records an exit
        now = [jid for jid, p in self._pending.items() if p.job.state.is_final]
        jobs, polled = await self._client._jobs.poll_reading(
            ids, {jid: self._reads(jid) for jid in ids}, now=now)
        final = []
        for j in jobs:
            p = self._pending.get(j.id)
            if p is None:
                continue
            p.job = j
            for f, _ in p.futures:
                f._job = j
            # (final by the job runner alone, with no exit recorded: its files
            # come with the next poll, asked for "now")
            if j.state.is_final and (j.id in polled or j.id in now):
                final.append(j)
        if not final:
            return
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for j in final:
            groups[(j.platform, j.host)].append(j)
        await asyncio.gather(*(self._collect_group(k, g, polled) for k, g in groups.items()))

    async def _collect_group(self, key: tuple[str, str], jobs: list[Job],
                             polled: dict[int, list[Any]]) -> None:
        try:
            got = await self._read_results(key, jobs, polled)
        except SshqError as exc:
            log.warning("reading results from %s on %s failed (will retry): %s",
                        key[0], key[1], exc)
            return
        for j in jobs:
            result, err, why = got[j.id]
            p = self._pending.get(j.id)
            if p is None:
                continue
            if result is None and not why and j.state is JobState.SUCCEEDED \
                    and p.empty_rounds < _GRACE_ROUNDS:
                p.empty_rounds += 1
                continue
            del self._pending[j.id]

            def failed(extra: str, job: Job = j, tail: bytes = err) -> SshqError:
                return job_failed(job, tail, why=extra)

            if result is None:
                error = failed(why or "it wrote no result file")
                for f, _ in p.futures:
                    _set(f, False, error)
                continue
            self._settle_positions(p.futures, result, f"job {j.id}", failed)

    @staticmethod
    def _settle_positions(futures: list[tuple[CallFuture[Any], int | None]], data: bytes,
                          where: str, failed: Callable[[str], SshqError]) -> None:
        try:
            parsed = parse_result(data, where=where)
        except RemoteError as exc:
            err = failed(str(exc))
            for f, _ in futures:
                _set(f, False, err)
            return
        for f, pos in futures:
            if pos is None:  # attach: the job's whole result
                if not parsed.chunk:
                    _set(f, *settle(parsed.outcome(0), where=where))
                    continue
                values = []
                for i in range(max(parsed.calls, 1)):
                    ok, value = settle(parsed.outcome(i), where=where)
                    if not ok:
                        _set(f, False, value)
                        break
                    values.append(value)
                else:
                    _set(f, True, values)
                continue
            if not parsed.load_error and pos >= parsed.calls:
                _set(f, False, failed(f"its result holds {parsed.calls} calls, not {pos + 1}"))
                continue
            _set(f, *settle(parsed.outcome(pos), where=where))

    async def _read_results(self, key: tuple[str, str], jobs: list[Job],
                            polled: dict[int, list[Any]]
                            ) -> dict[int, tuple[bytes | None, bytes, str]]:
        """Each job's result file, the tail of its job.err, and why there is
        no result: what the poll brought (``polled``: :meth:`_reads`' items
        per job), read on with one ``read_many`` agent call per host only for
        a result the poll did not bring whole (over its budget) or a job it
        brought nothing of (an installed agent older than this sshq)."""
        res = {j.id: bytearray() for j in jobs}
        err: dict[int, bytes] = {}
        why: dict[int, str] = {}
        size: dict[int, int] = {}
        done: set[int] = set()

        def take(jid: int, kind: str, item: object, asked: dict[str, Any]) -> bool:
            """One file's item; True if it brought result bytes."""
            data, total, problem = _read_item(item, asked)
            if kind == "err":
                err[jid] = data or b""
                return False
            if data is None:
                done.add(jid)
                if problem:
                    why[jid] = problem
                return False
            res[jid] += data
            size[jid] = total
            limit = self._limit(jid)
            if total > limit:
                why[jid] = (f"its result file has {total} bytes, over the limit of"
                            f" {limit} bytes")
                done.add(jid)
            elif len(res[jid]) >= total:
                done.add(jid)
            return bool(data)

        for j in jobs:
            items = polled.get(j.id)
            if items is not None:
                for kind, item, r in zip(("result", "err"), items, self._reads(j.id),
                                         strict=True):
                    take(j.id, kind, item, r.wire(j))
        todo = {j.id: j for j in jobs if j.id not in done}
        runners = {j.job_runner for j in jobs}
        while todo:
            files: list[dict[str, Any]] = []
            order: list[tuple[int, str]] = []
            for jid, j in todo.items():
                got = len(res[jid])
                files.append({"path": f"{j.job_log_dir}/{sshq_call.RESULT_FILE}",
                              "offset": got, "max_bytes": self._limit(jid) - got})
                order.append((jid, "result"))
                if jid not in err:
                    files.append(self._reads(jid)[1].wire(j))
                    order.append((jid, "err"))
            reply = await self._client.pool.agent_on_group(
                key[0], key[1], "read_many", {"files": files}, runners=runners)
            items = reply.get("files")
            if not isinstance(items, list) or len(items) != len(files):
                raise RemoteError(f"{key[1]}: malformed reply to read_many")
            progress = False
            for (jid, kind), item, asked in zip(order, items, files, strict=True):
                progress = take(jid, kind, item, asked) or progress
            todo = {jid: j for jid, j in todo.items() if jid not in done}
            if todo and not progress:
                for jid in todo:
                    why[jid] = "its result file could not be read whole"
                break
        out: dict[int, tuple[bytes | None, bytes, str]] = {}
        for j in jobs:
            complete = j.id not in why and j.id in size and len(res[j.id]) == size[j.id]
            out[j.id] = (bytes(res[j.id]) if complete else None, err.get(j.id, b""),
                         why.get(j.id, ""))
        return out

    # ---- closing ------------------------------------------------------------------------------

    async def _close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
        for t in list(self._farms):
            t.cancel()
        await asyncio.gather(*self._farms, *( [self._collector] if self._collector else []),
                             return_exceptions=True)
        await self._client.close()

    async def _close_when_idle(self) -> None:
        while self._pending or self._farms:
            await asyncio.gather(*self._farms, *([self._collector] if self._collector else []),
                                 return_exceptions=True)
            await asyncio.sleep(0)
        await self._client.close()
        self._loop.loop.stop()


@dataclass(slots=True, kw_only=True)
class _Recorded:
    """A farm run of an Executor as its directory records it: its number of
    tasks, the journalled results by seq, whether it was stopped."""

    dir: Path
    tasks: int
    results: dict[int, dict[str, Any]]
    cancelled: bool


def _parse_handle(handle: str) -> tuple[str, int]:
    """``"RUN/SEQ"`` (:attr:`CallFuture.task`) -> ``(run, seq)``.

    Raises:
        InvalidInputError: not of that form.
    """
    run, _, seq = handle.rpartition("/")
    try:
        check_run_name(run)
    except ConfigError:
        run = ""
    if not run or not seq.isdigit() or not seq.isascii() or int(seq) < 1 or len(seq) > 9:
        raise InvalidInputError(f"{handle[:200]!r} is neither an sshq id nor a farm task"
                                " handle RUN/SEQ")
    return run, int(seq)


def _read_file(path: Path, *, tail: int | None = None) -> bytes | None:
    """A local file's bytes (its last ``tail`` bytes); None if unreadable."""
    try:
        with open(path, "rb") as fh:
            if tail is not None:
                fh.seek(max(0, fh.seek(0, 2) - tail))
            return fh.read()
    except OSError:
        return None


def _read_item(item: object, asked: dict[str, Any]) -> tuple[bytes | None, int, str]:
    """One file of a ``read_many`` reply (untrusted): (bytes or None, file
    size, why there are none: '' for a missing file)."""
    if not isinstance(item, dict):
        return None, 0, "malformed reply"
    if item.get("ok") is not True:
        if item.get("missing") is True:
            return None, 0, ""
        return None, 0, str(item.get("error", "unreadable"))[:300]
    total, offset, data_b64 = item.get("size"), item.get("offset"), item.get("data_b64")
    if not (isinstance(total, int) and isinstance(offset, int) and isinstance(data_b64, str)):
        return None, 0, "malformed reply"
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        return None, 0, "malformed reply"
    if len(data) > int(asked.get("max_bytes", 0)) or (
            not asked.get("tail") and offset != asked.get("offset")):
        return None, 0, "malformed reply"
    return data, total, ""


def _set(f: CallFuture[Any], ok: bool, value: Any) -> None:
    """Resolve ``f`` unless it is done (cancelled) already."""
    if f.done():
        return
    try:
        if ok:
            f.set_result(value)
        else:
            f.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass
