"""sshq.model.job_spec: validation, defaults and construction from files."""

# JobSpec coerces "1:00:00", 600, "2G" and lists (its docstring); its annotations
# say timedelta/int/tuple only, so mypy is told to allow the documented forms here.
# mypy: disable-error-code="arg-type"

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sshq.exceptions import InvalidInputError
from sshq.model.job_spec import MAIL_EVENTS, JobSpec, default_name, specs_from_files
from sshq.quoting import check_job_name


def _spec(**kw: Any) -> JobSpec:
    if "script" not in kw and "command" not in kw:
        kw["command"] = "true"
    return JobSpec(**kw)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "exactly one of a script or a command"),
        ({"script": b"echo\n", "command": "echo"}, "exactly one of a script or a command"),
        ({"command": ""}, "empty"),
        ({"command": "  \n\t"}, "empty"),
        ({"command": "echo a\x00b"}, "NUL"),
        ({"script": b"echo a\x00b\n"}, "NUL"),
        ({"arguments": ("ok", "a\x00b")}, "NUL"),
        ({"name": "bad name"}, "job name"),
        ({"name": "../etc"}, "job name"),
        ({"name": "-rf"}, "job name"),
        ({"name": "a\nb"}, "newline"),
        ({"environment": {"1A": "x"}}, "1A"),
        ({"environment": {"A-B": "x"}}, "A-B"),
        ({"environment": {"": "x"}}, "environment variable name"),
        ({"environment": {"A B": "x"}}, "A B"),
        ({"environment": {"OK": "a\x00b"}}, "OK"),
        ({"queue": "debug\n#SBATCH --uid=0"}, "queue"),
        ({"queue": "a\rb"}, "queue"),
        ({"queue": ""}, "queue"),
        ({"account": "a\nb"}, "account"),
        ({"mail_user": "me@x\n"}, "mail-user"),
        ({"work_dir": "/tmp/a\nb"}, "work-dir"),
        ({"work_dir": "relative/dir"}, "work-dir"),
        ({"directives": ("--constraint=gpu\n#SBATCH --x",)}, "directive"),
        ({"mail_user": "me@x", "mail_events": ("sometimes",)}, "sometimes"),
        ({"mail_user": "me@x", "mail_events": ("end", "bogus")}, "bogus"),
        ({"mail_events": ("end",)}, "mail user"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": -1}, "cpus"),
        ({"cpus": "4"}, "cpus"),
        ({"cpus": 1.5}, "cpus"),
        ({"nodes": 0}, "nodes"),
        ({"tasks": -2}, "tasks"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_normalized_refuses(fields: dict[str, Any], match: str) -> None:
    spec = JobSpec(**fields) if ("script" in fields or "command" in fields or not fields) \
        else _spec(**fields)
    with pytest.raises(InvalidInputError, match=match):
        spec.normalized()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"walltime": "soon"}, "walltime"),
        ({"walltime": "00:00:00"}, "walltime"),
        ({"memory": "lots"}, "memory"),
        ({"memory": "0"}, "memory"),
        ({"arguments": "one string"}, "arguments"),
        ({"directives": "--x"}, "directives"),
        ({"mail_events": "end"}, "mail_events"),
    ],
)
def test_bad_values_refused_at_construction_or_normalization(
    fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        _spec(**fields).normalized()


def test_normalized_full_spec() -> None:
    env = {"A": "1", "B_2": "$(x) `y` 'z'\n"}
    spec = JobSpec(
        command="echo hi",
        arguments=["a", "b c"],
        name="my-job",
        environment=env,
        walltime="1:30:00",
        nodes=2,
        tasks=4,
        cpus=8,
        memory="2G",
        queue="debug",
        account="proj1",
        mail_user="me@example.org",
        mail_events=[" END ", "Begin", ""],
        directives=["--constraint=gpu"],
        work_dir="/scratch/me",
    ).normalized()
    assert spec.walltime == timedelta(hours=1, minutes=30)
    assert spec.memory == 2 * 1024**3
    assert spec.mail_events == ("end", "begin")
    assert set(spec.mail_events) <= MAIL_EVENTS
    assert spec.arguments == ("a", "b c")
    assert spec.directives == ("--constraint=gpu",)
    assert spec.environment == env
    assert spec.environment is not env  # a copy: later changes to env do not leak in
    env["C"] = "3"
    assert "C" not in spec.environment
    assert (spec.nodes, spec.tasks, spec.cpus) == (2, 4, 8)
    assert spec.job_name == "my-job"


def test_normalized_is_idempotent() -> None:
    spec = _spec(walltime=600, memory=1024, mail_user="u", mail_events=("all",)).normalized()
    assert spec.normalized() == spec


def test_walltime_and_memory_forms_coerced() -> None:
    spec = _spec(walltime=90, memory="512M")
    spec = spec.normalized()
    assert spec.walltime == timedelta(seconds=90)
    assert spec.memory == 512 * 1024**2


@pytest.mark.parametrize("events", [("begin",), ("end",), ("fail",), ("all",),
                                    ("begin", "end", "fail")])
def test_every_mail_event_accepted(events: tuple[str, ...]) -> None:
    assert _spec(mail_user="u@h", mail_events=events).normalized().mail_events == events


def test_default_job_name() -> None:
    assert _spec().job_name == "job"
    assert _spec(name="").job_name == "job"
    assert _spec(name="x1").job_name == "x1"


def test_user_script_for_command_is_bash_script() -> None:
    spec = _spec(command="echo 'hé' $HOME")
    assert spec.user_script() == "#!/bin/bash\necho 'hé' $HOME\n".encode()


def test_user_script_is_script_bytes_exactly() -> None:
    data = b"#!/bin/sh\nprintf '\\377' \xff\xfe no newline"
    assert _spec(script=data).user_script() == data


def test_script_as_str_is_utf8() -> None:
    assert JobSpec(script="echo é\n").script == "echo é\n".encode()


# ---------------------------------------------------------------- from_file


def test_from_file_reads_bytes_and_names_job(tmp_path: Path) -> None:
    data = b"#!/bin/bash\necho \xff\xfe\r\nexit 3"
    p = tmp_path / "my job.sh"
    p.write_bytes(data)
    spec = JobSpec.from_file(p, queue="q")
    assert spec.script == data
    assert spec.name == "my_job"
    assert spec.queue == "q"
    assert spec.normalized().job_name == "my_job"


def test_from_file_keeps_explicit_name(tmp_path: Path) -> None:
    p = tmp_path / "run.sh"
    p.write_bytes(b"true\n")
    assert JobSpec.from_file(p, name="other").name == "other"
    assert JobSpec.from_file(str(p), name=None).name == "run"


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read job script"):
        JobSpec.from_file(tmp_path / "nope.sh")


def test_from_file_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read job script"):
        JobSpec.from_file(tmp_path)


def test_specs_from_files(tmp_path: Path) -> None:
    paths = []
    for n in ("a", "b"):
        p = tmp_path / f"{n}.sh"
        p.write_bytes(f"echo {n}\n".encode())
        paths.append(p)
    specs = specs_from_files(paths, queue="debug")
    assert [s.name for s in specs] == ["a", "b"]
    assert [s.script for s in specs] == [b"echo a\n", b"echo b\n"]
    assert all(s.queue == "debug" for s in specs)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("run", "run"),
        ("my job", "my_job"),
        (".hidden", "hidden"),
        ("-rf", "rf"),
        ("+x", "x"),
        ("..", "job"),
        ("", "job"),
        ("---", "job"),
        ("résumé", "r_sum_"),
        ("a/b", "a_b"),
        ("a" * 150, "a" * 100),
        ("job.v2+final", "job.v2+final"),
    ],
)
def test_default_name(stem: str, expected: str) -> None:
    assert default_name(stem) == expected


@pytest.mark.parametrize(
    "stem", ["x", "a b c", "..a", "-" * 5 + "a" * 200, "日本語", "$(id)", "\n", "a\x00b", "_"],
)
def test_default_name_is_always_valid(stem: str) -> None:
    assert check_job_name(default_name(stem))
