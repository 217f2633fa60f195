"""``sshq serve`` (the HTTP gateway) and ``sshq token`` (its API tokens)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click

from ..client import AsyncClient
from ..server import DEFAULT_FARM_RETENTION
from ..server.state import ServerState
from .common import common, make_client
from .render import Renderer


@contextmanager
def _state(ctx: click.Context, config_path: str | None) -> Iterator[tuple[AsyncClient,
                                                                          ServerState]]:
    client = make_client(ctx, config_path)
    state = ServerState(client.store.path)
    try:
        yield client, state
    finally:
        state.close()
        asyncio.run(client.close())


def _when(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@click.group()
def token() -> None:
    """API tokens of `sshq serve` (kept, as hashes, in the state database).

    \b
    Examples:
      sshq token create backend --platform mycluster --expires 90
      sshq token list
      sshq token revoke backend
    """


@token.command("create")
@click.argument("name")
@click.option("-p", "--platform", "platforms", multiple=True,
              help="A platform the token may use (repeatable; default: every platform).")
@click.option("--expires", type=click.FloatRange(min=0, min_open=True), metavar="DAYS",
              help="Lifetime in days (default: no expiry).")
@common
@click.pass_context
def token_create(ctx: click.Context, name: str, platforms: tuple[str, ...],
                 expires: float | None, as_json: bool, config_path: str | None) -> None:
    """Create a token and print it, alone, on stdout.

    The token is shown once: only its hash is stored.  Its webhook secret
    (the key of the X-Sshq-Signature HMAC of its webhooks) is shown once too,
    on stderr (in the JSON object with --json).
    """
    with _state(ctx, config_path) as (client, state):
        for p in platforms:
            client.config.platform(p)  # ConfigError for an unknown platform
        tok, secret = state.create_token(name, platforms, expires)
        info = next(t for t in state.tokens() if t.name == name)
    if as_json:
        click.echo(json.dumps({"name": name, "token": tok, "webhook_secret": secret,
                               "platforms": list(info.platforms),
                               "created": _when(info.created),
                               "expires": _when(info.expires)}, indent=2))
        return
    click.echo(tok)
    click.echo(f"sshq: webhook secret of token {name!r} (shown once): {secret}", err=True)


@token.command("list")
@common
@click.pass_context
def token_list(ctx: click.Context, as_json: bool, config_path: str | None) -> None:
    """List the tokens: name, platforms, creation and expiry times (never the tokens)."""
    with _state(ctx, config_path) as (_client, state):
        tokens = state.tokens()
    rows: list[dict[str, Any]] = [
        {"name": t.name, "platforms": list(t.platforms), "created": _when(t.created),
         "expires": _when(t.expires)} for t in tokens]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    r = Renderer(False)
    r.line("name\tplatforms\tcreated\texpires")
    for row in rows:
        r.line(f"{row['name']}\t{','.join(row['platforms']) or '*'}\t{row['created']}"
               f"\t{row['expires'] or '-'}")


@token.command("revoke")
@click.argument("name")
@common
@click.pass_context
def token_revoke(ctx: click.Context, name: str, as_json: bool,
                 config_path: str | None) -> None:
    """Revoke (delete) a token: it is refused at once, also by a running server."""
    from ..exceptions import InvalidInputError

    with _state(ctx, config_path) as (_client, state):
        if not state.revoke_token(name):
            raise InvalidInputError(f"no token named {name!r} (see `sshq token list`)")
    if as_json:
        click.echo(json.dumps({"name": name, "revoked": True}))



def parse_listen(listen: str, *, tls: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) for ``--listen``.

    Without TLS only loopback addresses (and ``localhost``) are accepted.

    Raises:
        InvalidInputError: malformed, or not loopback without TLS.
    """
    from ..exceptions import InvalidInputError

    host, sep, port_s = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise InvalidInputError(f"--listen {listen!r}: use HOST:PORT, e.g. 127.0.0.1:8622")
    if not tls:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise InvalidInputError(
                f"--listen {listen!r}: without TLS sshq serve listens only on loopback"
                " addresses (127.0.0.1, ::1, localhost); give --tls-cert and --tls-key to"
                " listen on another address")
    return host, int(port_s)


@click.command()
@click.option("--listen", default="127.0.0.1:8622", show_default=True, metavar="HOST:PORT",
              help="Address to listen on; other than loopback only with TLS.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="TLS certificate chain (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="TLS private key (PEM).")
@click.option("--allow-farm-destinations", is_flag=True,
              help="Let farm runs (POST /api/v1/farm) name SSH destinations"
              " [user@]host[:port] besides platforms, for tokens not limited to platforms:"
              " they are reached with this server's own SSH configuration and keys."
              " Default: refused (403).")
@click.option("--farm-retention", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_FARM_RETENTION / 86400, show_default=True, metavar="DAYS",
              help="Delete a farm run (its status, results and files) DAYS after it ended"
              " (finished, failed or stopped); fractions of a day accepted.  Running runs"
              " are never deleted; a deleted run is 404.")
@common
@click.pass_context
def serve(ctx: click.Context, listen: str, tls_cert: str | None, tls_key: str | None,
          allow_farm_destinations: bool, farm_retention: float, as_json: bool,
          config_path: str | None) -> None:
    """Serve the HTTP gateway: the native API (/api/v1), a FirecREST v2 subset
    (/firecrest) and a web page (/), over the platforms file's platforms.

    Every request needs `Authorization: Bearer <token>` (`sshq token
    create`).  One background poller serves every client: each login host
    sees at most one poll per platform `min_poll_interval`.  Jobs, events,
    idempotency keys and pending webhooks live in the state database, so a
    restart loses nothing.  API docs: /docs (OpenAPI: /openapi.json).

    Farm runs use the platforms only, unless --allow-farm-destinations
    lets tokens not limited to platforms name any SSH destination, which
    the server then reaches with its own keys.  A farm run that ended is
    kept --farm-retention days, then deleted (checked periodically).

    \b
    Examples:
      sshq serve
      sshq serve --listen 0.0.0.0:8622 --tls-cert cert.pem --tls-key key.pem
    """
    from ..exceptions import InvalidInputError

    if (tls_cert is None) != (tls_key is None):
        raise InvalidInputError("give both --tls-cert and --tls-key, or neither")
    host, port = parse_listen(listen, tls=tls_cert is not None)
    import uvicorn

    from ..server.app import create_app
    from ..server.gateway import Gateway

    scheme = "https" if tls_cert else "http"

    async def main() -> None:
        client = make_client(ctx, config_path)
        gateway = Gateway(client)
        try:
            app = create_app(gateway, farm_retention=farm_retention * 86400)
            app.state.farms.allow_destinations = allow_farm_destinations
            config = uvicorn.Config(
                app, host=host, port=port, ssl_certfile=tls_cert,
                ssl_keyfile=tls_key, lifespan="on", server_header=False,
                proxy_headers=False, log_level="info", timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)

            async def announce() -> None:
                while not server.started:
                    if server.should_exit:
                        return
                    await asyncio.sleep(0.02)
                for s in server.servers:
                    for sock in s.sockets:
                        addr = sock.getsockname()
                        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                        click.echo(f"sshq serve: listening on {scheme}://{shown}:{addr[1]}",
                                   err=True)

            task = asyncio.create_task(announce())
            await server.serve()
            task.cancel()
        finally:
            gateway.close()
            await client.close()

    asyncio.run(main())
