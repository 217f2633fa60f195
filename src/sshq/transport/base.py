"""What a transport is: a way to run an argument vector on a host.

Three transports implement :class:`Transport`: ``asyncssh`` (the default, one
SSH connection per host reused by every operation), ``openssh`` (the system
``ssh`` binary with ControlMaster, for MFA or Kerberos sites) and ``local``
(this machine, no SSH).  One contract test suite runs over all three.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from ..exceptions import CommandError, ConfigError
from ..quoting import join
from .bounded import MAX_OUTPUT
from .ssh_config import known_hosts_files, strict_config

__all__ = ["CommandResult", "HostParams", "Session", "Transport", "check_host",
           "ssh_known_hosts", "ssh_options"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The outcome of one remote command (like ``subprocess.CompletedProcess``).

    Attributes:
        exit_status: the command's exit status; -1 if it died of a signal or
            the server sent none (the ``openssh`` transport reports 255 then,
            as ssh does).
        stdout: standard output, raw bytes.
        stderr: standard error, raw bytes.
    """

    exit_status: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class HostParams:
    """How to reach one host.

    Attributes:
        host: host name, address, or ~/.ssh/config alias.
        port: TCP port; None for ssh config / default 22.
        user: login user; None for ssh config / current user.
        identity_file: private key path; None for ssh config / defaults.
        known_hosts: known_hosts path; None for ~/.ssh/known_hosts.
        connect_timeout: seconds to wait for a connection.
        keepalive_interval: seconds between keepalives on an idle connection.
        certificate_file: an OpenSSH user certificate for ``identity_file``.
        identity_command: argv run (no shell) to renew the key and certificate
            before a connection when the certificate is missing or has less
            than ``certificate_min_validity`` seconds left
            (:mod:`~sshq.transport.certificates`).
        certificate_min_validity: seconds.
    """

    host: str
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = 10.0
    keepalive_interval: float = 15.0
    certificate_file: str | None = None
    identity_command: tuple[str, ...] = ()
    certificate_min_validity: float = 60.0

    @property
    def label(self) -> str:
        """``[user@]host[:port]`` for messages."""
        s = f"{self.user}@{self.host}" if self.user else self.host
        return f"{s}:{self.port}" if self.port else s


def ssh_options(p: HostParams, *, batch_mode: bool = True) -> list[str]:
    """System ``ssh`` options equivalent to ``p`` (everything before the host).

    Strict host key checking always, on every ProxyJump hop too (through the
    ``-F`` file of :func:`~sshq.transport.ssh_config.strict_config`);
    ``BatchMode`` and ``ConnectTimeout`` as in Cylc's remote commands (seed 001).

    Raises:
        ConfigError: ssh cannot read its configuration, or the private
            directory for the ``-F`` file is not private.
    """
    opts = _cmdline_options(p, batch_mode)
    return ["-F", strict_config(opts, p.host, batch_mode=batch_mode,
                                known_hosts=p.known_hosts), *opts]


def ssh_known_hosts(p: HostParams) -> list[str]:
    """The known_hosts files the system ``ssh`` checks every hop against for ``p``.

    Raises:
        ConfigError: as :func:`ssh_options`.
    """
    return known_hosts_files(_cmdline_options(p, True), p.host, batch_mode=True,
                             known_hosts=p.known_hosts)


def _cmdline_options(p: HostParams, batch_mode: bool) -> list[str]:
    opts = [
        "-o", f"BatchMode={'yes' if batch_mode else 'no'}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={int(p.connect_timeout)}",
        "-o", f"ServerAliveInterval={int(p.keepalive_interval)}",
        "-o", "ServerAliveCountMax=3",
    ]
    if p.port:
        opts += ["-p", str(p.port)]
    if p.user:
        opts += ["-l", p.user]
    if p.identity_file:
        opts += ["-i", p.identity_file, "-o", "IdentitiesOnly=yes"]
    if p.certificate_file:
        opts += ["-o", f"CertificateFile={p.certificate_file}"]
    if p.known_hosts:
        opts += ["-o", f"UserKnownHostsFile={p.known_hosts}"]
    return opts


_HOST_RE = re.compile(r"[A-Za-z0-9_.:\[\]%-]+\Z")


def check_host(host: str) -> str:
    """Refuse a host name that could be read as an option or carries odd bytes.

    Raises:
        ConfigError: naming the host.
    """
    if not host or host.startswith("-") or not _HOST_RE.match(host):
        raise ConfigError(f"invalid host name {host!r}")
    return host


