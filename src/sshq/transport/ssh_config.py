"""The ``ssh -F`` file that makes every ProxyJump hop as strict as the target.

OpenSSH passes none of the ``-o`` options of the command line to the ssh it
starts for a ProxyJump host: that ssh is run as ``ssh [-l user] [-p port]
[-J rest] [-F file] [-v] -W host:port jumphost`` and reads ~/.ssh/config,
where the jump host's section may say ``StrictHostKeyChecking accept-new``,
``no``, or ``UserKnownHostsFile /dev/null``.  The ``-F`` file *is* passed on,
to every hop of a chain, and in an ssh config the first value read wins.  So
sshq gives ssh a file of its own that sets host-key checking (strict, with
the target's known_hosts) and ``BatchMode`` first, then includes
``~/.ssh/config`` and ``/etc/ssh/ssh_config`` for everything else: aliases,
users, keys and ProxyJump itself work as before, on every hop.

Included files are checked for safe permissions by ssh itself, as the files
it reads by default are.  One difference remains: a relative ``Include``
inside /etc/ssh/ssh_config is looked up in ~/.ssh (Debian's is absolute).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Sequence

from ..exceptions import ConfigError

__all__ = ["known_hosts_files", "private_dir", "strict_config"]

# (cmdline, host, batch_mode, known_hosts) -> (the file's text, the user known_hosts
# files it sets); one ssh -G per key and process.
_resolved: dict[tuple[tuple[str, ...], str, bool, str | None], tuple[str, list[str]]] = {}


def private_dir(path: str | None = None) -> str:
    """A directory only this user can enter: ``path``, or ``$TMPDIR/sshq-<uid>``.

    Raises:
        ConfigError: it exists but is not a private directory of this user.
    """
    d = path or os.path.join(tempfile.gettempdir(), f"sshq-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{d} is not a private directory of this user; remove it")
    return d


def _value(path: str) -> str:
    """``path`` as one ssh config value (quoted; ``%`` escaped from token expansion)."""
    if '"' in path or "\n" in path:
        raise ConfigError(f"known_hosts path {path!r} cannot be written in an ssh config")
    return '"' + path.replace("%", "%%") + '"'


def _text(known_hosts: Sequence[str] | None, global_known_hosts: Sequence[str] | None,
          batch_mode: bool) -> str:
    lines = [
        "# Written by sshq and given to ssh with -F, which passes it on to the ssh of",
        "# every ProxyJump hop: host keys are checked on every hop as on the target,",
        "# against the same known_hosts. The first value read wins.",
        "StrictHostKeyChecking yes",
        f"BatchMode {'yes' if batch_mode else 'no'}",
    ]
    for option, files in (("UserKnownHostsFile", known_hosts),
                          ("GlobalKnownHostsFile", global_known_hosts)):
        if files:
            words = ["none"] if list(files) == ["none"] else [_value(f) for f in files]
            lines.append(f"{option} {' '.join(words)}")
    lines += ["Include ~/.ssh/config", "Include /etc/ssh/ssh_config", ""]
    return "\n".join(lines)


def _write(text: str) -> str:
    """The file holding ``text`` (named by its hash, in the private directory)."""
    d = private_dir()
    path = os.path.join(d, f"ssh-{hashlib.sha256(text.encode()).hexdigest()[:20]}.conf")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return path


def _resolved_known_hosts(base: str, cmdline: Sequence[str], host: str
                          ) -> tuple[list[str], list[str]]:
    """The target's UserKnownHostsFile and GlobalKnownHostsFile, as ``ssh -G`` says.

    Raises:
        ConfigError: ssh cannot read its configuration, or prints a list that
            cannot be split into paths (a path with a space).
    """
    try:
        out = subprocess.run(["ssh", "-G", "-F", base, *cmdline, "--", host],
                             capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{host}: cannot run ssh -G: {exc}") from None
    if out.returncode != 0:
        err = out.stderr.decode("utf-8", "replace").strip().replace("\n", "; ")
        raise ConfigError(f"{host}: ssh cannot read its configuration: {err}")
    found: dict[str, list[str]] = {}
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        key, _, rest = line.partition(" ")
        if key in ("userknownhostsfile", "globalknownhostsfile"):
            files = rest.split()
            if files != ["none"] and not all(f.startswith("/") for f in files):
                raise ConfigError(
                    f"{host}: cannot tell the paths in ssh's {key} {rest!r} apart; set"
                    " known_hosts in the platform")
            found[key] = files
    return found.get("userknownhostsfile", []), found.get("globalknownhostsfile", [])


def strict_config(cmdline: Sequence[str], host: str, *, batch_mode: bool,
                  known_hosts: str | None) -> str:
    """The ``-F`` file for reaching ``host`` with the ssh options ``cmdline``.

    Every hop is checked strictly against the target's known_hosts:
    ``known_hosts`` if given, else what the user's ssh config says for
    ``host`` (asked of ``ssh -G`` once per process).

    Args:
        cmdline: the other ssh options (they can select ``Match`` blocks).
        host: the destination as given to ssh.
        batch_mode: ``BatchMode`` for every hop.
        known_hosts: the platform's known_hosts file, if it sets one.

    Returns:
        The file's path (mode 0600, in :func:`private_dir`); rewritten if
        something removed it.

    Raises:
        ConfigError: see :func:`private_dir` and ``ssh -G`` above.
    """
    return _write(_resolve(cmdline, host, batch_mode, known_hosts)[0])


def known_hosts_files(cmdline: Sequence[str], host: str, *, batch_mode: bool,
                      known_hosts: str | None) -> list[str]:
    """The known_hosts files that :func:`strict_config` sets for every hop
    (``[]`` for ``UserKnownHostsFile none``).

    Raises:
        ConfigError: as :func:`strict_config`.
    """
    return _resolve(cmdline, host, batch_mode, known_hosts)[1]


def _resolve(cmdline: Sequence[str], host: str, batch_mode: bool, known_hosts: str | None
             ) -> tuple[str, list[str]]:
    key = (tuple(cmdline), host, batch_mode, known_hosts)
    found = _resolved.get(key)
    if found is None:
        if known_hosts is not None:
            found = _text([known_hosts], None, batch_mode), [known_hosts]
        else:
            base = _write(_text(None, None, batch_mode))
            user, system = _resolved_known_hosts(base, cmdline, host)
            found = _text(user, system, batch_mode), [] if user == ["none"] else user
        _resolved[key] = found
    return found
