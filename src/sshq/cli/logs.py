"""Log commands: cat-log, ssh-to-job."""

from __future__ import annotations

import base64
import codecs
import os
import sys
from typing import Any

import click

from ..client import LOG_FILES, AsyncClient
from ..exceptions import SshqError
from ..model import Job
from .common import (
    common,
    parse_ids,
    run_with_client,
)
from .jobs import job_exit_code
from .render import Renderer


@click.command("cat-log")
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
    (sid,) = parse_ids([job_id])
    r = Renderer(as_json)
    if follow:
        async def follow_body(client: AsyncClient) -> Job:
            decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in LOG_FILES}
            async for name, data in client.follow_log(sid):
                r.stream(data, decoders[name], err=(name == "err"))
            (job,) = await client.jobs(ids=[sid])
            return job

        job = run_with_client(ctx, config_path, follow_body)
        if as_json:
            r.jobs([job])
        ctx.exit(job_exit_code(job))

    async def body(client: AsyncClient) -> tuple[Job, bytes]:
        data = await client.cat_log(sid, file_)  # type: ignore[arg-type]
        (job,) = await client.jobs(ids=[sid])
        return job, data

    job, data = run_with_client(ctx, config_path, body)
    if as_json:
        r.jobs([job], extra={"file": file_, "content": data.decode("utf-8", "replace"),
                             "content_b64": base64.b64encode(data).decode()})
    else:
        r.raw(data)


@click.command("ssh-to-job", epilog="Exit status: the remote shell's, or the command's.")
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
    (sid,) = parse_ids([job_id])
    r = Renderer(as_json)
    if command is not None:
        async def body(client: AsyncClient) -> tuple[Job, Any]:
            result = await client.ssh_to_job(sid, command)
            (job,) = await client.jobs(ids=[sid])
            return job, result

        job, result = run_with_client(ctx, config_path, body)
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

    argv = run_with_client(ctx, config_path, argv_body)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise SshqError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
