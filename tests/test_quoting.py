"""sshq.quoting: hostile words survive a real shell byte-exact; validators."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sshq.exceptions import InvalidInputError
from sshq.quoting import (
    check_directive_value,
    check_env_key,
    check_env_value,
    check_job_name,
    directive_word,
    join,
    quote,
)

HOSTILE = [
    "plain",
    "",
    " ",
    "two words",
    "  leading and trailing  ",
    "it's",
    "'",
    "''",
    '"double"',
    "\\",
    "back\\slash\\",
    "$HOME",
    "${IFS}",
    "$(id)",
    "`id`",
    "a;b",
    "a && b || c",
    "a | b > c < d",
    "<(echo x)",
    "#not a comment",
    "*",
    "?",
    "[a-z]",
    "~",
    "~root",
    "{a,b}",
    "!",
    "!!",
    "line1\nline2",
    "trailing newline\n",
    "\n",
    "tab\there",
    "cr\rhere",
    "\x01\x02\x1b[31m\x7f",
    "héllo wörld",
    "日本語",
    "emoji \U0001F600",
    "-n",
    "-e",
    "--",
    "-",
    "--option=value",
    "a=b",
    "%s%d%%",
    "'\"'\"'",
    "\udcff\udcfe",  # undecodable bytes 0xff 0xfe (surrogateescape)
]

SHELLS = [s for s in ("sh", "bash", "dash") if shutil.which(s)]


def _expected(words: list[str]) -> bytes:
    return b"".join(os.fsencode(w) + b"\0" for w in words)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("word", HOSTILE, ids=lambda w: repr(w)[:30])
def test_quoted_word_round_trips_through_real_shell(shell: str, word: str) -> None:
    cmd = join(["printf", "%s\\0", word])
    out = subprocess.run([shell, "-c", cmd], capture_output=True, check=True).stdout
    assert out == _expected([word])


@pytest.mark.parametrize("shell", SHELLS)
def test_all_hostile_words_in_one_command_line(shell: str) -> None:
    cmd = join(["printf", "%s\\0", *HOSTILE])
    out = subprocess.run([shell, "-c", cmd], capture_output=True, check=True).stdout
    assert out == _expected(HOSTILE)


@pytest.mark.parametrize("shell", SHELLS)
def test_quote_alone_round_trips(shell: str) -> None:
    cmd = "printf '%s\\0' " + " ".join(quote(w) for w in HOSTILE)
    out = subprocess.run([shell, "-c", cmd], capture_output=True, check=True).stdout
    assert out == _expected(HOSTILE)


@pytest.mark.parametrize("shell", SHELLS)
def test_command_substitution_never_runs(shell: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    words = [
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"; touch {canary}",
        f"' ; touch {canary} ; '",
        f"\"; touch {canary}; \"",
        f"\ntouch {canary}\n",
        f"$(touch {canary}",
    ]
    cmd = join(["printf", "%s\\0", *words])
    out = subprocess.run([shell, "-c", cmd], capture_output=True, check=True, cwd=tmp_path).stdout
    assert out == _expected(words)
    assert not canary.exists()


def test_joined_words_are_the_program_argv(tmp_path: Path) -> None:
    # the first word is the program, even if it has a space in its name
    prog = tmp_path / "my prog"
    prog.write_text('#!/bin/sh\nprintf "%s\\0" "$0" "$@"\n')
    prog.chmod(0o755)
    args = ["$(x)", "a b", "-c"]
    out = subprocess.run(["sh", "-c", join([str(prog), *args])], capture_output=True,
                         check=True).stdout
    assert out == _expected([str(prog), *args])


def test_join_empty() -> None:
    assert join([]) == ""
    assert subprocess.run(["sh", "-c", "printf '%s\\0' " + join([""])],
                          capture_output=True, check=True).stdout == b"\0"


@pytest.mark.parametrize("word", ["\x00", "a\x00b", "trailing\x00"])
def test_nul_refused(word: str) -> None:
    with pytest.raises(InvalidInputError, match="NUL"):
        quote(word)
    with pytest.raises(InvalidInputError, match="NUL"):
        join(["ok", word])


# ------------------------------------------------------------- validators


@pytest.mark.parametrize("key", ["A", "_", "a", "PATH", "my_var_1", "_1", "X" * 200])
def test_env_key_accepted(key: str) -> None:
    assert check_env_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "1A", "9", "A-B", "A B", "A.B", "A=B", "A\n", "A\nB", "\nA", "A\x00", "é",
     "$A", "A;B", "-A", "/A", "..", " A", "A "],
)
def test_env_key_refused(key: str) -> None:
    with pytest.raises(InvalidInputError) as ei:
        check_env_key(key)
    assert repr(key) in str(ei.value)


@pytest.mark.parametrize("key", ["SSHQ_JOB_LOG_DIR", "SSHQ_WORK_DIR", "SSHQ_X", "sshq_x"])
def test_env_key_reserved_for_wrapper(key: str) -> None:
    with pytest.raises(InvalidInputError, match="reserved"):
        check_env_key(key)


@pytest.mark.parametrize("value", HOSTILE)
def test_env_value_accepted(value: str) -> None:
    assert check_env_value("K", value) == value


def test_env_value_nul_refused() -> None:
    with pytest.raises(InvalidInputError, match="MYKEY"):
        check_env_value("MYKEY", "a\x00b")


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "_", "job", "job-1", "a.b", "A+B", "_x", "x.y-z+w_1", "x" * 100,
             "a..b", "a-"],
)
def test_job_name_accepted(name: str) -> None:
    assert check_job_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-a", "-", ".a", ".", "..", "+a", "a/b", "/", "../x", "a b", " a", "a ", "a\tb",
     "x" * 101, "é", "a;b", "a$b", "a'b", "a*", "a:b", "a\\b"],
)
def test_job_name_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="job name"):
        check_job_name(name)


@pytest.mark.parametrize("name", ["a\nb", "a\n", "\n", "a\rb"])
def test_job_name_newline_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="newline"):
        check_job_name(name)


@pytest.mark.parametrize("name", ["a\x00", "\x00"])
def test_job_name_nul_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="NUL"):
        check_job_name(name)


@pytest.mark.parametrize(
    "value", ["gpu", "--constraint=gpu&bigmem", "a b", "日本語", "$(id)", "x'y\"z", ""],
)
def test_directive_value_accepted(value: str) -> None:
    assert check_directive_value("queue", value) == value


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("a\nb", "newline"),
        ("a\n", "newline"),
        ("a\rb", "carriage return"),
        ("a\x00b", "NUL"),
        ("a\tb", "control character"),
        ("\x1b[0m", "control character"),
        ("a\x7f", "control character"),
    ],
)
def test_directive_value_refused(value: str, what: str) -> None:
    with pytest.raises(InvalidInputError) as ei:
        check_directive_value("account", value)
    assert "account" in str(ei.value)
    assert what in str(ei.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gpu", "gpu"),
        ("/home/u/run/log/job.out", "/home/u/run/log/job.out"),
        ("/home/u/my runs/job.out", '"/home/u/my runs/job.out"'),
        ("a  b", '"a  b"'),
    ],
)
def test_directive_word(value: str, expected: str) -> None:
    assert directive_word(value) == expected
    # how sbatch reads such values is checked against real sbatch in test_job_runners.py


@pytest.mark.parametrize("value", ['a"b', '"', "it's", "a\\b", "a#b", "a\nb", "a\x00b", "a\rb"])
def test_directive_word_refused(value: str) -> None:
    # the default (UNVERIFIED_SYNTAX): a parser sshq cannot observe; each job
    # runner's own syntax is tested in test_directive_values.py
    with pytest.raises(InvalidInputError):
        directive_word(value)
