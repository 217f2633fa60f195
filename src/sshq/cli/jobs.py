"""Job commands: submit, poll, wait, kill, jobs."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..client import AsyncClient
from ..exceptions import InvalidInputError, WaitTimeoutError
from ..model import Job, JobSpec, JobState
from ..model.job_spec import default_name
from .common import (
    JOB_FIELDS_HELP,
    common,
    parse_ids,
    run_with_client,
)
from .render import Renderer

# ---------------------------------------------------------------- submit


def _parse_env(values: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


@click.command(epilog=JOB_FIELDS_HELP)
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
        "walltime": walltime or None,
        "nodes": nodes, "tasks": tasks, "cpus": cpus,
        "memory": memory or None,
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

    jobs = run_with_client(ctx, config_path, body)
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


@click.command(epilog=JOB_FIELDS_HELP)
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
            return await client.poll(parse_ids(ids), all=all_)

    r.jobs(run_with_client(ctx, config_path, body))


@click.command(epilog=JOB_FIELDS_HELP + " Exit status: 0 if all succeeded, 1 if any did not,"
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
            return await client.wait(parse_ids(ids), timeout=timeout, interval=interval,
                                     on_poll=on_poll)

    try:
        jobs = run_with_client(ctx, config_path, body)
    except WaitTimeoutError as exc:
        r.jobs(getattr(exc, "jobs", []))
        raise
    r.jobs(jobs)
    if not all(j.state is JobState.SUCCEEDED for j in jobs):
        ctx.exit(1)


@click.command(epilog=JOB_FIELDS_HELP)
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
            return await client.kill(parse_ids(ids), settle=settle)

    r.jobs(run_with_client(ctx, config_path, body))



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



@click.command(epilog=JOB_FIELDS_HELP)
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

    r.jobs(run_with_client(ctx, config_path, body))
