"""The farm's driver: one dispatcher session per host, over asyncio.

One SSH channel and one dispatcher (:mod:`sshq.shipped.dispatcher`) per
host.  What to run where, retries, stragglers, the host-failure counter and
exactly-once reporting are decided by :class:`~sshq.farm.scheduler.Scheduler`
(no I/O); :class:`Farm` feeds it the dispatchers' frames, lost sessions and
the time, and carries out its actions: it writes task, kill and pause frames,
holds each copy's output, writes the reports.  What it adds itself:

* a host whose session dies (connection lost, dispatcher killed, no
  heartbeat for :data:`SILENCE` seconds) is reconnected after the
  scheduler's back-off, with jitter; new connections are paced (sshd's
  ``MaxStartups`` punishes bursts);
* a result is only taken once its ``done`` frame arrived complete: output
  received before a connection died is thrown away with its copy;
* everything a dispatcher sends is checked before it becomes an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import HostUnreachableError, RemoteError, SshqError
from ..remote.protocol import agent_argv
from ..transport import Session, Transport
from .output import Budget, TaskOutput, TaskResult, output_paths, result_fields
from .scheduler import (
    Action,
    Counts,
    DiscardOutput,
    DropHost,
    HostLost,
    HostUp,
    Journal,
    KillCopy,
    PauseHost,
    Reconnect,
    Report,
    Scheduler,
    SendTask,
    TaskDone,
    TaskStarted,
    Tick,
    Warn,
)
from .wire import FrameReader, dispatcher_stdin, encode

__all__ = ["FarmHost", "FarmOptions", "Farm", "FarmStats"]

log = logging.getLogger(__name__)

#: Seconds without any frame from a dispatcher (it sends a heartbeat every
#: 5 s) after which its session is taken for dead.
SILENCE = 20.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FarmHost:
    """One host of a farm.

    Attributes:
        label: the name used in results and messages.
        transport: how to reach it.
        python: the remote Python 3.6+ interpreter.
        login_shell: start the dispatcher from ``bash -l``.
        run_dir: the host's remote run directory (``~`` allowed): spools
            and ``--deps`` copies live under it.
        path_prepend: absolute remote directories put before PATH (the
            platform's ``path_prepend``): the dispatcher puts them before its
            tasks' PATH, ``farm find``/``killall``'s agent before its own.
        installed: the platform's agent is installed (``sshq agent
            install``): a pilot run's spool calls run its dispatcher and no
            dispatcher source is sent.
    """

    label: str
    transport: Transport
    python: str = "python3"
    login_shell: bool = False
    run_dir: str = "~/sshq-run"
    path_prepend: tuple[str, ...] = ()
    installed: bool = False

    def path(self, *parts: str) -> str:
        """A path under the host's run directory, as the dispatcher reads it
        (``~`` expanded remotely; on a local transport, expanded here)."""
        p = "/".join([self.run_dir.rstrip("/"), *parts])
        if self.transport.is_local:
            return os.path.expanduser(p)
        return p

    def argv_path(self, *parts: str) -> str:
        """:meth:`path` as an argument of a remote command (run from the home
        directory, no shell: ``~/x`` becomes ``x``)."""
        p = self.path(*parts)
        return p[2:] if p.startswith("~/") else p


@dataclass(slots=True, kw_only=True)
class FarmOptions:
    """How a farm runs.

    Attributes:
        slots: tasks at once per host; None for the host's core count.
        retries: extra runs of a task that failed (exit status not 0, signal,
            timeout).
        timeout: seconds a task may run before it is killed (TERM, then
            KILL 2 s later); None for no limit.
        speculate: start stragglers again on idle hosts.
        keep_order: report results in input order.
        output_dir: write each task's stdout/stderr there instead of
            carrying them in the result.
        spill_dir: where a stream longer than
            :data:`~sshq.farm.output.INLINE_MAX` goes (``<seq>.stdout``,
            ``<seq>.stderr``), named in the result instead of carried in it;
            None: a fresh temporary directory, made when first needed.
        deps: name of the ``--deps`` directory: tasks run in its copy,
            ``<run_dir>/farm-deps/<deps>``; None: in the login directory.
        env: extra environment variables for the tasks.
        max_host_failures: consecutive session failures that drop a host.
        lost_limit: a task whose host went away this many times is reported
            failed (it may be what kills its host).
        speculate_min: seconds a task must exceed the median by before it
            is started again.
    """

    slots: int | None = None
    retries: int = 0
    timeout: float | None = None
    speculate: bool = True
    keep_order: bool = False
    output_dir: Path | None = None
    spill_dir: Path | None = None
    deps: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    max_host_failures: int = 5
    lost_limit: int = 3
    speculate_min: float = 1.0


@dataclass(slots=True)
class FarmStats(Counts):
    """Counts for progress display and the final summary.

    Attributes:
        total: tasks of this invocation (``attach``: of the whole run).
        done, failed: tasks reported as succeeded / failed (``attach``:
            ``done`` includes the ``earlier`` ones).
        running: copies running now.
        speculative: straggler copies started.
        retried: failed tasks queued again (``--retries``).
        hosts_alive, hosts_dropped: hosts in use / given up.
        paused: dispatching is paused.
        started: ``time.monotonic()`` at the start.
        earlier: tasks reported by earlier invocations (``attach``).

    The scheduler keeps the fields of :class:`~sshq.farm.scheduler.Counts`
    up to date.
    """

    total: int = 0
    started: float = field(default_factory=time.monotonic)
    earlier: int = 0

    def summary(self) -> str:
        """One line: done, failed, retried, speculative copies, wall time, tasks/s."""
        wall = max(1e-6, time.monotonic() - self.started)
        n = self.done + self.failed - self.earlier
        return (f"{self.done - self.earlier} done, {self.failed} failed, {self.retried} retried,"
                f" {self.speculative} speculative copies, {wall:.1f} s, {n / wall:.1f} tasks/s")


class _Host:
    """What the driver keeps per host: its session and what waits to be written."""

    __slots__ = ("dropped", "label", "outbox", "retry_after", "session", "spec", "wake",
                 "writer")

    def __init__(self, spec: FarmHost) -> None:
        self.spec = spec
        self.label = spec.label
        self.session: Session | None = None
        self.outbox: list[bytes] = []
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.dropped = False
        self.retry_after = 1.0


class Farm:
    """Runs the tasks of one batch over a set of hosts.

    The policy (what goes where, retries, stragglers, reporting) is
    :class:`~sshq.farm.scheduler.Scheduler`'s; this class turns dispatcher
    frames and time into its events and carries out its actions.

    Args:
        hosts: the hosts (at least one).
        tasks: ``(seq, command)`` pairs, consumed lazily.
        total: the number of tasks in ``tasks``.
        report: called once per task with its result, in the order results
            are final (or input order with ``keep_order``); it must write the
            result and journal it without awaiting anything.
        options: see :class:`FarmOptions`.
        journal: ``journal(event, **fields)`` appends to the run's journal.
        order: with ``keep_order``, the seqs of ``tasks`` in input order.
        warn: called with a message for the user (a host dropped, ...).
        paused: returns True while dispatching new tasks is paused.

    Raises:
        ValueError: no hosts, or two with the same label.
    """

    def __init__(
        self,
        hosts: list[FarmHost],
        tasks: Iterator[tuple[int, str]],
        total: int,
        report: Callable[[TaskResult], None],
        options: FarmOptions,
        *,
        journal: Callable[..., None] = lambda event, **f: None,
        order: Iterator[int] | None = None,
        warn: Callable[[str], None] = lambda msg: None,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        if not hosts:
            raise ValueError("a farm needs at least one host")
        self.hosts = [_Host(h) for h in hosts]
        self._by_label = {h.label: h for h in self.hosts}
        self.opts = options
        self.stats = FarmStats(total=total)
        self._sched = Scheduler([h.label for h in self.hosts], tasks, total, options,
                                order=order, paused=paused(), counts=self.stats)
        self._report_cb = report
        self._journal = journal
        self._warn = warn
        self._paused_cb = paused
        self._budget = Budget()
        #: output of copies not done yet, by copy id, with the host running them
        self._live: dict[int, tuple[_Host, TaskOutput]] = {}
        #: output of copies done, until the scheduler reports or drops it
        self._ended: dict[int, TaskOutput] = {}
        self._finished = asyncio.Event()
        self._fatal: BaseException | None = None
        self._connect_gate = asyncio.Semaphore(4)
        self._connect_lock = asyncio.Lock()
        self._last_connect = 0.0
        if self._sched.finished:
            self._finished.set()

    # ------------------------------------------------------------ public

    async def run(self) -> FarmStats:
        """Run every task; return the counts.

        Raises:
            SshqError: every host was dropped; unreported tasks are left for
                a resume.
            Exception: whatever ``report`` raised (the run stops at once).
        """
        runners = [asyncio.create_task(self._host_main(h)) for h in self.hosts]
        ticker = asyncio.create_task(self._tick())
        all_gone = asyncio.create_task(self._all_hosts_gone(runners))
        finished = asyncio.create_task(self._finished.wait())
        try:
            await asyncio.wait([finished, all_gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in [*runners, ticker, all_gone, finished]:
                t.cancel()
            await asyncio.gather(*runners, ticker, all_gone, finished, return_exceptions=True)
            for _h, output in self._live.values():
                output.discard()
            for output in self._ended.values():
                output.discard()
            self._live.clear()
            self._ended.clear()
        if self._fatal is not None:
            raise self._fatal
        if not self._finished.is_set():
            raise SshqError(f"every host failed; {self._sched.unreported} task(s) have no"
                            " result")
        return self.stats

    # ------------------------------------------------------------ actions

    def _apply(self, actions: list[Action]) -> None:
        """Carry out the scheduler's actions, in order (nothing here awaits)."""
        for a in actions:
            if isinstance(a, SendTask):
                h = self._by_label[a.host]
                self._live[a.copy] = (h, self._new_output(a.seq, a.copy))
                self._post(h, encode({"type": "task", "id": a.copy, "seq": a.seq,
                                      "cmd": a.command, "timeout": self.opts.timeout,
                                      "attempt": a.attempt}))
            elif isinstance(a, Journal):
                self._journal(a.event, **a.fields)
            elif isinstance(a, Report):
                self._report(a)
            elif isinstance(a, DiscardOutput):
                self._discard(a.copy)
            elif isinstance(a, KillCopy):
                self._discard(a.copy)
                self._post(self._by_label[a.host], encode({"type": "kill", "id": a.copy}))
            elif isinstance(a, PauseHost):
                self._post(self._by_label[a.host],
                           encode({"type": "pause" if a.paused else "resume"}))
            elif isinstance(a, Warn):
                self._warn(a.message)
            elif isinstance(a, DropHost):
                self._by_label[a.host].dropped = True
            elif isinstance(a, Reconnect):
                self._by_label[a.host].retry_after = a.after
        if self._sched.finished:
            self._finished.set()

    def _post(self, h: _Host, frame: bytes) -> None:
        """Queue a frame for ``h``'s dispatcher (dropped if it has no session)."""
        if h.session is not None:
            h.outbox.append(frame)
            h.wake.set()

    def _discard(self, cid: int) -> None:
        live = self._live.pop(cid, None)
        if live is not None:
            live[1].discard()
        ended = self._ended.pop(cid, None)
        if ended is not None:
            ended.discard()

    def _new_output(self, seq: int, cid: int) -> TaskOutput:
        o = self.opts
        if o.output_dir is not None:
            return TaskOutput(o.output_dir, f"{seq}.{cid}", self._budget, to_files=True)
        if o.spill_dir is None:
            o.spill_dir = Path(tempfile.mkdtemp(prefix="sshq-farm-output-"))
        return TaskOutput(o.spill_dir, f"{seq}.{cid}", self._budget)

    def _spill_dir(self) -> Path:
        assert self.opts.spill_dir is not None   # set by _new_output
        return self.opts.spill_dir

    def _report(self, a: Report) -> None:
        r = a.result
        output = self._ended.pop(a.copy, None) if a.copy is not None else None
        if self._fatal is not None:   # the results' destination failed: report no more
            if output is not None:
                output.discard()
            return
        try:
            if output is not None:
                output.settle(r, self.opts.output_dir or self._spill_dir())
                output.fill(r)
            elif self.opts.output_dir is not None:
                out, err = output_paths(self.opts.output_dir, r.seq)
                out.write_bytes(b"")
                err.write_bytes(b"")
                r.stdout_file, r.stderr_file = str(out), str(err)
            self._report_cb(r)
        except BaseException as exc:  # the output is gone: stop everything
            if output is not None:
                output.discard()
            self._fatal = exc
            self._finished.set()

    # ------------------------------------------------------------ time

    async def _tick(self) -> None:
        """Tell the scheduler the time and the pause flag twice a second (a
        pause is also sent to every dispatcher, which then holds the tasks it
        has queued but not started)."""
        while True:
            await asyncio.sleep(0.5)
            self._apply(self._sched.handle(Tick(now=time.monotonic(),
                                                paused=self._paused_cb())))

    async def _all_hosts_gone(self, runners: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*runners, return_exceptions=True)

    # ------------------------------------------------------------ hosts

    async def _host_main(self, h: _Host) -> None:
        while not self._finished.is_set():
            exc = await self._session(h)
            if exc is None or h.dropped:
                return
            delay = h.retry_after * (0.5 + random.random())
            log.info("%s: %s; reconnecting in %.1f s", h.label, exc, delay)
            await asyncio.sleep(delay)

    async def _paced_open(self, h: _Host) -> Session:
        async with self._connect_gate:
            async with self._connect_lock:
                wait = self._last_connect + 0.1 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last_connect = time.monotonic()
            return await h.spec.transport.open_session(
                agent_argv(h.spec.python, login_shell=h.spec.login_shell))

    async def _session(self, h: _Host) -> BaseException | None:
        """One session with ``h``'s dispatcher, until the run is finished (None)
        or the session fails (the error, already given to the scheduler)."""
        session: Session | None = None
        try:
            session = await self._paced_open(h)
            await self._serve(h, session)
            return None
        except (SshqError, OSError, TimeoutError) as exc:
            self._lost(h, exc)   # before anything awaits: no task goes to a dead host
            return exc
        finally:
            h.session = None
            h.outbox.clear()
            if h.writer is not None:
                h.writer.cancel()
                await asyncio.gather(h.writer, return_exceptions=True)
                h.writer = None
            if session is not None:
                await session.close()

    def _lost(self, h: _Host, exc: BaseException) -> None:
        h.session = None
        h.outbox.clear()
        fatal = (isinstance(exc, SshqError) and not exc.transient
                 and not isinstance(exc, RemoteError))
        self._apply(self._sched.handle(HostLost(host=h.label, reason=str(exc), fatal=fatal,
                                                now=time.monotonic())))

    async def _serve(self, h: _Host, session: Session) -> None:
        """Start the dispatcher, then read its frames until the run is finished.

        Raises:
            RemoteError: it did not start, or sent something malformed.
            HostUnreachableError: the channel closed, or went silent.
            TimeoutError: no hello within 60 s.
            SshqError, OSError: the channel failed.
        """
        env = dict(self.opts.env, SSHQ_FARM_HOST=h.label)
        nonce, stdin = dispatcher_stdin({"slots": self.opts.slots, "env": env,
                                         "cwd": task_dir(h.spec, self.opts),
                                         "path_prepend": list(h.spec.path_prepend)})
        await session.write(stdin)
        reader = FrameReader(nonce)
        hello: dict[str, Any] | None = None
        while hello is None:
            async with asyncio.timeout(60.0):   # not wait_for: see below
                data = await session.read()
            if not data:
                err = session.stderr_tail().decode("utf-8", "replace").strip()
                raise RemoteError(f"the dispatcher did not start: {err or 'no output'}")
            for head, _ in reader.feed(data):
                if head.get("type") == "hello":
                    hello = head
        slots = hello.get("slots")
        if not isinstance(slots, int) or isinstance(slots, bool) or not 0 < slots <= 65536:
            raise RemoteError(f"{h.label}: the dispatcher's hello is malformed"
                              f" (slots {str(slots)[:40]!r})")
        h.session = session
        h.outbox.clear()
        h.wake.clear()
        log.info("%s: dispatcher up (%d slots)", h.label, slots)
        self._apply(self._sched.handle(HostUp(host=h.label, slots=slots,
                                              now=time.monotonic())))
        h.writer = asyncio.create_task(self._writer(h, session))
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow
                # the cancellation that ends the run (CPython gh-86296)
                async with asyncio.timeout(SILENCE):
                    data = await session.read()
                if self._finished.is_set():
                    return
                if not data:
                    err = session.stderr_tail().decode("utf-8", "replace").strip()
                    raise HostUnreachableError(
                        f"{h.label}: the dispatcher's channel closed"
                        + (f": {err[-300:]}" if err else ""), host=h.label)
                for head, payload in reader.feed(data):
                    self._on_frame(h, head, payload)
                if h.writer.done():
                    h.writer.result()  # a write failure
        except TimeoutError:
            raise HostUnreachableError(
                f"{h.label}: no word from the dispatcher for {SILENCE:.0f} s",
                host=h.label) from None

    async def _writer(self, h: _Host, session: Session) -> None:
        """Write what is queued for ``h`` (task, kill, pause frames), in order."""
        while True:
            await h.wake.wait()
            h.wake.clear()
            if h.outbox:
                data = b"".join(h.outbox)
                h.outbox.clear()
                await session.write(data)

    # ------------------------------------------------------------ frames

    def _on_frame(self, h: _Host, head: dict[str, Any], payload: bytes) -> None:
        """One frame from ``h``'s dispatcher (untrusted: checked here).

        Raises:
            RemoteError: a frame that makes no sense (the session is dropped).
            OSError: output could not be written to its file.
        """
        kind = head.get("type")
        if kind == "heartbeat" or kind == "bye":
            return
        cid = head.get("id")
        if not isinstance(cid, int) or isinstance(cid, bool):
            return
        if kind == "started":
            self._apply(self._sched.handle(TaskStarted(host=h.label, copy=cid,
                                                       now=time.monotonic())))
        elif kind == "output":
            live = self._live.get(cid)
            if live is None or live[0] is not h:   # not a copy of h's, or a loser's
                return
            stream = head.get("stream", 1)
            if stream not in (1, 2) or isinstance(stream, bool):
                raise RemoteError(f"{h.label}: malformed dispatcher frame (stream {stream!r})")
            live[1].add(stream, payload)
        elif kind == "done":
            live = self._live.get(cid)
            if live is not None and live[0] is h:
                del self._live[cid]
                output = live[1]
                n1 = head.get("stdout_bytes", 0)
                if (not isinstance(n1, int) or isinstance(n1, bool)
                        or not 0 <= n1 <= len(payload)):
                    output.discard()
                    raise RemoteError(
                        f"{h.label}: malformed dispatcher frame (stdout_bytes {n1!r})")
                output.add(1, payload[:n1])
                output.add(2, payload[n1:])
                output.close()
                self._ended[cid] = output
            f = result_fields(head)
            self._apply(self._sched.handle(TaskDone(
                host=h.label, copy=cid, now=time.monotonic(), exit_status=f["exit_status"],
                signal=f["signal"], start=f["start"], end=f["end"],
                timed_out=f["timed_out"], killed=f["killed"])))


def task_dir(host: FarmHost, opts: FarmOptions) -> str | None:
    """The tasks' working directory on ``host`` (None: the login directory)."""
    return host.path("farm-deps", opts.deps) if opts.deps else None
