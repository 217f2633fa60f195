"""Host keys: look up, fingerprint, report and (only when asked) record them.

sshq checks host keys strictly and never adds one silently, on the target
and on every ProxyJump hop, with the same known_hosts for all of them.  An
unknown, changed or revoked key is a :class:`~sshq.exceptions.HostKeyError`
naming the host whose key failed and the SHA256 fingerprint it offered;
``sshq hosts trust`` (:func:`trust_host`) shows it and records it only on
explicit confirmation.

Lookups follow OpenSSH's rules, whichever transport connects: a host's key is
found under the name it was reached by (its ``HostName``, or its
``HostKeyAlias``), never under its address alone (``CheckHostIP`` only adds a
warning in OpenSSH); on a port other than 22 under ``[name]:port``, and only
when nothing is recorded there, an entry without a port that holds the very
key offered is accepted too (OpenSSH's "found matching key w/out port"); an
``@revoked`` key is refused even where it is also listed as trusted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..exceptions import HostKeyError, HostUnreachableError, SshqError
from .base import HostParams

if TYPE_CHECKING:  # asyncssh is imported when used: it costs 0.1 s of CLI start-up
    import asyncssh

__all__ = [
    "KnownHosts",
    "TrustResult",
    "default_known_hosts",
    "fetch_host_key",
    "fingerprint",
    "host_key_error",
    "known_hosts_entry_name",
    "known_keys",
    "record_host_key",
    "split_entry_name",
    "trust_host",
]

log = logging.getLogger(__name__)

#: Why a host key failed: not listed, listed with another key, or ``@revoked``.
Failure = Literal["unknown", "changed", "revoked"]


def default_known_hosts() -> str:
    """``~/.ssh/known_hosts``."""
    return os.path.expanduser("~/.ssh/known_hosts")


def known_hosts_entry_name(host: str, port: int | None) -> str:
    """How OpenSSH writes a host in known_hosts: ``host`` or ``[host]:port``."""
    return host if port in (None, 22) else f"[{host}]:{port}"


def split_entry_name(name: str) -> tuple[str, int | None]:
    """The inverse of :func:`known_hosts_entry_name`: ``(host, port or None)``."""
    if name.startswith("[") and "]:" in name:
        host, _, port = name[1:].rpartition("]:")
        if port.isdigit():
            return host, int(port)
    return name, None


@dataclass(frozen=True, slots=True)
class _Match:
    trusted: list[asyncssh.SSHKey]
    authorities: list[asyncssh.SSHKey]
    revoked: list[asyncssh.SSHKey]
    #: the keys were recorded for the name with its port (not OpenSSH's fallback)
    exact: bool = True


class KnownHosts:
    """known_hosts files, read once, looked up as OpenSSH does.

    Missing files count as empty; lines that cannot be read are skipped (as
    OpenSSH skips them).

    Args:
        files: the files, in order (``~`` is expanded).
    """

    def __init__(self, files: Sequence[str]) -> None:
        import asyncssh

        self.files = list(files)
        self._sets: list[asyncssh.SSHKnownHosts] = []
        for f in self.files:
            try:
                text = Path(f).expanduser().read_text("utf-8", "replace")
            except OSError:
                continue
            kh = asyncssh.SSHKnownHosts()
            for line in text.splitlines():
                try:
                    kh.load(line)
                except (ValueError, TypeError):
                    log.debug("%s: skipping a line that cannot be read", f)
            self._sets.append(kh)

    def _entries(self, name: str) -> _Match:
        m = _Match([], [], [])
        for kh in self._sets:
            # The name as written in the file, with no address and no port of its
            # own: asyncssh would also look the address up.
            trusted, authorities, revoked = kh.match(name, "", None)[:3]
            m.trusted.extend(trusted)
            m.authorities.extend(authorities)
            m.revoked.extend(revoked)
        return m

    def lookup(self, host: str, port: int | None, *, alias: str | None = None) -> _Match:
        """Keys recorded for ``host`` on ``port`` (or for ``alias``, OpenSSH's
        ``HostKeyAlias``, which is looked up without a port).

        When nothing is recorded for ``[host]:port``, the entries for ``host``
        without a port (``exact`` False): OpenSSH accepts the key offered if
        it is among them, and reports no changed key otherwise.
        """
        if alias:
            return self._entries(alias)
        m = self._entries(known_hosts_entry_name(host, port))
        if port in (None, 22) or m.trusted or m.authorities:
            return m
        bare = self._entries(host)
        return _Match(bare.trusted, bare.authorities, m.revoked + bare.revoked, exact=False)

    def matcher(self, alias: str | None = None) -> Callable[
            [str, str, int | None], tuple[Sequence[asyncssh.SSHKey], ...]]:
        """The ``known_hosts`` callable for :func:`asyncssh.connect` (host,
        address, port) -> (trusted keys, CA keys, revoked keys)."""

        def match(host: str, _addr: str, port: int | None) -> tuple[
                Sequence[asyncssh.SSHKey], ...]:
            m = self.lookup(host, port, alias=alias)
            return m.trusted, m.authorities, m.revoked

        return match

    def state(self, host: str, port: int | None, key: asyncssh.SSHKey | None, *,
              alias: str | None = None) -> Failure | Literal["known"]:
        """How ``key`` (None: not known) stands for ``host``: known, or why not."""
        m = self.lookup(host, port, alias=alias)
        if key is not None and key in m.revoked:
            return "revoked"
        if key is not None and key in m.trusted:
            return "known"
        return "changed" if m.trusted and m.exact else "unknown"


async def fetch_host_key(host: str, port: int | None, timeout: float = 10.0, *,
                         tunnel: object = ()) -> asyncssh.SSHKey:
    """Ask the server for its host key, without authenticating to it.

    Args:
        host, port: the server (as given: ~/.ssh/config is honoured).
        timeout: seconds.
        tunnel: an asyncssh connection to reach it through (a ProxyJump hop
            already checked), None to connect directly, or ``()`` for what
            ~/.ssh/config says (``sshq hosts trust``, whose user then checks
            the fingerprint shown).

    Raises:
        HostUnreachableError: the server cannot be reached.
    """
    import asyncssh

    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(
            host, port or (), tunnel=tunnel), timeout)  # type: ignore[arg-type]
    except (OSError, asyncssh.Error, TimeoutError, ValueError) as exc:
        raise HostUnreachableError(f"{host}: cannot fetch host key: {exc}", host=host) from None
    if key is None:
        raise HostUnreachableError(f"{host}: server offered no host key", host=host)
    return key


def fingerprint(key: asyncssh.SSHKey) -> str:
    """The key's ``SHA256:...`` fingerprint, as ``ssh-keygen -l`` prints it."""
    return str(key.get_fingerprint("sha256"))


