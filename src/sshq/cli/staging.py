"""Staging commands: retrieve, install, tidy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..client import AsyncClient
from ..model import Job
from .common import (
    JOB_FIELDS_HELP,
    common,
    parse_ids,
    run_with_client,
)
from .render import Renderer


@click.command(epilog=JOB_FIELDS_HELP + " Each object gains local_dir.")
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
    sids = parse_ids(ids)

    async def body(client: AsyncClient) -> tuple[list[Job], list[Path]]:
        with r.progress("retrieving"):
            dirs = await client.retrieve(sids, dest=dest)
        return await client.jobs(ids=sids), dirs

    jobs, dirs = run_with_client(ctx, config_path, body)
    if as_json:
        r.jobs_with(jobs, [{"local_dir": str(d)} for d in dirs])
    else:
        for j, d in zip(jobs, dirs, strict=True):
            r.line(f"{j.id}\t{d}")



# ---------------------------------------------------------------- staging


@click.command()
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

    done = run_with_client(ctx, config_path, body)
    r.host_result(done.to_dict(), f"{done.method}: {done.files_transferred} file(s) to"
                  f" {done.host}:{done.remote_dir}")


@click.command()
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

    removed = run_with_client(ctx, config_path, body)
    if as_json:
        click.echo(json.dumps(removed, indent=2))
    else:
        r = Renderer(as_json)
        for path in removed:
            r.line(f"removed {path}")
        if not removed:
            r.line("nothing to remove")
