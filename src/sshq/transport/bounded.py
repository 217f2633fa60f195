"""Reading a command's output with a cap: what a remote host sends is untrusted.

Both transports collect a command's stdout and stderr through
:func:`read_bounded`, so that a remote program printing gigabytes (a login
script gone wrong, a hostile ``python`` on the remote PATH) costs the client
at most the cap, and ends in a clear error that names the host and the cap.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ..exceptions import RemoteError

__all__ = ["MAX_OUTPUT", "STDERR_KEEP", "read_bounded"]

#: Default cap on a command's stdout, in bytes (:meth:`Transport.run`'s ``max_output``).
MAX_OUTPUT = 256 * 1024 * 1024
#: At most this much of a command's stderr is kept (bytes); the rest is read and dropped.
STDERR_KEEP = 256 * 1024
_CHUNK = 65536


class _Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


async def read_bounded(
    stdout: _Reader, stderr: _Reader, *, max_output: int | None, host: str
) -> tuple[bytes, bytes]:
    """Read two streams to their end, stdout up to ``max_output`` bytes.

    Args:
        stdout, stderr: readers with ``async read(n) -> bytes`` (asyncio or
            asyncssh streams).
        max_output: cap on stdout in bytes; None for no cap.
        host: the host label, for the error.

    Returns:
        ``(stdout, stderr)``; stderr holds its first :data:`STDERR_KEEP` bytes.

    Raises:
        RemoteError: stdout passed ``max_output`` (reading stops there; the
            caller closes the command).
    """

    async def out() -> bytes:
        buf = bytearray()
        while chunk := await stdout.read(_CHUNK):
            buf += chunk
            if max_output is not None and len(buf) > max_output:
                raise RemoteError(
                    f"{host}: the remote command sent more than {max_output} bytes on"
                    " stdout, the cap for one reply; nothing more was read")
        return bytes(buf)

    async def err() -> bytes:
        buf = bytearray()
        while chunk := await stderr.read(_CHUNK):
            if len(buf) < STDERR_KEEP:
                buf += chunk[: STDERR_KEEP - len(buf)]
        return bytes(buf)

    tasks = [asyncio.ensure_future(out()), asyncio.ensure_future(err())]
    try:
        o, e = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return o, e
