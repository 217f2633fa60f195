"""Short-lived SSH user certificates: read their validity, renew them in time.

Sites issue SSH user certificates that last minutes to a day (signed by a site
CA, e.g. after MFA).  A platform names one with ``certificate_file`` (an
OpenSSH certificate for its ``identity_file``) and may name an
``identity_command``: a local command, run without a shell, that writes a
fresh key and certificate.  Before every *new* SSH connection (asyncssh's
connect, a system ``ssh`` without a live ControlMaster, an rsync) the
transport calls :func:`ensure_certificate`:

- a certificate valid for at least ``certificate_min_validity`` more seconds
  is used as it is;
- otherwise (missing, expiring, expired) the ``identity_command`` runs first;
- without one, an expired (or not yet valid, or missing) certificate fails
  with an :class:`~sshq.exceptions.AuthenticationError` that says so and when.

Connections already open are not touched: a server checks a certificate when
a connection authenticates, not afterwards.  Nothing about certificates is
stored in sshq's state; the command's output is logged at DEBUG level only
(``--debug``), as it may carry secrets.

The certificate format is OpenSSH's ``PROTOCOL.certkeys``: after the key type
and a nonce come the public key's own fields (their number depends on the key
type), then serial (uint64), type (uint32), key id and principals (strings),
valid after and valid before (uint64 seconds since the epoch).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import struct
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime

from ..exceptions import AuthenticationError, ConfigError
from .base import HostParams

__all__ = ["CertificateInfo", "parse_certificate", "read_certificate", "is_fresh",
           "ensure_certificate"]

log = logging.getLogger(__name__)

#: How many SSH-string fields each certificate type's public key has
#: (OpenSSH ``PROTOCOL.certkeys``; an mpint is a string on the wire).
_KEY_FIELDS = {
    "ssh-rsa-cert-v01@openssh.com": 2,  # e, n
    "ssh-dss-cert-v01@openssh.com": 4,  # p, q, g, y
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,  # curve, Q
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": 3,  # curve, Q, application
    "ssh-ed25519-cert-v01@openssh.com": 1,  # pk
    "sk-ssh-ed25519-cert-v01@openssh.com": 2,  # pk, application
}
#: "valid before" meaning forever.
FOREVER = 2**64 - 1
#: The most bytes read of a certificate file.
MAX_CERT_FILE = 64 * 1024
#: Seconds an identity_command may run.
IDENTITY_COMMAND_TIMEOUT = 300.0
#: Bytes of its output kept (for the debug log).
MAX_COMMAND_OUTPUT = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateInfo:
    """What sshq reads of an OpenSSH user certificate.

    Attributes:
        key_type: e.g. ``ssh-ed25519-cert-v01@openssh.com``.
        key_id: the CA's key id for it.
        principals: the user names it is valid for (empty: any).
        valid_after: seconds since the epoch (UTC).
        valid_before: seconds since the epoch; :data:`FOREVER` for no end.
    """

    key_type: str
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int

    def seconds_left(self, now: float) -> float:
        """Seconds of validity left at ``now`` (negative once expired)."""
        return float("inf") if self.valid_before == FOREVER else self.valid_before - now

    @property
    def expires(self) -> str:
        """``valid_before`` as ``YYYY-MM-DD HH:MM:SS UTC`` (``never``)."""
        return "never" if self.valid_before == FOREVER else _when(self.valid_before)


def _when(t: float) -> str:
    return datetime.fromtimestamp(min(t, 253402300799), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated certificate")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self.take(4))
        return self.take(n)

    def uint64(self) -> int:
        (v,) = struct.unpack(">Q", self.take(8))
        return int(v)


def parse_certificate(text: bytes) -> CertificateInfo:
    """Parse an OpenSSH certificate file (``<type> <base64> [comment]``).

    Returns:
        The certificate's type, key id, principals and validity.

    Raises:
        ValueError: not an OpenSSH user certificate of a known key type.
    """
    words = text.split()
    if len(words) < 2:
        raise ValueError("not an OpenSSH certificate file")
    try:
        blob = base64.b64decode(words[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the certificate is not base64") from None
    r = _Reader(blob)
    key_type = r.string().decode("ascii", "replace")
    fields = _KEY_FIELDS.get(key_type)
    if fields is None or words[0].decode("ascii", "replace") != key_type:
        raise ValueError(f"unknown certificate type {key_type[:60]!r}")
    r.string()  # nonce
    for _ in range(fields):
        r.string()
    r.uint64()  # serial
    (cert_type,) = struct.unpack(">I", r.take(4))
    if cert_type != 1:
        raise ValueError("a host certificate, not a user certificate")
    key_id = r.string().decode("utf-8", "replace")
    principals = _Reader(r.string())
    names = []
    while principals.pos < len(principals.data):
        names.append(principals.string().decode("utf-8", "replace"))
    valid_after, valid_before = r.uint64(), r.uint64()
    return CertificateInfo(key_type=key_type, key_id=key_id[:200], principals=tuple(names),
                           valid_after=valid_after, valid_before=valid_before)


def read_certificate(path: str) -> CertificateInfo | None:
    """The certificate in ``path``; None when the file does not exist.

    Raises:
        ConfigError: the file cannot be read or is no OpenSSH user certificate.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CERT_FILE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the certificate file {path}: {exc.strerror}") from None
    try:
        return parse_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"certificate file {path}: {exc}") from None


