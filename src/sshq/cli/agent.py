"""``sshq agent``: install the agent on a platform, for a restricted key."""

from __future__ import annotations

import json
from typing import Any

import click

from ..client import AsyncClient
from ..exceptions import ConfigError
from ..remote.installed import (
    AgentInstallation,
    bundle_version,
    install_agent,
    install_platform,
    read_public_key,
)
from ..remote.protocol import PROTOCOL
from .common import common, run_with_client


@click.group()
def agent() -> None:
    """The installed agent: for keys restricted to job management.

    \b
    sshq agent install -p mycluster --key ~/.ssh/id_sshq.pub >> line.txt
      copies the agent to ~/.sshq/ on the platform and prints the line to add
      to ~/.ssh/authorized_keys there (restrict,command="..." KEY sshq);
      then set identity_file to that key and agent = "installed".
    """


@agent.command("install")
@click.option("-p", "--platform", required=True, help="Platform to install on (each host).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The public key (.pub) to restrict.")
@click.option("--identity-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Install with this private key instead of the platform's (its key may be"
              " the restricted one, which cannot install).")
@click.option("--allow-background", is_flag=True,
              help="Let the key submit background jobs (they run on the login node).")
@common
@click.pass_context
def install_cmd(ctx: click.Context, platform: str, key_file: str, identity_file: str | None,
                allow_background: bool, as_json: bool, config_path: str | None) -> None:
    """Install the agent in ~/.sshq on PLATFORM's hosts; print the authorized_keys line.

    The files are checked by sha256 on the platform and replaced in one
    rename; installing the same files again changes nothing.  The line (on
    stdout, alone) confines the key to the installed agent, which serves
    only job management under the platform's run directory, and logs each
    request in ~/.sshq/audit.log.  Other messages go to stderr.
    """
    public_key = read_public_key(key_file)

    async def body(client: AsyncClient) -> tuple[str, list[AgentInstallation]]:
        plat = client.config.platform(platform)
        if plat.transport == "local":
            raise ConfigError(f"platform {platform!r} is local: nothing to install over SSH")
        setup = install_platform(plat, identity_file)
        out = []
        for host in plat.hosts:
            out.append(await install_agent(client.pool.transport(setup, host), plat,
                                           public_key, allow_background=allow_background))
        return plat.job_runner, out

    runner, done = run_with_client(ctx, config_path, body)
    lines = {d.line for d in done}
    if len(lines) > 1:
        raise ConfigError(f"the hosts of platform {platform!r} differ in home, python or run"
                          " directory, so one authorized_keys line cannot serve them all: "
                          + "; ".join(f"{d.host}: {d.line}" for d in done))
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in done], indent=2))
        return
    for d in done:
        state = "installed" if d.changed else "already installed (unchanged)"
        click.echo(f"sshq: {d.host}: agent {d.version} (protocol {d.protocol}) {state} in"
                   f" {d.home}/.sshq; run directory {d.run_dir}", err=True)
        if not d.rrsync:
            click.echo(f"sshq: warning: {d.host} has no rrsync: the restricted key cannot"
                       " stage files (install, retrieve) until it has", err=True)
    if runner == "background" and not allow_background:
        click.echo(f"sshq: warning: platform {platform!r} runs background jobs, which the"
                   " restricted key refuses without --allow-background", err=True)
    click.echo("sshq: add this line to ~/.ssh/authorized_keys on the platform, then set"
               f" identity_file to the key and agent = \"installed\" in [platforms.{platform}]",
               err=True)
    click.echo(done[0].line)


@agent.command("status")
@click.option("-p", "--platform", required=True, help="Platform whose installed agent to ask.")
@common
@click.pass_context
def status_cmd(ctx: click.Context, platform: str, as_json: bool,
               config_path: str | None) -> None:
    """Ask PLATFORM's installed agent its protocol, version and restrictions."""

    async def body(client: AsyncClient) -> dict[str, Any]:
        plat = client.config.platform(platform)
        if not plat.restricted:
            raise ConfigError(f"platform {platform!r} does not use an installed agent"
                              " (agent = \"installed\")")

        async def op(host: str, t: Any) -> dict[str, Any]:
            reply = await client.pool.agent(plat, t, "agent_info", {})
            return dict(reply, host=t.host)

        info: dict[str, Any] = await client.pool.with_failover(plat, op)
        return info

    info = run_with_client(ctx, config_path, body)
    info = dict(info, client_protocol=PROTOCOL, client_version=bundle_version(),
                up_to_date=info.get("version") == bundle_version())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    scope = (f"restricted to {info.get('run_dir')}" if info.get("restricted")
             else "not restricted")
    click.echo(f"{info.get('host')}: protocol {info.get('protocol')}, version"
               f" {info.get('version')}, {scope}")
    if not info["up_to_date"]:
        click.echo(f"this sshq has version {bundle_version()}: run `sshq agent install -p"
                   f" {platform} --key KEY.pub` to update it")
