"""``sshq farm``: run a batch of shell commands over many hosts' cores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from ..client import AsyncClient
from ..exceptions import SshqError
from .common import run_with_client
from .render import clean

__all__ = ["farm"]

def _result_help(attach: bool) -> str:
    """The epilog on results and exit statuses (``run`` and ``attach``)."""
    fmt_default = "default: the run's format" if attach else "the default"
    files = ("" if attach else "with --output-dir, or ") + (
        "for a stream longer than 4 MiB (then in <state dir>/farm/NAME/output/,\n"
        "                  named on stderr too)")
    return f"""\b
Output (stdout carries results and nothing else):
  --format jsonl  ({fmt_default}) one JSON object per task: seq (1-based line
                  number), command, host, exit_status (null if a signal ended
                  it), signal (e.g. "TERM"), stdout, stderr (stdout_b64/
                  stderr_b64 instead when not valid UTF-8), start, end (epoch
                  seconds), attempts; timed_out and error when they apply;
                  stdout_file/stderr_file instead of stdout/stderr {files}.
  --format anet   ANet's framing: 32-bit little-endian seq, 32-bit little-endian
                  length, then the task's stdout.
\b
Exit status: 0 if every task succeeded, 1 if any failed; for errors 2 (bad
options or config, or the run is in use by another client), 3 (no host
reachable), 4 (authentication), 5 (host key), 6 (remote failure), 141 (stdout
closed), 130 (interrupted).  Tasks get SSHQ_FARM_RUN, SSHQ_FARM_SEQ,
SSHQ_FARM_HOST, SSHQ_FARM_SLOT and SSHQ_FARM_ATTEMPT in their environment.
On a terminal, a progress bar, then a one-line summary, go to stderr."""


class _FarmGroup(click.Group):
    """``sshq farm BATCH ...`` runs the default ``run`` subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_FarmGroup)
def farm() -> None:
    """Run a batch of shell commands over many hosts' cores.

    \b
      sshq farm BATCH_FILE --hosts H1,H2 [options]   (= sshq farm run ...)
      sshq farm --resume NAME
      sshq farm pause NAME | resume NAME
      sshq farm find PATTERN --hosts ... | killall PATTERN --hosts ...

    Each line of BATCH_FILE is one shell command.  One SSH connection and one
    small dispatcher per host run up to --slots tasks at once; each result is
    written as soon as its task ends.  Hosts are platform names from the
    platforms file or SSH destinations [user@]host[:port] (~/.ssh/config
    applies).  A task whose host dies runs elsewhere; stragglers are started
    again on idle hosts; every state change goes to a journal, so a killed
    client can `--resume` and report every task exactly once.

    See `sshq farm run --help` for every option.
    """


def _warn(msg: str) -> None:
    """A warning on stderr; ``msg`` may quote a host (its errors, a task's
    paths): control characters and escape sequences are made harmless."""
    click.echo(f"sshq: warning: {clean(msg)}", err=True)


@contextlib.contextmanager
def _progress(farm_ref: list[Any]) -> Iterator[None]:
    """A live bar on stderr (terminals only): done, failed, running, tasks/s, ETA;
    when it is erased at the end, a one-line summary in its place."""
    if not sys.stderr.isatty():
        yield
        return
    try:
        with _bar(farm_ref):
            yield
    finally:
        if farm_ref:
            click.echo(f"sshq: farm: {farm_ref[0].stats.summary()}", err=True)


@contextlib.contextmanager
def _bar(farm_ref: list[Any]) -> Iterator[None]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(
        TextColumn("[bold]farm"), BarColumn(), TextColumn("{task.fields[counts]}"),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )
    task = prog.add_task("farm", total=None, counts="")

    async def update() -> None:
        import time
        while True:
            await asyncio.sleep(0.2)
            if not farm_ref:
                continue
            s = farm_ref[0].stats
            n = s.done + s.failed
            rate = (n - s.earlier) / max(1e-6, time.monotonic() - s.started)
            state = " [yellow]paused" if s.paused else ""
            prog.update(task, total=s.total, completed=n, counts=(
                f"{s.done} done, {s.failed} failed, {s.running} running,"
                f" {rate:.0f} tasks/s{state}"))

    with prog:
        t = asyncio.ensure_future(update())
        try:
            yield
        finally:
            t.cancel()


def _with_progress(config_path: str | None, call: Any) -> Any:
    """Run ``call(client, on_start)`` with a client and the progress bar; its result."""
    farm_ref: list[Any] = []

    async def body(client: AsyncClient) -> Any:
        with _progress(farm_ref):
            return await call(client, farm_ref.append)

    return run_with_client(click.get_current_context(), config_path, body)