def known_keys(path: str, host: str, port: int | None) -> list[asyncssh.SSHKey]:
    """Host keys recorded (not revoked) for ``host``/``port`` itself in the
    known_hosts file ``path`` (a key recorded without the port is another host's)."""
    m = KnownHosts([path]).lookup(host, port)
    return m.trusted if m.exact else []


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
    known_hosts: Sequence[str] | None = None,
    name: str | None = None,
    failure: Failure | None = None,
    fingerprint_: str | None = None,
    jump: bool = False,
) -> HostKeyError:
    """Build the error for a host key that failed verification.

    Args:
        params: the host as configured (the error's ``host``).
        host, port: the host whose key failed, as reached (default: params');
            a ProxyJump hop's when the hop failed.
        known_hosts: the known_hosts files in force (default: params' or
            ~/.ssh/known_hosts).
        name: how that host is looked up in known_hosts (default
            ``host``/``[host]:port``; a ``HostKeyAlias`` otherwise).
        failure: why it failed; None: tell unknown from changed by looking
            the name up.
        fingerprint_: the fingerprint offered; None: fetch the key directly
            from ``host``/``port`` (no proxy) to name it.
        jump: the host is a ProxyJump hop on the way to ``params``' host.

    Returns:
        The error (not raised): one line naming the host, the fingerprint and
        the files, with what to do.
    """
    real_host = host or params.host
    real_port = port if port is not None else params.port
    if real_port == 22:
        real_port = None
    files = list(known_hosts or [params.known_hosts or default_known_hosts()])
    name = name or known_hosts_entry_name(real_host, real_port)
    fp = fingerprint_
    if fp is None:
        try:
            fp = fingerprint(await fetch_host_key(real_host, real_port, params.connect_timeout,
                                                  tunnel=None))
        except HostUnreachableError:
            fp = ""
    if failure is None:
        failure = "changed" if any(known_keys(f, real_host, real_port) for f in files) \
            else "unknown"
    shown = fp or "(could not fetch the key)"
    where = " or ".join(files) or "no known_hosts file (UserKnownHostsFile none)"
    hop = f" (jump host on the way to {params.label})" if jump else ""
    if failure == "revoked":
        message = (f"REVOKED host key for {name}{hop}: the server offers {shown}, which {where}"
                   " marks @revoked. Someone may be impersonating the host; do not connect"
                   " until the site confirms its new key.")
    elif failure == "changed":
        message = (f"HOST KEY CHANGED for {name}{hop}: the server offers {shown}, which is not"
                   f" the key recorded in {where}. Someone may be intercepting the connection."
                   " If the change is legitimate, remove the old line and run `sshq hosts"
                   " trust`.")
    else:
        trust = f"sshq hosts trust {real_host}" + (f" --port {real_port}" if real_port else "")
        if files and files[0] != default_known_hosts():
            trust += f" --known-hosts {files[0]}"
        message = (f"unknown host key for {name}{hop}: the server offers {shown}, not found in"
                   f" {where}. Check it with the site, then run `{trust}`.")
    return HostKeyError(message, host=params.host, fingerprint=fp,
                        changed=failure == "changed")


