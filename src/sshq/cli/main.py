"""The ``sshq`` command: a thin layer over :class:`sshq.AsyncClient`.

Errors exit non-zero with one line on stderr (a traceback with ``--debug``).
Every command takes ``--json``.  Progress is drawn on stderr, only when it
is a terminal.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import __version__
from ..client import LOG_FILES, AsyncClient
from ..exceptions import InvalidInputError, SshqError, WaitTimeoutError
from ..model import Job, JobSpec, JobState
from ..model.job_spec import default_name
from ..model.resources import parse_memory, parse_walltime
from .render import CleanFormatter, Renderer, clean

F = TypeVar("F", bound=Callable[..., Any])

_state: dict[str, Any] = {"debug": False}

JOB_FIELDS_HELP = (
    "With --json, prints a JSON array of job objects: id, platform, host, name,"
    " job_runner, job_id, submit_num, state, exit_status, signal, job_log_dir, work_dir,"
    " submit_time, start_time, exit_time, message."
)


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        _state["debug"] = True
        logging.getLogger("sshq").setLevel(logging.DEBUG)
    return value


def common(f: F) -> F:
    """Options every command takes: --json, --config, --debug."""
    f = click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                     callback=_set_debug, help="Show tracebacks and debug logs.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     default=None, help="Platforms file (default: $SSHQ_CONFIG, then the"
                     " user config dir's sshq/platforms.toml).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)
    return f


def _client(ctx: click.Context, config_path: str | None) -> AsyncClient:
    path = config_path or (ctx.obj or {}).get("config") or os.environ.get("SSHQ_CONFIG")
    state = os.environ.get("SSHQ_STATE_DIR") or None
    return AsyncClient(path, state_dir=state)


T = TypeVar("T")


def _run(ctx: click.Context, config_path: str | None,
         body: Callable[[AsyncClient], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        client = _client(ctx, config_path)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def _ids(values: Sequence[str]) -> list[int]:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            if not part.isdigit():
                raise InvalidInputError(f"invalid sshq job id {part!r}: ids are numbers")
            out.append(int(part))
    return out


# ---------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sshq")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="Platforms file (default: $SSHQ_CONFIG, then the user config dir).")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """Manage jobs on clusters and hosts you can only reach by SSH.

    sshq submits jobs to a platform's job runner (Slurm, or background
    processes on a host) over SSH, polls and kills them in batches (one SSH
    command per host, however many jobs), and reads their logs.  A job
    wrapper writes a job status file, so a job's end is known even after the
    batch system has forgotten it.

    \b
    Platforms live in a TOML file (see `sshq submit --help`); the built-in
    platform "localhost" runs background jobs on this machine and needs no
    configuration.  Local state: an SQLite database in the user state dir
    ($SSHQ_STATE_DIR overrides).

    \b
    Examples:
      sshq submit --wait examples/hello.sh
      sshq submit -p mycluster --walltime 0:10:00 --cpus 4 job.sh
      sshq poll --all
      sshq cat-log 3 --follow
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


# ---------------------------------------------------------------- submit


