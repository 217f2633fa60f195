"""The ``asyncssh`` transport (default): one SSH connection per host, reused.

Every operation in a process shares the host's connection; channels on it
are bounded (sshd's ``MaxSessions`` is 10 by default).  Connecting retries
transient failures with exponential backoff and jitter; a command is never
re-run after its channel opened (it may have had effects).  Host keys are
checked strictly against known_hosts, by OpenSSH's rules
(:mod:`~sshq.transport.hostkeys`), on the target and on every ProxyJump hop
(connected here, one by one, against the target's known_hosts);
~/.ssh/config is honoured (Host aliases, User, Port, IdentityFile,
ProxyJump) by asyncssh's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncssh

from ..exceptions import (
    AuthenticationError,
    ConfigError,
    HostUnreachableError,
    TransportError,
)
from ..quoting import join
from .base import CommandResult, HostParams, Session, Transport, check_host, ssh_options
from .bounded import MAX_OUTPUT, read_bounded
from .hostkeys import (
    Failure,
    KnownHosts,
    default_known_hosts,
    fetch_host_key,
    fingerprint,
    host_key_error,
)

__all__ = ["AsyncSSHTransport"]

log = logging.getLogger(__name__)


class AsyncSSHTransport(Transport):
    """asyncssh-based transport.

    Args:
        params: how to reach the host.
        max_channels: concurrent channels on the connection.
        connect_attempts: tries for a transient connect failure.
        backoff: first retry delay in seconds (doubles, with jitter).
    """

    name = "asyncssh"
    has_sftp = True

    def __init__(
        self,
        params: HostParams,
        *,
        max_channels: int = 8,
        connect_attempts: int = 3,
        backoff: float = 0.5,
    ) -> None:
        super().__init__(params)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._channels = asyncio.Semaphore(max_channels)
        self.connect_attempts = connect_attempts
        self.backoff = backoff

    def _base_options(self) -> dict[str, Any]:
        """Options for every connection, the target's and each ProxyJump hop's."""
        p = self.params
        return {
            "connect_timeout": p.connect_timeout,
            "keepalive_interval": p.keepalive_interval,
            "keepalive_count_max": 3,
            "agent_forwarding": False,
            "password": None,
            "kbdint_auth": False,
        }

    def _connect_options(self) -> dict[str, Any]:
        p = self.params
        opts = self._base_options()
        if p.port:
            opts["port"] = p.port
        if p.user:
            opts["username"] = p.user
        if p.identity_file:
            if not os.path.exists(p.identity_file):
                raise ConfigError(f"identity file {p.identity_file} does not exist")
            opts["client_keys"] = [p.identity_file]
            if p.certificate_file:  # renewed (if need be) before this connection
                opts["client_keys"] = [(p.identity_file, p.certificate_file)]
        if p.known_hosts and not os.path.exists(p.known_hosts):
            raise ConfigError(
                f"known_hosts file {p.known_hosts} does not exist; create it with"
                f" `sshq hosts trust {p.host}`"
            )
        return opts

    def _known_hosts(self, resolved: asyncssh.SSHClientConnectionOptions) -> KnownHosts:
        """The target's known_hosts, which every hop is checked against too.

        The platform's file, else ~/.ssh/config's UserKnownHostsFile (and
        GlobalKnownHostsFile) for the target; "UserKnownHostsFile none" would
        check nothing, so it falls back to ~/.ssh/known_hosts: strict always.
        """
        if self.params.known_hosts:
            return KnownHosts([self.params.known_hosts])
        files = resolved.known_hosts if isinstance(resolved.known_hosts, list) else []
        return KnownHosts([f for f in files if isinstance(f, str)] or [default_known_hosts()])

    def _failed(self, exc: BaseException, where: str) -> TransportError:
        """``exc`` from connecting (to ``where``) as sshq's error."""
        p = self.params
        if isinstance(exc, asyncssh.PermissionDenied):
            return AuthenticationError(
                f"{where}: authentication refused ({exc.reason}); sshq uses keys, an"
                " ssh-agent or Kerberos, never stored passwords",
                host=p.host,
            )
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        return HostUnreachableError(
            f"{where}: cannot connect: {reason or type(exc).__name__}", host=p.host)

    async def _resolve(self, host: str, opts: dict[str, Any], where: str
                       ) -> asyncssh.SSHClientConnectionOptions:
        """``host``'s options as asyncssh resolves them from ~/.ssh/config
        (HostName, Port, User, HostKeyAlias, ProxyJump, UserKnownHostsFile)."""
        try:
            options: asyncssh.SSHClientConnectionOptions = \
                await asyncssh.SSHClientConnectionOptions.construct(
                    None, config=(), host=host, **opts)
            return options
        except (OSError, ValueError, asyncssh.Error) as exc:
            raise self._failed(exc, where) from None

    async def _connect_checked(
        self, host: str, opts: dict[str, Any], resolved: asyncssh.SSHClientConnectionOptions,
        known: KnownHosts, tunnel: asyncssh.SSHClientConnection | None, *, jump: bool,
    ) -> asyncssh.SSHClientConnection:
        """Connect to ``host`` (through ``tunnel``), its key checked in ``known``."""
        p = self.params
        where = f"{p.label}: jump host {host}" if jump else p.label
        offered = _OfferedKey()
        try:
            return await asyncssh.connect(
                host, tunnel=tunnel, known_hosts=known.matcher(resolved.host_key_alias),
                client_factory=lambda: offered, **opts)
        except asyncssh.HostKeyNotVerifiable as exc:
            key = offered.key
            if key is None:  # a revoked key is refused before the client is asked
                with contextlib.suppress(HostUnreachableError):
                    key = await fetch_host_key(host, opts.get("port"), p.connect_timeout,
                                               tunnel=tunnel)
            state = known.state(resolved.host, resolved.port, key,
                                alias=resolved.host_key_alias)
            failure: Failure = "revoked" if state == "revoked" or "revoked" in exc.reason \
                else "unknown" if state == "unknown" else "changed"
            raise await host_key_error(
                p, host=resolved.host, port=resolved.port, name=resolved.host_key_alias,
                failure=failure, fingerprint_=fingerprint(key) if key else "",
                known_hosts=known.files, jump=jump,
            ) from None
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise self._failed(exc, where) from None

    async def _via(self, spec: object, known: KnownHosts, depth: int = 0
                   ) -> asyncssh.SSHClientConnection | None:
        """Connect through the ProxyJump hops ``spec`` (``[user@]host[:port],...``),
        each checked against ``known`` as the target is (asyncssh's own ProxyJump
        would check them against their own known_hosts, or not at all).

        As OpenSSH does, the first hop's own ProxyJump is followed; later
        hops are reached through the hop before them.

        Returns:
            The last hop's connection (which closes the others), or None.
        """
        if not isinstance(spec, str) or not spec.strip():
            return None
        if depth > 8:
            raise ConfigError(f"{self.params.label}: ProxyJump chain deeper than 8 (a loop?)")
        conn: asyncssh.SSHClientConnection | None = None
        try:
            for hop in spec.split(","):
                user, host, port = _parse_jump(hop)
                opts = self._base_options()
                if user:
                    opts["username"] = user
                if port:
                    opts["port"] = port
                resolved = await self._resolve(host, opts, f"{self.params.label}: jump host {host}")
                if conn is None:
                    conn = await self._via(resolved.tunnel, known, depth + 1)
                new = await self._connect_checked(host, opts, resolved, known, conn, jump=True)
                if conn is not None:
                    new.set_tunnel(conn)
                conn = new
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    async def _connect_once(self) -> asyncssh.SSHClientConnection:
        p = self.params
        await self.ensure_credentials()  # a short-lived certificate: renewed first
        opts = self._connect_options()
        resolved = await self._resolve(p.host, opts, p.label)
        known = self._known_hosts(resolved)
        hops = await self._via(resolved.tunnel, known)
        try:
            conn = await self._connect_checked(p.host, opts, resolved, known, hops, jump=False)
        except BaseException:
            if hops is not None:
                hops.close()
            raise
        if hops is not None:
            conn.set_tunnel(hops)  # closed with the connection
        return conn

    def sftp(self) -> AbstractAsyncContextManager[asyncssh.SFTPClient]:
        """An SFTP client session on the host's connection."""
        return self._sftp()

    @contextlib.asynccontextmanager
    async def _sftp(self) -> AsyncIterator[asyncssh.SFTPClient]:
        conn = await self.connection()
        async with conn.start_sftp_client() as sftp:
            yield sftp

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The host's connection, opened (with retries) on first use.

        Raises:
            HostUnreachableError: after ``connect_attempts`` transient failures.
            AuthenticationError, HostKeyError: at once (not transient).
        """
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            self._conn = None
            delay = self.backoff
            for attempt in range(1, self.connect_attempts + 1):
                try:
                    self._conn = await self._connect_once()
                    return self._conn
                except HostUnreachableError:
                    if attempt == self.connect_attempts:
                        raise
                    log.info("connect to %s failed; retry %d in %.1fs", self.host, attempt, delay)
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay *= 2
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def _lost(self, exc: BaseException) -> HostUnreachableError:
        self._drop()
        return HostUnreachableError(
            f"{self.host}: connection lost: {exc}", host=self.params.host, command_sent=True
        )

    async def _open(self, argv: Sequence[str]) -> asyncssh.SSHClientProcess[bytes]:
        """Open a channel running ``argv``.

        A refused channel (sshd's ``MaxSessions`` reached by other users of
        the connection) is retried on the same connection after a short
        pause; a dead connection is replaced once.  Either way the command
        never started, so retrying is safe.
        """
        command = join(argv)
        refused = 0
        reconnected = False
        while True:
            conn = await self.connection()
            try:
                return await conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                refused += 1
                if refused > 50:
                    raise HostUnreachableError(
                        f"{self.host}: the server keeps refusing channels: {exc.reason}",
                        host=self.params.host,
                    ) from None
                await asyncio.sleep(min(0.02 * refused, 0.5) * (0.5 + random.random()))
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, OSError) as exc:
                self._drop()
                if reconnected:
                    raise HostUnreachableError(
                        f"{self.host}: cannot open a channel: {exc}", host=self.params.host
                    ) from None
                reconnected = True

    @staticmethod
    async def _feed(proc: asyncssh.SSHClientProcess[bytes], stdin: bytes) -> None:
        """Write ``stdin`` then EOF.  A command that exits without reading it all
        (``python3: not found``) closes the channel first: that is no lost
        connection, and its exit status and stderr say what happened."""
        try:
            if stdin:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.write_eof()
        except (BrokenPipeError, ConnectionResetError, asyncssh.ProtocolError):
            pass  # asyncssh: ProtocolError("Channel not open for sending")

    async def run(
        self, argv: Sequence[str], *, stdin: bytes = b"", timeout: float | None = None,
        max_output: int | None = MAX_OUTPUT,
    ) -> CommandResult:
        async def communicate() -> tuple[bytes, bytes]:
            out, err = await read_bounded(proc.stdout, proc.stderr,
                                          max_output=max_output, host=self.host)
            await proc.wait_closed()
            return out, err

        async with self._channels:
            proc = await self._open(argv)
            try:
                await self._feed(proc, stdin)
                out, err = await asyncio.wait_for(communicate(), timeout)
            except TimeoutError:
                proc.close()
                raise HostUnreachableError(
                    f"{self.host}: command timed out after {timeout} s",
                    host=self.params.host, command_sent=True,
                ) from None
            except (asyncssh.Error, OSError) as exc:
                raise self._lost(exc) from None
            finally:
                proc.close()
            status = proc.exit_status
            return CommandResult(status if status is not None and status >= 0 else -1,
                                 out or b"", err or b"")

    async def stream(self, argv: Sequence[str], *, stdin: bytes = b"") -> AsyncIterator[bytes]:
        async with self._channels:
            proc = await self._open(argv)
            try:
                await self._feed(proc, stdin)
                while True:
                    try:
                        chunk = await proc.stdout.read(65536)
                    except (asyncssh.Error, OSError) as exc:
                        raise self._lost(exc) from None
                    if not chunk:
                        break
                    yield chunk
            finally:
                proc.close()

    async def open_session(self, argv: Sequence[str]) -> Session:
        await self._channels.acquire()
        try:
            proc = await self._open(argv)
        except BaseException:
            self._channels.release()
            raise
        return _AsyncSSHSession(self, proc)

    def rsync_args(self, remote_path: str) -> tuple[list[str], str]:
        return ["-e", join(["ssh", *ssh_options(self.params)])], f"{self.params.host}:{remote_path}"

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()


def _parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """``[ssh://][user@]host[:port]`` (host may be ``[v6]``) -> (user, host, port).

    Raises:
        ConfigError: naming the hop.
    """
    s = spec.strip().removeprefix("ssh://")
    user: str | None = None
    if "@" in s:
        user, s = s.rsplit("@", 1)
    port = ""
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = rest.removeprefix(":")
    elif s.count(":") == 1:
        host, port = s.split(":")
    else:
        host = s
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"invalid port in ProxyJump {spec!r}")
    return user or None, check_host(host), int(port) if port else None


class _OfferedKey(asyncssh.SSHClient):
    """Remembers the host key a server offered that known_hosts did not trust;
    acknowledges the server's debug messages at once (see
    :meth:`debug_msg_received`)."""

    def __init__(self) -> None:
        self.key: asyncssh.SSHKey | None = None
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    def debug_msg_received(self, msg: str, lang: str, always_display: bool) -> None:
        """Send the TCP ACK for what has arrived now, not after the delayed-ACK timer.

        Right after authentication, OpenSSH's sshd writes its host keys and
        debug messages (the authorized_keys line's options), then, as a second
        small write, the first channel's confirmation.  sshd leaves Nagle on
        for sessions without a terminal, so that second write waits for the
        ACK of the first, which Linux delays by 40 ms when the client has
        nothing to send: every new connection's first command started 40 ms
        late (bench/RESULTS.md).  TCP_QUICKACK sends the pending ACK now.
        """
        sock = self._conn.get_extra_info("socket") if self._conn is not None else None
        quickack = getattr(socket, "TCP_QUICKACK", None)  # Linux only
        if sock is not None and quickack is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.key = key
        return False


class _AsyncSSHSession(Session):
    """A long-running channel; its stderr is drained into a small tail buffer."""

    def __init__(self, transport: AsyncSSHTransport, proc: asyncssh.SSHClientProcess[bytes]):
        self._t = transport
        self._proc = proc
        self._err = bytearray()
        self._closed = False
        self._err_task = asyncio.ensure_future(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        try:
            while chunk := await self._proc.stderr.read(65536):
                self._err += chunk
                del self._err[:-8192]
        except (asyncssh.Error, OSError):
            pass

    async def read(self) -> bytes:
        try:
            return await self._proc.stdout.read(262144)
        except (asyncssh.Error, OSError) as exc:
            raise self._t._lost(exc) from None

    async def write(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        except (asyncssh.Error, OSError) as exc:
            raise self._t._lost(exc) from None

    def stderr_tail(self) -> bytes:
        return bytes(self._err)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._proc.close()
        self._err_task.cancel()
        self._t._channels.release()
