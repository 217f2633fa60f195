"""Staging: install a source tree into a run directory, bring files back.

After Cylc's remote job management (seed 001): run files travel by rsync
(only changed files; Cylc's excludes), a shared filesystem is detected
through the UUID file remote-init writes (``<run_dir>/.sshq/uuid``), and
job logs come back by rsync.  Where the remote side has no rsync, files go by
SFTP (asyncssh transport), still only those whose size or time changed.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exceptions import RemoteError
from ..model import JobSpec
from ..transport import Transport
from ..transport.local import LocalTransport

__all__ = [
    "CYLC_EXCLUDES",
    "Installation",
    "input_files",
    "is_shared_filesystem",
    "rsync_pull",
    "rsync_push",
    "sftp_push",
]

#: What an install never copies, as Cylc's ``rose suite-run`` (seed 001):
#: hidden files, and the run directory's own log, work and share trees.
CYLC_EXCLUDES = (".*", "/log", "/work", "/share")


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
            here and there (remote-init's UUID file is visible locally).
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


def is_shared_filesystem(init: dict[str, Any]) -> bool:
    """Whether the run directory is ours here too (seed 001's UUID-file test).

    True when remote-init's UUID file is visible here with the same content
    *and* belongs to this user: a copy made here then lands as it would
    remotely.  (The same file under another account is not shared for
    installing: files copied here would belong to the wrong user.)
    """
    try:
        uuid_file = Path(init["uuid_file"])
        return (uuid_file.read_text().strip() == init["uuid"]
                and uuid_file.stat().st_uid == os.getuid())
    except (OSError, KeyError):
        return False


def input_files(spec: JobSpec) -> dict[str, str]:
    """A job's input files for the agent's submit request: {base name: base64}."""
    return {Path(p).name: base64.b64encode(Path(p).read_bytes()).decode() for p in spec.inputs}


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
    if isinstance(t, LocalTransport) and shutil.which("rsync") is None and not relative:
        shutil.copytree(remote_path, local, dirs_exist_ok=True, symlinks=True)
        return
    src = remote_path if relative else remote_path.rstrip("/") + "/"
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
    from ..transport.asyncssh_ import AsyncSSHTransport

    if not isinstance(t, AsyncSSHTransport):
        raise RemoteError(f"{t.host} has no rsync; the SFTP fallback needs the asyncssh"
                          " transport")
    conn = await t.connection()
    sent = 0
    async with conn.start_sftp_client() as sftp:
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
