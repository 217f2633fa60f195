"""Staging: install a source tree into a run directory, bring files back.

After Cylc's remote job management (seed 001): run files travel by rsync
(only changed files; Cylc's excludes), a shared filesystem is detected
through the UUID file remote-init writes (``<run_dir>/.sshq/uuid``) and
proved with a fresh random token written here and read back there, and job
logs come back by rsync.  Where the remote side has no rsync, files go by
SFTP (asyncssh transport), still only those whose size or time changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hmac
import os
import re
import secrets
import shutil
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exceptions import RemoteError
from ..model import JobSpec
from ..transport import Transport

__all__ = [
    "CYLC_EXCLUDES",
    "Installation",
    "SERVICE_DIR",
    "input_files",
    "proves_shared",
    "shared_run_dir",
    "rsync_pull",
    "rsync_push",
    "sftp_push",
]

#: What an install never copies, as Cylc's ``rose suite-run`` (seed 001):
#: hidden files, and the run directory's own log, work and share trees.
CYLC_EXCLUDES = (".*", "/log", "/work", "/share")

#: sshq's own directory under a run directory (remote-init's UUID file); the
#: agent's ``SERVICE_DIR`` (tests/test_install_token.py holds them equal).
SERVICE_DIR = ".sshq"


@dataclass(frozen=True, slots=True, kw_only=True)
class Installation:
    """The outcome of ``install``.

    Attributes:
        platform: platform name.
        host: the host the files went to.
        source: the local source directory.
        remote_dir: the absolute remote destination.
        method: ``rsync``, ``sftp``, ``local`` (shared filesystem or local
            platform: copied without SSH) or ``skipped`` (source is the
            destination).
        shared_filesystem: True when the run directory is the same directory
            here and there, ours (a token written here was read back there:
            :func:`shared_run_dir`).
        files_transferred: regular files copied (0: nothing had changed).
    """

    platform: str
    host: str
    source: str
    remote_dir: str
    method: str
    shared_filesystem: bool
    files_transferred: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__slots__}


async def proves_shared(write: Callable[[bytes], Awaitable[bool]],
                        reads: Sequence[Callable[[], Awaitable[bytes | None]]]) -> bool:
    """Prove a shared file system: the one token probe of sshq.

    A fresh random token (32 ASCII bytes, never sent anywhere but into the
    probe file) is written on one side and must be read back, byte for
    byte, on every other.  A remote side that does not see the file cannot
    produce the token, whatever else it answers.

    Args:
        write: writes the token into the probe file; False if it could not.
        reads: each reads the probe file from one other side; its bytes, or
            None if it could not.

    Returns:
        True when every read returned the token (False without reads).
    """
    if not reads:
        return False
    token = secrets.token_hex(16).encode("ascii")
    if not await write(token):
        return False
    got = await asyncio.gather(*(read() for read in reads))
    return all(g is not None and hmac.compare_digest(g, token) for g in got)


def _own_service_dir(init: dict[str, Any]) -> str | None:
    """The run directory's service directory, if remote-init's reply points
    at one here that is ours and holds the same UUID; None otherwise."""
    try:
        run_dir, uuid_file, uuid = init["run_dir"], init["uuid_file"], init["uuid"]
        if not all(isinstance(v, str) and v for v in (run_dir, uuid_file, uuid)):
            return None
        service = os.path.join(run_dir, SERVICE_DIR)
        if not os.path.isabs(service) or os.path.dirname(uuid_file) != service:
            return None
        for path, kind in ((service, stat.S_ISDIR), (uuid_file, stat.S_ISREG)):
            st = os.lstat(path)
            if not kind(st.st_mode) or st.st_uid != os.getuid():
                return None
        with open(uuid_file, "rb") as fh:
            return service if fh.read(1024).strip() == uuid.encode() else None
    except (OSError, KeyError, TypeError, UnicodeError):
        return None


async def shared_run_dir(init: dict[str, Any],
                         read: Callable[[str], Awaitable[bytes | None]]) -> bool:
    """Whether the run directory remote-init reported is the same directory
    here, ours (seed 001's UUID-file test, proved by :func:`proves_shared`).

    Nothing here is written unless the reply names a service directory
    (``<run_dir>/.sshq``) that exists here, is ours (not a symbolic link)
    and holds a UUID file with the same UUID: a reply naming any other
    directory or file costs no probe and no round trip.  Then a probe file
    (mode 0600, a random name that is not the token) is created there, read
    back through ``read`` and removed.  (The same directory under another
    account is not shared for installing: files copied here would belong to
    the wrong user.)

    Args:
        init: remote-init's reply (``run_dir``, ``uuid_file``, ``uuid``).
        read: reads a remote file (absolute path); its first bytes, or None.

    Returns:
        True when the remote side read back the token written here.
    """
    service = _own_service_dir(init)
    if service is None:
        return False
    name = f"probe-{secrets.token_hex(8)}"
    try:
        dir_fd = os.open(service, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    if os.fstat(dir_fd).st_uid != os.getuid():   # replaced since it was checked
        os.close(dir_fd)
        return False
    created = False

    async def write(token: bytes) -> bool:
        nonlocal created
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=dir_fd)
        except OSError:
            return False
        created = True
        try:
            os.write(fd, token)
        finally:
            os.close(fd)
        return True

    async def read_back() -> bytes | None:
        return await read(os.path.join(service, name))

    try:
        return await proves_shared(write, [read_back])
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
        os.close(dir_fd)


def input_files(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """A job's input files for the agent's submit request.

    Returns:
        ``{base name: {"data_b64": str, "mode": int}}``; ``mode`` is the local
        file's permission bits, which the agent gives the remote copy exactly.
    """
    out: dict[str, dict[str, Any]] = {}
    for p in spec.inputs:
        path = Path(p)
        with path.open("rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            out[path.name] = {"data_b64": base64.b64encode(fh.read()).decode(), "mode": mode}
    return out


async def _run_rsync(argv: list[str], host: str) -> str:
    if shutil.which("rsync") is None:
        raise RemoteError("rsync is not installed on this machine")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RemoteError(f"rsync with {host} failed (exit {proc.returncode}):"
                          f" {err.decode('utf-8', 'replace').strip()}")
    return out.decode("utf-8", "replace")


async def rsync_pull(t: Transport, remote_path: str, local: Path, *,
                     relative: bool = False) -> None:
    """Copy a remote directory's contents (or, ``relative``, a path kept as
    written after a ``/./`` marker) into ``local``.

    Raises:
        RemoteError: rsync failed.
    """
    local.mkdir(parents=True, exist_ok=True)
    if t.is_local and shutil.which("rsync") is None and not relative:
        shutil.copytree(remote_path, local, dirs_exist_ok=True, symlinks=True)
        return
    src = remote_path if relative else remote_path.rstrip("/") + "/"
    await t.ensure_credentials()  # rsync's ssh is a new connection
    opts, location = t.rsync_args(src)
    await _run_rsync(["rsync", "-a", *(["--relative"] if relative else []), *opts, location,
                      str(local) + os.sep], t.host)


_TRANSFERRED = re.compile(r"Number of regular files transferred:\s*([\d,]+)")


async def rsync_push(t: Transport | None, src_dir: Path, remote_dir: str,
                     excludes: Sequence[str]) -> int:
    """rsync ``src_dir``'s contents into ``remote_dir`` (``t`` None: a local copy).

    Returns:
        The number of files transferred (rsync's ``--stats``).

    Raises:
        RemoteError: rsync failed.
    """
    if t is not None:
        await t.ensure_credentials()  # rsync's ssh is a new connection
    opts, dest = ([], remote_dir) if t is None else t.rsync_args(remote_dir)
    argv = ["rsync", "-a", "--stats", *(f"--exclude={e}" for e in excludes), *opts,
            str(src_dir).rstrip("/") + "/", dest.rstrip("/") + "/"]
    out = await _run_rsync(argv, "localhost" if t is None else t.host)
    m = _TRANSFERRED.search(out)
    return int(m.group(1).replace(",", "")) if m else 0


def _excluded(rel: str, excludes: Sequence[str]) -> bool:
    parts = rel.split("/")
    for pat in excludes:
        if pat.startswith("/"):
            if fnmatch.fnmatchcase(parts[0], pat[1:]):
                return True
        elif any(fnmatch.fnmatchcase(p, pat) for p in parts):
            return True
    return False


async def sftp_push(t: Transport, src_dir: Path, remote_dir: str, excludes: Sequence[str],
                    remote_files: dict[str, list[int]]) -> int:
    """Copy changed files by SFTP (asyncssh transport): rsync's fallback.

    Args:
        remote_files: the agent's listing of ``remote_dir`` ({path: [size, mtime]}).

    Returns:
        The number of files transferred.

    Raises:
        RemoteError: the transport has no SFTP (not asyncssh).
    """
    if not t.has_sftp:
        raise RemoteError(f"{t.host} has no rsync; the SFTP fallback needs the asyncssh"
                          " transport")
    sent = 0
    async with t.sftp() as sftp:
        for root, dirs, files in os.walk(src_dir):
            rel_root = os.path.relpath(root, src_dir)
            dirs[:] = [d for d in dirs
                       if not _excluded(os.path.normpath(os.path.join(rel_root, d)), excludes)]
            for name in files:
                rel = os.path.normpath(os.path.join(rel_root, name))
                if _excluded(rel, excludes):
                    continue
                st = os.stat(os.path.join(root, name))
                if remote_files.get(rel) == [st.st_size, int(st.st_mtime)]:
                    continue
                target = f"{remote_dir}/{rel}"
                await sftp.makedirs(os.path.dirname(target), exist_ok=True)
                await sftp.put(os.path.join(root, name), target, preserve=True)
                sent += 1
    return sent
