"""The farm's scheduler and its per-host dispatcher sessions.

One SSH channel and one dispatcher (:mod:`sshq.shipped.dispatcher`) per
host.  Each host takes at most ``slots + prefetch`` tasks at a time, so
what is in flight is bounded on both sides.  Fault handling:

* a host whose session dies (connection lost, dispatcher killed, no
  heartbeat for :data:`SILENCE` seconds) gets its tasks back in the queue,
  at the front, and is reconnected with exponential backoff and jitter;
  new connections are paced (sshd's ``MaxStartups`` punishes bursts);
* a result is only taken once its ``d`` frame arrived complete: output
  received before a connection died is thrown away with its copy;
* a failed task is re-run ``retries`` times, on a host where it has not
  failed yet when there is one;
* a host that fails ``max_host_failures`` times in a row is dropped with
  a warning, and the run goes on with the others;
* stragglers: once no task is waiting and a host has an idle slot, a task
  that has run longer than ``max(2 x median, median + 1 s)`` on another
  host is started again there; the first copy to succeed is reported, the
  others are killed.  Exactly one result is reported per task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import HostUnreachableError, RemoteError, SshqError
from ..remote.protocol import agent_argv
from ..transport import Session, Transport
from ..transport.local import LocalTransport
from .output import Budget, TaskOutput, TaskResult, output_paths, result_fields
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
            platform's ``path_prepend``; honoured by ``farm find``/``killall``).
    """

    label: str
    transport: Transport
    python: str = "python3"
    login_shell: bool = False
    run_dir: str = "~/sshq-run"
    path_prepend: tuple[str, ...] = ()

    def path(self, *parts: str) -> str:
        """A path under the host's run directory, as the dispatcher reads it
        (``~`` expanded remotely; on a local transport, expanded here)."""
        p = "/".join([self.run_dir.rstrip("/"), *parts])
        if isinstance(self.transport, LocalTransport):
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
class FarmStats:
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
    """

    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    speculative: int = 0
    retried: int = 0
    hosts_alive: int = 0
    hosts_dropped: int = 0
    paused: bool = False
    started: float = field(default_factory=time.monotonic)
    earlier: int = 0

    def summary(self) -> str:
        """One line: done, failed, retried, speculative copies, wall time, tasks/s."""
        wall = max(1e-6, time.monotonic() - self.started)
        n = self.done + self.failed - self.earlier
        return (f"{self.done - self.earlier} done, {self.failed} failed, {self.retried} retried,"
                f" {self.speculative} speculative copies, {wall:.1f} s, {n / wall:.1f} tasks/s")


class _Task:
    __slots__ = ("attempts", "command", "copies", "failed_hosts", "failures", "lost", "seq")

    def __init__(self, seq: int, command: str) -> None:
        self.seq = seq
        self.command = command
        self.attempts = 0
        self.failures = 0
        self.failed_hosts: set[str] = set()
        self.lost = 0
        self.copies: dict[int, _Copy] = {}


class _Copy:
    __slots__ = ("dispatched", "host", "id", "output", "started", "task")

    def __init__(self, cid: int, task: _Task, host: _Host, output: TaskOutput) -> None:
        self.id = cid
        self.task = task
        self.host = host
        self.dispatched = time.monotonic()
        self.started: float | None = None
        self.output = output


class _Host:
    def __init__(self, spec: FarmHost) -> None:
        self.spec = spec
        self.label = spec.label
        self.copies: dict[int, _Copy] = {}
        self.slots = 0
        self.capacity = 0
        self.session: Session | None = None
        self.failures = 0
        self.completed = 0
        self.dropped = False
        self.wake = asyncio.Event()

    def running(self) -> int:
        return len(self.copies)


class Farm:
    """Runs the tasks of one batch over a set of hosts.

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
        self._fresh = tasks
        self._fresh_done = False
        self._retry: deque[_Task] = deque()
        self._active: dict[int, _Task] = {}
        self._report_cb = report
        self.opts = options
        self._journal = journal
        self._warn = warn
        self._paused_cb = paused
        self._order = order
        self._held: dict[int, tuple[TaskResult, TaskOutput | None]] = {}
        self._budget = Budget()
        self._next_in_order: int | None = None
        self._durations: deque[float] = deque(maxlen=1001)
        self._next_id = 0
        self._remaining = total
        self._finished = asyncio.Event()
        self._fatal: BaseException | None = None
        self._bg: set[asyncio.Future[None]] = set()
        self._paused = paused()
        self._connect_gate = asyncio.Semaphore(4)
        self._connect_lock = asyncio.Lock()
        self._last_connect = 0.0
        self.stats = FarmStats(total=total, hosts_alive=len(hosts))
        if total == 0:
            self._finished.set()

    # ------------------------------------------------------------ public

    async def run(self) -> FarmStats:
        """Run every task; return the counts.

        Raises:
            SshqError: every host was dropped; unreported tasks are left for
                a resume.
        """
        if self.opts.keep_order and self._order is not None:
            self._next_in_order = next(self._order, None)
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
            for h in self.hosts:
                for c in list(h.copies.values()):
                    c.output.discard()
            for _r, held in self._held.values():
                if held is not None:
                    held.discard()
        if self._fatal is not None:
            raise self._fatal
        if not self._finished.is_set():
            raise SshqError(f"every host failed; {self._remaining} task(s) have no result")
        return self.stats

    # ------------------------------------------------------------ queue

    def _take(self, h: _Host) -> tuple[_Task, bool] | None:
        """The next task for host ``h`` and whether it is a speculative copy."""
        if self._paused:
            return None
        if self._retry:
            for i, t in enumerate(self._retry):
                if h.label not in t.failed_hosts:
                    del self._retry[i]
                    return t, False
            others = [o for o in self.hosts if not o.dropped and o is not h]
            t = self._retry[0]
            if not any(o.label not in t.failed_hosts for o in others):
                return self._retry.popleft(), False
        if not self._fresh_done:
            nxt = next(self._fresh, None)
            if nxt is not None:
                t = _Task(*nxt)
                self._active[t.seq] = t
                return t, False
            self._fresh_done = True
        if self.opts.speculate and h.running() < h.slots:
            s = self._straggler(h)
            if s is not None:
                return s, True
        return None

    def _straggler(self, h: _Host) -> _Task | None:
        if len(self._durations) < 3 or not self._active:
            return None
        med = statistics.median(self._durations)
        limit = max(2 * med, med + self.opts.speculate_min)
        now = time.monotonic()
        multi = sum(1 for o in self.hosts if not o.dropped) > 1
        best: tuple[float, _Task] | None = None
        for t in self._active.values():
            if len(t.copies) != 1:
                continue
            (c,) = t.copies.values()
            if multi and c.host is h:
                continue
            age = now - (c.started if c.started is not None else c.dispatched)
            if age > limit and (best is None or age > best[0]):
                best = (age, t)
        return best[1] if best else None

    def _wake_all(self) -> None:
        for h in self.hosts:
            h.wake.set()

    async def _tick(self) -> None:
        """Re-check pause and stragglers twice a second.

        A pause is also sent to every dispatcher, which then holds the tasks
        it has queued but not started.
        """
        while True:
            await asyncio.sleep(0.5)
            paused = self._paused_cb()
            if paused != self._paused:
                self._paused = paused
                self.stats.paused = paused
                self._journal("pause" if paused else "resume")
                msg = encode({"t": "pause" if paused else "resume"})
                for h in self.hosts:
                    if h.session is not None:
                        self._background(_quiet_write(h.session, msg))
            self._wake_all()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _all_hosts_gone(self, runners: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*runners, return_exceptions=True)

    # ------------------------------------------------------------ hosts

    async def _host_main(self, h: _Host) -> None:
        backoff = 1.0
        while not self._finished.is_set():
            progress = h.completed
            try:
                await self._session(h)
                return
            except (SshqError, OSError, TimeoutError) as exc:
                fatal = isinstance(exc, SshqError) and not exc.transient \
                    and not isinstance(exc, RemoteError)
                self._host_lost(h, str(exc))
                if h.completed > progress:   # this host did work before failing
                    h.failures = 0
                    backoff = 1.0
                h.failures += 1
                if fatal or h.failures >= self.opts.max_host_failures:
                    h.dropped = True
                    self.stats.hosts_alive -= 1
                    self.stats.hosts_dropped += 1
                    self._journal("host", host=h.label, dropped=True, reason=str(exc))
                    self._warn(f"{h.label}: dropped ({exc}); the run goes on with the"
                               " other hosts" if self.stats.hosts_alive else
                               f"{h.label}: dropped ({exc})")
                    self._wake_all()
                    return
                delay = backoff * (0.5 + random.random())
                log.info("%s: %s; reconnecting in %.1f s", h.label, exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)

    async def _paced_open(self, h: _Host) -> Session:
        async with self._connect_gate:
            async with self._connect_lock:
                wait = self._last_connect + 0.1 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last_connect = time.monotonic()
            return await h.spec.transport.open_session(
                agent_argv(h.spec.python, login_shell=h.spec.login_shell))

    async def _session(self, h: _Host) -> None:
        env = dict(self.opts.env, SSHQ_FARM_HOST=h.label)
        nonce, stdin = dispatcher_stdin({"slots": self.opts.slots, "env": env,
                                         "cwd": task_dir(h.spec, self.opts)})
        session = await self._paced_open(h)
        try:
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
                    if head.get("t") == "hello":
                        hello = head
            if self._paused:
                await session.write(encode({"t": "pause"}))
            slots = hello.get("slots")
            if not isinstance(slots, int) or isinstance(slots, bool) or not 0 < slots <= 65536:
                raise RemoteError(f"{h.label}: the dispatcher's hello is malformed"
                                  f" (slots {str(slots)[:40]!r})")
            h.slots = slots
            h.capacity = h.slots + max(1, h.slots)
            h.session = session
            log.info("%s: dispatcher up (%d slots)", h.label, h.slots)
            feeder = asyncio.create_task(self._feed(h, session))
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
                    if feeder.done():
                        feeder.result()  # a write failure
            except TimeoutError:
                raise HostUnreachableError(
                    f"{h.label}: no word from the dispatcher for {SILENCE:.0f} s",
                    host=h.label) from None
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
        finally:
            h.session = None
            await session.close()

    async def _feed(self, h: _Host, session: Session) -> None:
        while True:
            frames = []
            while h.running() < h.capacity:
                got = self._take(h)
                if got is None:
                    break
                t, speculative = got
                c = _Copy(self._next_id, t, h, self._new_output(t.seq, self._next_id))
                self._next_id += 1
                t.copies[c.id] = c
                h.copies[c.id] = c
                if speculative:
                    self.stats.speculative += 1
                    self._journal("speculate", seq=t.seq, host=h.label)
                frames.append(encode({"t": "task", "id": c.id, "seq": t.seq, "cmd": t.command,
                                      "timeout": self.opts.timeout, "attempt": t.attempts + 1}))
            if frames:
                await session.write(b"".join(frames))
                continue
            await h.wake.wait()
            h.wake.clear()

    def _host_lost(self, h: _Host, reason: str) -> None:
        """Put the tasks the host held back in the queue."""
        copies = list(h.copies.values())
        h.copies.clear()
        for c in copies:
            self.stats.running -= c.started is not None
            c.output.discard()
            t = c.task
            t.copies.pop(c.id, None)
            if t.seq not in self._active or t.copies:
                continue
            t.lost += 1
            self._journal("lost", seq=t.seq, host=h.label)
            if t.lost >= self.opts.lost_limit:
                self._final(t, TaskResult(
                    seq=t.seq, command=t.command, host=h.label, exit_status=None, signal=None,
                    attempts=t.attempts,
                    error=f"lost its host {t.lost} times (last: {reason})"))
            else:
                self._retry.appendleft(t)
        if copies:
            self._wake_all()

    # ------------------------------------------------------------ frames

    def _new_output(self, seq: int, cid: int) -> TaskOutput:
        o = self.opts
        if o.output_dir is not None:
            return TaskOutput(o.output_dir, f"{seq}.{cid}", self._budget, to_files=True)
        if o.spill_dir is None:
            o.spill_dir = Path(tempfile.mkdtemp(prefix="sshq-farm-output-"))
        return TaskOutput(o.spill_dir, f"{seq}.{cid}", self._budget)

    def _on_frame(self, h: _Host, head: dict[str, Any], payload: bytes) -> None:
        """One frame from ``h``'s dispatcher (untrusted: checked here).

        Raises:
            RemoteError: a frame that makes no sense (the session is dropped).
            OSError: output could not be written to its file.
        """
        kind = head.get("t")
        if kind == "hb" or kind == "bye":
            return
        cid = head.get("id")
        c = h.copies.get(cid) if isinstance(cid, int) else None
        if c is None:
            return
        if kind == "s":
            if c.started is not None:
                return
            c.started = time.monotonic()
            self.stats.running += 1
        elif kind == "d":
            del h.copies[c.id]
            self.stats.running -= c.started is not None
            h.wake.set()
        if c.task.seq not in self._active:   # decided already: a loser's output
            if kind == "d":
                c.output.discard()
            return
        if kind == "s":
            c.task.attempts += 1
            self._journal("start", seq=c.task.seq, host=h.label, attempt=c.task.attempts)
        elif kind == "o":
            stream = head.get("s", 1)
            if stream not in (1, 2) or isinstance(stream, bool):
                raise RemoteError(f"{h.label}: malformed dispatcher frame (stream {stream!r})")
            c.output.add(stream, payload)
        elif kind == "d":
            h.completed += 1
            n1 = head.get("n1", 0)
            if not isinstance(n1, int) or isinstance(n1, bool) or not 0 <= n1 <= len(payload):
                c.output.discard()
                raise RemoteError(f"{h.label}: malformed dispatcher frame (n1 {n1!r})")
            c.output.add(1, payload[:n1])
            c.output.add(2, payload[n1:])
            c.output.close()
            self._copy_done(c, head)

    def _copy_done(self, c: _Copy, head: dict[str, Any]) -> None:
        t = c.task
        t.copies.pop(c.id, None)
        f = result_fields(head)
        if t.seq not in self._active or f["killed"]:
            c.output.discard()
            return
        r = TaskResult(
            seq=t.seq, command=t.command, host=c.host.label, exit_status=f["exit_status"],
            signal=f["signal"], start=f["start"], end=f["end"], attempts=t.attempts,
            timed_out=f["timed_out"])
        if r.ok:
            if c.started is not None:
                self._durations.append(time.monotonic() - c.started)
            self._final(t, r, c)
            return
        t.failures += 1
        t.failed_hosts.add(c.host.label)
        if t.copies:   # another copy may still succeed
            c.output.discard()
            return
        if t.failures <= self.opts.retries:
            c.output.discard()
            self.stats.retried += 1
            self._journal("retry", seq=t.seq, host=c.host.label)
            self._retry.append(t)
            self._wake_all()
            return
        self._final(t, r, c)

    def _final(self, t: _Task, r: TaskResult, winner: _Copy | None = None) -> None:
        """The task's result is decided: kill other copies and report it."""
        del self._active[t.seq]
        for other in list(t.copies.values()):
            other.output.discard()
            if other.host.session is not None:
                frame = encode({"t": "kill", "id": other.id})
                self._background(_quiet_write(other.host.session, frame))
        t.copies.clear()
        output = winner.output if winner is not None else None
        if output is not None:
            output.settle(r, self.opts.output_dir or self._spill_dir())
        elif self.opts.output_dir is not None:
            out, err = output_paths(self.opts.output_dir, t.seq)
            out.write_bytes(b"")
            err.write_bytes(b"")
            r.stdout_file, r.stderr_file = str(out), str(err)
        if r.ok:
            self.stats.done += 1
        else:
            self.stats.failed += 1
        if self.opts.keep_order:
            # held results keep their output in buffers: counted in the budget,
            # spilled to files past it
            self._held[t.seq] = (r, output)
            while self._next_in_order is not None and self._next_in_order in self._held:
                self._report(*self._held.pop(self._next_in_order))
                assert self._order is not None
                self._next_in_order = next(self._order, None)
        else:
            self._report(r, output)

    def _spill_dir(self) -> Path:
        assert self.opts.spill_dir is not None   # set by _new_output
        return self.opts.spill_dir

    def _report(self, r: TaskResult, output: TaskOutput | None) -> None:
        try:
            if output is not None:
                output.fill(r)
            self._report_cb(r)
        except BaseException as exc:  # the output is gone: stop everything
            self._fatal = exc
            self._finished.set()
            return
        self._remaining -= 1
        if self._remaining <= 0:
            self._finished.set()


def task_dir(host: FarmHost, opts: FarmOptions) -> str | None:
    """The tasks' working directory on ``host`` (None: the login directory)."""
    return host.path("farm-deps", opts.deps) if opts.deps else None


async def _quiet_write(session: Session, data: bytes) -> None:
    try:
        await session.write(data)
    except (SshqError, OSError):
        pass  # the session's reader will notice
