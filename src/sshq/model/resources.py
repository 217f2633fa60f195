"""Parsing of walltimes and memory sizes as users write them."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from ..exceptions import InvalidInputError

__all__ = ["parse_walltime", "parse_memory", "format_hms", "format_memory_mib",
           "parse_array", "MAX_ARRAY_ELEMENTS", "MAX_ARRAY_INDEX"]

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_MEM_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*\Z", re.IGNORECASE)
_WALL_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\Z")


def parse_walltime(text: str | int | float | timedelta) -> timedelta:
    """Parse a walltime.

    Accepts a ``timedelta``, a number of seconds, or Slurm's forms
    (``sbatch(1)`` ``--time``): ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``.  A lone number is minutes, as in Slurm.

    Returns:
        The walltime; always positive.

    Raises:
        InvalidInputError: unparseable or not positive.
    """
    try:
        td = _walltime(text)
    except (OverflowError, ValueError):
        raise InvalidInputError(f"walltime {text!r} is out of range") from None
    if td.total_seconds() <= 0:
        raise InvalidInputError(f"walltime must be positive, got {text!r}")
    if td > MAX_WALLTIME:
        raise InvalidInputError(f"walltime {text!r} is out of range (at most 3650 days)")
    return td


#: No batch system's limit is near this; larger values are typos.
MAX_WALLTIME = timedelta(days=3650)


def _walltime(text: str | int | float | timedelta) -> timedelta:
    if isinstance(text, timedelta):
        td = text
    elif isinstance(text, (int, float)):
        td = timedelta(seconds=text)
    else:
        m = _WALL_RE.match(text.strip())
        if not m:
            raise InvalidInputError(
                f"invalid walltime {text!r}: use HH:MM:SS, MM:SS, minutes, or D-HH:MM:SS"
            )
        days, a, b, c = m.groups()
        if days is not None:
            hours, mins, secs = int(a), int(b or 0), int(c or 0)
            td = timedelta(days=int(days), hours=hours, minutes=mins, seconds=secs)
        elif c is not None:
            td = timedelta(hours=int(a), minutes=int(b), seconds=int(c))
        elif b is not None:
            td = timedelta(minutes=int(a), seconds=int(b))
        else:
            td = timedelta(minutes=int(a))
    return td


def format_hms(td: timedelta) -> str:
    """Format a walltime as ``HH:MM:SS`` (hours may exceed 24), seconds rounded up."""
    total = math.ceil(td.total_seconds())
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def parse_memory(text: str | int) -> int:
    """Parse a memory size into bytes.

    ``2G``, ``512M``, ``1.5GiB``, ``1024`` (bytes) are accepted; the suffixes
    K, M, G, T, P are powers of 1024, as in ``sbatch --mem``.

    Raises:
        InvalidInputError: unparseable or not positive.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _MEM_RE.match(text)
        if not m:
            raise InvalidInputError(f"invalid memory size {text!r}: use e.g. 512M or 2G")
        try:
            value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
        except OverflowError:
            raise InvalidInputError(f"memory size {text!r} is out of range") from None
    if value <= 0:
        raise InvalidInputError(f"memory must be positive, got {text!r}")
    return value


def format_memory_mib(nbytes: int) -> int:
    """Bytes to whole MiB, rounded up (what batch systems accept)."""
    return max(1, math.ceil(nbytes / 1024**2))


#: The most elements one array job may have here.
MAX_ARRAY_ELEMENTS = 10000

#: The largest array index: Slurm's MaxArraySize is at most 4000001
#: (slurm.conf(5)) and indices go up to MaxArraySize - 1 (sbatch(1)).
MAX_ARRAY_INDEX = 4000000

# sbatch(1) --array: ranges "N", "N-M", "N-M:S", comma-separated, then an
# optional "%T" throttle.  ASCII digits only ([0-9], not re's Unicode \d), no
# blanks: the range is written as it is on a directive line.
_ARRAY_PART = re.compile(r"([0-9]{1,12})(?:-([0-9]{1,12})(?::([0-9]{1,12}))?)?\Z")
_ARRAY_THROTTLE = re.compile(r"[0-9]{1,12}\Z")


def parse_array(text: str) -> tuple[int, ...]:
    """Parse an array range as ``sbatch --array`` reads it (``sbatch(1)``).

    ``1-100``, ``0-99:2`` (step), ``1,3,5-7``, with an optional ``%N``
    throttle (kept for the job runner, no effect on the indices).  The text
    is taken exactly as written: blanks, signs, non-ASCII digits and empty
    parts are refused, never tidied away, because the range reaches the job
    runner's directive line byte-exact.

    Returns:
        The element indices, sorted, without duplicates.

    Raises:
        InvalidInputError: unparseable, empty, an index above
            :data:`MAX_ARRAY_INDEX`, or more than :data:`MAX_ARRAY_ELEMENTS`
            elements; the message quotes the text.
    """
    usage = "use e.g. 1-100, 1-99:2, 1,3,5-7 or 1-100%10, without blanks"
    body, sep, throttle = text.partition("%")
    if sep and not _ARRAY_THROTTLE.match(throttle):
        raise InvalidInputError(
            f"invalid array {text!r}: the throttle after % is a number; {usage}")
    indices: set[int] = set()
    for part in body.split(","):
        m = _ARRAY_PART.match(part)
        if not m:
            raise InvalidInputError(f"invalid array {text!r}: {usage}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi > MAX_ARRAY_INDEX:
            raise InvalidInputError(
                f"invalid array {text!r}: indices go up to {MAX_ARRAY_INDEX}")
        if hi < lo or step < 1 or (hi - lo) // step + len(indices) >= MAX_ARRAY_ELEMENTS:
            raise InvalidInputError(
                f"invalid array {text!r}: ranges go up, steps are positive, at most"
                f" {MAX_ARRAY_ELEMENTS} elements")
        indices.update(range(lo, hi + 1, step))
    return tuple(sorted(indices))
