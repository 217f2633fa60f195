"""The one place where sshq turns data into shell words.

Everything that ends up in a shell command line or a shell script goes
through :func:`quote` or :func:`join`.  No other module builds shell text
from data.  The validators here refuse what no quoting can make safe (NUL
bytes) and what the batch systems' directive parsers cannot carry (newlines).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from .exceptions import InvalidInputError

__all__ = [
    "quote",
    "join",
    "ENV_KEY_RE",
    "JOB_NAME_RE",
    "check_env_key",
    "check_env_value",
    "check_job_name",
    "check_directive_value",
    "directive_word",
]

#: POSIX environment variable names (IEEE Std 1003.1, 8.1): portable set.
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: Job names are also directory names in the job log layout and batch
#: system directive values, so they are kept to a conservative set.
JOB_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}\Z")

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def quote(word: str) -> str:
    """Quote one word for a POSIX shell (``shlex.quote``).

    Args:
        word: any text without NUL.

    Returns:
        A shell word that expands to exactly ``word``.

    Raises:
        InvalidInputError: ``word`` contains a NUL byte, which no shell can carry.
    """
    if "\x00" in word:
        raise InvalidInputError("a NUL byte cannot be passed through a shell")
    return shlex.quote(word)


def join(argv: Iterable[str]) -> str:
    """Join an argument vector into one shell command line (``shlex.join``).

    Args:
        argv: the words; each reaches the program byte-exact.

    Returns:
        The command line, with every word quoted.

    Raises:
        InvalidInputError: a word contains NUL.
    """
    return " ".join(quote(w) for w in argv)


def directive_word(value: str) -> str:
    """A value for a batch system directive line (``#SBATCH --output=VALUE``).

    Directive lines are parsed by the batch system, not by a shell: a value
    with blanks or ``#`` (which would start a comment) is wrapped in double
    quotes, which sbatch and bsub strip; a value holding a double quote or a
    backslash (sbatch drops it, even quoted), a newline or a NUL is refused.
    (SGE's qsub ends a value at ``#`` even inside quotes: its handler
    refuses such values itself.)

    Raises:
        InvalidInputError: the value cannot be carried in a directive.
    """
    check_directive_value("directive", value)
    for bad in ('"', "\\"):
        if bad in value:
            raise InvalidInputError(f"directive value {value!r} contains {bad!r}")
    return f'"{value}"' if "#" in value or any(c.isspace() for c in value) else value


def check_env_key(key: str) -> str:
    """Refuse an environment variable name that is not a portable POSIX name.

    Raises:
        InvalidInputError: naming the key.
    """
    if not ENV_KEY_RE.match(key):
        raise InvalidInputError(
            f"invalid environment variable name {key!r}: use letters, digits and _,"
            " not starting with a digit"
        )
    if key.upper().startswith("SSHQ_"):
        raise InvalidInputError(
            f"environment variable name {key!r} is reserved: names starting with SSHQ_"
            " belong to the job wrapper"
        )
    return key


def check_env_value(key: str, value: str) -> str:
    """Refuse an environment value that cannot be carried (it contains NUL).

    Quotes, ``$()``, backticks, ``;``, spaces, newlines and non-ASCII text are
    all fine: the value is quoted and reaches the job byte-exact.

    Raises:
        InvalidInputError: naming the key.
    """
    if "\x00" in value:
        raise InvalidInputError(f"environment variable {key}: value contains a NUL byte")
    return value


def check_job_name(name: str) -> str:
    """Refuse a job name that is not safe as a directory name and directive value.

    Allowed: 1 to 100 of ``A-Z a-z 0-9 _ . + -``, not starting with ``.``,
    ``+`` or ``-``.

    Raises:
        InvalidInputError: saying what is wrong with the name.
    """
    if "\n" in name or "\r" in name:
        raise InvalidInputError(f"job name {name!r} contains a newline")
    if "\x00" in name:
        raise InvalidInputError(f"job name {name!r} contains a NUL byte")
    if not JOB_NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid job name {name!r}: use 1-100 of letters, digits, _ . + -"
            " (not starting with . + or -)"
        )
    return name


def check_directive_value(field: str, value: str) -> str:
    """Refuse a directive value with a newline, NUL or other control character.

    Batch systems read directives line by line: a newline would start a new
    directive (or a shell command) of the attacker's choosing.

    Args:
        field: the job spec field, for the message.
        value: the value to check.

    Raises:
        InvalidInputError: naming the field.
    """
    m = _CONTROL_RE.search(value)
    if m:
        what = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL byte"}.get(
            m.group(), f"control character {m.group()!r}"
        )
        raise InvalidInputError(f"{field}: value {value!r} contains {what}")
    return value
