"""The wire protocol between the farm client and its dispatcher (I/O-free).

The dispatcher (:mod:`sshq.shipped.dispatcher`, whose header comment is the
specification) starts like the agent: the remote command is the fixed
:data:`~sshq.remote.protocol.BOOTSTRAP`, and stdin carries the source, then
one JSON header line, then frames.  A frame is a 4-byte big-endian header
length, a 4-byte big-endian payload length, a JSON object and the payload;
the object's ``type`` names the frame, and every key is a whole word
(``exit_status``, ``stream``, ``stdout_bytes``, ...).
The dispatcher's stdout starts with a fence line carrying the header's
random nonce, so whatever a login shell prints cannot be taken for a frame.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

from ..exceptions import RemoteError
from ..remote.protocol import PROTOCOL, skip_to_fence

__all__ = ["Frame", "FrameReader", "encode", "dispatcher_stdin", "dispatcher_source"]

HEAD = struct.Struct(">II")
#: Largest frame header or payload accepted from a dispatcher (bytes): what
#: one host's reader may hold.  The dispatcher sends at most 2 MiB at once
#: (a ``done`` frame with two streams of up to 1 MiB; longer output comes in
#: 256 KiB ``output`` frames).
MAX_FRAME = 8 << 20

Frame = tuple[dict[str, Any], bytes]


@cache
def dispatcher_source() -> bytes:
    """The dispatcher's source, as shipped."""
    return resources.files("sshq.shipped").joinpath("dispatcher.py").read_bytes()


def encode(head: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame."""
    hb = json.dumps(head, separators=(",", ":")).encode("utf-8")
    return HEAD.pack(len(hb), len(payload)) + hb + payload


def dispatcher_stdin(header: dict[str, Any], *, installed: bool = False) -> tuple[str, bytes]:
    """The bytes that start a dispatcher: source and header line.

    Args:
        header: ``slots`` (int or None for the core count), ``env`` (dict of
            extra environment variables for tasks), ``cwd`` (tasks' working
            directory, ``~`` expanded remotely), ``path_prepend`` (list of
            absolute directories put before the tasks' PATH).
        installed: for the installed agent (``agent_argv(installed=True)``):
            the header line alone, with the protocol it needs; its own
            dispatcher runs.

    Returns:
        ``(nonce, stdin_bytes)``; nothing else may be written before the
        dispatcher's ``hello`` frame arrives.
    """
    nonce = secrets.token_hex(12)
    if installed:
        return nonce, json.dumps(dict(header, nonce=nonce, protocol=PROTOCOL)).encode() + b"\n"
    src = dispatcher_source()
    line = json.dumps(dict(header, nonce=nonce)).encode("utf-8") + b"\n"
    return nonce, b"%d\n" % len(src) + src + line


class FrameReader:
    """Incremental parser of a dispatcher's stdout.

    Bytes before the fence line (banners) are skipped.
    """

    def __init__(self, nonce: str) -> None:
        self._fence = f"SSHQ-BEGIN-{nonce}\n".encode()
        self._buf = bytearray()
        self.started = False

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Add bytes; yield the ``(header, payload)`` frames they complete.

        Raises:
            RemoteError: a malformed frame.
        """
        self._buf += data
        if not self.started:
            if not skip_to_fence(self._buf, self._fence):
                return
            self.started = True
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 8:
                hl, pl = HEAD.unpack_from(buf, pos)
                if hl > MAX_FRAME or pl > MAX_FRAME:
                    raise RemoteError("malformed dispatcher frame (too long)")
                end = pos + 8 + hl + pl
                if len(buf) < end:
                    break
                try:
                    head = json.loads(bytes(buf[pos + 8: pos + 8 + hl]))
                except ValueError:
                    raise RemoteError("malformed dispatcher frame (not JSON)") from None
                if not isinstance(head, dict):
                    raise RemoteError("malformed dispatcher frame (not an object)")
                payload = bytes(buf[pos + 8 + hl: end])
                pos = end
                yield head, payload
        finally:
            del buf[:pos]
