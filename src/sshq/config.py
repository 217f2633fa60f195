"""Platforms: where jobs go and how to reach them.

The platforms file is TOML (the user config dir, ``platforms.toml``; the CLI
also honours ``SSHQ_CONFIG`` and ``--config``)::

    [platforms.mycluster]
    hosts = ["login1.example.org", "login2.example.org"]   # tried in order
    port = 22
    user = "me"
    identity_file = "~/.ssh/id_ed25519"
    known_hosts = "~/.ssh/known_hosts"
    job_runner = "slurm"          # slurm | pbs | sge | lsf | htcondor | background
    run_dir = "~/sshq-run"        # remote; absolute once resolved by remote-init
    transport = "asyncssh"        # asyncssh | openssh | local
    python = "python3"            # remote interpreter for the agent (3.6+)
    login_shell = false           # true: run the agent from `bash -l` (modules, PATH)
    path_prepend = []             # remote dirs put before PATH, e.g. ["/opt/slurm/bin"]
    min_poll_interval = 10        # seconds between job runner status queries per host
    container_runtime = "apptainer"  # apptainer | singularity | podman (--container-image)
    agent = "shipped"             # installed: run ~/.sshq's agent (`sshq agent install`)
    certificate_file = "~/.ssh/id_ed25519-cert.pub"  # an SSH user certificate for identity_file
    identity_command = ["step", "ssh", "login"]  # renews key and certificate (no shell)
    certificate_min_validity = 60  # seconds a certificate must have left, else renewed

Every key is optional; ``hosts`` defaults to ``[NAME]`` (an ~/.ssh/config
alias works).  The built-in platform ``localhost`` (transport ``local``,
job runner ``background``) needs no configuration.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from .exceptions import ConfigError
from .job_runners import HANDLERS
from .jobscript.container import CONTAINER_RUNTIMES
from .transport import TRANSPORTS, HostParams, check_host

__all__ = ["Platform", "Config", "load_config", "default_config_path", "default_state_dir"]

APP = "sshq"


def default_config_path() -> Path:
    """``<user config dir>/sshq/platforms.toml`` (platformdirs)."""
    return Path(platformdirs.user_config_dir(APP)) / "platforms.toml"


def default_state_dir() -> Path:
    """``<user state dir>/sshq`` (platformdirs)."""
    return Path(platformdirs.user_state_dir(APP))


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    """One platform: a set of equivalent login hosts and a job runner.

    Attributes:
        name: the platform's name.
        hosts: login hosts, tried in order; one that fails to connect is
            skipped for ``bad_host_seconds``.
        port, user, identity_file, known_hosts: SSH settings (None: from
            ~/.ssh/config or defaults).
        job_runner: job runner name, one of
            :data:`sshq.job_runners.JOB_RUNNERS`: ``slurm``, ``pbs``,
            ``sge``, ``lsf``, ``htcondor`` or ``background`` (the default:
            detached processes on the login host).
        run_dir: the remote run directory (``~`` allowed).
        transport: ``asyncssh``, ``openssh`` or ``local``.
        python: the remote Python 3.6+ that runs the agent.
        connect_timeout: seconds.
        bad_host_seconds: how long a failing host is skipped, in seconds.
        batch_mode: openssh only; False lets ssh prompt (MFA).
        submit_concurrency: concurrent job runner submissions in the agent.
        container_runtime: what runs a job's ``container_image``:
            ``apptainer`` (default), ``singularity`` or ``podman``.
        login_shell: start the agent from ``bash -l`` so that it sees a login
            environment (module systems, PATH to the job runner's commands).
        path_prepend: absolute remote directories put before PATH for the
            job runner's commands (e.g. ``/opt/slurm/bin``).
        min_poll_interval: seconds between two job runner status queries on
            one host, however many sshq processes poll (job status files are
            read on every poll).
        agent: ``shipped`` (default: the agent travels with every call) or
            ``installed``: the agent ``sshq agent install`` put in ``~/.sshq``
            runs, and only requests are sent; the platform is treated as
            restricted (the key's forced command may refuse anything but job
            management under the run directory): direct farms, ``farm
            find``/``killall`` and ssh-to-job are refused before connecting.
        certificate_file: an OpenSSH user certificate for ``identity_file``
            (short-lived, signed by a site CA).
        identity_command: a local command (argv, run without a shell) that
            renews ``identity_file`` and ``certificate_file``; run before a new
            connection when the certificate is missing or has less than
            ``certificate_min_validity`` seconds left.
        certificate_min_validity: seconds, see ``identity_command``.
    """

    name: str
    hosts: tuple[str, ...]
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    job_runner: str = "background"
    run_dir: str = "~/sshq-run"
    transport: str = "asyncssh"
    python: str = "python3"
    connect_timeout: float = 10.0
    bad_host_seconds: float = 300.0
    batch_mode: bool = True
    submit_concurrency: int = 4
    login_shell: bool = False
    container_runtime: str = "apptainer"
    path_prepend: tuple[str, ...] = ()
    min_poll_interval: float = 10.0
    agent: str = "shipped"
    certificate_file: str | None = None
    identity_command: tuple[str, ...] = ()
    certificate_min_validity: float = 60.0

    @property
    def restricted(self) -> bool:
        """True when the platform's agent is installed (its key may be restricted)."""
        return self.agent == "installed"

    def host_params(self, host: str) -> HostParams:
        """Connection parameters for one of the platform's hosts."""
        return HostParams(
            host=host,
            port=self.port,
            user=self.user,
            identity_file=self.identity_file,
            known_hosts=self.known_hosts,
            connect_timeout=self.connect_timeout,
            certificate_file=self.certificate_file,
            identity_command=self.identity_command,
            certificate_min_validity=self.certificate_min_validity,
        )


LOCALHOST = Platform(name="localhost", hosts=("localhost",), transport="local",
                     job_runner="background")

_KEYS = {
    "hosts", "port", "user", "identity_file", "known_hosts", "job_runner", "run_dir",
    "transport", "python", "connect_timeout", "bad_host_seconds", "batch_mode",
    "submit_concurrency", "login_shell", "path_prepend", "min_poll_interval",
    "container_runtime", "agent", "certificate_file", "identity_command",
    "certificate_min_validity",
}

#: Values of a platform's ``agent`` key.
AGENT_MODES = ("shipped", "installed")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The loaded configuration.

    Attributes:
        platforms: by name, ``localhost`` always included.
        path: the file it came from (None: none existed).
    """

    platforms: Mapping[str, Platform] = field(default_factory=dict)
    path: Path | None = None

    def platform(self, name: str) -> Platform:
        """The named platform.

        Raises:
            ConfigError: no such platform (the message lists the known ones).
        """
        try:
            return self.platforms[name]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise ConfigError(
                f"unknown platform {name!r}{where}; known: {', '.join(sorted(self.platforms))}"
            ) from None


def _expand(path: Any, what: str) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what} must be a path string")
    return os.path.expanduser(path)


def _platform(name: str, table: Any, source: str) -> Platform:
    where = f"{source}: [platforms.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    hosts = table.get("hosts", [name])
    if isinstance(hosts, str):
        hosts = [hosts]
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ConfigError(f"{where}: hosts must be a non-empty list of strings")
    for h in hosts:
        try:
            check_host(h)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    kw: dict[str, Any] = {"name": name, "hosts": tuple(hosts)}
    for key in ("user", "run_dir", "python"):
        if key in table:
            if not isinstance(table[key], str) or not table[key]:
                raise ConfigError(f"{where}: {key} must be a non-empty string")
            kw[key] = table[key]
    for key in ("identity_file", "known_hosts", "certificate_file"):
        if key in table:
            kw[key] = _expand(table[key], f"{where}: {key}")
    if "port" in table:
        port = table["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"{where}: port must be an integer 1-65535")
        kw["port"] = port
    runner = table.get("job_runner", "background")
    if not isinstance(runner, str) or runner not in HANDLERS:
        raise ConfigError(
            f"{where}: unknown job_runner {runner!r}; known: {', '.join(sorted(HANDLERS))}"
        )
    kw["job_runner"] = runner
    transport = table.get("transport", "local" if name == "localhost" else "asyncssh")
    if not isinstance(transport, str) or transport not in TRANSPORTS:
        raise ConfigError(
            f"{where}: unknown transport {transport!r}; known: {', '.join(TRANSPORTS)}"
        )
    kw["transport"] = transport
    runtime = table.get("container_runtime", "apptainer")
    if runtime not in CONTAINER_RUNTIMES:
        raise ConfigError(f"{where}: unknown container_runtime {runtime!r}; known:"
                          f" {', '.join(CONTAINER_RUNTIMES)}")
    kw["container_runtime"] = runtime
    for key in ("connect_timeout", "bad_host_seconds", "min_poll_interval",
                "certificate_min_validity"):
        if key in table:
            v = table[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}: {key} must be a number of seconds")
            kw[key] = float(table[key])
    if "path_prepend" in table:
        dirs = table["path_prepend"]
        if isinstance(dirs, str):
            dirs = [dirs]
        if (not isinstance(dirs, list) or not all(isinstance(d, str) and d.startswith("/")
                                                   and ":" not in d for d in dirs)):
            raise ConfigError(f"{where}: path_prepend must be a list of absolute paths"
                              " without ':'")
        kw["path_prepend"] = tuple(dirs)
    for key in ("batch_mode", "login_shell"):
        if key in table:
            if not isinstance(table[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false")
            kw[key] = table[key]
    if "submit_concurrency" in table:
        n = table["submit_concurrency"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}: submit_concurrency must be a positive integer")
        kw["submit_concurrency"] = n
    kw.update(_credentials_and_agent(table, where, kw))
    return Platform(**kw)


def _credentials_and_agent(table: dict[str, Any], where: str,
                           kw: dict[str, Any]) -> dict[str, Any]:
    """The ``agent``, ``certificate_file`` and ``identity_command`` keys, checked."""
    out: dict[str, Any] = {}
    agent = table.get("agent", "shipped")
    if agent not in AGENT_MODES:
        raise ConfigError(f"{where}: agent must be one of {', '.join(AGENT_MODES)},"
                          f" not {agent!r}")
    ssh = kw["transport"] != "local"
    if agent == "installed" and not ssh:
        raise ConfigError(f"{where}: agent = \"installed\" needs an SSH transport")
    out["agent"] = agent
    if "identity_command" in table:
        cmd = table["identity_command"]
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)  # a command line read as words, never run by a shell
        if (not isinstance(cmd, list) or not cmd
                or not all(isinstance(w, str) and w and "\0" not in w for w in cmd)):
            raise ConfigError(f"{where}: identity_command must be a non-empty list of"
                              " strings (a command and its arguments; no shell runs it)")
        out["identity_command"] = (os.path.expanduser(cmd[0]), *cmd[1:])
    if ("certificate_file" in kw or "identity_command" in out) and not ssh:
        raise ConfigError(f"{where}: certificate_file and identity_command need an SSH"
                          " transport")
    if "identity_command" in out and "certificate_file" not in kw:
        raise ConfigError(f"{where}: identity_command needs certificate_file (the"
                          " certificate it renews)")
    if "certificate_file" in kw and not kw.get("identity_file"):
        raise ConfigError(f"{where}: certificate_file needs identity_file (the key it"
                          " certifies)")
    return out


def parse_config(text: str, source: str = "<string>") -> dict[str, Platform]:
    """Parse platforms TOML text.

    Raises:
        ConfigError: invalid TOML or an invalid platform table.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    unknown = set(data) - {"platforms"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    tables = data.get("platforms", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: [platforms] must be a table")
    return {name: _platform(name, t, source) for name, t in tables.items()}


def load_config(path: str | Path | None = None, *, must_exist: bool = False) -> Config:
    """Load the platforms file.

    Args:
        path: the file; None for :func:`default_config_path`.
        must_exist: raise if the file is missing (an explicit ``--config``).

    Returns:
        The config, with the built-in ``localhost`` unless the file overrides it.

    Raises:
        ConfigError: unreadable or invalid file.
    """
    p = Path(path) if path is not None else default_config_path()
    platforms: dict[str, Platform] = {"localhost": LOCALHOST}
    if not p.exists():
        if must_exist:
            raise ConfigError(f"config file {p} does not exist")
        return Config(platforms=platforms, path=None)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    platforms.update(parse_config(text, str(p)))
    return Config(platforms=platforms, path=p)
