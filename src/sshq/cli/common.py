"""What every command shares: common options, the client, the event loop, ids."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click

from ..client import AsyncClient
from ..exceptions import InvalidInputError

F = TypeVar("F", bound=Callable[..., Any])

STATE: dict[str, Any] = {"debug": False}

JOB_FIELDS_HELP = (
    "With --json, prints a JSON array of job objects: id, platform, host, name,"
    " job_runner, job_id, submit_num, state, exit_status, signal, job_log_dir, work_dir,"
    " submit_time, start_time, exit_time, message."
)


def set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        STATE["debug"] = True
        logging.getLogger("sshq").setLevel(logging.DEBUG)
    return value


def common(f: F) -> F:
    """Options every command takes: --json, --config, --debug."""
    f = click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                     callback=set_debug, help="Show tracebacks and debug logs.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     default=None, help="Platforms file (default: $SSHQ_CONFIG, then the"
                     " user config dir's sshq/platforms.toml).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)
    return f


def make_client(ctx: click.Context, config_path: str | None) -> AsyncClient:
    path = config_path or (ctx.obj or {}).get("config") or os.environ.get("SSHQ_CONFIG")
    state = os.environ.get("SSHQ_STATE_DIR") or None
    return AsyncClient(path, state_dir=state)


T = TypeVar("T")


def run_with_client(ctx: click.Context, config_path: str | None,
         body: Callable[[AsyncClient], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        client = make_client(ctx, config_path)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def parse_ids(values: Sequence[str]) -> list[int]:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            if not part.isdigit():
                raise InvalidInputError(f"invalid sshq job id {part!r}: ids are numbers")
            out.append(int(part))
    return out