# ---------------------------------------------------------------- sshq hosts trust


@dataclass(frozen=True, slots=True)
class TrustResult:
    """What :func:`trust_host` found and did.

    Attributes:
        host: the host.
        port: its port (22 by default).
        key_type: the key's algorithm, e.g. ``ssh-ed25519``.
        fingerprint: ``SHA256:...``.
        known_hosts: the file looked in (and written to).
        added: the key was appended now.
        already_known: the key was recorded already (nothing written).
    """

    host: str
    port: int
    key_type: str
    fingerprint: str
    known_hosts: str
    added: bool = False
    already_known: bool = False

    @property
    def name(self) -> str:
        """How the host appears in known_hosts."""
        return known_hosts_entry_name(self.host, self.port)


async def trust_host(host: str, port: int | None, known_hosts: str | None, *,
               expected: str | None = None,
               confirm: Callable[[TrustResult], bool]) -> TrustResult:
    """Fetch ``host``'s key and record it in ``known_hosts`` only when confirmed.

    Args:
        host, port: the server (port None: 22).
        known_hosts: the file; None for ~/.ssh/known_hosts.
        expected: a ``SHA256:...`` fingerprint the key must have (it is then
            recorded if ``confirm`` agrees; ``confirm`` may just return True).
        confirm: called with the new key's details when it is not recorded
            yet; True records it.  It may raise to refuse with its own message.

    Returns:
        The result (``already_known`` when nothing had to be added).

    Raises:
        HostUnreachableError: the key cannot be fetched.
        SshqError: the file holds a different or revoked key for the host, the
            fingerprint differs from ``expected``, or ``confirm`` said no.
    """
    kh = known_hosts or default_known_hosts()
    key = await fetch_host_key(host, port)
    fp = fingerprint(key)
    name = known_hosts_entry_name(host, port)
    result = TrustResult(host, port or 22, key.get_algorithm(), fp, kh)
    state = KnownHosts([kh]).state(host, port, key)
    if state == "known":
        return TrustResult(host, port or 22, result.key_type, fp, kh, already_known=True)
    if state == "revoked":
        raise SshqError(f"the key {name} offers ({result.key_type} {fp}) is marked @revoked in"
                        f" {kh}; nothing added")
    if state == "changed":
        raise SshqError(
            f"HOST KEY CHANGED for {name}: {kh} holds a different key; the server offers"
            f" {result.key_type} {fp}. If the change is legitimate, remove the old entry"
            f" (ssh-keygen -R '{name}' -f {kh}) and run this again."
        )
    confirmed = confirm(result)
    if expected is not None and expected.strip() != fp:
        raise SshqError(f"fingerprint mismatch for {name}: expected {expected.strip()},"
                        f" server offers {fp}; nothing added")
    if not confirmed:
        raise SshqError("not added")
    record_host_key(kh, host, port, key)
    return TrustResult(host, port or 22, result.key_type, fp, kh, added=True)
