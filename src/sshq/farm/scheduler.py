"""The farm's scheduling policy, without I/O.

A :class:`Scheduler` is fed events (:class:`HostUp`, :class:`TaskStarted`,
:class:`TaskDone`, :class:`HostLost`, :class:`Tick`) and answers each with
the actions that follow from it (:class:`SendTask`, :class:`KillCopy`,
:class:`DiscardOutput`, :class:`Report`, :class:`DropHost`,
:class:`Reconnect`, :class:`PauseHost`, :class:`Journal`, :class:`Warn`), in
the order they are to be carried out.  It does no I/O, starts nothing, never
awaits and never reads a clock: time comes in with the events (``now``,
seconds on one monotonic clock).  :class:`sshq.farm.engine.Farm` drives it
over one asyncio session per host.

The policy:

* each host up holds at most ``2 x slots`` copies (``slots`` running,
  as many queued on the host), so what is in flight is bounded; fresh
  tasks are pulled from the task iterator only when a host has room;
* a task runs in rounds: its first run, then each retry.  A round fails
  when its copies have all ended without success, or at once when one of
  them times out (``--timeout`` is the task's limit: a timed-out copy is
  the round's result, its other copy is killed); a failed round is run
  again up to ``retries`` times, on a host where the task has not failed
  yet when one can take it, else the task is reported failed (with the
  output of the copy that failed last);
* a host lost puts the tasks it held back at the front of the queue; a
  task whose host went away ``lost_limit`` times is reported failed; a
  host that fails ``max_host_failures`` times in a row (a session that
  finished a task resets the count) is dropped, and so is one whose
  failure is fatal (:attr:`HostLost.fatal`);
* stragglers: once no fresh task is left and a host has an idle slot, a
  task that has run longer than ``max(2 x median, median + speculate_min)``
  (the median of successful copies' run times, from three on) on another
  host is started again there, once per round (so a task never has more
  than two copies, and a copy left alone after its twin failed is not
  started again); the first copy to succeed wins and the others are
  killed;
* every task is reported exactly once (with ``keep_order``, in input order);
  a copy's output is reported with it or discarded, never both.

The driver holds each copy's output buffer: it makes one on
:class:`SendTask`, adds what the copy's host sends while the buffer exists,
and gives it up on :class:`KillCopy`, :class:`DiscardOutput` (dropped) or
:class:`Report` (the winner's).  Output bytes never pass through here.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .output import TaskResult

__all__ = [
    "Action", "Counts", "DiscardOutput", "DropHost", "Event", "HostLost", "HostUp", "Journal",
    "KillCopy", "PauseHost", "Policy", "Reconnect", "Report", "Scheduler", "SendTask",
    "TaskDone", "TaskStarted", "Tick", "Warn",
]

#: Successful run times kept for the median (seconds).
DURATIONS_KEPT = 1001
#: Longest wait before reconnecting to a host (seconds, before jitter).
BACKOFF_MAX = 30.0


class Policy(Protocol):
    """The options the scheduler follows (:class:`sshq.farm.engine.FarmOptions`
    has them all)."""

    @property
    def retries(self) -> int:
        """Extra runs of a failed task."""
        ...

    @property
    def speculate(self) -> bool:
        """Start stragglers again on idle hosts."""
        ...

    @property
    def keep_order(self) -> bool:
        """Report results in input order."""
        ...

    @property
    def max_host_failures(self) -> int:
        """Failures in a row that drop a host."""
        ...

    @property
    def lost_limit(self) -> int:
        """Times a task may lose its host before it is reported failed."""
        ...

    @property
    def speculate_min(self) -> float:
        """Seconds a straggler must exceed the median by."""
        ...


@dataclass(slots=True)
class Counts:
    """What the scheduler counts (for progress display and the summary).

    Attributes:
        done, failed: tasks reported as succeeded / failed.
        running: copies running now (started, not done).
        speculative: straggler copies started.
        retried: failed tasks queued again (``--retries``).
        hosts_alive, hosts_dropped: hosts in use / given up.
        paused: dispatching is paused.
    """

    done: int = 0
    failed: int = 0
    running: int = 0
    speculative: int = 0
    retried: int = 0
    hosts_alive: int = 0
    hosts_dropped: int = 0
    paused: bool = False


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class HostUp:
    """A host's dispatcher said hello.

    Attributes:
        host: the host's label.
        slots: tasks it runs at once (1 or more).
        now: monotonic seconds.
    """

    host: str
    slots: int
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStarted:
    """A copy started running (its first ``started`` frame; repeats are ignored).

    Attributes:
        host: the label of the host that sent it.
        copy: the copy's id (from :class:`SendTask`); an id that is not a
            copy on ``host`` is ignored.
        now: monotonic seconds.
    """

    host: str
    copy: int
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDone:
    """A copy ended (its ``done`` frame arrived whole).

    Attributes:
        host: the label of the host that sent it.
        copy: the copy's id; an id that is not a copy on ``host`` is ignored.
        now: monotonic seconds.
        exit_status: the command's exit status (None: a signal ended it, or
            it never ran).
        signal: the signal's name, or None.
        start, end: epoch seconds on the host's clock, or None.
        timed_out: the task's ``--timeout`` ended it.
        killed: a :class:`KillCopy` ended it (counts as a failure if its
            task is still undecided: the scheduler only kills losers).
    """

    host: str
    copy: int
    now: float
    exit_status: int | None
    signal: str | None = None
    start: float | None = None
    end: float | None = None
    timed_out: bool = False
    killed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLost:
    """A host's session ended before the run did (or could not be opened).

    Attributes:
        host: the host's label.
        reason: why, for messages (one line).
        fatal: retrying cannot help (e.g. authentication refused): drop it now.
        now: monotonic seconds.
    """

    host: str
    reason: str
    fatal: bool = False
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Time passed (the driver sends one about twice a second).

    Attributes:
        now: monotonic seconds.
        paused: whether dispatching new tasks is paused now.
    """

    now: float
    paused: bool = False