class Session(abc.ABC):
    """A running remote command with both directions open (the farm's dispatcher).

    Reads and writes raise :class:`~sshq.exceptions.HostUnreachableError`
    when the connection is lost.
    """

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The next chunk of stdout (up to 256 KiB); ``b""`` at end of file."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Write ``data`` to stdin, waiting while the channel's buffer is full."""

    @abc.abstractmethod
    def stderr_tail(self) -> bytes:
        """The last 8 KiB the command wrote on stderr (for error messages)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the command (closing stdin, then the channel); idempotent."""


class Transport(abc.ABC):
    """Runs argument vectors on one host.

    Implementations quote the argv with :func:`sshq.quoting.join` (the one
    place) when a remote shell is involved.
    """

    #: The transport's name in platform configs.
    name: str = ""
    #: Capabilities, so that callers ask instead of checking classes.
    #: ``is_local``: commands run on this machine (remote paths are local paths).
    is_local: ClassVar[bool] = False
    #: ``has_sftp``: :meth:`sftp` works (file transfer without rsync).
    has_sftp: ClassVar[bool] = False

    def __init__(self, params: HostParams) -> None:
        self.params = params

    @property
    def host(self) -> str:
        """The host label, for messages and the job store."""
        return self.params.label

    async def ensure_credentials(self) -> None:
        """Renew the platform's SSH certificate before a new connection, if it
        is missing or expires soon (:func:`~sshq.transport.certificates.ensure_certificate`);
        nothing without ``certificate_file``.

        Raises:
            AuthenticationError: the certificate expired (saying when) and no
                ``identity_command`` renews it, or the command failed.
            ConfigError: the certificate file cannot be read as one.
        """
        from .certificates import ensure_certificate

        await ensure_certificate(self.params, label=self.host)

    def sftp(self) -> AbstractAsyncContextManager[Any]:
        """An SFTP client session (``async with t.sftp() as sftp``), where
        :attr:`has_sftp`.

        Raises:
            CommandError: this transport has no SFTP.
        """
        raise CommandError(f"{self.host}: the {self.name} transport has no SFTP",
                           host=self.host)

    @abc.abstractmethod
    async def run(
        self, argv: Sequence[str], *, stdin: bytes = b"", timeout: float | None = None,
        max_output: int | None = MAX_OUTPUT,
    ) -> CommandResult:
        """Run ``argv`` to completion.

        Args:
            argv: the program and its arguments, each reaching it byte-exact.
            stdin: bytes fed to the command's standard input, then EOF.
            timeout: seconds before the command is abandoned; None for no limit.
            max_output: cap on stdout in bytes (None: no cap); stderr keeps
                its first :data:`~sshq.transport.bounded.STDERR_KEEP` bytes.

        Returns:
            The exit status and output.

        Raises:
            HostUnreachableError: the host cannot be reached, or the connection
                was lost (transient).
            AuthenticationError: the server refused our credentials.
            HostKeyError: the host key, or a ProxyJump hop's, is unknown, changed
                or revoked.
            RemoteError: stdout passed ``max_output`` (the command is closed).
        """

    @abc.abstractmethod
    def stream(self, argv: Sequence[str], *, stdin: bytes = b"") -> AsyncIterator[bytes]:
        """Run ``argv`` and yield its stdout as it arrives (for ``tail -F``-like use).

        Raises:
            the same errors as :meth:`run`.
        """

    async def open_session(self, argv: Sequence[str]) -> Session:
        """Start ``argv`` with stdin and stdout both left open.

        Raises:
            the same errors as :meth:`run`.
        """
        raise NotImplementedError(f"the {self.name} transport has no sessions")

    def interactive_argv(self, argv: Sequence[str]) -> list[str]:
        """The local argv that runs ``argv`` on the host with a terminal.

        The default (SSH transports) is the system ``ssh -t`` with options
        equivalent to the transport's; the local transport runs ``argv``.
        """
        return ["ssh", "-t", *ssh_options(self.params), "--", self.params.host, join(argv)]

    def rsync_args(self, remote_path: str) -> tuple[list[str], str]:
        """rsync options and the source/destination spelling of ``remote_path``.

        Returns:
            ``(options, location)``: e.g. ``(["-e", "ssh -p 2222 ..."],
            "user@host:/path")``; for a local transport ``([], "/path")``.
        """
        return [], remote_path

    async def close(self) -> None:
        """Close connections (idempotent)."""