def _parse_env(values: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


@cli.command(epilog=JOB_FIELDS_HELP)
@click.argument("scripts", nargs=-1, type=click.Path(dir_okay=False))
@click.option("-p", "--platform", default="localhost", show_default=True,
              help="Platform to submit to.")
@click.option("-c", "--command", help="Run this shell command line instead of a script file.")
@click.option("--name", help="Job name (default: the script's file stem, or 'job').")
@click.option("--arg", "args", multiple=True, help="Argument for the script (repeatable);"
              " passed byte-exact, never interpreted by a shell.")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the job (repeatable); the value is byte-exact.")
@click.option("--walltime", help="Run time limit: HH:MM:SS, MM:SS, minutes, D-HH:MM:SS.")
@click.option("--nodes", type=click.IntRange(min=1), help="Number of nodes.")
@click.option("--tasks", type=click.IntRange(min=1), help="Number of tasks.")
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs per task.")
@click.option("--memory", help="Memory per node, e.g. 512M, 2G.")
@click.option("--queue", help="Queue or partition.")
@click.option("--account", help="Account or project to charge.")
@click.option("--mail-user", help="Address for the job runner's mail.")
@click.option("--mail-events", help="Comma-separated: begin,end,fail,all.")
@click.option("--directive", "directives", multiple=True,
              help="Raw extra directive for the job runner (repeatable), e.g."
              " '--constraint=gpu' for Slurm.")
@click.option("--work-dir", help="Absolute remote working directory"
              " (default: <run_dir>/work/<name>).")
@click.option("--array", help="Array range, e.g. 1-100, 1-99:2, 1,3,5-7, 1-100%10: one"
              " submission, one sshq job per element (SSHQ_ARRAY_INDEX in the job).")
@click.option("--input", "inputs", multiple=True, type=click.Path(dir_okay=False),
              help="Local file staged into the job's work directory before submission"
              " (repeatable; up to 64 MiB in all).")
@click.option("--output", "outputs", multiple=True, metavar="RELPATH",
              help="File or directory (relative to the work directory) that `sshq retrieve`"
              " brings back once the job has succeeded (repeatable).")
@click.option("--container-image", metavar="IMAGE",
              help="Run the script inside this container image, with the platform's"
              " container_runtime (apptainer, singularity or podman); ssh-to-job then opens"
              " its shell there too.")
@click.option("--wait", "wait_", is_flag=True, help="Wait until the jobs are final; exit 0"
              " only if all succeeded.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@common
@click.pass_context
def submit(ctx: click.Context, scripts: tuple[str, ...], platform: str, command: str | None,
           name: str | None, args: tuple[str, ...], envs: tuple[str, ...],
           walltime: str | None, nodes: int | None, tasks: int | None, cpus: int | None,
           memory: str | None, queue: str | None, account: str | None,
           mail_user: str | None, mail_events: str | None, directives: tuple[str, ...],
           work_dir: str | None, array: str | None, inputs: tuple[str, ...],
           outputs: tuple[str, ...], container_image: str | None,
           wait_: bool, timeout: float | None, as_json: bool,
           config_path: str | None) -> None:
    """Submit job scripts (or --command) to a platform, all in one SSH command.

    Prints, for each job, the sshq id, the platform and the job runner's job
    id.  Jobs the job runner refused are reported on stderr with its error,
    and the exit status is then 1.

    \b
    Examples:
      sshq submit --wait examples/hello.sh
      sshq submit -p mycluster a.sh b.sh c.sh
      sshq submit -p mycluster --name sim --walltime 0:10:00 --cpus 4 \\
           --memory 2G --env ALPHA=1 --command 'python run.py --seed 3'
    """
    if bool(scripts) == bool(command):
        raise InvalidInputError("give job script files, or --command, not both (nor neither)")
    if name is not None and len(scripts) > 1:
        raise InvalidInputError("--name applies to one job; omit it to name jobs after scripts")
    fields: dict[str, Any] = {
        "arguments": tuple(args),
        "environment": _parse_env(envs),
        "walltime": parse_walltime(walltime) if walltime else None,
        "nodes": nodes, "tasks": tasks, "cpus": cpus,
        "memory": parse_memory(memory) if memory else None,
        "queue": queue, "account": account, "mail_user": mail_user,
        "mail_events": tuple(e for e in (mail_events or "").split(",") if e),
        "directives": tuple(directives), "work_dir": work_dir,
        "inputs": tuple(inputs), "outputs": tuple(outputs), "array": array,
        "container_image": container_image,
    }
    if command is not None:
        specs = [JobSpec(command=command, name=name or "job", **fields)]
    else:
        specs = [JobSpec.from_file(s, name=name or default_name(Path(s).stem), **fields)
                 for s in scripts]
    r = Renderer(as_json)

    async def body(client: AsyncClient) -> list[Job]:
        with r.progress(f"submitting {len(specs)} job(s) to {platform}"):
            jobs = await client.submit(specs, platform=platform)
        if not wait_:
            return jobs
        ok = [j.id for j in jobs if j.state is not JobState.SUBMIT_FAILED]
        if not as_json and r.out_tty:
            r.jobs(jobs, title="submitted")
        with r.wait_progress() as on_poll:
            waited = await client.wait(ok, timeout=timeout, on_poll=on_poll) if ok else []
        by_id = {j.id: j for j in waited}
        return [by_id.get(j.id, j) for j in jobs]

    jobs = _run(ctx, config_path, body)
    if as_json or not wait_:
        r.jobs(jobs)
    else:
        r.jobs(jobs, title="final")
    for j in jobs:
        if j.state is JobState.SUBMIT_FAILED:
            r.error(f"job {j.id} ({j.name}) submit-failed: {j.message}")
    if any(j.state is JobState.SUBMIT_FAILED for j in jobs):
        ctx.exit(1)
    if wait_ and not all(j.state is JobState.SUCCEEDED for j in jobs):
        ctx.exit(1)


# ---------------------------------------------------------------- poll / wait / kill


@cli.command(epilog=JOB_FIELDS_HELP)
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Poll every job not yet final.")
@common
@click.pass_context
def poll(ctx: click.Context, ids: tuple[str, ...], all_: bool, as_json: bool,
         config_path: str | None) -> None:
    """Update job states from job status files and the job runner.

    One SSH command per host, however many jobs.  A host that cannot be
    reached changes no job's state (the failure is reported on stderr).
    """
    if not ids and not all_:
        raise InvalidInputError("give job ids, or --all")
    r = Renderer(as_json)

    async def body(client: AsyncClient) -> list[Job]:
        with r.progress("polling"):
            return await client.poll(_ids(ids), all=all_)

    r.jobs(_run(ctx, config_path, body))


@cli.command(epilog=JOB_FIELDS_HELP + " Exit status: 0 if all succeeded, 1 if any did not,"
             " 124 on timeout.")
@click.argument("ids", nargs=-1, required=True)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 124).")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="First poll interval in seconds (grows to 10 s).")
@common
@click.pass_context
def wait(ctx: click.Context, ids: tuple[str, ...], timeout: float | None, interval: float,
         as_json: bool, config_path: str | None) -> None:
    """Wait until jobs are final; exit 0 only if all succeeded."""
    r = Renderer(as_json)

    async def body(client: AsyncClient) -> list[Job]:
        with r.wait_progress() as on_poll:
            return await client.wait(_ids(ids), timeout=timeout, interval=interval,
                                     on_poll=on_poll)

    try:
        jobs = _run(ctx, config_path, body)
    except WaitTimeoutError as exc:
        r.jobs(getattr(exc, "jobs", []))
        raise
    r.jobs(jobs)
    if not all(j.state is JobState.SUCCEEDED for j in jobs):
        ctx.exit(1)


@cli.command(epilog=JOB_FIELDS_HELP)
@click.argument("ids", nargs=-1, required=True)
@click.option("--settle", type=float, default=5.0, show_default=True,
              help="Seconds to wait for killed jobs to record how they ended.")
@common
@click.pass_context
def kill(ctx: click.Context, ids: tuple[str, ...], settle: float, as_json: bool,
         config_path: str | None) -> None:
    """Kill jobs through their job runner (one SSH command per host)."""
    r = Renderer(as_json)

    async def body(client: AsyncClient) -> list[Job]:
        with r.progress("killing"):
            return await client.kill(_ids(ids), settle=settle)

    r.jobs(_run(ctx, config_path, body))


# ---------------------------------------------------------------- logs


_SIGNUMS = {s.name[3:]: int(s) for s in signal.Signals if s.name.startswith("SIG")
            and not s.name.startswith("SIG_")}


def job_exit_code(job: Job) -> int:
    """A shell-style exit code for a final job: its status, or 128+signal."""
    if job.exit_status is not None:
        return job.exit_status
    if job.signal:
        return 128 + _SIGNUMS.get(job.signal, 0)
    return 0 if job.state is JobState.SUCCEEDED else 1


@cli.command("cat-log")
@click.argument("job_id")
@click.option("-f", "--file", "file_", type=click.Choice(list(LOG_FILES)), default="out",
              show_default=True, help="out: job.out, err: job.err, status: job.status,"
              " job: the job script.")
@click.option("--follow", is_flag=True, help="Stream job.out and job.err as they grow"
              " (tail -F) until the job ends; exit with the job's exit status.")
@common
@click.pass_context
def cat_log(ctx: click.Context, job_id: str, file_: str, follow: bool, as_json: bool,
            config_path: str | None) -> None:
    """Print a job's log file, or follow its output live.

    On a terminal, bytes that are not valid UTF-8 are shown as replacement
    characters; piped, the bytes pass through unchanged.  With --json, the
    job object gains "file" and "content" (text) and "content_b64" (bytes).
    """
    (sid,) = _ids([job_id])
    r = Renderer(as_json)
    if follow:
        async def follow_body(client: AsyncClient) -> Job:
            decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in LOG_FILES}
            async for name, data in client.follow_log(sid):
                r.stream(data, decoders[name], err=(name == "err"))
            (job,) = await client.jobs(ids=[sid])
            return job

        job = _run(ctx, config_path, follow_body)
        if as_json:
            r.jobs([job])
        ctx.exit(job_exit_code(job))

    async def body(client: AsyncClient) -> tuple[Job, bytes]:
        data = await client.cat_log(sid, file_)  # type: ignore[arg-type]
        (job,) = await client.jobs(ids=[sid])
        return job, data

    job, data = _run(ctx, config_path, body)
    if as_json:
        r.jobs([job], extra={"file": file_, "content": data.decode("utf-8", "replace"),
                             "content_b64": base64.b64encode(data).decode()})
    else:
        r.raw(data)