def is_fresh(p: HostParams) -> bool:
    """Whether ``p`` needs nothing before a new connection: no certificate, or
    one valid now and for ``p.certificate_min_validity`` more seconds.

    Raises:
        ConfigError: the certificate file is no OpenSSH user certificate.
    """
    if not p.certificate_file:
        return True
    now = time.time()
    cert = read_certificate(p.certificate_file)
    return (cert is not None and now >= cert.valid_after
            and cert.seconds_left(now) >= p.certificate_min_validity)


# One renewal at a time per certificate file (per event loop: asyncio locks
# belong to one loop).
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = \
    weakref.WeakKeyDictionary()


def _lock(path: str) -> asyncio.Lock:
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(path, asyncio.Lock())


async def ensure_certificate(p: HostParams, *, label: str) -> None:
    """Make sure ``p``'s certificate can authenticate a new connection.

    Nothing when ``p`` names no certificate, or when it is valid for at least
    ``p.certificate_min_validity`` more seconds.  Otherwise ``p.identity_command``
    runs (no shell; its output is logged at DEBUG only) and the certificate is
    read again.

    Args:
        p: the host's parameters (``certificate_file``, ``identity_command``,
            ``certificate_min_validity``).
        label: the host, for messages.

    Raises:
        AuthenticationError: the certificate is missing, expired or not yet
            valid (the message says when) and no ``identity_command`` is set;
            the command failed or wrote no valid certificate.
        ConfigError: the certificate file is no OpenSSH user certificate.
    """
    path = p.certificate_file
    if not path:
        return
    async with _lock(path):
        if is_fresh(p):
            return
        now = time.time()
        cert = read_certificate(path)
        why = _state(cert, path, now)
        if not p.identity_command:
            if cert is not None and now >= cert.valid_after and cert.seconds_left(now) > 0:
                log.info("%s: %s; no identity_command renews it", label, why)
                return
            raise AuthenticationError(
                f"{label}: {why}; renew it, or set identity_command in the platform to"
                " renew it automatically", host=p.host)
        log.info("%s: %s; running identity_command %s", label, why, p.identity_command[0])
        await _run_identity_command(p, label)
        now = time.time()
        cert = read_certificate(path)
        if cert is None or now < cert.valid_after or cert.seconds_left(now) <= 0:
            raise AuthenticationError(
                f"{label}: identity_command {p.identity_command[0]} ran, yet"
                f" {_state(cert, path, now)}", host=p.host)


def _state(cert: CertificateInfo | None, path: str, now: float) -> str:
    """What is wrong with the certificate, with its times."""
    if cert is None:
        return f"the SSH certificate {path} does not exist"
    if now < cert.valid_after:
        return f"the SSH certificate {path} is not valid before {_when(cert.valid_after)}"
    left = cert.seconds_left(now)
    if left <= 0:
        return (f"the SSH certificate {path} expired at {cert.expires}"
                f" ({_ago(-left)} ago)")
    return f"the SSH certificate {path} expires at {cert.expires} (in {left:.0f} s)"


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"


async def _run_identity_command(p: HostParams, label: str) -> None:
    """Run ``p.identity_command`` (argv, no shell; stdin is inherited so that it
    may prompt on the terminal).  Its output goes to the debug log only.

    Raises:
        AuthenticationError: it could not start, failed or timed out.
    """
    argv = p.identity_command
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        raise AuthenticationError(f"{label}: cannot run identity_command {argv[0]!r}:"
                                  f" {exc.strerror}", host=p.host) from None
    assert proc.stdout is not None
    out = bytearray()

    async def read() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            out.extend(chunk[:max(0, MAX_COMMAND_OUTPUT - len(out))])
        await proc.wait()

    try:
        await asyncio.wait_for(read(), IDENTITY_COMMAND_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise AuthenticationError(f"{label}: identity_command {argv[0]!r} took longer than"
                                  f" {IDENTITY_COMMAND_TIMEOUT:.0f} s", host=p.host) from None
    log.debug("%s: identity_command %s exited %s; its output: %s", label, argv[0],
              proc.returncode, bytes(out).decode("utf-8", "replace").strip() or "(none)")
    if proc.returncode != 0:
        raise AuthenticationError(
            f"{label}: identity_command {argv[0]!r} failed (exit {proc.returncode}); its"
            " output is logged with --debug", host=p.host)

