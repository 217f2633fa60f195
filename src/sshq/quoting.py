"""The one place where sshq turns data into shell words.

Everything that ends up in a shell command line or a shell script goes
through :func:`quote` or :func:`join`.  No other module builds shell text
from data.  The validators here refuse what no quoting can make safe (NUL
bytes) and what the batch systems' directive parsers cannot carry (newlines).

Directive lines (``#SBATCH --partition=VALUE``) are read by the job runner's
own parser, not by a shell: every value on such a line goes through
:func:`directive_word`, with the :class:`DirectiveSyntax` its job runner
handler declares, so that it reaches the runner byte-exact or is refused.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Literal

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
    "DirectiveSyntax",
    "UNVERIFIED_SYNTAX",
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DirectiveSyntax:
    """How one job runner's directive parser reads a value.

    Each job runner handler declares its parser's rules (its module docstring
    says where they come from: the runner's source, or what its real parser
    was seen to do); :func:`directive_word` applies them.

    Attributes:
        escape: characters the parser takes literally after a backslash
            (sbatch: ``\\ ' " #``); empty when it has no escape character.
        blanks: ``"quote"``: a value with blanks is wrapped in double quotes,
            which the parser groups into one word and strips; ``"keep"``: the
            parser reads the value to the end of the line, blanks and all.
        strips_edges: the parser strips blanks at either end of a value
            (such a value is refused).
        doubled: characters written twice (Slurm's filename patterns read
            ``%%`` as ``%``).
        refuse: character -> why the runner cannot carry it (a phrase that
            names the character).
        refuse_last: character -> why it cannot end a value.
    """

    escape: str = ""
    blanks: Literal["quote", "keep"] = "quote"
    strips_edges: bool = False
    doubled: str = ""
    refuse: Mapping[str, str] = dataclasses.field(default_factory=dict)
    refuse_last: Mapping[str, str] = dataclasses.field(default_factory=dict)


#: For a directive parser sshq cannot observe (no test system): blanks are
#: double-quoted (the documented way to group them) and every character such
#: a parser may read as syntax is refused.
UNVERIFIED_SYNTAX = DirectiveSyntax(refuse={
    c: f"its directive parser may read {c!r} as syntax, and sshq passes only values"
       " it knows the runner reads back byte-exact" for c in ("'", '"', "\\", "#")
})


def directive_word(
    value: str,
    *,
    field: str = "directive",
    runner: str = "",
    syntax: DirectiveSyntax = UNVERIFIED_SYNTAX,
    tail: str = "",
) -> str:
    """A value as one word of a directive line, which the runner reads back byte-exact.

    The one validator of every value that reaches a directive line: control
    characters (a newline would end the line and start a directive of the
    value's choosing) are refused, then what the runner's parser could not
    carry (``syntax.refuse``), and the rest is escaped for that parser.

    Args:
        value: the value (a queue, an account, a path...).
        field: the job spec field, for messages (``queue``, ``run-dir``).
        runner: the job runner's name, for messages.
        syntax: how the runner's directive parser reads a value.
        tail: text in the runner's own syntax appended to the value inside
            the same word (Slurm's ``/%a/job.out`` pattern); never escaped.

    Returns:
        The word to write after the option (``--partition=WORD``).

    Raises:
        InvalidInputError: the value is empty, holds a control character, or
            holds something the runner cannot carry; naming the field, the
            runner and the value.
    """
    check_directive_value(field, value)
    where = f"job runner {runner!r} cannot express {field} {value!r}" if runner else \
        f"{field}: value {value!r} cannot be carried in a directive"
    if not value:
        raise InvalidInputError(f"{field}: empty value")
    for c, why in syntax.refuse.items():
        if c in value:
            raise InvalidInputError(f"{where}: {why}")
    for c, why in syntax.refuse_last.items():
        if value.endswith(c):
            raise InvalidInputError(f"{where}: {why}")
    if syntax.strips_edges and value != value.strip():
        raise InvalidInputError(f"{where}: it starts or ends with blanks, which the"
                                " runner strips")
    word = "".join(c * 2 if c in syntax.doubled else "\\" + c if c in syntax.escape else c
                   for c in value) + tail
    if syntax.blanks == "quote" and any(c.isspace() for c in word):
        word = f'"{word}"'
    return word


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
