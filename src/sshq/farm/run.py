"""A farm run from start to end: hosts, journal, resume, dependencies, output.

:func:`run_farm` is what ``sshq farm`` calls; the scheduling itself is
:class:`sshq.farm.engine.Farm`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Platform
from ..exceptions import ConfigError
from ..remote.installed import refuse_restricted_hosts
from ..remote.staging import rsync_push
from .backend import FarmBackend
from .batch import count_tasks, read_batch
from .engine import Farm, FarmHost, FarmOptions, FarmStats
from .journal import RunDir, new_run_name
from .output import ResultSink, TaskResult, ensure_dir, make_writer, spill_note

__all__ = ["FarmRequest", "parse_destination", "refuse_restricted_farm", "resolve_hosts",
           "run_farm", "pause_run", "sync_deps"]

_DEST_RE = re.compile(r"(?:(?P<user>[A-Za-z0-9_.][A-Za-z0-9_.-]*)@)?"
                      r"(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?\Z")


@dataclass(slots=True, kw_only=True)
class FarmRequest:
    """Everything ``sshq farm`` was asked to do.

    Attributes:
        batch: the batch file (None with ``resume``).
        hosts: host specs: platform names or ``[user@]host[:port]``
            destinations (resolved through ~/.ssh/config); commas allowed.
        run: the run's name (None: generated).
        resume: name of a run to resume (its batch and options are reused;
            ``hosts`` may replace its hosts).
        fmt: ``jsonl`` or ``anet``.
        options: scheduling options.
        deps: local directory rsynced to every host before the first task;
            the tasks then run in its copy.
        detach: leave the tasks with the hosts' detached workers and return
            (collect with :func:`attach_run`).
        via: run the dispatchers as ``nodes`` pilot jobs of this platform's
            job runner (walltime ``walltime``) instead of on ``hosts``.
    """

    batch: Path | None = None
    hosts: list[str]
    run: str | None = None
    resume: str | None = None
    fmt: str = "jsonl"
    options: FarmOptions
    deps: Path | None = None
    detach: bool = False
    via: str | None = None
    nodes: int = 1
    walltime: str | None = None


def _safe(label: str) -> str:
    """A host label as one path component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def split_specs(specs: list[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [s.strip() for spec in specs for s in spec.split(",") if s.strip()]


def parse_destination(spec: str) -> tuple[str | None, str, int | None]:
    """An SSH destination ``[user@]host[:port]`` (``[v6addr]`` for IPv6) as
    ``(user or None, host, port or None)``.

    Raises:
        ConfigError: ``spec`` is not of that form.
    """
    m = _DEST_RE.match(spec)
    if m is None:
        raise ConfigError(f"{spec!r} is neither a platform nor an SSH destination"
                          " [user@]host[:port]")
    return m["user"], m["host"].strip("[]"), int(m["port"]) if m["port"] else None


def resolve_hosts(client: FarmBackend, specs: list[str]) -> list[FarmHost]:
    """Turn host specs into farm hosts with their transports.

    A spec naming a platform gives one farm host per host of the platform
    (labelled with the platform name, or ``platform/host`` when it has
    several); any other spec is an SSH destination ``[user@]host[:port]``.

    Args:
        client: whose config and transports are used (an
            :class:`~sshq.client.AsyncClient`).
        specs: as :attr:`FarmRequest.hosts`.

    Raises:
        ConfigError: no hosts, a malformed destination, or a host given twice.
    """
    hosts: list[FarmHost] = []
    for spec in split_specs(specs):
        plat = client.config.platforms.get(spec)
        if plat is not None:
            for host in plat.hosts:
                label = spec if len(plat.hosts) == 1 else f"{spec}/{host}"
                hosts.append(FarmHost(label=label, transport=client.transport(plat, host),
                                      python=plat.python, login_shell=plat.login_shell,
                                      run_dir=plat.run_dir,
                                      path_prepend=plat.path_prepend,
                                      installed=plat.agent == "installed"))
            continue
        try:
            user, host, port = parse_destination(spec)
        except ConfigError as exc:
            raise ConfigError(f"--hosts: {exc}") from None
        plat = Platform(name=spec, hosts=(host,), port=port, user=user)
        hosts.append(FarmHost(label=spec, transport=client.transport(plat, host)))
    if not hosts:
        raise ConfigError("--hosts: no hosts given")
    labels = [h.label for h in hosts]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"--hosts: {', '.join(sorted(dup))} given more than once")
    return hosts


async def sync_deps(hosts: list[FarmHost], deps: Path) -> str:
    """rsync ``deps`` to every host's ``<run_dir>/farm-deps/NAME`` (only
    changed files travel).

    Returns:
        NAME, for :attr:`FarmOptions.deps`.

    Raises:
        ConfigError: ``deps`` is not a directory, or a host's copy cannot be made.
        RemoteError, TransportError: a copy failed.
    """
    if not deps.is_dir():
        raise ConfigError(f"--deps: {str(deps)!r} is not a directory")
    name = deps.resolve().name or "deps"

    async def one(h: FarmHost) -> None:
        remote = h.argv_path("farm-deps", name)
        res = await h.transport.run(["mkdir", "-p", remote], timeout=60)
        if res.exit_status != 0:
            raise ConfigError(f"{h.label}: cannot create {remote}: "
                              + res.stderr.decode("utf-8", "replace").strip())
        await rsync_push(None if h.transport.is_local else h.transport,
                         deps, remote, [])

    await asyncio.gather(*(one(h) for h in hosts))
    return name


def _options_record(req: FarmRequest, hosts: list[str]) -> dict[str, Any]:
    o = req.options
    return {"hosts": hosts, "format": req.fmt, "via": req.via, "nodes": req.nodes,
            "slots": o.slots, "retries": o.retries,
            "timeout": o.timeout, "speculate": o.speculate, "keep_order": o.keep_order,
            "output_dir": str(o.output_dir) if o.output_dir else None,
            "deps": str(req.deps.resolve()) if req.deps else None}


def _restore(req: FarmRequest, rec: dict[str, Any]) -> None:
    o = req.options
    if not req.hosts:
        req.hosts = list(rec.get("hosts") or [])
    req.fmt = rec.get("format") or req.fmt
    o.slots = o.slots or rec.get("slots")
    o.retries = o.retries or int(rec.get("retries") or 0)
    o.timeout = o.timeout or rec.get("timeout")
    o.keep_order = o.keep_order or bool(rec.get("keep_order"))
    if o.output_dir is None and rec.get("output_dir"):
        o.output_dir = Path(rec["output_dir"])
    if req.deps is None and rec.get("deps"):
        req.deps = Path(rec["deps"])


def refuse_restricted_farm(client: FarmBackend, req: FarmRequest) -> list[str]:
    """Refuse, before connecting, what a restricted platform's key would refuse:
    a direct farm (its dispatcher runs tasks on the login node) and, for a
    pilot farm, ``--deps`` (its copy starts with a ``mkdir`` on the login node).

    Returns:
        The run's host specs (``[req.via]`` for a pilot farm).

    Raises:
        InvalidInputError: a spec names a restricted platform
            (:func:`~sshq.remote.installed.refuse_if_restricted`).
    """
    specs = split_specs([req.via] if req.via else req.hosts)
    if not req.via:
        refuse_restricted_hosts(client.config.platforms, specs, "a direct farm (--hosts)")
    elif req.deps is not None:
        refuse_restricted_hosts(client.config.platforms, specs,
                                "farm --deps (stage the directory with `sshq install`"
                                " instead)")
    return specs


async def run_farm(
    client: FarmBackend,
    req: FarmRequest,
    out: ResultSink,
    *,
    on_name: Callable[[str], None] = lambda name: None,
    warn: Callable[[str], None] = lambda msg: None,
    on_start: Callable[[Farm], None] = lambda farm: None,
) -> tuple[str, FarmStats]:
    """Run (or resume) a farm, writing each result to ``out`` once.

    Args:
        client: config, transports, state dir (an
            :class:`~sshq.client.AsyncClient`).
        req: what to do.
        out: binary stream for the results (in ``req.fmt``), or a callable
            given each :class:`TaskResult`.
        on_name: told the run's name before anything runs (the CLI prints
            a generated one on stderr).
        warn: told of hosts dropped and similar.
        on_start: given the :class:`Farm` once it exists (progress display).

    Returns:
        ``(run name, counts)``.

    Raises:
        ConfigError: bad options, unknown run, unusable batch file, or the
            run is in use by another client (its lock names the pid and host).
        InvalidInputError: a restricted platform would refuse the run
            (:func:`refuse_restricted_farm`); nothing was sent.
        SshqError: every host failed (tasks without a result stay in the
            journal for ``--resume``).
    """
    if req.resume:
        rd = RunDir(client.state_dir, req.resume)
        rec = rd.options()
        if rec.get("spools"):
            raise ConfigError(f"farm run {req.resume!r} is detached: collect its results with"
                              f" `sshq farm attach {req.resume}`")
        _restore(req, rec)
        refuse_restricted_farm(client, req)
    else:
        if req.batch is None:
            raise ConfigError("give a batch file, or --resume NAME")
        rd = RunDir(client.state_dir, req.run or new_run_name())
        specs = refuse_restricted_farm(client, req)
        resolve_hosts(client, specs)  # refuse bad specs before creating the run
        rd.create(req.batch, _options_record(req, specs))
    rd.lock()
    try:
        on_name(rd.name)
        return await _run_locked(client, req, rd, out, warn, on_start)
    finally:
        rd.close()


async def _run_locked(client: FarmBackend, req: FarmRequest, rd: RunDir, out: ResultSink,
                      warn: Callable[[str], None],
                      on_start: Callable[[Farm], None]) -> tuple[str, FarmStats]:
    """:func:`run_farm` once the run is known and locked."""
    hosts = resolve_hosts(client, [req.via] if req.via else req.hosts)
    if (req.detach or req.via) and not req.resume:
        return rd.name, await _start_spools(client, req, rd, hosts, out, warn, on_start)
    reported, _ = rd.replay()
    total, _lines = count_tasks(rd.batch)
    total -= sum(1 for seq, _ in read_batch(rd.batch) if seq < len(reported) and reported[seq])
    opts = req.options
    if opts.output_dir is not None:
        ensure_dir(opts.output_dir)
    if req.deps is not None:
        opts.deps = await sync_deps(hosts, req.deps)
    opts.env = dict(opts.env, SSHQ_FARM_RUN=rd.name)
    opts.spill_dir = rd.output_dir
    writer = make_writer(out, req.fmt)
    rd.open_journal()
    rd.log("run", resume=bool(req.resume), hosts=[h.label for h in hosts], tasks=total)

    def report(r: TaskResult) -> None:
        writer.write(r)
        rd.log("result", seq=r.seq, host=r.host, exit_status=r.exit_status, signal=r.signal)
        note = spill_note(r, output_dir=opts.output_dir is not None)
        if note:
            warn(note)

    farm = Farm(
        hosts, read_batch(rd.batch, skip=reported), total, report, opts,
        journal=rd.log, warn=warn, paused=rd.paused_flag.exists,
        order=(seq for seq, _ in read_batch(rd.batch, skip=reported)),
    )
    on_start(farm)
    try:
        stats = await farm.run()
    finally:
        rd.log("end")
    return rd.name, stats


async def _start_spools(client: FarmBackend, req: FarmRequest, rd: RunDir, hosts: list[FarmHost],
                        out: ResultSink, warn: Callable[[str], None],
                        on_start: Callable[[Any], None]) -> FarmStats:
    """``--detach`` and ``--via``: fill the remote spools, start the workers."""
    from .detached import (
        Pilots,
        Spool,
        attach_spools,
        command_lookup,
        prepare_spools,
        shares_run_dir,
        start_shared,
    )

    opts = req.options
    if req.deps is not None:
        opts.deps = await sync_deps(hosts, req.deps)
    opts.env = dict(opts.env, SSHQ_FARM_RUN=rd.name)
    shared = False
    if req.via:   # one spool on the login host, shared by every pilot job
        spools = [Spool(host=hosts[0], path=hosts[0].path("farm", rd.name, "pilots"))]
    elif await shares_run_dir(hosts, rd.name):
        # one queue for all: each host's worker claims tasks (no static split)
        shared = True
        spools = [Spool(host=hosts[0], path=hosts[0].path("farm", rd.name, "shared"),
                        workers=list(hosts))]
    else:
        spools = [Spool(host=h, path=h.path("farm", rd.name, _safe(h.label))) for h in hosts]
    prepared = await prepare_spools(spools, read_batch(rd.batch), opts, detach=not req.via)
    if shared:
        await start_shared(spools[0], opts)
    total = sum(sp.tasks for sp in spools)
    rd.open_journal()
    try:
        for sp, rep in zip(spools, prepared, strict=True):
            rd.log("spool", host=sp.host.label, spool=sp.path, tasks=sp.tasks, pid=rep.get("pid"),
                   workers=[h.label for h in sp.workers])
        if not req.via:
            _record_spools(rd, spools, None)
            return FarmStats(total=total)
        pilots = Pilots(client, req.via, rd, req.walltime)
        await pilots.submit(spools[0], req.nodes)
        _record_spools(rd, spools, req.walltime)
        stats = FarmStats(total=total)
        on_start(_StatsHolder(stats))
        return await attach_spools(spools, rd, make_writer(out, req.fmt),
                                   command_lookup(rd.batch), opts, warn=warn,
                                   revive=pilots.revive, stats=stats)
    finally:
        rd.close()


class _StatsHolder:
    def __init__(self, stats: FarmStats) -> None:
        self.stats = stats


def _record_spools(rd: RunDir, spools: list[Any], walltime: str | None) -> None:
    rec = rd.options()
    rec["spools"] = [{"host": sp.host.label, "path": sp.path, "tasks": sp.tasks,
                      "jobs": sp.job_ids, "workers": [h.label for h in sp.workers]}
                     for sp in spools]
    rec["walltime"] = walltime
    (rd.path / "options.json").write_text(json.dumps(rec, indent=1))


async def attach_run(client: FarmBackend, name: str, out: ResultSink, *, fmt: str | None = None,
                     warn: Callable[[str], None] = lambda msg: None,
                     on_start: Callable[[Any], None] = lambda farm: None) -> FarmStats:
    """Collect the results of a detached (or pilot) run; each is reported once.

    Args:
        client: config, transports, state dir, pilot jobs (an
            :class:`~sshq.client.AsyncClient`).
        name: the run.
        out: as for :func:`run_farm`.
        fmt: ``jsonl`` or ``anet`` for a stream ``out``; None: the run's format.
        warn: told of unreachable hosts, dead workers, bogus results.
        on_start: given an object with the run's ``stats`` (progress display).

    Raises:
        ConfigError: no such run, it was not detached, or it is in use by
            another client (named by pid and host).
        InvalidInputError: a detached direct farm on a restricted platform
            (nothing was sent).
        SshqError: a host stayed unreachable (attach again later).
    """
    from .detached import Pilots, Spool, attach_spools, command_lookup

    rd = RunDir(client.state_dir, name)
    rec = rd.options()
    if not rec.get("spools"):
        raise ConfigError(f"farm run {name!r} was not detached; use `sshq farm --resume {name}`")
    req = FarmRequest(hosts=[], options=FarmOptions())
    _restore(req, rec)
    req.via = rec.get("via")
    req.deps = None  # (copied when the run started)
    refuse_restricted_farm(client, req)  # a detached direct farm's workers
    req.fmt = fmt or req.fmt
    by_label = {h.label: h for h in resolve_hosts(client, req.hosts)}
    spools = []
    for item in rec["spools"]:
        host = by_label.get(item["host"])
        if host is None:
            raise ConfigError(f"host {item['host']!r} of run {name!r} is no longer configured")
        spools.append(Spool(host=host, path=item["path"], tasks=int(item["tasks"]),
                            job_ids=list(item.get("jobs") or []),
                            workers=[by_label[w] for w in item.get("workers") or []
                                     if w in by_label]))
    stats = FarmStats(total=sum(sp.tasks for sp in spools))
    rd.lock()
    try:
        reported, _ = rd.replay()
        stats.done = stats.earlier = sum(reported)
        on_start(_StatsHolder(stats))
        rd.open_journal()
        revive = None
        if rec.get("via"):
            revive = Pilots(client, rec["via"], rd, rec.get("walltime")).revive
        return await attach_spools(spools, rd, make_writer(out, req.fmt),
                                   command_lookup(rd.batch), req.options, warn=warn,
                                   revive=revive, stats=stats)
    finally:
        rd.close()


async def pause_run(client: FarmBackend, name: str, paused: bool) -> None:
    """Stop (``paused``) or restart the dispatch of new tasks of a run.

    Running tasks go on.  A running client notices within half a second and
    tells its dispatchers to hold the tasks they have queued; the workers of
    a detached run see a ``paused`` file in their spool.

    Raises:
        ConfigError: no such run.
        InvalidInputError: a detached or pilot run on a restricted platform
            (nothing was sent, nothing changed).
        TransportError: a detached run's host could not be reached.
    """
    rd = RunDir(client.state_dir, name)
    rec = rd.options()
    if rec.get("spools"):  # its workers see a file made on the login node
        refuse_restricted_hosts(client.config.platforms, list(rec.get("hosts") or []),
                                "farm pause/resume of a detached or pilot run (it touches"
                                " a file by a command on the login node)")
    if paused:
        rd.paused_flag.touch()
    else:
        rd.paused_flag.unlink(missing_ok=True)
    spools = rec.get("spools") or []
    if spools:
        by_label = {h.label: h for h in resolve_hosts(client, list(rec.get("hosts") or []))}
        for item in spools:
            host = by_label.get(item["host"])
            if host is None:
                continue
            flag = f"{item['path']}/paused"
            argv = ["touch", flag] if paused else ["rm", "-f", flag]
            res = await host.transport.run(argv, timeout=60)
            if res.exit_status != 0:
                raise ConfigError(f"{host.label}: cannot {'pause' if paused else 'resume'}"
                                  f" the workers: {res.stderr.decode('utf-8', 'replace')}")