@cli.command("ssh-to-job", epilog="Exit status: the remote shell's, or the command's.")
@click.argument("job_id")
@click.option("--command", "command", help="Run this one command in the job's environment"
              " instead of an interactive shell, and exit with its status.")
@common
@click.pass_context
def ssh_to_job(ctx: click.Context, job_id: str, command: str | None, as_json: bool,
               config_path: str | None) -> None:
    """Open a terminal inside a running job: same variables, directory and host.

    \b
    Slurm jobs: a step of the job (srun --jobid=ID --overlap --pty), inside
    its allocation and cgroup.  Background jobs: a shell on the job's host.
    The job's environment comes from the job.env snapshot its wrapper wrote
    at start.  Window-size changes and Ctrl-C go to the remote side
    (OpenSSH's terminal handling).

    \b
    Examples:
      sshq ssh-to-job 12
      sshq ssh-to-job 12 --command 'nvidia-smi; ls -l'
    """
    (sid,) = _ids([job_id])
    r = Renderer(as_json)
    if command is not None:
        async def body(client: AsyncClient) -> tuple[Job, Any]:
            result = await client.ssh_to_job(sid, command)
            (job,) = await client.jobs(ids=[sid])
            return job, result

        job, result = _run(ctx, config_path, body)
        status = result.exit_status if result.exit_status >= 0 else 255
        if as_json:
            r.jobs([job], extra={
                "command": command, "command_exit_status": status,
                "stdout": result.stdout.decode("utf-8", "replace"),
                "stderr": result.stderr.decode("utf-8", "replace")})
        else:
            r.raw(result.stdout)
            sys.stderr.buffer.write(result.stderr)
            sys.stderr.flush()
        ctx.exit(status)

    async def argv_body(client: AsyncClient) -> list[str]:
        return await client.ssh_to_job_argv(sid)

    argv = _run(ctx, config_path, argv_body)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise SshqError(f"cannot run {argv[0]!r}: {exc.strerror}") from None


