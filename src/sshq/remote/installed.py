"""The installed agent and restricted keys: what ``sshq agent install`` puts on a
platform, the ``authorized_keys`` line it prints, and the client's own checks.

A key in ``~/.ssh/authorized_keys`` behind the line::

    restrict,command="/usr/bin/python3 /home/me/.sshq/sshq-agent --restricted
    --run-dir /home/me/sshq-run" ssh-ed25519 AAAA... sshq

(one line) can run nothing but the installed agent, which reads what the
client asked from ``SSH_ORIGINAL_COMMAND`` and serves only job management
under the run directory (:mod:`sshq.shipped.sshq_restricted` says exactly
what).  A platform with ``agent = "installed"`` sends such an agent only its
requests (:mod:`sshq.remote.protocol`), and is treated as restricted by the
client: operations the agent would refuse are refused before connecting
(:func:`refuse_if_restricted`).

The install (:func:`install_agent`) is one agent call through the *shipped*
agent, so it needs a key that is not restricted: the files of
:func:`bundle`, each with its sha256, are written aside on the platform,
checked, and swapped into place with one rename (idempotent: the same files
change nothing).  The job runner commands the restricted agent may run
(:func:`runner_table`) are written there too, from this client's job runner
handlers: a request's commands are compared with them, never run from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from ..config import Platform
from ..exceptions import ConfigError, InvalidInputError, RemoteError, RestrictedPlatformError
from ..job_runners import HANDLERS
from ..quoting import join
from ..shipped import sshq_jobstatus as js
from ..shipped.sshq_restricted import (
    AGENT_MODULE,
    DISPATCHER_MODULE,
    ENTRY,
    FARM_WORKER,
    INSTALL_DIR,
    LOG_DIR_PLACEHOLDER,
    PROTOCOL,
    RUNNERS_FILE,
)
from ..transport import Transport
from .operations import call_agent
from .protocol import shipped_file

__all__ = ["AgentInstallation", "authorized_keys_line", "bundle", "bundle_version",
           "install_agent", "install_platform", "installed_worker_command", "read_public_key",
           "refuse_if_restricted", "refuse_restricted_hosts", "runner_table"]

#: The installed name of each shipped file.
INSTALLED_FILES = {
    f"{AGENT_MODULE}.py": "agent.py",
    f"{DISPATCHER_MODULE}.py": "dispatcher.py",
    "sshq_jobstatus.py": "sshq_jobstatus.py",
    "sshq_procs.py": "sshq_procs.py",
    "sshq_restricted.py": "sshq_restricted.py",
}

#: ``~/.sshq/sshq-agent``: runs sshq_restricted.main beside it.  (Python caches
#: the modules' bytecode in ``__pycache__`` there: a call compiles nothing,
#: which makes it faster than a shipped one.)
ENTRY_SCRIPT = b"""\
# sshq installed agent (written by `sshq agent install`, which replaces it).
# What it does and refuses: sshq_restricted.py beside it.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import sshq_restricted  # noqa: E402

sys.exit(sshq_restricted.main(sys.argv[1:]))
"""


def runner_table() -> dict[str, dict[str, Any]]:
    """The job runner commands a restricted agent may run, from the handlers.

    Returns:
        ``{runner: {"submit": argv with LOG_DIR_PLACEHOLDER for the job's log
        directory, "stdin": bool, "id_regex", "array_element_id", "poll",
        "kill", "sep", "group": [option prefixes of id words],
        "on_login_node": bool}}``.
    """
    p = LOG_DIR_PLACEHOLDER
    out: dict[str, dict[str, Any]] = {}
    for name, h in sorted(HANDLERS.items()):
        words, _ = h.job_id_parts("1@sshqgroup")  # e.g. Slurm's --clusters=NAME
        out[name] = {
            "submit": h.submit_argv(f"{p}/{js.JOB_FILE}", p),
            "stdin": h.submit_stdin,
            "id_regex": h.job_id_regex,
            "array_element_id": h.array_element_id,
            "poll": list(h.poll_command),
            "kill": list(h.kill_command),
            "sep": h.ids_sep,
            "group": sorted({w.split("=", 1)[0] + "=" for w in words if "=" in w}),
            "on_login_node": h.runs_on_submit_host,
        }
    return out


@cache
def bundle() -> dict[str, bytes]:
    """The installed agent's files: ``{name: bytes}``."""
    files = {name: shipped_file(src) for name, src in INSTALLED_FILES.items()}
    files[ENTRY] = ENTRY_SCRIPT
    files[RUNNERS_FILE] = json.dumps(runner_table(), indent=1, sort_keys=True).encode() + b"\n"
    return files


