"""Host keys: fetch, fingerprint, look up and (only when asked) record them.

sshq checks host keys strictly and never adds one silently: an unknown or
changed key is a :class:`~sshq.exceptions.HostKeyError` naming the host and
the SHA256 fingerprint the server offered; ``sshq hosts trust`` shows it and
records it only on explicit confirmation.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..exceptions import HostKeyError, HostUnreachableError
from .base import HostParams

if TYPE_CHECKING:  # asyncssh is imported when used: it costs 0.1 s of CLI start-up
    import asyncssh

__all__ = [
    "default_known_hosts",
    "fetch_host_key",
    "fingerprint",
    "known_hosts_entry_name",
    "known_keys",
    "record_host_key",
    "host_key_error",
]


def default_known_hosts() -> str:
    """``~/.ssh/known_hosts``."""
    return os.path.expanduser("~/.ssh/known_hosts")


def known_hosts_entry_name(host: str, port: int | None) -> str:
    """How OpenSSH writes a host in known_hosts: ``host`` or ``[host]:port``."""
    return host if port in (None, 22) else f"[{host}]:{port}"


async def fetch_host_key(host: str, port: int | None, timeout: float = 10.0) -> asyncssh.SSHKey:
    """Ask the server for its host key, without authenticating.

    Raises:
        HostUnreachableError: the server cannot be reached.
    """
    import asyncssh

    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port or 22), timeout)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise HostUnreachableError(f"{host}: cannot fetch host key: {exc}", host=host) from None
    if key is None:
        raise HostUnreachableError(f"{host}: server offered no host key", host=host)
    return key


def fingerprint(key: asyncssh.SSHKey) -> str:
    """The key's ``SHA256:...`` fingerprint, as ``ssh-keygen -l`` prints it."""
    return str(key.get_fingerprint("sha256"))


def known_keys(path: str, host: str, port: int | None) -> list[asyncssh.SSHKey]:
    """Host keys recorded for ``host``/``port`` in the known_hosts file ``path``."""
    if not os.path.exists(path):
        return []
    import asyncssh

    kh = asyncssh.read_known_hosts(path)
    # OpenSSH's rule: an entry without a port is for port 22 only.  asyncssh's
    # public match() falls back to such entries for other ports, so use its
    # exact lookup.
    exact = getattr(kh, "_match", kh.match)
    trusted = exact(host, "", None if port in (None, 22) else port)[0]
    return list(trusted)


def record_host_key(path: str, host: str, port: int | None, key: asyncssh.SSHKey) -> str:
    """Append ``host``'s key to known_hosts (mode 0600, parent 0700).

    Returns:
        The line written.
    """
    p = Path(path)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    blob = key.export_public_key("openssh").decode().split()
    line = f"{known_hosts_entry_name(host, port)} {blob[0]} {blob[1]}\n"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return line


async def host_key_error(
    params: HostParams,
    *,
    host: str | None = None,
    port: int | None = None,
    known_hosts: list[str] | None = None,
) -> HostKeyError:
    """Build the error for a host key that failed verification.

    Fetches the offered key to name its fingerprint and tells an unknown key
    from a changed one.

    Args:
        params: the host as configured.
        host, port: the address ~/.ssh/config resolved it to (default: params').
        known_hosts: the known_hosts files in force (default: params' or
            ~/.ssh/known_hosts).
    """
    real_host = host or params.host
    real_port = port if port is not None else params.port
    if real_port == 22:
        real_port = None
    files = known_hosts or [params.known_hosts or default_known_hosts()]
    name = known_hosts_entry_name(real_host, real_port)
    try:
        key = await fetch_host_key(real_host, real_port, params.connect_timeout)
        fp = fingerprint(key)
    except HostUnreachableError:
        fp = ""
    shown = fp or "(could not fetch the key)"
    where = " or ".join(files)
    if any(known_keys(f, real_host, real_port) for f in files):
        return HostKeyError(
            f"HOST KEY CHANGED for {name}: the server offers {shown}, which is not the key"
            f" recorded in {where}. Someone may be intercepting the connection. If the change"
            " is legitimate, remove the old line and run `sshq hosts trust`.",
            host=params.host, fingerprint=fp, changed=True,
        )
    return HostKeyError(
        f"unknown host key for {name}: the server offers {shown}, not found in {where}."
        f" Check it with the site, then run `sshq hosts trust {real_host}"
        + (f" --port {real_port}" if real_port else "") + "`.",
        host=params.host, fingerprint=fp, changed=False,
    )
