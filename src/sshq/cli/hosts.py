"""Host commands: hosts trust (the trust logic is sshq.transport.hostkeys')."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from ..exceptions import SshqError
from .common import (
    common,
)
from .render import Renderer

# ---------------------------------------------------------------- hosts


@click.group()
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
