"""The wire protocol between sshq and its remote agent (I/O-free).

Request (stdin of the remote command)::

    <len(program)>\\n<program bytes><JSON request>

where the program is :func:`agent_program`: :func:`agent_source` (the
shipped modules the agent imports, then ``agent.py``), compressed.

The remote command is fixed (:data:`BOOTSTRAP`): it reads the agent source
from stdin and runs it; nothing user-supplied is ever on the command line.

With an installed agent (platform ``agent = "installed"``, ``sshq agent
install``; :mod:`sshq.shipped.sshq_restricted`) the command is
``python3 .sshq/sshq-agent`` (or the key's forced command) and stdin is the
JSON request alone, one line, with the protocol version the client needs::

    <JSON request>\n

Reply (stdout), after whatever a login shell printed::

    SSHQ-BEGIN-<nonce>\\n  (<len>\\n<JSON frame>)*  0\\n  SSHQ-END-<nonce>\\n

The nonce is random per call and travels on stdin, so a banner cannot forge
a reply.
"""

from __future__ import annotations

import base64
import json
import secrets
import zlib
from collections.abc import Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any

from ..exceptions import RemoteError, RestrictedError
from ..shipped.sshq_restricted import ENTRY, INSTALL_DIR, PROTOCOL

__all__ = ["BOOTSTRAP", "BUNDLED_MODULES", "INSTALLED_AGENT", "MAX_REPLY", "PROTOCOL",
           "agent_source", "agent_argv", "encode_request", "FrameParser", "shipped_file",
           "skip_to_fence"]

#: The remote command's program: one line, no ``!``, no newline, no single
#: quote, so that any login shell (sh, bash, tcsh) passes it unchanged.
BOOTSTRAP = (
    "import sys;b=sys.stdin.buffer;"
    'exec(compile(b.read(int(b.readline())),"sshq-agent","exec"))'
)


#: The shipped modules the agent imports (``src/sshq/shipped/<name>.py``),
#: bundled ahead of it.
BUNDLED_MODULES = ("sshq_jobstatus", "sshq_procs")

_BUNDLE_PRELUDE = b"""\
import sys as _sshq_sys, types as _sshq_types
def _sshq_module(name, source):
    m = _sshq_types.ModuleType(name)
    m.__file__ = "<sshq-bundle>/%s.py" % name
    _sshq_sys.modules[name] = m
    exec(compile(source, m.__file__, "exec"), m.__dict__)
"""


def shipped_file(name: str) -> bytes:
    """The bytes of one shipped file (``agent.py``, ``sshq_jobstatus.py``, ...)."""
    return resources.files("sshq.shipped").joinpath(name).read_bytes()


@cache
def agent_source() -> bytes:
    """The program sent to the remote Python: the bundled modules, then ``agent.py``.

    Each module of :data:`BUNDLED_MODULES` is registered in ``sys.modules``
    under its plain name before the agent runs, so ``import sshq_jobstatus``
    works there exactly as beside an installed agent.
    """
    parts = [_BUNDLE_PRELUDE]
    for name in BUNDLED_MODULES:
        src = shipped_file(name + ".py")
        parts.append(b"_sshq_module(%s, %s)\n" % (repr(name).encode(), repr(src).encode()))
    parts.append(shipped_file("agent.py"))
    return b"".join(parts)


@cache
def agent_program() -> bytes:
    """What is sent: :func:`agent_source`, zlib-compressed inside a two-line
    stub (about a third of the bytes: fewer round trips of TCP slow start on a
    new connection).  Runs the source with the stub's globals, under the name
    ``sshq-agent``, exactly as if it had been sent plain.

    Compressed at level 6: 0.5 % more bytes than level 9, in a third of the
    time (2 ms instead of 6 ms, paid once per process: each CLI command)."""
    packed = base64.b64encode(zlib.compress(agent_source(), 6))
    return (b"import base64 as _b, zlib as _z\n"
            b'exec(compile(_z.decompress(_b.b64decode(b"' + packed + b'")), "sshq-agent",'
            b' "exec"))\n')


#: With ``login_shell``: a fixed bash program that runs its arguments, so the
#: agent sees the environment of a login shell (modules, PATH to sbatch).
LOGIN_SHELL = ["bash", "-l", "-c", 'exec "$0" "$@"']


#: The installed agent's entry, relative to the home directory (where SSH
#: commands start).
INSTALLED_AGENT = f"{INSTALL_DIR}/{ENTRY}"


def agent_argv(python: str = "python3", *, login_shell: bool = False,
               installed: bool = False) -> list[str]:
    """The remote argv that starts the agent with interpreter ``python``.

    Args:
        python: the remote Python 3.6+ interpreter.
        login_shell: run it from ``bash -l`` (Cylc's "use login shell").
        installed: run the installed agent (:data:`INSTALLED_AGENT`) instead of
            the bootstrap that reads the shipped program.
    """
    argv = [python, INSTALLED_AGENT] if installed else [python, "-c", BOOTSTRAP]
    return [*LOGIN_SHELL, *argv] if login_shell else argv