Event = HostUp | TaskStarted | TaskDone | HostLost | Tick


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTask:
    """Send a task to a host: a new copy (make its output buffer).

    Attributes:
        host: the host's label.
        copy: the copy's id, unique in the run (the ``id`` of its frames).
        seq: the task's 1-based line number.
        command: the shell command.
        attempt: the task's attempt number this copy would be (1-based).
        speculative: a straggler's extra copy.
    """

    host: str
    copy: int
    seq: int
    command: str
    attempt: int
    speculative: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class KillCopy:
    """Kill a copy whose task is decided (drop its output; its ``done`` frame
    will still come and free its slot).

    Attributes:
        host: the host running it.
        copy: the copy's id.
    """

    host: str
    copy: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscardOutput:
    """Drop a copy's output: it will not be reported (lost, lost the race,
    failed and retried).

    Attributes:
        copy: the copy's id.
    """

    copy: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Report a task's result (exactly one per task).

    Attributes:
        result: the result, without output.
        copy: the copy whose output goes with it (the driver fills ``result``
            from it); None: no output (the task kept losing its host).
    """

    result: TaskResult
    copy: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DropHost:
    """Give up on a host for the rest of the run.

    Attributes:
        host: the host's label.
        reason: why (the last failure).
    """

    host: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconnect:
    """Connect to a lost host again.

    Attributes:
        host: the host's label.
        after: seconds to wait first, before jitter (exponential in the
            failures in a row: 1, 2, 4, ... up to :data:`BACKOFF_MAX`).
    """

    host: str
    after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseHost:
    """Tell a host's dispatcher to hold (``paused``) or start its queued tasks.

    Attributes:
        host: the host's label.
        paused: hold them.
    """

    host: str
    paused: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Journal:
    """Append an event to the run's journal.

    Attributes:
        event: ``start``, ``retry``, ``speculate``, ``lost``, ``host``,
            ``pause`` or ``resume``.
        fields: its fields (``seq``, ``host``, ``attempt``, ``dropped``,
            ``reason``).
    """

    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Warn:
    """A message for the user (a host dropped).

    Attributes:
        message: one line.
    """

    message: str


Action = (SendTask | KillCopy | DiscardOutput | Report | DropHost | Reconnect | PauseHost
          | Journal | Warn)


# ---------------------------------------------------------------- state


class _Task:
    __slots__ = ("attempts", "command", "copies", "failed_hosts", "failures", "held", "lost",
                 "seq", "speculated")

    def __init__(self, seq: int, command: str) -> None:
        self.seq = seq
        self.command = command
        self.attempts = 0            # copies started while undecided
        self.failures = 0            # rounds failed
        self.failed_hosts: set[str] = set()
        self.lost = 0
        #: the copies of this round still running (a copy no longer here is a
        #: loser: killed, or its task decided)
        self.copies: dict[int, _Copy] = {}
        self.speculated = False      # this round has had its straggler copy
        #: a copy of this round that failed while the other ran on: its id and
        #: result (its output is held until the round is decided)
        self.held: tuple[int, TaskResult] | None = None


class _Copy:
    __slots__ = ("host", "id", "sent", "started", "task")

    def __init__(self, cid: int, task: _Task, host: _Host, now: float) -> None:
        self.id = cid
        self.task = task
        self.host = host
        self.sent = now
        self.started: float | None = None


class _Host:
    __slots__ = ("capacity", "completed", "copies", "dropped", "failures", "label", "slots",
                 "up")

    def __init__(self, label: str) -> None:
        self.label = label
        self.copies: dict[int, _Copy] = {}
        self.slots = 0
        self.capacity = 0
        self.up = False
        self.failures = 0            # session failures in a row
        self.completed = 0           # tasks finished since the last failure
        self.dropped = False


class Scheduler:
    """The farm's policy as a state machine (see the module docstring).

    Args:
        hosts: the hosts' labels (unique; at least one).
        tasks: ``(seq, command)`` pairs, pulled lazily when a host has room.
        total: the number of tasks in ``tasks``.
        policy: the options (see :class:`Policy`).
        order: with ``keep_order``, the seqs of ``tasks`` in input order.
        paused: dispatching starts paused.
        counts: counts to keep up to date (default: a fresh :class:`Counts`).

    Raises:
        ValueError: no hosts, or a label given twice.
    """

    def __init__(self, hosts: Sequence[str], tasks: Iterator[tuple[int, str]], total: int,
                 policy: Policy, *, order: Iterator[int] | None = None, paused: bool = False,
                 counts: Counts | None = None) -> None:
        if not hosts:
            raise ValueError("a farm needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError("host labels must be unique")
        self.policy = policy
        self._hosts = {label: _Host(label) for label in hosts}
        self._fresh = tasks
        self._fresh_done = False
        self._retry: deque[_Task] = deque()
        self._active: dict[int, _Task] = {}
        self._durations: deque[float] = deque(maxlen=DURATIONS_KEPT)
        self._next_id = 0
        self._total = total
        self._reported = 0
        self._order = order if policy.keep_order else None
        self._next_in_order = next(self._order, None) if self._order is not None else None
        self._held: dict[int, Report] = {}
        self._paused = paused
        self.counts = counts if counts is not None else Counts()
        self.counts.hosts_alive = len(hosts)
        self.counts.paused = paused
        self._handlers: dict[type, Callable[[Any, list[Action]], None]] = {
            TaskStarted: self._started, TaskDone: self._done, HostUp: self._host_up,
            HostLost: self._host_lost, Tick: self._tick,
        }

    # ------------------------------------------------------------ public

    def handle(self, event: Event) -> list[Action]:
        """Take one event; return the actions it calls for, in order.

        Raises:
            KeyError: the event names a host that is not one of the run's.
            TypeError: not an event.
            Exception: whatever the task iterator raises.
        """
        out: list[Action] = []
        try:
            handler = self._handlers[type(event)]
        except KeyError:
            raise TypeError(f"not a scheduler event: {event!r}") from None
        handler(event, out)
        return out

    @property
    def finished(self) -> bool:
        """Every task has been reported."""
        return self._reported >= self._total

    @property
    def unreported(self) -> int:
        """Tasks without a reported result yet."""
        return self._total - self._reported

    @property
    def hosts_left(self) -> int:
        """Hosts not dropped."""
        return sum(1 for h in self._hosts.values() if not h.dropped)

    # ------------------------------------------------------------ events

    def _host_up(self, ev: HostUp, out: list[Action]) -> None:
        h = self._hosts[ev.host]
        if h.dropped:
            return
        h.up = True
        h.slots = ev.slots
        h.capacity = ev.slots + max(1, ev.slots)
        if self._paused:
            out.append(PauseHost(host=h.label, paused=True))
        self._fill(h, ev.now, out)

    def _started(self, ev: TaskStarted, out: list[Action]) -> None:
        h = self._hosts[ev.host]
        c = h.copies.get(ev.copy)
        if c is None or c.started is not None:
            return
        c.started = ev.now
        self.counts.running += 1
        t = c.task
        if c.id not in t.copies:           # a loser (killed, or its task decided)
            return
        t.attempts += 1
        out.append(Journal(event="start", fields={"seq": t.seq, "host": h.label,
                                                  "attempt": t.attempts}))

    def _done(self, ev: TaskDone, out: list[Action]) -> None:
        h = self._hosts[ev.host]
        c = h.copies.pop(ev.copy, None)
        if c is None:
            return
        if c.started is not None:
            self.counts.running -= 1
        t = c.task
        if t.copies.pop(c.id, None) is None:   # a loser's output
            out.append(DiscardOutput(copy=c.id))
        else:
            h.completed += 1
            self._copy_done(c, ev, out)
        self._fill(h, ev.now, out)

    def _copy_done(self, c: _Copy, ev: TaskDone, out: list[Action]) -> None:
        t = c.task
        r = TaskResult(seq=t.seq, command=t.command, host=c.host.label,
                       exit_status=ev.exit_status, signal=ev.signal, start=ev.start, end=ev.end,
                       attempts=t.attempts, timed_out=ev.timed_out)
        if r.ok:
            if c.started is not None:
                self._durations.append(ev.now - c.started)
            self._final(t, r, c.id, out)
            return
        t.failed_hosts.add(c.host.label)
        if t.copies and not ev.timed_out:  # the other copy may still succeed
            self._drop_held(t, out)
            t.held = (c.id, r)
            return
        self._round_failed(t, r, c.id, ev.now, out)

    def _drop_held(self, t: _Task, out: list[Action]) -> None:
        if t.held is not None:
            out.append(DiscardOutput(copy=t.held[0]))
            t.held = None

    def _round_failed(self, t: _Task, r: TaskResult, cid: int, now: float,
                      out: list[Action]) -> None:
        """The task's round failed with result ``r`` (copy ``cid``'s output):
        stop its other copies, then run it again or report it."""
        if t.held is not None and t.held[0] != cid:
            self._drop_held(t, out)
        t.held = None
        self._kill_copies(t, out)
        t.failures += 1
        if t.failures <= self.policy.retries:
            out.append(DiscardOutput(copy=cid))
            t.speculated = False
            self.counts.retried += 1
            out.append(Journal(event="retry", fields={"seq": t.seq, "host": r.host}))
            self._retry.append(t)
            self._fill_all(now, out)
            return
        self._final(t, r, cid, out)

    def _kill_copies(self, t: _Task, out: list[Action]) -> None:
        """Kill the task's running copies: losers from now on."""
        for other in t.copies.values():
            out.append(KillCopy(host=other.host.label, copy=other.id))
        t.copies.clear()

    def _host_lost(self, ev: HostLost, out: list[Action]) -> None:
        h = self._hosts[ev.host]
        if h.dropped:
            return
        h.up = False
        copies = list(h.copies.values())
        h.copies.clear()
        for c in copies:
            if c.started is not None:
                self.counts.running -= 1
            out.append(DiscardOutput(copy=c.id))
            t = c.task
            if t.copies.pop(c.id, None) is None or t.copies:   # a loser, or not alone
                continue
            if t.held is not None:         # its twin failed: the round failed
                self._round_failed(t, t.held[1], t.held[0], ev.now, out)
                continue
            t.lost += 1
            out.append(Journal(event="lost", fields={"seq": t.seq, "host": h.label}))
            if t.lost >= self.policy.lost_limit:
                self._final(t, TaskResult(
                    seq=t.seq, command=t.command, host=h.label, exit_status=None, signal=None,
                    attempts=t.attempts,
                    error=f"lost its host {t.lost} times (last: {ev.reason})"), None, out)
            else:
                t.speculated = False
                self._retry.appendleft(t)
        if h.completed:                    # this host did work before failing
            h.failures = 0
        h.completed = 0
        h.failures += 1
        if ev.fatal or h.failures >= self.policy.max_host_failures:
            h.dropped = True
            self.counts.hosts_alive -= 1
            self.counts.hosts_dropped += 1
            out.append(Journal(event="host", fields={"host": h.label, "dropped": True,
                                                     "reason": ev.reason}))
            out.append(Warn(message=(
                f"{h.label}: dropped ({ev.reason}); the run goes on with the other hosts"
                if self.counts.hosts_alive else f"{h.label}: dropped ({ev.reason})")))
            out.append(DropHost(host=h.label, reason=ev.reason))
        else:
            out.append(Reconnect(host=h.label,
                                 after=min(2.0 ** (h.failures - 1), BACKOFF_MAX)))
        if copies or h.dropped:
            self._fill_all(ev.now, out)

    def _tick(self, ev: Tick, out: list[Action]) -> None:
        if ev.paused != self._paused:
            self._paused = ev.paused
            self.counts.paused = ev.paused
            out.append(Journal(event="pause" if ev.paused else "resume", fields={}))
            for h in self._hosts.values():
                if h.up:
                    out.append(PauseHost(host=h.label, paused=ev.paused))
        self._fill_all(ev.now, out)

    # ------------------------------------------------------------ queue

    def _fill_all(self, now: float, out: list[Action]) -> None:
        for h in self._hosts.values():
            self._fill(h, now, out)

    def _fill(self, h: _Host, now: float, out: list[Action]) -> None:
        """Send ``h`` tasks while it has room."""
        if not h.up:
            return
        while len(h.copies) < h.capacity:
            got = self._take(h, now)
            if got is None:
                return
            t, speculative = got
            c = _Copy(self._next_id, t, h, now)
            self._next_id += 1
            t.copies[c.id] = c
            h.copies[c.id] = c
            if speculative:
                t.speculated = True
                self.counts.speculative += 1
                out.append(Journal(event="speculate", fields={"seq": t.seq, "host": h.label}))
            out.append(SendTask(host=h.label, copy=c.id, seq=t.seq, command=t.command,
                                attempt=t.attempts + 1, speculative=speculative))

    def _take(self, h: _Host, now: float) -> tuple[_Task, bool] | None:
        """The next task for host ``h`` and whether it is a speculative copy."""
        if self._paused:
            return None
        if self._retry:
            for i, t in enumerate(self._retry):
                if h.label not in t.failed_hosts:
                    del self._retry[i]
                    return t, False
            t = self._retry[0]
            if not any(o.label not in t.failed_hosts for o in self._hosts.values()
                       if not o.dropped and o is not h):
                return self._retry.popleft(), False
        if not self._fresh_done:
            nxt = next(self._fresh, None)
            if nxt is not None:
                t = _Task(*nxt)
                self._active[t.seq] = t
                return t, False
            self._fresh_done = True
        if self.policy.speculate and len(h.copies) < h.slots:
            s = self._straggler(h, now)
            if s is not None:
                return s, True
        return None

    def _straggler(self, h: _Host, now: float) -> _Task | None:
        """The task running alone longest past the limit, elsewhere (or
        anywhere, with one host)."""
        if len(self._durations) < 3 or not self._active:
            return None
        med = statistics.median(self._durations)
        limit = max(2 * med, med + self.policy.speculate_min)
        multi = self.hosts_left > 1
        best: tuple[float, _Task] | None = None
        for t in self._active.values():
            if t.speculated or len(t.copies) != 1:
                continue
            (c,) = t.copies.values()
            if multi and c.host is h:
                continue
            age = now - (c.started if c.started is not None else c.sent)
            if age > limit and (best is None or age > best[0]):
                best = (age, t)
        return best[1] if best else None

    # ------------------------------------------------------------ results

    def _final(self, t: _Task, r: TaskResult, winner: int | None, out: list[Action]) -> None:
        """The task's result is decided: kill its other copies and report it."""
        del self._active[t.seq]
        self._kill_copies(t, out)
        if t.held is not None and t.held[0] != winner:
            out.append(DiscardOutput(copy=t.held[0]))
        t.held = None
        if r.ok:
            self.counts.done += 1
        else:
            self.counts.failed += 1
        rep = Report(result=r, copy=winner)
        if self._order is None:
            self._reported += 1
            out.append(rep)
            return
        self._held[t.seq] = rep
        while self._next_in_order is not None and self._next_in_order in self._held:
            self._reported += 1
            out.append(self._held.pop(self._next_in_order))
            self._next_in_order = next(self._order, None)
