"""Detached runs and pilot jobs: the remote file system as the mediator.

``--detach``: the tasks are split among the hosts and written to a spool
directory on each (``<run_dir>/farm/<run>/<host>/``), where a daemon
worker (the dispatcher in worker mode) runs them and leaves each result in
files.  The client may go; ``sshq farm attach NAME`` collects the results
later, reporting each exactly once (the local journal decides), and then
acknowledges them so the host deletes them.  A worker found dead before
it finished is started again; it skips tasks that have a result.

``--via PLATFORM --nodes N``: the same spools on the platform's login host,
one per pilot job; the workers are started by the platform's job runner
(one job per pilot, not one per task) and the client attaches at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import HostUnreachableError, RemoteError, SshqError
from ..remote.protocol import agent_argv
from .backend import FarmBackend
from .engine import FarmHost, FarmOptions, FarmStats, task_dir
from .journal import RunDir
from .output import Budget, TaskOutput, TaskResult, printable, result_fields, spill_note
from .wire import FrameReader, dispatcher_source, dispatcher_stdin, encode

__all__ = ["Spool", "Pilots", "prepare_spools", "attach_spools"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Spool:
    """One remote spool directory and the host that holds it."""

    host: FarmHost
    path: str
    tasks: int = 0
    job_ids: list[int] = field(default_factory=list)  # with --via: the pilot jobs
    workers: list[FarmHost] = field(default_factory=list)  # hosts sharing this spool
    finished: bool = False
    failures: int = 0
    restarts: int = 0


def _worker_header(sp: Spool, opts: FarmOptions, *, detach: bool,
                   host: FarmHost | None = None) -> dict[str, Any]:
    """A spool for pilots (not ``detach``) or for hosts sharing it is shared:
    its workers claim tasks.  ``host``: whose worker this is (default: the
    spool's host)."""
    host = host or sp.host
    return {"mode": "prepare", "spool": sp.path, "detach": detach,
            "shared": not detach or bool(sp.workers), "label": host.label,
            "slots": opts.slots, "env": dict(opts.env, SSHQ_FARM_HOST=host.label),
            "cwd": task_dir(host, opts), "path_prepend": list(host.path_prepend),
            "retries": opts.retries}


async def _call(host: FarmHost, header: dict[str, Any], frames: bytes = b"",
                timeout: float = 300.0) -> list[tuple[dict[str, Any], bytes]]:
    """One dispatcher call that reads frames until EOF (prepare, collect)."""
    nonce, stdin = dispatcher_stdin(header, installed=host.installed)
    res = await host.transport.run(agent_argv(host.python, login_shell=host.login_shell,
                                              installed=host.installed),
                                   stdin=stdin + frames, timeout=timeout)
    reader = FrameReader(nonce)
    got = list(reader.feed(res.stdout))
    if not reader.started:
        err = res.stderr.decode("utf-8", "replace").strip()
        raise RemoteError(f"{host.label}: the dispatcher failed (exit {res.exit_status}):"
                          f" {err[-500:] or 'no output'}")
    return got


async def prepare_spools(
    spools: list[Spool], tasks: Iterator[tuple[int, str]], opts: FarmOptions, *, detach: bool,
) -> list[dict[str, Any]]:
    """Write the tasks (split round-robin) and the dispatcher into the spools.

    Returns:
        One ``prepared`` reply per spool: ``{"spool": absolute path, "pid":
        daemon pid or None}``.

    Raises:
        TransportError, RemoteError: a host could not be prepared.
    """
    chunks: list[list[bytes]] = [[] for _ in spools]
    for i, (seq, cmd) in enumerate(tasks):
        chunks[i % len(spools)].append(encode({"type": "task", "id": seq, "seq": seq, "cmd": cmd,
                                               "timeout": opts.timeout, "attempt": 1}))
    src = encode({"type": "source"}, dispatcher_source())

    async def one(sp: Spool, frames: list[bytes]) -> dict[str, Any]:
        sp.tasks = len(frames)
        own = b"" if sp.host.installed else src  # (an installed agent has its own)
        got = await _call(sp.host, _worker_header(sp, opts, detach=detach),
                          b"".join(frames) + own + encode({"type": "close"}))
        for head, _ in got:
            if head.get("type") == "prepared":
                sp.path = str(head["spool"])
                return head
        raise RemoteError(f"{sp.host.label}: no reply from the dispatcher")

    return list(await asyncio.gather(*(one(sp, ch) for sp, ch in zip(spools, chunks,
                                                                       strict=True))))


async def restart_worker(sp: Spool, opts: FarmOptions, host: FarmHost | None = None) -> None:
    """Start a detached worker on a spool (again: it skips finished tasks).

    Args:
        sp: the spool.
        opts: the run's options.
        host: where (default: the spool's host; for a shared spool, any of
            its workers' hosts).
    """
    await _call(host or sp.host, _worker_header(sp, opts, detach=True, host=host),
                encode({"type": "close"}))


async def _restart(sp: Spool, opts: FarmOptions, warn: Callable[[str], None]) -> bool:
    if sp.restarts >= 3:
        return False
    sp.restarts += 1
    hosts = sp.workers or [sp.host]
    warn(f"{sp.path}: no detached worker is alive; restarting them on"
         f" {', '.join(h.label for h in hosts)}")
    started = 0
    for h in hosts:
        try:
            await restart_worker(sp, opts, h)
            started += 1
        except SshqError as exc:
            warn(f"{h.label}: cannot restart its worker: {exc}")
    return started > 0


async def shares_run_dir(hosts: list[FarmHost], run: str) -> bool:
    """Whether every host sees the same ``<run_dir>/farm/<run>`` directory (a
    shared file system, as on a cluster or a department's machines).

    A random token written through the first host must be read back through
    every other one (:func:`sshq.remote.staging.proves_shared`).
    """
    from ..remote.staging import proves_shared

    if len(hosts) < 2:
        return False
    first = hosts[0]
    d = first.argv_path("farm", run)

    async def write(token: bytes) -> bool:
        res = await first.transport.run(
            ["sh", "-c", 'mkdir -p "$1" && printf %s "$2" >"$1/.shared-probe"', "sh", d,
             token.decode("ascii")], timeout=60)
        return res.exit_status == 0

    def reader(h: FarmHost) -> Callable[[], Awaitable[bytes | None]]:
        async def read() -> bytes | None:
            try:
                r = await h.transport.run(["cat", f"{h.argv_path('farm', run)}/.shared-probe"],
                                          timeout=60)
            except SshqError:
                return None
            return r.stdout if r.exit_status == 0 else None
        return read

    return await proves_shared(write, [reader(h) for h in hosts[1:]])


async def start_shared(sp: Spool, opts: FarmOptions) -> None:
    """Start a detached worker on every other host of a shared spool (the
    spool's own host got one when it was prepared)."""
    await asyncio.gather(*(restart_worker(sp, opts, h) for h in sp.workers
                           if h is not sp.host))


async def _stream_call(host: FarmHost, header: dict[str, Any],
                       on_frame: Callable[[dict[str, Any], bytes], None],
                       idle: float = 600.0) -> None:
    """One dispatcher call whose reply is read as it arrives (``collect``):
    each frame goes to ``on_frame`` at once, so what the client holds does
    not grow with the reply.

    Raises:
        RemoteError: the dispatcher did not start, or sent a malformed frame.
        HostUnreachableError: nothing came for ``idle`` seconds.
        TransportError: the host could not be reached.
    """
    nonce, stdin = dispatcher_stdin(header, installed=host.installed)
    reader = FrameReader(nonce)
    session = await host.transport.open_session(
        agent_argv(host.python, login_shell=host.login_shell, installed=host.installed))
    try:
        await session.write(stdin)
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await session.read()
            except TimeoutError:
                raise HostUnreachableError(
                    f"{host.label}: no word from the dispatcher for {idle:.0f} s",
                    host=host.label) from None
            if not data:
                break
            for head, payload in reader.feed(data):
                on_frame(head, payload)
        if not reader.started:
            err = session.stderr_tail().decode("utf-8", "replace").strip()
            raise RemoteError(f"{host.label}: the dispatcher failed: {err[-500:] or 'no output'}")
    finally:
        await session.close()


class _Collector:
    """Turns one spool's ``collect`` reply into results (untrusted: checked).

    A result is reported only if its seq is one of the run's tasks not
    reported yet; anything else is skipped with a warning and never
    journalled.  Output frames are taken for one result at a time (the
    dispatcher sends a result's output, then its ``done`` frame), held in a
    :class:`~sshq.farm.output.TaskOutput`: bounded memory, long streams in
    files under the run's ``output`` directory.
    """

    def __init__(self, sp: Spool, rd: RunDir, writer: Any, commands: Callable[[int], str | None],
                 reported: bytearray, stats: FarmStats, budget: Budget,
                 warn: Callable[[str], None]) -> None:
        self.sp = sp
        self.rd = rd
        self.writer = writer
        self.commands = commands
        self.reported = reported
        self.stats = stats
        self.budget = budget
        self.warn = warn
        self.acks: list[int] = []
        self.states: list[dict[str, Any]] = []
        self.cur: tuple[int, TaskOutput] | None = None
        self.warned: set[object] = set()

    def _task(self, seq: object) -> bool:
        """Whether ``seq`` is one of the run's tasks (warns once if not)."""
        if (isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq < len(self.reported)
                and self.commands(seq) is not None):
            return True
        key = seq if isinstance(seq, (int, str)) else repr(seq)[:60]
        if key not in self.warned and len(self.warned) < 100:
            self.warned.add(key)
            self.warn(f"{self.sp.host.label}: ignored a result for {str(seq)[:60]!r} in"
                      f" {self.sp.path}: not a task of run {self.rd.name}")
        return False

    def drop(self) -> None:
        if self.cur is not None:
            self.cur[1].discard()
            self.cur = None

    def frame(self, head: dict[str, Any], payload: bytes) -> None:
        kind = head.get("type")
        if kind == "output":
            seq = head.get("id")
            stream = head.get("stream", 1)
            if self.cur is None or self.cur[0] != seq:
                self.drop()
                if not self._task(seq):
                    return
                assert isinstance(seq, int)
                if self.reported[seq]:
                    return
                self.cur = (seq, TaskOutput(self.rd.output_dir, f"{seq}.attach", self.budget))
            if stream in (1, 2) and not isinstance(stream, bool):
                self.cur[1].add(stream, payload)
        elif kind == "done":
            self.result(head)
        elif kind == "state":
            self.drop()
            self.states.append(head)
        elif kind == "warn":
            self.warn(f"{self.sp.host.label}: {printable(head.get('message'), 300)}")

    def result(self, head: dict[str, Any]) -> None:
        seq = head.get("id")
        output = None
        if self.cur is not None and self.cur[0] == seq:
            output = self.cur[1]
            self.cur = None
        else:
            self.drop()
        if not self._task(seq):
            if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 1 << 62:
                self.acks.append(seq)   # the host may forget it
            if output is not None:
                output.discard()
            return
        assert isinstance(seq, int)
        self.acks.append(seq)
        if self.reported[seq]:
            if output is not None:
                output.discard()
            return
        if output is None:
            output = TaskOutput(self.rd.output_dir, f"{seq}.attach", self.budget)
        output.close()
        f = result_fields(head)
        node, who = f["node"], f["host"]
        if self.sp.job_ids:    # a pilot: platform/node
            label = f"{self.sp.host.label}/{node}" if node else self.sp.host.label
        else:                  # the worker's host (several may share a spool)
            label = who or self.sp.host.label
        command = self.commands(seq)
        assert command is not None
        r = TaskResult(seq=seq, command=command, host=label, exit_status=f["exit_status"],
                       signal=f["signal"], start=f["start"], end=f["end"],
                       attempts=f["attempt"], timed_out=f["timed_out"])
        try:
            output.settle(r, self.rd.output_dir)
            output.fill(r)
        except BaseException:
            output.discard()
            raise
        self.writer.write(r)
        self.rd.log("result", seq=seq, host=r.host, exit_status=r.exit_status, signal=r.signal)
        self.reported[seq] = 1
        if r.ok:
            self.stats.done += 1
        else:
            self.stats.failed += 1
        note = spill_note(r)
        if note:
            self.warn(note)


async def attach_spools(
    spools: list[Spool],
    rd: RunDir,
    writer: Any,
    commands: Callable[[int], str | None],
    opts: FarmOptions,
    *,
    interval: float = 1.0,
    warn: Callable[[str], None] = lambda msg: None,
    revive: Callable[[Spool, FarmOptions, Callable[[str], None]], Awaitable[bool]] | None = None,
    stats: FarmStats | None = None,
) -> FarmStats:
    """Collect results from spools until every task has one.

    Everything a spool holds is untrusted (its tasks can write there): a
    result whose seq is not one of the run's tasks is skipped with a
    warning, and never journalled.

    Args:
        spools: the spools of the run.
        rd: the run directory (journal: what was reported already).
        writer: where results go.
        commands: seq -> command text (for the result objects); None for a
            seq that is not one of the run's tasks.
        opts: the run's options (to restart a worker).
        interval: seconds between two collections from a host.
        warn: told about unreachable hosts, dead workers and bogus results.
        revive: given a spool with tasks left and no live worker; returns
            True if a worker is coming (a pilot job queued, a worker
            restarted), False if none will (the tasks are left for later).
            None: restart a detached worker, three times at most.
        stats: counts to update (progress display).

    Returns:
        The counts.

    Raises:
        SshqError: a host stayed unreachable (its tasks are still there:
            attach again later).
        OSError: a long output could not be written to the run's directory.
    """
    stats = stats or FarmStats(total=sum(sp.tasks for sp in spools))
    reported, _ = rd.replay()
    budget = Budget()
    acks: dict[int, list[int]] = {i: [] for i in range(len(spools))}

    while not all(sp.finished for sp in spools):
        for i, sp in enumerate(spools):
            if sp.finished:
                continue
            header = {"mode": "collect", "spools": [
                {"spool": sp.path, "ack": acks[i], "tidy": False}]}
            col = _Collector(sp, rd, writer, commands, reported, stats, budget, warn)
            try:
                await _stream_call(sp.host, header, col.frame)
            except SshqError as exc:
                sp.failures += 1
                acks[i] += col.acks   # not known to have arrived: sent again
                warn(f"{sp.host.label}: {exc}")
                if sp.failures >= opts.max_host_failures:
                    raise SshqError(f"{sp.host.label} stayed unreachable; its tasks are"
                                    f" still there: `sshq farm attach {rd.name}` later") from None
                continue
            finally:
                col.drop()
            sp.failures = 0
            acks[i] = col.acks
            for head in col.states[:1]:
                if not head.get("exists", True):
                    sp.finished = True     # tidied by an earlier attach
                    rd.log("spool_done", spool=sp.path)
                elif head.get("done") and head.get("results", 0) == len(acks[i]):
                    sp.finished = True
                    # tidy: acknowledge and remove the spool
                    await _stream_call(sp.host, {"mode": "collect", "spools": [
                        {"spool": sp.path, "ack": acks[i], "tidy": True}]},
                        lambda head, payload: None)
                    rd.log("spool_done", spool=sp.path)
                elif not head.get("alive") and not head.get("done"):
                    if not await (revive or _restart)(sp, opts, warn):
                        warn(f"{sp.host.label}: no worker is left for {sp.path}; its"
                             f" unfinished tasks stay there (`sshq farm attach {rd.name}`)")
                        sp.finished = True
        if not all(sp.finished for sp in spools):
            await asyncio.sleep(interval)
    return stats


def command_lookup(batch: Path) -> Callable[[int], str | None]:
    """seq -> command of a batch file (None: not one of its tasks)."""
    from .batch import read_batch

    table = dict(read_batch(batch))
    return table.get


class Pilots:
    """The pilot jobs of a ``--via`` run (one shared spool).

    Args:
        client: submits and polls the pilot jobs (an
            :class:`~sshq.client.AsyncClient`).
        platform: the platform whose job runner runs the pilots.
        rd: the run (journal).
        walltime: the pilots' walltime (``HH:MM:SS``), or None.
    """

    def __init__(self, client: FarmBackend, platform: str, rd: RunDir,
                 walltime: str | None) -> None:
        self.client = client
        self.platform = client.config.platform(platform)
        self.rd = rd
        self.walltime = walltime

    async def submit(self, sp: Spool, n: int) -> None:
        """Submit ``n`` pilot jobs working on spool ``sp``.

        Raises:
            TransportError, RemoteError: the submission failed.
            SshqError: the job runner refused every pilot.
        """
        from ..model import JobSpec
        from ..model.resources import parse_walltime
        from ..quoting import join
        from ..remote.installed import installed_worker_command

        first = len(sp.job_ids) + 1
        if self.platform.agent == "installed":  # its dispatcher, no source in the spool
            command = installed_worker_command(self.platform.python, sp.path)
        else:
            command = join([self.platform.python, f"{sp.path}/dispatcher.py", "worker",
                            sp.path])
        specs = [JobSpec(
            command=command,
            name=f"farm-{self.rd.name}-{k}"[:60],
            walltime=parse_walltime(self.walltime) if self.walltime else None,
        ) for k in range(first, first + n)]
        jobs = await self.client.submit(specs, platform=self.platform.name)
        ok = 0
        for job in jobs:
            sp.job_ids.append(job.id)
            self.rd.log("pilot", spool=sp.path, job=job.id, job_id=job.job_id,
                        state=str(job.state), message=job.message)
            ok += not job.state.is_final
        if not ok:
            raise SshqError(f"{self.platform.name}: the job runner refused the pilot jobs:"
                            f" {jobs[0].message if jobs else ''}")

    async def revive(self, sp: Spool, opts: FarmOptions, warn: Callable[[str], None]) -> bool:
        """No worker is alive: wait for queued pilots, or submit one more (3 at most)."""
        if sp.job_ids:
            jobs = await self.client.poll(sp.job_ids)
            if any(not j.state.is_final for j in jobs):
                return True   # queued or starting: its worker will come
        if sp.restarts >= 3:
            return False
        sp.restarts += 1
        warn(f"{self.platform.name}: every pilot job ended with tasks left; submitting another")
        await self.submit(sp, 1)
        return True
