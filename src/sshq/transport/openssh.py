"""The ``openssh`` transport: the system ``ssh`` binary with ControlMaster.

For sites with MFA or Kerberos: the first command authenticates (prompting
on the terminal when ``batch_mode`` is off), later commands reuse the master
connection (``ControlPersist``) without authenticating again.  Options after
Cylc (seed 001): ``-oBatchMode=yes -oConnectTimeout=10``; host keys are
checked strictly (``StrictHostKeyChecking=yes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import Sequence

from ..exceptions import AuthenticationError, ConfigError, HostKeyError, HostUnreachableError
from ..quoting import join
from .base import CommandResult, HostParams, ssh_known_hosts, ssh_options
from .certificates import is_fresh
from .hostkeys import Failure, host_key_error, known_hosts_entry_name, split_entry_name
from .ssh_config import private_dir
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
# ssh's last words on a host key that failed strict checking (whichever hop's
# ssh said them), naming the host as it is looked up in known_hosts.
_NAME = r"[A-Za-z0-9_.:\[\]%-]{1,300}"
_KEY_FAILED_RE = re.compile(
    rf"^(?:No \S+ host key is known for (?P<unknown>{_NAME})"
    rf"|Host key for (?P<changed>{_NAME}) has changed"
    rf"|\S+ host key for (?P<revoked>{_NAME}) was revoked)"
    r" and you have requested strict checking\.\r?$",
    re.MULTILINE,
)
# The changed-key warning shows the offered key; ``ssh -v`` shows it always.
_OFFERED_RE = re.compile(r"key sent by the remote host is\r?\n(SHA256:[A-Za-z0-9+/]{43})\.")
# How the ssh that reached the target through a proxy (ProxyJump) says the hop
# closed the connection; the hop's ssh's own words are lost under a ControlMaster.
_PROXY_CLOSED_RE = re.compile(r"^Connection closed by UNKNOWN port \d+\r?$", re.MULTILINE)
_SERVER_KEY_RE = re.compile(r"^debug1: Server host key: \S+ (SHA256:[A-Za-z0-9+/]{43})\r?$",
                            re.MULTILINE)


def _offered(verbose: str, name: str) -> str:
    """The fingerprint that ``name`` offered, from ``ssh -v``'s stderr: the last
    "Server host key" line before ssh's verdict on ``name``; ``""`` if none."""
    for m in _KEY_FAILED_RE.finditer(verbose):
        if name in (m["unknown"], m["changed"], m["revoked"]):
            seen = _SERVER_KEY_RE.findall(verbose, 0, m.start())
            return seen[-1] if seen else ""
    return ""


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
    return private_dir(os.path.join(tempfile.gettempdir(), f"sshq-cm-{os.getuid()}"))


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

    async def _spawn(self, argv: Sequence[str]) -> asyncio.subprocess.Process:
        await self.ensure_credentials()
        return await super()._spawn(argv)

    async def ensure_credentials(self) -> None:
        """As :meth:`Transport.ensure_credentials`, only when a new connection
        is coming: a live ControlMaster authenticated already, and keeps
        working after its certificate expires."""
        if is_fresh(self.params) or await self._master_alive():
            return
        await super().ensure_credentials()

    async def _master_alive(self) -> bool:
        """Whether the host's ControlMaster runs (``ssh -O check``)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "ssh", *self.ssh_options(), "-O", "check", "--", self.params.host,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError:
            return False
        try:
            return await asyncio.wait_for(proc.wait(), 30) == 0
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return False

    async def check_result(self, result: CommandResult) -> CommandResult:
        """Tell ssh's own failures (exit 255 with an ssh message) from the command's.

        ssh exits 255 both on its own errors and when the remote command
        exits 255 or dies of a signal; only ssh's messages tell them apart.
        A ControlMaster sends what a ProxyJump hop's ssh says to /dev/null:
        when the hop closed the connection, the attempt is repeated once, as
        strictly, with ``ssh -v`` and no master, to learn why.
        """
        if result.exit_status != 255:
            return result
        err = result.stderr.decode("utf-8", "replace")
        host = self.params.host
        verbose: str | None = None
        if _PROXY_CLOSED_RE.search(err) and not _HOSTKEY_RE.search(err):
            verbose = await self._verbose_attempt()
            said = "\n".join(line for line in verbose.splitlines()
                             if not line.startswith(("debug", "OpenSSH_")))
            if said.strip():  # the same failure, with the hop's own words
                err = said
        if _HOSTKEY_RE.search(err):
            raise await self._host_key_error(err, verbose)
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

    async def _host_key_error(self, err: str, verbose: str | None) -> HostKeyError:
        """The error for ssh's host-key failure ``err``, naming the host (the
        target or a ProxyJump hop) whose key failed and the key it offered.

        ssh names the host; it shows the offered key only for a changed one.
        Otherwise the key is read from ``verbose`` (``ssh -v``'s stderr, which
        shows every hop's key before judging it), made now if not given.
        """
        p = self.params
        files = ssh_known_hosts(p)
        failed = list(_KEY_FAILED_RE.finditer(err))
        if not failed:
            return await host_key_error(p, known_hosts=files)
        m = failed[-1]
        failure: Failure = "unknown" if m["unknown"] else "changed" if m["changed"] else "revoked"
        name = m["unknown"] or m["changed"] or m["revoked"]
        offered = _OFFERED_RE.findall(err)
        if failure == "changed" and offered:
            fp = offered[-1]
        else:
            fp = _offered(verbose if verbose is not None else await self._verbose_attempt(),
                          name)
        host, port = split_entry_name(name)
        jump = name not in await self._target_names()
        return await host_key_error(p, host=host, port=port, name=name, failure=failure,
                                    fingerprint_=fp, known_hosts=files, jump=jump)

    async def _run_ssh(self, args: Sequence[str], timeout: float) -> tuple[str, str]:
        """Run the local ``ssh`` with ``args`` (no stdin): its stdout and stderr
        (their last 256 KiB); empty if it could not run or took longer than
        ``timeout`` seconds."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "ssh", *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError:
            return "", ""
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return "", ""
        return (out[-262144:].decode("utf-8", "replace"),
                err[-262144:].decode("utf-8", "replace"))

    async def _verbose_attempt(self) -> str:
        """``ssh -v``'s stderr for one more attempt with the same strict options
        (batch mode: no prompts; no master, so every hop's ssh is heard).  The
        command is ``true``: it runs only if the attempt now succeeds."""
        p = self.params
        _, err = await self._run_ssh(
            [*ssh_options(p, batch_mode=True), "-v", "-o", "ControlMaster=no",
             "-o", "ControlPath=none", "-T", "--", p.host, "true"],
            timeout=3 * p.connect_timeout + 10)
        return err

    async def _target_names(self) -> set[str]:
        """The names ssh may look the target up by (``ssh -G``: HostName and
        port, HostKeyAlias)."""
        out, _ = await self._run_ssh(["-G", *ssh_options(self.params), "--", self.params.host],
                                     timeout=30)
        values = dict(line.partition(" ")[::2] for line in out.splitlines())
        port = int(values["port"]) if values.get("port", "").isdigit() else None
        return {known_hosts_entry_name(values.get("hostname", self.params.host), port),
                values.get("hostkeyalias", "")} - {""}

    def interactive_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ssh", "-t", *self.ssh_options(), "--", self.params.host, join(argv)]

    def rsync_args(self, remote_path: str) -> tuple[list[str], str]:
        return ["-e", join(["ssh", *self.ssh_options()])], f"{self.params.host}:{remote_path}"

    async def close(self) -> None:
        # Leave the master running for ControlPersist: that is its purpose.
        return None