@farm.command("run", epilog=_result_help(False))
@click.argument("batch_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--hosts", "-H", "hosts", multiple=True, metavar="H1,H2,...",
              help="Hosts: platform names or [user@]host[:port]; comma-separated or repeated.")
@click.option("--slots", "-j", type=click.IntRange(min=1),
              help="Tasks at once per host (default: the host's core count).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "anet"]), default="jsonl",
              show_default=True, help="Result format on stdout.")
@click.option("--keep-order", is_flag=True, help="Write results in input order.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each task's output to DIR/SEQ.stdout and DIR/SEQ.stderr.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Re-run a failed task up to N times, on a host where it has not failed"
              " when there is one.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Kill a task after this many seconds (TERM, then KILL 2 s later).")
@click.option("--speculate/--no-speculate", default=True, show_default=True,
              help="Once no task waits, start stragglers again on idle hosts; the first copy"
              " to succeed wins, the others are killed.")
@click.option("--run", "run_name", metavar="NAME",
              help="Name the run (default: generated and printed on stderr).")
@click.option("--resume", metavar="NAME",
              help="Resume a run: run only its tasks without a reported result.")
@click.option("--deps", type=click.Path(file_okay=False, path_type=Path),
              help="rsync this directory to every host first (only changed files); tasks"
              " run in its copy, <run_dir>/farm-deps/NAME (the platform's run_dir;"
              " ~/sshq-run for a plain destination).")
@click.option("--detach", is_flag=True,
              help="Leave the tasks with detached workers on the hosts (the remote run"
              " directory holds the queue and results) and return; collect them with"
              " `sshq farm attach NAME`.")
@click.option("--via", metavar="PLATFORM",
              help="Run the dispatchers as pilot jobs of PLATFORM's job runner (instead of"
              " --hosts): a whole cluster through its scheduler, one job per pilot.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --via: number of pilot jobs.")
@click.option("--walltime", help="With --via: the pilot jobs' walltime (HH:MM:SS).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Platforms file.")
def run_cmd(batch_file: Path | None, hosts: tuple[str, ...], slots: int | None, fmt: str,
            keep_order: bool, output_dir: Path | None, retries: int, timeout: float | None,
            speculate: bool, run_name: str | None, resume: str | None, deps: Path | None,
            detach: bool, via: str | None, nodes: int, walltime: str | None,
            config_path: str | None) -> None:
    """Run each line of BATCH_FILE as a shell command on the hosts' cores.

    \b
    Examples:
      sshq farm cmds.txt --hosts node1,node2,alice@node3:2222 > results.jsonl
      sshq farm cmds.txt --hosts mycluster --retries 2 --timeout 600 --run sweep
      sshq farm --resume sweep >> results.jsonl
    """
    from ..farm.engine import FarmOptions
    from ..farm.run import FarmRequest, run_farm

    if batch_file is None and not resume:
        raise click.UsageError("give a BATCH_FILE, or --resume NAME")
    if batch_file is not None and resume:
        raise click.UsageError("--resume takes no BATCH_FILE (the run keeps its own copy)")
    if not hosts and not resume and not via:
        raise click.UsageError("--hosts (or --via PLATFORM) is required")
    if via and hosts:
        raise click.UsageError("--via and --hosts cannot be combined")
    if (detach or via) and (keep_order or output_dir):
        raise click.UsageError("--keep-order and --output-dir are not available with"
                               " --detach or --via")
    if resume and run_name:
        raise click.UsageError("--run and --resume cannot be combined")
    req = FarmRequest(
        batch=batch_file, hosts=list(hosts), run=run_name, resume=resume, fmt=fmt, deps=deps,
        detach=detach, via=via, nodes=nodes, walltime=walltime,
        options=FarmOptions(slots=slots, retries=retries, timeout=timeout, speculate=speculate,
                            keep_order=keep_order, output_dir=output_dir),
    )
    named: list[str] = []

    def on_name(name: str) -> None:
        named.append(name)
        if not run_name and not resume:
            click.echo(f"sshq: farm run {name}", err=True)
        if detach:
            click.echo(f"sshq: detached; collect the results with `sshq farm attach {name}`",
                       err=True)

    try:
        _name, stats = _with_progress(config_path, lambda client, on_start: run_farm(
            client, req, sys.stdout.buffer, on_name=on_name, warn=_warn, on_start=on_start))
    except SshqError as exc:
        if named:
            raise type(exc)(f"{exc}; resume with `sshq farm --resume {named[0]}`") from None
        raise
    except BrokenPipeError:
        _reader_gone()
    except KeyboardInterrupt:
        if named:
            click.echo(f"sshq: interrupted; resume with `sshq farm --resume {named[0]}`",
                       err=True)
        sys.exit(130)
    if stats.failed:
        click.echo(f"sshq: {stats.failed} of {stats.total} task(s) failed", err=True)
        sys.exit(1)


