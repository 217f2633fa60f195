"""The farm's scheduling policy alone: events in, actions out, no hosts.

Every test here feeds :class:`sshq.farm.scheduler.Scheduler` events by hand
(time too: ``now`` is whatever the test says) and checks the actions it
returns.  The whole file runs in well under a second.
"""

from __future__ import annotations

import ast
import inspect
import random
from collections import Counter
from collections.abc import Iterator

import pytest

from sshq.farm import scheduler as scheduler_mod
from sshq.farm.engine import FarmOptions, FarmStats
from sshq.farm.scheduler import (
    Action,
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


class Tasks:
    """``(seq, command)`` pairs that count how many were pulled."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for seq in range(1, self.n + 1):
            self.pulled += 1
            yield seq, f"cmd {seq}"


class Sim:
    """A scheduler and everything it said, with helpers to feed it."""

    def __init__(self, hosts: tuple[str, ...] = ("a", "b"), n: int = 10, **options: object,
                 ) -> None:
        self.tasks = Tasks(n)
        self.opts = FarmOptions(**options)  # type: ignore[arg-type]
        self.stats = FarmStats(total=n)
        order = iter(range(1, n + 1)) if self.opts.keep_order else None
        self.s = Scheduler(list(hosts), iter(self.tasks), n, self.opts, order=order,
                           counts=self.stats)
        self.log: list[Action] = []

    def do(self, event: object) -> list[Action]:
        acts = self.s.handle(event)  # type: ignore[arg-type]
        self.log.extend(acts)
        return acts

    def up(self, host: str, slots: int = 1, now: float = 0.0) -> list[SendTask]:
        return sends(self.do(HostUp(host=host, slots=slots, now=now)))

    def start(self, host: str, copy: int, now: float = 0.0) -> list[Action]:
        return self.do(TaskStarted(host=host, copy=copy, now=now))

    def done(self, host: str, copy: int, now: float = 1.0, exit_status: int | None = 0,
             **kw: object) -> list[Action]:
        return self.do(TaskDone(host=host, copy=copy, now=now, exit_status=exit_status,
                                **kw))  # type: ignore[arg-type]

    def run(self, send: SendTask, now: float = 1.0, exit_status: int | None = 0,
            ) -> list[Action]:
        """Start a copy and end it at once."""
        acts = self.start(send.host, send.copy, now - 0.1)
        return acts + self.done(send.host, send.copy, now, exit_status)

    def reports(self) -> list[Report]:
        return [a for a in self.log if isinstance(a, Report)]


def sends(acts: list[Action]) -> list[SendTask]:
    return [a for a in acts if isinstance(a, SendTask)]


def of(kind: type, acts: list[Action]) -> list[Action]:
    return [a for a in acts if isinstance(a, kind)]


# ---------------------------------------------------------------- dispatch


def test_a_host_gets_twice_its_slots_and_tasks_are_pulled_lazily() -> None:
    sim = Sim(hosts=("a",), n=100)
    got = sim.up("a", slots=3)
    assert [(s.seq, s.attempt, s.speculative) for s in got] == [
        (i, 1, False) for i in range(1, 7)]
    assert sim.tasks.pulled == 6          # no more than the host can hold
    more = sends(sim.run(got[0]))
    assert [s.seq for s in more] == [7]   # one done, one more sent
    assert sim.tasks.pulled == 7
    assert len({s.copy for s in got + more}) == 7


def test_each_task_is_reported_once_with_its_copy_and_the_run_finishes() -> None:
    sim = Sim(hosts=("a",), n=3)
    first = sim.up("a", slots=2)
    assert [s.seq for s in first] == [1, 2, 3]
    for s in reversed(first):
        acts = sim.run(s, now=5.0)
        (rep,) = of(Report, acts)
        assert isinstance(rep, Report)
        assert rep.copy == s.copy and rep.result.seq == s.seq and rep.result.ok
        assert rep.result.host == "a" and rep.result.attempts == 1
    assert [r.result.seq for r in sim.reports()] == [3, 2, 1]
    assert sim.s.finished and sim.s.unreported == 0
    assert (sim.stats.done, sim.stats.failed, sim.stats.running) == (3, 0, 0)
    journal = [a for a in sim.log if isinstance(a, Journal)]
    assert [(j.event, j.fields["seq"]) for j in journal] == [("start", 3), ("start", 2),
                                                              ("start", 1)]


def test_frames_for_unknown_copies_or_another_hosts_copies_are_ignored() -> None:
    sim = Sim(hosts=("a", "b"), n=2)
    (on_a,) = sim.up("a", slots=1)[:1]
    sim.up("b", slots=1)
    assert sim.start("b", on_a.copy) == []          # b names a's copy
    assert sim.done("b", on_a.copy) == []
    assert sim.done("a", 999) == []
    assert sim.start("a", on_a.copy) != []
    assert sim.start("a", on_a.copy) == []          # a repeated start
    assert sim.stats.running == 1 and sim.reports() == []
    with pytest.raises(TypeError):
        sim.s.handle("hello")  # type: ignore[arg-type]


# ---------------------------------------------------------------- retries


def test_a_failed_task_is_retried_on_a_host_where_it_has_not_failed() -> None:
    sim = Sim(hosts=("a", "b"), n=1, retries=1)
    (s1,) = sim.up("a", slots=1)
    sim.up("b", slots=1)                    # nothing left for b
    acts = sim.run(s1, exit_status=3)
    assert of(Report, acts) == []
    assert DiscardOutput(copy=s1.copy) in acts
    assert Journal(event="retry", fields={"seq": 1, "host": "a"}) in acts
    (s2,) = sends(acts)
    assert (s2.host, s2.seq, s2.attempt) == ("b", 1, 2)   # not a: it failed there
    (rep,) = of(Report, sim.run(s2))
    assert isinstance(rep, Report)
    assert rep.result.ok and rep.result.host == "b" and rep.result.attempts == 2
    assert rep.copy == s2.copy
    assert (sim.stats.retried, sim.stats.done, sim.stats.failed) == (1, 1, 0)


def test_retries_exhausted_report_the_last_failure() -> None:
    sim = Sim(hosts=("a",), n=1, retries=2)
    (s,) = sim.up("a", slots=1)
    for attempt in (1, 2, 3):
        assert s.attempt == attempt and s.host == "a"   # the only host takes it again
        acts = sim.run(s, exit_status=7)
        if attempt < 3:
            (s,) = sends(acts)
    (rep,) = sim.reports()
    assert rep.result.exit_status == 7 and rep.result.attempts == 3 and not rep.result.ok
    assert rep.copy == s.copy
    assert (sim.stats.failed, sim.stats.retried) == (1, 2)


def test_without_retries_a_failure_is_reported_at_once() -> None:
    sim = Sim(hosts=("a",), n=1)
    (s,) = sim.up("a", slots=1)
    acts = sim.run(s, exit_status=None)
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.result.exit_status is None
    assert sends(acts) == []


def test_a_retry_waits_for_a_host_where_it_did_not_fail() -> None:
    sim = Sim(hosts=("a", "b"), n=4, retries=1)
    a1, _a2 = sim.up("a", slots=1)              # tasks 1 and 2
    b3, _b4 = sim.up("b", slots=1)              # tasks 3 and 4: b is full
    acts = sim.run(a1, exit_status=1)           # 1 failed on a: a must not take it
    assert sends(acts) == []
    (b1,) = sends(sim.run(b3))                  # b frees a slot: b takes task 1
    assert (b1.host, b1.seq, b1.attempt) == ("b", 1, 2)


def test_a_retry_goes_to_a_host_it_failed_on_when_no_other_is_left() -> None:
    sim = Sim(hosts=("a", "b"), n=1, retries=1, max_host_failures=1)
    (s,) = sim.up("a", slots=1)
    sim.do(HostLost(host="b", reason="refused", now=0.0))   # b dropped (1 failure)
    (again,) = sends(sim.run(s, exit_status=1))
    assert (again.host, again.seq, again.attempt) == ("a", 1, 2)


# ---------------------------------------------------------------- speculation


def warm_up(sim: Sim, host: str, copies: list[SendTask], now: float) -> None:
    """Three quick successes: a median of 0.1 s."""
    for c in copies[:3]:
        sim.start(host, c.copy, now)
        sim.done(host, c.copy, now + 0.1)


def test_a_straggler_runs_again_and_the_first_copy_to_succeed_wins() -> None:
    sim = Sim(hosts=("a", "b"), n=4)
    sa = sim.up("a", slots=2)                   # tasks 1-4 on a
    assert [s.seq for s in sa] == [1, 2, 3, 4]
    warm_up(sim, "a", sa, now=0.0)              # 1-3 done in 0.1 s each
    slow = sa[3]
    sim.start("a", slow.copy, 0.2)
    assert sim.up("b", slots=1, now=0.3) == []  # not a straggler yet: 0.1 s < 1.1 s
    assert sends(sim.do(Tick(now=1.2))) == []   # 1.0 s: over 2 x median, under median + 1
    spec = sends(sim.do(Tick(now=1.5)))         # 1.3 s > max(2 x 0.1, 0.1 + 1)
    assert [(s.host, s.seq, s.attempt, s.speculative) for s in spec] == [("b", 4, 2, True)]
    assert Journal(event="speculate", fields={"seq": 4, "host": "b"}) in sim.log
    assert sim.stats.speculative == 1
    assert sends(sim.do(Tick(now=9.0))) == []   # never a third copy
    sim.start("b", spec[0].copy, 1.6)
    acts = sim.done("b", spec[0].copy, 1.7)
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report)
    assert rep.copy == spec[0].copy and rep.result.host == "b" and rep.result.attempts == 2
    assert KillCopy(host="a", copy=slow.copy) in acts
    # the loser ends, killed: its output is dropped, nothing more is reported
    acts = sim.done("a", slow.copy, 1.8, exit_status=None, signal="TERM", killed=True)
    assert acts == [DiscardOutput(copy=slow.copy)]
    assert [r.result.seq for r in sim.reports()] == [1, 2, 3, 4]
    assert sim.s.finished and sim.stats.running == 0 and sim.stats.done == 4


def test_a_loser_that_succeeds_after_the_winner_is_not_reported() -> None:
    sim = Sim(hosts=("a", "b"), n=4)
    sa = sim.up("a", slots=2)
    warm_up(sim, "a", sa, now=0.0)
    sim.start("a", sa[3].copy, 0.2)
    sim.up("b", slots=1, now=0.3)
    (spec,) = sends(sim.do(Tick(now=2.0)))
    acts = sim.done("a", sa[3].copy, 2.1)               # the original wins after all
    assert [r.copy for r in of(Report, acts)] == [sa[3].copy]
    assert KillCopy(host="b", copy=spec.copy) in acts
    assert sim.done("b", spec.copy, 2.2) == [DiscardOutput(copy=spec.copy)]
    assert Counter(r.result.seq for r in sim.reports())[4] == 1


def test_a_failed_copy_waits_for_the_other_copy() -> None:
    sim = Sim(hosts=("a", "b"), n=4)
    sa = sim.up("a", slots=2)
    warm_up(sim, "a", sa, now=0.0)
    sim.start("a", sa[3].copy, 0.2)
    sim.up("b", slots=1, now=0.3)
    (spec,) = sends(sim.do(Tick(now=2.0)))
    acts = sim.done("b", spec.copy, 2.1, exit_status=1)   # the extra copy fails
    assert of(Report, acts) == [] and of(KillCopy, acts) == []
    acts = sim.done("a", sa[3].copy, 2.5)
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.result.ok and rep.result.host == "a"
    assert DiscardOutput(copy=spec.copy) in acts   # held until the task was decided


def test_the_straggler_limit_is_twice_the_median_when_that_is_longer() -> None:
    sim = Sim(hosts=("a", "b"), n=4)
    sa = sim.up("a", slots=2)
    for c in sa[:3]:                            # a median of 2 s: the limit is 4 s
        sim.start("a", c.copy, 0.0)
        sim.done("a", c.copy, 2.0)
    sim.start("a", sa[3].copy, 2.0)
    sim.up("b", slots=1, now=2.0)
    assert sends(sim.do(Tick(now=5.5))) == []   # 3.5 s: over median + 1, under 2 x median
    assert [s.seq for s in sends(sim.do(Tick(now=6.5)))] == [4]


def test_no_speculation_before_three_successes_or_when_turned_off() -> None:
    for speculate, warm in ((True, 2), (False, 3)):
        sim = Sim(hosts=("a", "b"), n=4, speculate=speculate)
        sa = sim.up("a", slots=2)
        for c in sa[:warm]:
            sim.start("a", c.copy, 0.0)
            sim.done("a", c.copy, 0.1)
        sim.start("a", sa[3].copy, 0.2)
        sim.up("b", slots=1, now=0.3)
        assert sends(sim.do(Tick(now=100.0))) == []


def test_with_one_host_a_straggler_runs_again_on_the_same_host() -> None:
    sim = Sim(hosts=("a",), n=5)
    sa = sim.up("a", slots=3)
    warm_up(sim, "a", sa, now=0.0)
    sim.start("a", sa[3].copy, 0.2)
    sim.start("a", sa[4].copy, 5.0)
    spec = sends(sim.do(Tick(now=5.5)))
    assert [(s.host, s.seq, s.speculative) for s in spec] == [("a", 4, True)]



def straggling(hosts: tuple[str, ...] = ("a",), **options: object,
               ) -> tuple[Sim, SendTask, SendTask]:
    """Tasks 1-3 done in 0.1 s, task 4 started at 0.2 s and speculated at 5.5 s
    (on ``b`` if there is one): ``(sim, original copy, speculative copy)``."""
    sim = Sim(hosts=hosts, n=4, **options)
    sa = sim.up("a", slots=2)
    warm_up(sim, "a", sa, now=0.0)
    sim.start("a", sa[3].copy, 0.2)
    for other in hosts[1:]:
        sim.up(other, slots=1, now=0.3)
    (spec,) = sends(sim.do(Tick(now=5.5)))
    assert spec.speculative and spec.seq == 4 and spec.host == hosts[-1]
    sim.start(spec.host, spec.copy, 5.6)
    return sim, sa[3], spec


def no_more_copies(sim: Sim, now: float) -> None:
    """However long it runs, nothing is started again."""
    for k in range(200):
        assert sends(sim.do(Tick(now=now + k * 0.5))) == []


@pytest.mark.parametrize("hosts", [("a",), ("a", "b")], ids=["one-host", "two-hosts"])
def test_a_straggler_that_fails_leaves_its_copy_alone(hosts: tuple[str, ...]) -> None:
    # the original fails while its extra copy runs: the copy left alone is
    # not a straggler to start again; its end decides the task
    sim, orig, spec = straggling(hosts)
    acts = sim.done("a", orig.copy, 6.0, exit_status=3)
    assert of(Report, acts) == [] and of(DiscardOutput, acts) == [] and sends(acts) == []
    no_more_copies(sim, 6.5)
    assert sim.stats.speculative == 1
    acts = sim.done(spec.host, spec.copy, 200.0)
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.result.ok and rep.copy == spec.copy
    assert DiscardOutput(copy=orig.copy) in acts   # the failure's output, given up
    assert sim.s.finished and (sim.stats.done, sim.stats.failed) == (4, 0)


def test_all_copies_failing_report_the_last_failure_once() -> None:
    sim, orig, spec = straggling(("a", "b"))
    sim.done("a", orig.copy, 6.0, exit_status=3)
    acts = sim.done("b", spec.copy, 7.0, exit_status=4)
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.copy == spec.copy
    assert (rep.result.exit_status, rep.result.host, rep.result.attempts) == (4, "b", 2)
    assert DiscardOutput(copy=orig.copy) in acts and sends(acts) == []
    no_more_copies(sim, 7.5)
    assert sim.s.finished and (sim.stats.failed, sim.stats.retried) == (1, 0)
    assert Counter(r.result.seq for r in sim.reports()) == Counter(range(1, 5))


def test_all_copies_failing_is_one_failed_run_and_retried_once() -> None:
    # with --retries 1: both copies failing is the first run failing; the
    # task runs once more (and its retry may be speculated once more)
    sim, orig, spec = straggling(("a", "b"), retries=1)
    sim.done("a", orig.copy, 6.0, exit_status=3)
    acts = sim.done("b", spec.copy, 7.0, exit_status=4)
    assert of(Report, acts) == []
    assert DiscardOutput(copy=orig.copy) in acts and DiscardOutput(copy=spec.copy) in acts
    assert Journal(event="retry", fields={"seq": 4, "host": "b"}) in acts
    (again,) = sends(acts)                     # b is idle, a is where it failed first
    assert (again.seq, again.attempt, again.speculative) == (4, 3, False)
    sim.start(again.host, again.copy, 7.1)
    (spec2,) = sends(sim.do(Tick(now=20.0)))    # the retry straggles: one more copy
    assert spec2.speculative and spec2.seq == 4
    sim.start(spec2.host, spec2.copy, 20.1)
    sim.done(spec2.host, spec2.copy, 21.0, exit_status=5)
    no_more_copies(sim, 21.5)
    (rep,) = of(Report, sim.done(again.host, again.copy, 200.0, exit_status=6))
    assert isinstance(rep, Report) and rep.copy == again.copy
    assert rep.result.exit_status == 6 and rep.result.attempts == 4
    assert (sim.stats.failed, sim.stats.retried, sim.stats.speculative) == (1, 1, 2)
    assert sim.s.finished


@pytest.mark.parametrize("which", ["original", "copy"])
def test_a_copy_that_times_out_is_the_tasks_result(which: str) -> None:
    sim, orig, spec = straggling(("a",))
    late, other = (orig, spec) if which == "original" else (spec, orig)
    acts = sim.done("a", late.copy, 9.0, exit_status=None, signal="TERM", timed_out=True)
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.copy == late.copy
    assert rep.result.timed_out and not rep.result.ok and rep.result.attempts == 2
    assert KillCopy(host="a", copy=other.copy) in acts and sends(acts) == []
    # the killed copy's end frees its slot, and is neither reported nor counted
    acts = sim.done("a", other.copy, 9.1, exit_status=None, signal="TERM", killed=True)
    assert acts == [DiscardOutput(copy=other.copy)]
    no_more_copies(sim, 9.5)
    assert sim.s.finished and (sim.stats.failed, sim.stats.speculative) == (1, 1)
    assert len(sim.reports()) == 4


def test_a_copy_that_times_out_is_retried_per_retries() -> None:
    sim, orig, spec = straggling(("a",), retries=1)
    acts = sim.done("a", orig.copy, 9.0, exit_status=None, signal="TERM", timed_out=True)
    assert of(Report, acts) == [] and KillCopy(host="a", copy=spec.copy) in acts
    (again,) = sends(acts)
    assert (again.seq, again.attempt, again.speculative) == (4, 3, False)
    # the killed copy's end is not a second failure of the retry
    assert sim.done("a", spec.copy, 9.1, exit_status=None, killed=True) == [
        DiscardOutput(copy=spec.copy)]
    sim.start("a", again.copy, 9.2)
    (rep,) = of(Report, sim.done("a", again.copy, 9.5))
    assert isinstance(rep, Report) and rep.result.ok and rep.copy == again.copy
    assert (sim.stats.done, sim.stats.failed, sim.stats.retried) == (4, 0, 1)


def test_a_failed_copy_whose_twin_loses_its_host_is_the_result() -> None:
    sim, orig, spec = straggling(("a", "b"))
    sim.done("a", orig.copy, 6.0, exit_status=3)
    acts = sim.do(HostLost(host="b", reason="reset", now=7.0))
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.copy == orig.copy
    assert rep.result.exit_status == 3 and rep.result.host == "a"
    assert DiscardOutput(copy=spec.copy) in acts and sends(acts) == []
    assert sim.s.finished


def test_the_reported_endless_speculation_ends() -> None:
    """The batch of the bug report, as the scheduler saw it: ``sleep 60`` on
    one host with --timeout 3 (every copy times out 3 s after it starts) and
    a tick every 0.5 s.  It used to start a new copy every 1.5 s forever."""
    sim = Sim(hosts=("a",), n=5)
    first = sim.up("a", slots=2)               # tasks 1-4 (the host holds 4)
    (last,) = sends(sim.run(first[0], now=0.01))
    sim.run(first[1], now=0.01, exit_status=3)
    sim.run(first[2], now=0.01)
    sim.run(first[3], now=1.0)
    assert last.seq == 5
    sim.start("a", last.copy, 0.0)
    running = {last.copy: 0.0}                 # copy -> its start
    now = 0.0
    while not sim.s.finished and now < 120:
        now += 0.5
        for cid, began in list(running.items()):
            if now >= began + 3:
                del running[cid]
                for a in sim.done("a", cid, now, exit_status=None, signal="TERM",
                                  timed_out=True):
                    if isinstance(a, KillCopy):
                        running.pop(a.copy, None)
        for s in sends(sim.do(Tick(now=now))):
            sim.start("a", s.copy, now)
            running[s.copy] = now
    assert sim.s.finished and now < 10
    assert Counter(r.result.seq for r in sim.reports()) == Counter(range(1, 6))
    assert sim.stats.speculative <= 1


# ---------------------------------------------------------------- keep order


def test_keep_order_holds_results_until_their_turn() -> None:
    sim = Sim(hosts=("a",), n=4, keep_order=True)
    s = sim.up("a", slots=2)
    assert of(Report, sim.run(s[2])) == []
    assert of(Report, sim.run(s[1])) == []
    assert sim.stats.done == 2                       # decided, not yet reported
    assert not sim.s.finished
    acts = sim.run(s[0])
    assert [r.result.seq for r in of(Report, acts)] == [1, 2, 3]
    assert [r.copy for r in of(Report, acts)] == [s[0].copy, s[1].copy, s[2].copy]
    sim.run(s[3])
    assert [r.result.seq for r in sim.reports()] == [1, 2, 3, 4]
    assert sim.s.finished


def test_keep_order_with_gaps_in_the_seqs() -> None:
    seqs = [2, 5, 9]
    opts = FarmOptions(keep_order=True)
    s = Scheduler(["a"], iter([(q, f"c{q}") for q in seqs]), 3, opts, order=iter(seqs))
    got = sends(s.handle(HostUp(host="a", slots=2, now=0.0)))
    reported: list[int] = []
    for c in reversed(got):
        s.handle(TaskStarted(host="a", copy=c.copy, now=0.0))
        reported += [a.result.seq for a in s.handle(TaskDone(
            host="a", copy=c.copy, now=1.0, exit_status=0)) if isinstance(a, Report)]
    assert reported == [2, 5, 9] and s.finished


# ---------------------------------------------------------------- lost hosts


def test_a_lost_hosts_tasks_go_back_to_the_front_of_the_queue() -> None:
    sim = Sim(hosts=("a", "b"), n=10)
    sa = sim.up("a", slots=2)                        # 1-4 on a
    sim.start("a", sa[0].copy)
    sim.start("a", sa[1].copy)
    sb = sim.up("b", slots=1)                        # 5-6 on b
    sim.run(sb[0])                                   # b finished 5, took 7
    acts = sim.do(HostLost(host="a", reason="connection reset", now=2.0))
    assert {a.copy for a in of(DiscardOutput, acts)} == {s.copy for s in sa}
    assert [a.fields["seq"] for a in of(Journal, acts)] == [1, 2, 3, 4]
    assert Reconnect(host="a", after=1.0) in acts
    assert sim.stats.running == 0
    # b takes a's tasks before fresh ones, as soon as it has room
    more = sends(sim.done("b", sb[1].copy, 2.5))
    assert [s.seq for s in more] == [4]
    assert [s.seq for s in sends(sim.done("b", more[0].copy, 3.0))] == [3]
    # a's late frames for its old copies are ignored
    assert sim.done("a", sa[0].copy, 3.0) == []
    assert all(r.result.seq not in (1, 2) for r in sim.reports())


def test_a_lost_hosts_tasks_go_at_once_to_a_host_with_room() -> None:
    sim = Sim(hosts=("a", "b"), n=3)
    sim.up("a", slots=1)                             # 1 and 2 on a
    (b3,) = sim.up("b", slots=1)                     # 3 on b, room for one more
    acts = sim.do(HostLost(host="a", reason="reset", now=1.0))
    assert [(s.host, s.seq) for s in sends(acts)] == [("b", 2)]
    assert b3.seq == 3


def test_a_host_is_dropped_after_failures_in_a_row() -> None:
    sim = Sim(hosts=("a", "b"), n=3, max_host_failures=5)
    backoffs = []
    for _ in range(4):
        acts = sim.do(HostLost(host="a", reason="no route", now=0.0))
        backoffs += [a.after for a in of(Reconnect, acts)]
        assert of(DropHost, acts) == []
    assert backoffs == [1.0, 2.0, 4.0, 8.0]
    acts = sim.do(HostLost(host="a", reason="no route", now=0.0))
    assert DropHost(host="a", reason="no route") in acts
    assert Journal(event="host", fields={"host": "a", "dropped": True,
                                         "reason": "no route"}) in acts
    (warn,) = of(Warn, acts)
    assert "the run goes on with the other hosts" in warn.message
    assert (sim.stats.hosts_alive, sim.stats.hosts_dropped) == (1, 1)
    assert sim.s.hosts_left == 1
    assert sim.up("a", slots=4) == []                # a dropped host gets nothing


def test_a_session_that_did_work_resets_the_failure_count() -> None:
    sim = Sim(hosts=("a",), n=20, max_host_failures=2)
    sim.do(HostLost(host="a", reason="x", now=0.0))
    (s, *_rest) = sim.up("a", slots=1)
    sim.run(s)
    acts = sim.do(HostLost(host="a", reason="x", now=2.0))
    assert Reconnect(host="a", after=1.0) in acts and of(DropHost, acts) == []
    acts = sim.do(HostLost(host="a", reason="x", now=3.0))
    assert of(DropHost, acts) != []
    assert of(Warn, acts) == [Warn(message="a: dropped (x)")]


def test_a_fatal_failure_drops_the_host_at_once() -> None:
    sim = Sim(hosts=("a", "b"), n=2)
    acts = sim.do(HostLost(host="a", reason="permission denied", fatal=True, now=0.0))
    assert of(DropHost, acts) == [DropHost(host="a", reason="permission denied")]


def test_a_task_that_keeps_losing_its_host_is_reported_failed() -> None:
    sim = Sim(hosts=("a",), n=1, lost_limit=3)
    for k in range(3):
        (s,) = sim.up("a", slots=1)
        assert s.seq == 1
        sim.start("a", s.copy)
        acts = sim.do(HostLost(host="a", reason=f"oom {k}", now=float(k)))
    (rep,) = of(Report, acts)
    assert isinstance(rep, Report) and rep.copy is None
    assert rep.result.error == "lost its host 3 times (last: oom 2)"
    assert rep.result.attempts == 3 and not rep.result.ok
    assert sim.s.finished and sim.stats.failed == 1


# ---------------------------------------------------------------- pause


def test_pause_holds_new_tasks_and_tells_the_hosts() -> None:
    sim = Sim(hosts=("a", "b"), n=10)
    (a1, a2) = sim.up("a", slots=1)
    acts = sim.do(Tick(now=1.0, paused=True))
    assert PauseHost(host="a", paused=True) in acts and Journal(event="pause", fields={}) in acts
    assert PauseHost(host="b", paused=True) not in acts     # b is not up
    assert sim.stats.paused
    assert sim.up("b", slots=1) == [] and PauseHost(host="b", paused=True) in sim.log
    assert sends(sim.run(a1)) == []
    acts = sim.do(Tick(now=2.0, paused=False))
    assert Journal(event="resume", fields={}) in acts
    assert {(s.host, s.seq) for s in sends(acts)} == {("a", 3), ("b", 4), ("b", 5)}


def test_a_scheduler_that_starts_paused() -> None:
    s = Scheduler(["a"], iter([(1, "x")]), 1, FarmOptions(), paused=True)
    acts = s.handle(HostUp(host="a", slots=1, now=0.0))
    assert acts == [PauseHost(host="a", paused=True)]


# ---------------------------------------------------------------- exactly once


@pytest.mark.parametrize("seed", range(30))
def test_exactly_once_whatever_happens(seed: int) -> None:
    """Random runs: hosts come and go, copies fail, straggle and race; every
    task is reported once, and every copy's output is reported or dropped,
    once."""
    rnd = random.Random(seed)
    n = 40
    hosts = ("a", "b", "c")
    sim = Sim(hosts=hosts, n=n, retries=rnd.randint(0, 2), keep_order=rnd.random() < 0.5,
              max_host_failures=1000, lost_limit=rnd.randint(2, 4))
    made: set[int] = set()
    dropped: set[int] = set()               # copies whose output was given up
    live: dict[str, list[int]] = {h: [] for h in hosts}
    up: dict[str, bool] = dict.fromkeys(hosts, False)
    now = 0.0

    def take(acts: list[Action]) -> None:
        for a in acts:
            if isinstance(a, SendTask):
                assert up[a.host] and a.copy not in made
                made.add(a.copy)
                live[a.host].append(a.copy)
            elif isinstance(a, (DiscardOutput, KillCopy)):
                dropped.add(a.copy)

    for _ in range(5000):
        if sim.s.finished:
            break
        now += rnd.random() * 0.3
        h = rnd.choice(hosts)
        r = rnd.random()
        if not up[h]:
            if r < 0.5:
                up[h] = True
                take(sim.do(HostUp(host=h, slots=rnd.randint(1, 3), now=now)))
            continue
        if r < 0.04:
            up[h] = False
            live[h].clear()
            take(sim.do(HostLost(host=h, reason="gone", now=now)))
        elif r < 0.1:
            take(sim.do(Tick(now=now)))
        elif live[h]:
            cid = rnd.choice(live[h])
            take(sim.do(TaskStarted(host=h, copy=cid, now=now)))
            if rnd.random() < 0.7:
                live[h].remove(cid)
                fails = rnd.random() < 0.3
                take(sim.done(h, cid, now, exit_status=1 if fails else 0,
                              timed_out=fails and rnd.random() < 0.3))
    for h in hosts:                         # let the survivors finish
        if not up[h]:
            up[h] = True
            take(sim.do(HostUp(host=h, slots=2, now=now)))
    while not sim.s.finished:
        pending = [(h, c) for h in hosts for c in live[h]]
        assert pending, "the run stalled with nothing in flight"
        h, cid = pending[0]
        live[h].remove(cid)
        now += 0.1
        take(sim.do(TaskStarted(host=h, copy=cid, now=now)))
        take(sim.done(h, cid, now))
    seqs = [r.result.seq for r in sim.reports()]
    assert sorted(seqs) == list(range(1, n + 1))
    if sim.opts.keep_order:
        assert seqs == list(range(1, n + 1))
    assert sim.stats.done + sim.stats.failed == n
    # each copy's output is reported once or given up, never both, none left over
    reported = Counter(r.copy for r in sim.reports() if r.copy is not None)
    assert all(v == 1 for v in reported.values())
    assert not dropped & set(reported)
    assert made == dropped | set(reported)


# ---------------------------------------------------------------- purity


def test_the_scheduler_does_no_io_and_reads_no_clock() -> None:
    tree = ast.parse(inspect.getsource(scheduler_mod))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "dataclasses", "statistics", "typing"}, (
        imported)