@cache
def bundle_version() -> str:
    """The installed agent's version: a digest of its files (20 hex digits)."""
    h = hashlib.sha256(b"sshq-agent protocol %d\n" % PROTOCOL)
    for name, data in sorted(bundle().items()):
        h.update(b"%s %s\n" % (name.encode(), hashlib.sha256(data).hexdigest().encode()))
    return h.hexdigest()[:20]


# ---------------------------------------------------------------- the key line

_KEY_TYPES = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)"
    r"|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)\Z")
#: Words of the forced command: nothing that would need quoting, in a shell
#: or in authorized_keys' double quotes.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./+=,:@%-]+\Z")


def read_public_key(path: str | Path) -> str:
    """The ``<type> <base64>`` of an OpenSSH public key file.

    Raises:
        InvalidInputError: unreadable, or not one public key of a known type.
    """
    try:
        words = Path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read the public key {path}: {exc}") from None
    if len(words) < 2 or not _KEY_TYPES.match(words[0]):
        raise InvalidInputError(f"{path} is not an OpenSSH public key (ssh-ed25519 AAAA...)")
    try:
        blob = base64.b64decode(words[1], validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        named = blob[4:4 + n].decode("ascii")
    except (binascii.Error, ValueError, struct.error, UnicodeDecodeError):
        named = ""
    if named != words[0]:
        raise InvalidInputError(f"{path}: the key's data is not a {words[0]} key")
    return f"{words[0]} {words[1]}"


def authorized_keys_line(*, python: str, agent: str, run_dir: str, public_key: str,
                         allow_background: bool = False, path_prepend: Iterable[str] = (),
                         login_shell: bool = False) -> str:
    """The ``authorized_keys`` line that restricts ``public_key`` to the agent.

    Args:
        python: the remote interpreter (absolute).
        agent: the installed entry (``<home>/.sshq/sshq-agent``).
        run_dir: the absolute run directory the key is confined to.
        public_key: ``<type> <base64>``.
        allow_background: let the key submit ``background`` jobs (run on the
            login node).
        path_prepend: directories put before PATH for the job runner's commands.
        login_shell: run the agent in a login environment (``bash -l``).

    Raises:
        ConfigError: a path that would need quoting (spaces, quotes ...).
    """
    words = [python, agent, "--restricted", "--run-dir", run_dir]
    if allow_background:
        words.append("--allow-background")
    for d in path_prepend:
        words += ["--path", d]
    if login_shell:
        words.append("--login-shell")
    for w in words:
        if not _PLAIN_WORD.match(w):
            raise ConfigError(f"{w!r} would need quoting in the key's forced command; use a"
                              " python, home and run directory without spaces or quotes")
    return f'restrict,command="{join(words)}" {public_key} sshq'


# ---------------------------------------------------------------- install


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentInstallation:
    """The outcome of ``sshq agent install`` on one host.

    Attributes:
        platform: platform name.  host: the host installed on.
        home: the remote home directory.  python: the remote interpreter.
        run_dir: the absolute run directory the key is confined to.
        version: :func:`bundle_version`.  protocol: the agent's protocol.
        changed: False when the same files were installed already.
        rrsync: the host has rrsync (without it, a restricted key can
            stage nothing: install and retrieve are refused).
        line: the ``authorized_keys`` line.
    """

    platform: str
    host: str
    home: str
    python: str
    run_dir: str
    version: str
    protocol: int
    changed: bool
    rrsync: bool
    line: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__slots__}


def install_platform(platform: Platform, identity_file: str | None = None) -> Platform:
    """The platform as the install reaches it: the shipped agent, and another
    key if given (the platform's own may be the restricted one)."""
    kw: dict[str, Any] = {"name": f"{platform.name} (install)", "agent": "shipped"}
    if identity_file:
        kw.update(identity_file=identity_file, certificate_file=None, identity_command=())
    return replace(platform, **kw)


def _check_run_dir(host: str, run_dir: str, home: str) -> None:
    """The run dir must be below home, outside ~/.ssh and ~/.sshq."""
    r, h = run_dir.rstrip("/") + "/", home.rstrip("/") + "/"
    if h.startswith(r):
        raise ConfigError(f"{host}: the run directory {run_dir} holds the home directory: a"
                          " restricted key could write ~/.ssh there; choose one below it")
    for d in (".ssh", INSTALL_DIR):
        if r.startswith(f"{h}{d}/"):
            raise ConfigError(f"{host}: the run directory {run_dir} is inside ~/{d}")