@cli.command(epilog=JOB_FIELDS_HELP + " Each object gains local_dir.")
@click.argument("ids", nargs=-1, required=True)
@click.option("--dest", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Local directory; each job lands in DEST/<name>/<NN>/.")
@common
@click.pass_context
def retrieve(ctx: click.Context, ids: tuple[str, ...], dest: str, as_json: bool,
             config_path: str | None) -> None:
    """Copy job log directories back with rsync, and declared outputs of jobs
    that succeeded (into DEST/<name>/<NN>/outputs/)."""
    r = Renderer(as_json)
    sids = _ids(ids)

    async def body(client: AsyncClient) -> tuple[list[Job], list[Path]]:
        with r.progress("retrieving"):
            dirs = await client.retrieve(sids, dest=dest)
        return await client.jobs(ids=sids), dirs

    jobs, dirs = _run(ctx, config_path, body)
    if as_json:
        r.jobs_with(jobs, [{"local_dir": str(d)} for d in dirs])
    else:
        for j, d in zip(jobs, dirs, strict=True):
            r.line(f"{j.id}\t{d}")


@cli.command(epilog=JOB_FIELDS_HELP)
@click.option("-p", "--platform", help="Only this platform's jobs.")
@click.option("-s", "--state", type=click.Choice([s.value for s in JobState]),
              help="Only jobs in this state.")
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Only the newest N jobs.")
@common
@click.pass_context
def jobs(ctx: click.Context, platform: str | None, state: str | None, limit: int | None,
         as_json: bool, config_path: str | None) -> None:
    """List known jobs from the local state (no SSH; run `sshq poll` to refresh)."""
    r = Renderer(as_json)

    async def body(client: AsyncClient) -> list[Job]:
        return await client.jobs(platform=platform, state=state, limit=limit)

    r.jobs(_run(ctx, config_path, body))


# ---------------------------------------------------------------- staging


@cli.command()
@click.argument("src_dir", type=click.Path(file_okay=False))
@click.option("-p", "--platform", required=True, help="Platform to install on.")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="rsync exclude pattern (repeatable), besides Cylc's: .*, /log, /work,"
              " /share.")
