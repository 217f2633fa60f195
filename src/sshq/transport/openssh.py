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
import stat
import tempfile
from collections.abc import Sequence

from ..exceptions import AuthenticationError, ConfigError, HostUnreachableError
from ..quoting import join
from .base import CommandResult, HostParams, ssh_options
from .hostkeys import host_key_error
from .subprocess_base import SubprocessTransport

__all__ = ["OpenSSHTransport"]

# ssh's messages for failures before any command could start.
_CONNECT_RE = re.compile(
    r"Connection refused|Connection timed out|timed out during banner|Could not resolve"
    r"|No route to host|Network is unreachable|Connection closed by .* port \d+$",
    re.MULTILINE,
)
# Any other message of ssh's own (the remote command's stderr rarely looks so).
_SSH_ERROR_RE = re.compile(
    r"^(ssh|mux_client_\w+|ControlSocket|kex_exchange_identification|ssh_exchange_identification"
    r"|Connection (closed|reset|to .* closed)|Broken pipe|client_loop|packet_write)",
    re.MULTILINE,
)
_HOSTKEY_RE = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|host key is known"
)


def socket_dir(preferred: str) -> str:
    """A private directory for ControlMaster sockets, short enough for them.

    Unix socket paths are limited to about 104 bytes and ``%C`` takes 40; a
    longer ``preferred`` falls back to ``$TMPDIR/sshq-cm-<uid>``.

    Raises:
        ConfigError: the fallback exists but is not a private directory of ours.
    """
    if len(preferred) + 42 <= 100:
        os.makedirs(preferred, mode=0o700, exist_ok=True)
        return preferred
    d = os.path.join(tempfile.gettempdir(), f"sshq-cm-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{d} is not a private directory of this user; remove it")
    return d


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
        self.control_dir = socket_dir(control_dir)
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
        """Tell ssh's own failures (exit 255 with an ssh message) from the command's.

        ssh exits 255 both on its own errors and when the remote command
        exits 255 or dies of a signal; only ssh's messages tell them apart.
        """
        if result.exit_status != 255:
            return result
        err = result.stderr.decode("utf-8", "replace")
        host = self.params.host
        if _HOSTKEY_RE.search(err):
            raise await host_key_error(self.params)
        if "Permission denied" in err:
            raise AuthenticationError(f"{self.host}: authentication refused: {err.strip()}",
                                      host=host)
        if "ControlPath too long" in err or "too long for Unix domain socket" in err:
            raise ConfigError(f"{self.host}: {err.strip()} (control_dir {self.control_dir})")
        if _CONNECT_RE.search(err):
            raise HostUnreachableError(f"{self.host}: {err.strip()}", host=host)
        if _SSH_ERROR_RE.search(err):
            raise HostUnreachableError(f"{self.host}: {err.strip()}", host=host,
                                       command_sent=True)
        return result

    def interactive_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ssh", "-t", *self.ssh_options(), "--", self.params.host, join(argv)]

    def rsync_args(self, remote_path: str) -> tuple[list[str], str]:
        return ["-e", join(["ssh", *self.ssh_options()])], f"{self.params.host}:{remote_path}"

    async def close(self) -> None:
        # Leave the master running for ControlPersist: that is its purpose.
        return None