async def install_agent(t: Transport, platform: Platform, public_key: str, *,
                        allow_background: bool = False) -> AgentInstallation:
    """Install the agent on one host (through the shipped agent: two calls).

    Args:
        t: a transport to the host with a key that is not restricted.
        platform: the platform (its python, login shell, PATH, run dir).
        public_key: ``<type> <base64>`` (:func:`read_public_key`).
        allow_background: see :func:`authorized_keys_line`.

    Returns:
        What was installed, with the ``authorized_keys`` line.

    Raises:
        TransportError: the host could not be reached.
        RemoteError: the agent failed (e.g. a restricted key: use another).
        ConfigError: an unsuitable run directory or paths needing quotes.
    """
    async def call(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await call_agent(t, platform.python, op, payload, timeout=300,
                                login_shell=platform.login_shell,
                                path_prepend=platform.path_prepend)

    init = await call("init", {"run_dir": platform.run_dir})
    files = {name: {"data_b64": base64.b64encode(data).decode(),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "mode": 0o700 if name == ENTRY else 0o600}
             for name, data in bundle().items()}
    reply = await call("install_agent", {"dir": INSTALL_DIR, "entry": ENTRY,
                                         "version": bundle_version(), "files": files})
    facts = _facts(t.host, init, reply)
    _check_run_dir(t.host, facts["run_dir"], facts["home"])
    line = authorized_keys_line(
        python=facts["python"], agent=f"{facts['home']}/{INSTALL_DIR}/{ENTRY}",
        run_dir=facts["run_dir"], public_key=public_key, allow_background=allow_background,
        path_prepend=platform.path_prepend, login_shell=platform.login_shell)
    return AgentInstallation(
        platform=platform.name.removesuffix(" (install)"), host=t.host, home=facts["home"],
        python=facts["python"], run_dir=facts["run_dir"], version=bundle_version(),
        protocol=PROTOCOL, changed=reply.get("changed") is True,
        rrsync=reply.get("rrsync") is True, line=line)


def _facts(host: str, init: Mapping[str, Any], reply: Mapping[str, Any]) -> dict[str, str]:
    """The absolute home, interpreter and run directory the host reported."""
    out = {"home": reply.get("home"), "python": reply.get("python"),
           "run_dir": init.get("run_dir")}
    for k, v in out.items():
        if not isinstance(v, str) or not v.startswith("/") or "\n" in v:
            raise RemoteError(f"{host}: the agent install reported no absolute {k}")
    if reply.get("version") != bundle_version():
        raise RemoteError(f"{host}: the agent install reported another version")
    return {k: str(v) for k, v in out.items()}


# ---------------------------------------------------------------- pilot jobs


def installed_worker_command(python: str, spool: str) -> str:
    """The shell command of a pilot job (``sshq farm --via``) on a platform
    whose agent is installed: the installed dispatcher's worker on ``spool``
    (``python3 "$HOME"/.sshq/sshq-agent --farm-worker SPOOL``), so that no
    dispatcher source travels.

    Args:
        python: the remote interpreter.
        spool: the spool's absolute path.
    """
    return (f'{join([python])} "$HOME"/{join([f"{INSTALL_DIR}/{ENTRY}"])}'
            f" {join([FARM_WORKER, spool])}")


# ---------------------------------------------------------------- client checks


def refuse_if_restricted(platform: Platform, what: str) -> None:
    """Refuse ``what`` on a platform whose agent is installed (its key may
    only manage jobs), before connecting.

    Raises:
        RestrictedPlatformError: the platform is restricted (an
            :class:`~sshq.exceptions.InvalidInputError`).
    """
    if platform.restricted:
        raise RestrictedPlatformError(
            f"platform {platform.name!r} is restricted (agent = \"installed\"): {what} is"
            " refused; its key may only manage sshq jobs under its run directory")


def refuse_restricted_hosts(platforms: Mapping[str, Platform], specs: Iterable[str],
                            what: str) -> None:
    """:func:`refuse_if_restricted` for each farm host spec naming a platform.

    Raises:
        RestrictedPlatformError: one names a restricted platform.
    """
    for spec in specs:
        plat = platforms.get(spec)
        if plat is not None:
            refuse_if_restricted(plat, what)