@common
@click.pass_context
def install(ctx: click.Context, src_dir: str, platform: str, excludes: tuple[str, ...],
            as_json: bool, config_path: str | None) -> None:
    """Install a source tree into the platform's run directory (rsync).

    Only changed files travel.  When remote-init finds that the run
    directory is on a filesystem shared with this machine, the copy is made
    locally (and skipped when SRC_DIR is the run directory); when the remote
    side has no rsync, changed files go by SFTP.  With --json, prints a JSON
    array with one object: platform, host, source, remote_dir, method,
    shared_filesystem, files_transferred.
    """
    r = Renderer(as_json)

    async def body(client: AsyncClient) -> Any:
        with r.progress(f"installing {src_dir} on {platform}"):
            return await client.install(src_dir, platform=platform, excludes=excludes)

    done = _run(ctx, config_path, body)
    r.host_result(done.to_dict(), f"{done.method}: {done.files_transferred} file(s) to"
                  f" {done.host}:{done.remote_dir}")


@cli.command()
@click.option("-p", "--platform", required=True, help="Platform to tidy.")
@common
@click.pass_context
def tidy(ctx: click.Context, platform: str, as_json: bool, config_path: str | None) -> None:
    """Remove what sshq left on the platform (never job logs, work or results).

    Removes the run directory's .sshq service directory (remote-init's UUID
    file) and links an interrupted submission left behind.  With --json,
    prints a JSON array of the removed remote paths.
    """
    async def body(client: AsyncClient) -> list[str]:
        return await client.tidy(platform=platform)

    removed = _run(ctx, config_path, body)
    if as_json:
        click.echo(json.dumps(removed, indent=2))
    else:
        r = Renderer(as_json)
        for path in removed:
            r.line(f"removed {path}")
        if not removed:
            r.line("nothing to remove")


# ---------------------------------------------------------------- hosts


@cli.group()
def hosts() -> None:
    """Host keys: check and trust them explicitly."""