def _reader_gone() -> NoReturn:
    """stdout's reader went away (``| head -1``): exit 141 quietly, as a
    program killed by SIGPIPE would.  stdout is pointed at /dev/null first, so
    that flushing what is left in its buffer at exit cannot fail again (which
    would make Python exit 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.stderr.close()   # like `head`: the reader is gone, nothing to say
    sys.exit(141)


@farm.command("attach", epilog=_result_help(True))
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "anet"]), default=None,
              help="Result format on stdout (default: the format the run was started with).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Platforms file.")
def attach_cmd(name: str, fmt: str | None, config_path: str | None) -> None:
    """Collect the results of detached run NAME (each reported once, ever).

    Waits until every task has a result.  Interrupting is safe: attach again
    later; results already written are not written again.  One client at a
    time works on a run: a second attach is refused while the first is alive.
    """
    from ..farm.run import attach_run

    try:
        stats = _with_progress(config_path, lambda client, on_start: attach_run(
            client, name, sys.stdout.buffer, fmt=fmt, warn=_warn, on_start=on_start))
    except BrokenPipeError:
        _reader_gone()
    if stats.failed:
        click.echo(f"sshq: {stats.failed} task(s) failed", err=True)
        sys.exit(1)


def _pause(name: str, paused: bool, config_path: str | None) -> None:
    from ..farm.run import pause_run

    run_with_client(click.get_current_context(), config_path,
                    lambda client: pause_run(client, name, paused))
    click.echo(f"sshq: farm run {name} {'paused' if paused else 'resumed'}", err=True)


@farm.command("pause")
@click.argument("name")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Platforms file.")
def pause_cmd(name: str, config_path: str | None) -> None:
    """Stop dispatching new tasks of run NAME (running tasks go on)."""
    _pause(name, True, config_path)


@farm.command("resume")
@click.argument("name")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Platforms file.")
def resume_cmd(name: str, config_path: str | None) -> None:
    """Restart the dispatch of new tasks of a paused run NAME.

    (To restart a run whose client died, use `sshq farm --resume NAME`.)
    """
    _pause(name, False, config_path)


def _procs_cmd(kill: bool) -> Any:
    @click.argument("pattern")
    @click.option("--hosts", "-H", "hosts", multiple=True, required=True, metavar="H1,H2,...",
                  help="Hosts: platform names or [user@]host[:port].")
    @click.option("--signal", "sig", default="TERM", show_default=True,
                  hidden=not kill, help="Signal to send.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="Platforms file.")
    def cmd(pattern: str, hosts: tuple[str, ...], sig: str, as_json: bool,
            config_path: str | None) -> None:
        from ..farm import procs
        from ..farm.run import resolve_hosts, split_specs
        from ..remote.installed import refuse_restricted_hosts

        async def body(client: AsyncClient) -> list[Any]:
            refuse_restricted_hosts(client.config.platforms, split_specs(list(hosts)),
                                    "farm find/killall")
            fh = resolve_hosts(client, list(hosts))
            if kill:
                lists = await asyncio.gather(*(procs.kill_processes(
                    h.transport, pattern, signal=sig, python=h.python,
                    login_shell=h.login_shell, path_prepend=h.path_prepend)
                    for h in fh))
            else:
                lists = await asyncio.gather(*(procs.find_processes(
                    h.transport, pattern, python=h.python,
                    login_shell=h.login_shell, path_prepend=h.path_prepend)
                    for h in fh))
            return [(h.label, p) for h, ps in zip(fh, lists, strict=True) for p in ps]

        found = run_with_client(click.get_current_context(), config_path, body)
        if as_json:
            click.echo(json.dumps([{"host": label, "pid": p.pid, "user": p.user,
                                    "elapsed": p.elapsed, "args": p.args}
                                   for label, p in found], indent=1))
            return
        for label, p in found:   # user and args come from the host: cleaned
            click.echo(f"{clean(label)}\t{p.pid}\t{clean(p.user)}\t{int(p.elapsed)}s"
                       f"\t{clean(p.args)}")
        if kill:
            click.echo(f"sshq: signalled {len(found)} process(es)", err=True)

    return cmd


farm.command("find")(_procs_cmd(False))
farm.command("killall")(_procs_cmd(True))
farm.commands["find"].help = (
    "List your own processes whose command line contains PATTERN on every host"
    " (a plain substring; other users' processes are never shown).")
farm.commands["killall"].help = (
    "Kill your own processes whose command line contains PATTERN on every host"
    " (SIGTERM by default; never another user's process).")
