"""The ``openssh`` transport: the system ``ssh`` binary with ControlMaster.

For sites with MFA or Kerberos: the first command authenticates (prompting
on the terminal when ``batch_mode`` is off), later commands reuse the master
connection (``ControlPersist``) without authenticating again.  Options after
Cylc (seed 001): ``-oBatchMode=yes -oConnectTimeout=10``; host keys are
checked strictly (``StrictHostKeyChecking=yes``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ..exceptions import AuthenticationError, HostUnreachableError
from ..quoting import join
from .base import CommandResult, HostParams, ssh_options
from .hostkeys import host_key_error
from .subprocess_base import SubprocessTransport

__all__ = ["OpenSSHTransport"]

# ssh's messages for failures before any command could start.
_CONNECT_RE = re.compile(
    r"Connection refused|Connection timed out|timed out during banner|Could not resolve"
    r"|No route to host|Network is unreachable|Connection closed by .* port \d+$"
)
_HOSTKEY_RE = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|host key is known"
)


class OpenSSHTransport(SubprocessTransport):
    """Runs commands through ``ssh`` with a ControlMaster socket.

    Args:
        params: how to reach the host.
        control_dir: directory for ControlMaster sockets (mode 0700).
        batch_mode: False lets ssh prompt on the terminal (MFA, passwords
            typed by the user; sshq never stores them).
        control_persist: seconds the master lingers after the last command.
    """

    name = "openssh"

    def __init__(
        self,
        params: HostParams,
        *,
        control_dir: str,
        batch_mode: bool = True,
        control_persist: int = 600,
    ) -> None:
        super().__init__(params)
        os.makedirs(control_dir, mode=0o700, exist_ok=True)
        self.control_dir = control_dir
        self.batch_mode = batch_mode
        self.control_persist = control_persist

    def ssh_options(self) -> list[str]:
        """``ssh`` options (everything before the host), with ControlMaster."""
        return [
            *ssh_options(self.params, batch_mode=self.batch_mode),
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self.control_dir}/%C",
            "-o", f"ControlPersist={self.control_persist}",
        ]

    def local_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ssh", *self.ssh_options(), "--", self.params.host, join(argv)]

    async def check_result(self, result: CommandResult) -> CommandResult:
        if result.exit_status != 255:
            return result
        err = result.stderr.decode("utf-8", "replace")
        if _HOSTKEY_RE.search(err):
            raise await host_key_error(self.params)
        if "Permission denied" in err:
            raise AuthenticationError(
                f"{self.host}: authentication refused: {err.strip()}", host=self.host
            )
        before = bool(_CONNECT_RE.search(err))
        raise HostUnreachableError(
            f"{self.host}: {err.strip() or 'ssh failed'}", host=self.host, command_sent=not before
        )

    def rsync_args(self, remote_path: str) -> tuple[list[str], str]:
        return ["-e", join(["ssh", *self.ssh_options()])], f"{self.params.host}:{remote_path}"

    async def close(self) -> None:
        # Leave the master running for ControlPersist: that is its purpose.
        return None