@hosts.command("trust")
@click.argument("host")
@click.option("--port", type=click.IntRange(1, 65535), help="SSH port (default 22, or the"
              " platform's).")
@click.option("--known-hosts", type=click.Path(dir_okay=False),
              help="known_hosts file (default: the platform's, else ~/.ssh/known_hosts).")
@click.option("--fingerprint", help="Expected SHA256:... fingerprint; the key is added only"
              " if it matches (no prompt).")
@click.option("--yes", is_flag=True, help="Add without prompting, after you have checked the"
              " fingerprint shown.")
@common
@click.pass_context
def hosts_trust(ctx: click.Context, host: str, port: int | None, known_hosts: str | None,
                fingerprint: str | None, yes: bool, as_json: bool,
                config_path: str | None) -> None:
    """Show HOST's key fingerprint; add it to known_hosts only on confirmation.

    HOST may be a platform name (its first host, port and known_hosts are
    used).  Nothing is ever added silently: without --yes or a matching
    --fingerprint, sshq asks (on the terminal, or reads the answer from
    stdin) and refuses unless the answer is y.
    """
    from ..transport.hostkeys import TrustResult, trust_host

    r = Renderer(as_json)
    path = config_path or ctx.obj.get("config") or os.environ.get("SSHQ_CONFIG")
    from ..config import load_config

    cfg = load_config(path, must_exist=path is not None)
    if host in cfg.platforms and cfg.platforms[host].transport != "local":
        plat = cfg.platforms[host]
        host, port = plat.hosts[0], port or plat.port
        known_hosts = known_hosts or plat.known_hosts

    def confirm(t: TrustResult) -> bool:
        if not as_json:
            click.echo(f"{t.name} offers a {t.key_type} key with fingerprint {t.fingerprint}",
                       err=True)
        if fingerprint is not None or yes:
            return True
        if sys.stdin.isatty():
            return click.confirm(f"Add it to {t.known_hosts}?", default=False, err=True)
        # a script may answer on stdin; no answer (EOF) is a refusal
        click.echo(f"Add it to {t.known_hosts}? [y/N]: ", err=True, nl=False)
        answer = sys.stdin.readline()
        click.echo("", err=True)
        if not answer:
            raise SshqError("refusing to add a host key without confirmation: check the"
                            " fingerprint, then answer y, or pass --yes or --fingerprint")
        return answer.strip().lower() in ("y", "yes")

    t = asyncio.run(trust_host(host, port, known_hosts, expected=fingerprint, confirm=confirm))
    result = {"host": t.host, "port": t.port, "key_type": t.key_type,
              "fingerprint": t.fingerprint, "known_hosts": t.known_hosts, "added": t.added,
              "already_known": t.already_known}
    if t.already_known:
        r.host_result(result, f"{t.name} is already trusted in {t.known_hosts}"
                              f" ({t.key_type} {t.fingerprint})")
    else:
        r.host_result(result, f"added {t.name} ({t.key_type} {t.fingerprint}) to"
                              f" {t.known_hosts}")


# ---------------------------------------------------------------- entry point


from .farm import farm  # noqa: E402  (after the group it joins)

cli.add_command(farm)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; errors become one line on stderr and an exit status."""
    handler = logging.StreamHandler()
    handler.setFormatter(CleanFormatter("sshq: %(levelname)s: %(message)s"))
    logging.getLogger("sshq").addHandler(handler)
    logging.getLogger("sshq").setLevel(logging.WARNING)
    try:
        rc = cli.main(args=list(argv) if argv is not None else None, prog_name="sshq",
                      standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("sshq: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("sshq: interrupted", err=True)
        sys.exit(130)
    except SshqError as exc:
        if _state["debug"]:
            raise
        click.echo(f"sshq: error: {clean(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected bug: one line unless --debug
        if _state["debug"]:
            raise
        click.echo(f"sshq: internal error: {type(exc).__name__}: {clean(str(exc))} (run with"
                   " --debug)", err=True)
        sys.exit(70)
    sys.exit(rc if isinstance(rc, int) else 0)