def encode_request(op: str, payload: dict[str, Any], *,
                   path_prepend: Sequence[str] = (), installed: bool = False
                   ) -> tuple[str, bytes]:
    """Build the stdin for one agent call.

    Args:
        op: the agent operation; payload: its fields.
        path_prepend: directories the agent puts before its PATH.
        installed: for an installed agent: the request alone (one line, with
            :data:`PROTOCOL`), no program.

    Returns:
        ``(nonce, stdin_bytes)``.
    """
    nonce = secrets.token_hex(12)
    req = dict(payload, op=op, nonce=nonce)
    if path_prepend:
        req["path_prepend"] = list(path_prepend)
    if installed:
        req["protocol"] = PROTOCOL
        return nonce, json.dumps(req).encode("utf-8") + b"\n"
    src = agent_program()
    return nonce, b"%d\n" % len(src) + src + json.dumps(req).encode("utf-8")


def skip_to_fence(buf: bytearray, fence: bytes) -> bool:
    """Drop what precedes ``fence`` in ``buf`` (banners), and the fence itself.

    Returns:
        True once the fence was found; False while it has not arrived (only a
        tail that could hold a partial fence is kept).
    """
    i = buf.find(fence)
    if i < 0:
        del buf[: max(0, len(buf) - len(fence))]
        return False
    del buf[: i + len(fence)]
    return True


#: Caps on an agent's reply (bytes): what may precede the BEGIN fence (login
#: banners), and one frame.  The agent's own frames stay far below them (a
#: log read is at most 16 MiB, base64-encoded).
MAX_PREAMBLE = 4 * 1024 * 1024
MAX_FRAME = 48 * 1024 * 1024
#: The most a whole reply may be (bytes), for :meth:`Transport.run`.
MAX_REPLY = 64 * 1024 * 1024


class FrameParser:
    """Incremental parser of the agent's fenced, length-prefixed frames.

    Feed it stdout bytes as they arrive; it yields each JSON frame once
    complete.  Bytes before the BEGIN fence (banners) are ignored, up to
    :data:`MAX_PREAMBLE`; a frame may be at most :data:`MAX_FRAME` bytes.
    """

    def __init__(self, nonce: str, *, host: str = "remote host") -> None:
        self._begin = f"SSHQ-BEGIN-{nonce}\n".encode()
        self._end = f"SSHQ-END-{nonce}\n".encode()
        self._buf = bytearray()
        self._host = host
        self._preamble = 0
        self.started = False
        self.finished = False

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Add bytes; yield the frames they complete.

        Raises:
            RemoteError: a malformed frame.
        """
        self._buf += data
        if not self.started:
            self._preamble += len(data)
            if not skip_to_fence(self._buf, self._begin):
                if self._preamble > MAX_PREAMBLE:
                    raise RemoteError(
                        f"{self._host}: more than {MAX_PREAMBLE} bytes arrived before the"
                        " agent's reply (the cap); is the remote python an sshq agent?")
                return
            self.started = True
        while not self.finished:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > 32:
                    raise RemoteError("malformed agent reply (bad frame header)")
                return
            head = bytes(self._buf[:nl])
            if not head.isdigit():
                raise RemoteError(f"malformed agent reply (frame header {head[:40]!r})")
            n = int(head)
            if n > MAX_FRAME:
                raise RemoteError(f"{self._host}: an agent reply frame of {n} bytes is over"
                                  f" the cap of {MAX_FRAME} bytes")
            if n == 0:
                if len(self._buf) < nl + 1 + len(self._end):
                    return
                if bytes(self._buf[nl + 1: nl + 1 + len(self._end)]) != self._end:
                    raise RemoteError("malformed agent reply (no end fence)")
                self.finished = True
                return
            if len(self._buf) < nl + 1 + n:
                return
            body = bytes(self._buf[nl + 1: nl + 1 + n])
            del self._buf[: nl + 1 + n]
            try:
                frame = json.loads(body)
            except ValueError:
                raise RemoteError("malformed agent reply (frame is not JSON)") from None
            if not isinstance(frame, dict):
                raise RemoteError("malformed agent reply (frame is not a JSON object)")
            if "agent_error" in frame:
                raise _agent_error(self._host, frame)
            yield frame


def _agent_error(host: str, frame: dict[str, Any]) -> RemoteError:
    """The error of an agent's error frame: a restricted agent's refusal
    (:class:`RestrictedError`), an installed agent too old for this client,
    or a failure (:class:`RemoteError`)."""
    why = str(frame["agent_error"])[:1000]
    if frame.get("restricted"):
        return RestrictedError(f"{host}: refused by the restricted sshq agent: {why}",
                               reason=why)
    theirs = frame.get("agent_protocol")
    if isinstance(theirs, int) and not isinstance(theirs, bool):
        return RemoteError(f"{host}: the installed sshq agent speaks protocol {theirs}, this"
                           f" sshq needs {PROTOCOL}: run `sshq agent install` for the"
                           " platform again")
    return RemoteError(f"remote agent failed: {why}")
