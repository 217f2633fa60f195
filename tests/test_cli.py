"""The ``sshq`` command as users and scripts run it: ``python -m sshq ...``.

Most tests use the ``local`` and ``bg`` platforms (background jobs: fast);
the full set of submit options goes to the real Slurm.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sshq._client.core as sshq_client  # where agent calls are made
from sshq import AsyncClient, JobSpec
from sshq.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello.sh"

REQUIRED_KEYS = {
    "id", "platform", "name", "job_runner", "job_id", "submit_num", "state", "exit_status",
    "signal", "job_log_dir", "submit_time", "start_time", "exit_time",
}
STATES = {"submitted", "submit-failed", "running", "succeeded", "failed"}

Run = Callable[..., subprocess.CompletedProcess[bytes]]


def jobs_of(r: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    """Parse a --json output and check every job object's shape."""
    assert not r.stdout.startswith(b"\x1b"), "no terminal codes on a pipe"
    data = json.loads(r.stdout)
    assert isinstance(data, list)
    for obj in data:
        assert REQUIRED_KEYS <= set(obj), REQUIRED_KEYS - set(obj)
        assert isinstance(obj["id"], int)
        assert isinstance(obj["submit_num"], int) and obj["submit_num"] >= 1
        assert obj["state"] in STATES
        assert obj["exit_status"] is None or isinstance(obj["exit_status"], int)
        assert obj["signal"] is None or isinstance(obj["signal"], str)
        for k in ("submit_time", "start_time", "exit_time"):
            assert obj[k] is None or (isinstance(obj[k], str) and obj[k].endswith("Z")), obj[k]
    return data


def one_error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def wait_started(sshq: Run, sid: int, timeout: float = 60) -> None:
    """Wait until the job wrapper has recorded its start (its traps are set)."""
    deadline = time.monotonic() + timeout
    while b"SSHQ_JOB_INIT_TIME=" not in sshq("cat-log", str(sid), "--file", "status").stdout:
        assert time.monotonic() < deadline, f"job {sid} did not start in {timeout} s"
        time.sleep(0.2)


def submit_json(sshq: Run, *args: str) -> list[dict[str, Any]]:
    r = sshq("submit", "--json", *args)
    assert r.returncode == 0, r.stderr
    return jobs_of(r)


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("cmd", [
    [], ["submit"], ["poll"], ["wait"], ["kill"], ["cat-log"], ["retrieve"], ["jobs"],
    ["hosts"], ["hosts", "trust"],
])
def test_help_exits_0(cmd: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, SSHQ_STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-m", "sshq", *cmd, "--help"], capture_output=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert b"Usage:" in r.stdout
    assert r.stderr == b""


# ---------------------------------------------------------------- JSON


def test_json_output_of_every_command(testbed: dict[str, str], sshq: Run,
                                      tmp_path: Path) -> None:
    (job,) = submit_json(sshq, "-p", "local", "--name", "js", "--command", "echo json")
    assert job["platform"] == "local" and job["name"] == "js"
    assert job["job_runner"] == "background" and job["job_id"].isdigit()
    assert job["state"] == "submitted" and job["submit_num"] == 1
    sid = str(job["id"])

    r = sshq("wait", sid, "--json", "--interval", "0.2", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    (w,) = jobs_of(r)
    assert w["state"] == "succeeded" and w["exit_status"] == 0
    assert w["start_time"] and w["exit_time"]

    r = sshq("poll", sid, "--json")
    assert r.returncode == 0, r.stderr
    (p,) = jobs_of(r)
    assert p["state"] == "succeeded" and p["id"] == job["id"]

    r = sshq("cat-log", sid, "--json")
    assert r.returncode == 0, r.stderr
    (c,) = jobs_of(r)
    assert c["content"] == "json\n" and c["file"] == "out"

    r = sshq("cat-log", sid, "--file", "status", "--json")
    (c,) = jobs_of(r)
    assert "SSHQ_JOB_EXIT_STATUS=0\n" in c["content"]

    r = sshq("jobs", "--json")
    assert r.returncode == 0, r.stderr
    assert [j["id"] for j in jobs_of(r)] == [job["id"]]

    r = sshq("retrieve", sid, "--dest", str(tmp_path / "dest"), "--json")
    assert r.returncode == 0, r.stderr
    (rt,) = jobs_of(r)
    assert Path(rt["local_dir"]) == tmp_path / "dest" / "js" / "01"
    assert (Path(rt["local_dir"]) / "job.out").read_bytes() == b"json\n"

    # kill (and poll --all) on a running job
    (k,) = submit_json(sshq, "-p", "local", "--name", "sleeper", "--command",
                       "echo up; sleep 120")
    wait_started(sshq, k["id"])
    r = sshq("poll", "--all", "--json")
    assert r.returncode == 0, r.stderr
    assert [j["id"] for j in jobs_of(r)] == [k["id"]]
    r = sshq("kill", str(k["id"]), "--json")
    assert r.returncode == 0, r.stderr
    (killed,) = jobs_of(r)
    assert killed["id"] == k["id"]
    r = sshq("wait", str(k["id"]), "--json", "--timeout", "30", "--interval", "0.2")
    assert r.returncode == 1
    (killed,) = jobs_of(r)
    assert killed["state"] == "failed" and killed["signal"] == "TERM"


def test_submit_plain_output_names_id_platform_and_job_id(testbed: dict[str, str],
                                                          sshq: Run) -> None:
    r = sshq("submit", "-p", "local", "--command", "true")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.decode().splitlines()
    cols = header.split("\t")
    assert {"id", "platform", "job_id"} <= set(cols)
    values = dict(zip(cols, row.split("\t"), strict=True))
    assert values["id"] == "1" and values["platform"] == "local"
    assert values["job_id"].isdigit()


# ---------------------------------------------------------------- zero config


def test_submit_wait_hello_on_builtin_localhost_without_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSHQ_", "XDG_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_STATE_HOME=str(home / ".local" / "state"),
               SSHQ_STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-m", "sshq", "submit", "--wait", "--timeout", "60",
                        str(HELLO)], capture_output=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert b"succeeded" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sshq", "jobs", "--json"], capture_output=True,
                       timeout=60, env=env, cwd=tmp_path)
    (job,) = jobs_of(r)
    assert job["platform"] == "localhost" and job["name"] == "hello"
    assert job["state"] == "succeeded" and job["exit_status"] == 0
    assert job["job_log_dir"] == str(home / "sshq-run" / "log" / "job" / "hello" / "01")
    out = (Path(job["job_log_dir"]) / "job.out").read_text()
    assert out.startswith("Hello from ") and "(sshq id 1)" in out and out.endswith("done\n")


# ---------------------------------------------------------------- wait / jobs


def test_wait_exit_codes(testbed: dict[str, str], sshq: Run) -> None:
    ok1, ok2 = (submit_json(sshq, "-p", "local", "--command", "true")[0] for _ in range(2))
    (bad,) = submit_json(sshq, "-p", "local", "--command", "exit 4")
    (slow,) = submit_json(sshq, "-p", "local", "--command", "sleep 120")
    try:
        r = sshq("wait", str(ok1["id"]), str(ok2["id"]), "--interval", "0.2", "--timeout", "60")
        assert r.returncode == 0, r.stderr

        r = sshq("wait", f"{ok1['id']},{bad['id']}", "--json", "--interval", "0.2",
                 "--timeout", "60")
        assert r.returncode == 1, r.stderr
        states = {j["id"]: (j["state"], j["exit_status"]) for j in jobs_of(r)}
        assert states == {ok1["id"]: ("succeeded", 0), bad["id"]: ("failed", 4)}

        r = sshq("wait", str(slow["id"]), "--timeout", "1", "--interval", "0.2", "--json")
        assert r.returncode == 124
        line = one_error_line(r)
        assert "timed out" in line
        (s,) = jobs_of(r)
        assert s["state"] in ("submitted", "running")
    finally:
        sshq("kill", str(slow["id"]))


def test_jobs_filters(testbed: dict[str, str], sshq: Run) -> None:
    (ok,) = submit_json(sshq, "-p", "local", "--name", "good", "--command", "true")
    (bad,) = submit_json(sshq, "-p", "local", "--name", "bad", "--command", "exit 1")
    r = sshq("wait", str(ok["id"]), str(bad["id"]), "--interval", "0.2", "--timeout", "60")
    assert r.returncode == 1
    r = sshq("jobs", "--state", "failed", "--json")
    assert r.returncode == 0, r.stderr
    assert [(j["id"], j["name"]) for j in jobs_of(r)] == [(bad["id"], "bad")]
    r = sshq("jobs", "--state", "succeeded", "--json")
    assert [j["id"] for j in jobs_of(r)] == [ok["id"]]
    r = sshq("jobs", "--state", "running", "--json")
    assert jobs_of(r) == []
    r = sshq("jobs", "--platform", "local", "--json")
    assert [j["id"] for j in jobs_of(r)] == [ok["id"], bad["id"]]
    r = sshq("jobs", "--platform", "bg", "--json")
    assert jobs_of(r) == []
    r = sshq("jobs", "--limit", "1", "--json")
    assert [j["id"] for j in jobs_of(r)] == [bad["id"]]
    r = sshq("jobs", "--state", "nonsense")
    assert r.returncode == 2


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cmd", [
    ["poll", "999"], ["wait", "999"], ["kill", "999"], ["cat-log", "999"],
    ["retrieve", "999"], ["poll", "999", "--json"], ["cat-log", "999", "--follow"],
])
def test_unknown_id_exit_2_one_line(testbed: dict[str, str], sshq: Run,
                                    cmd: list[str]) -> None:
    r = sshq(*cmd)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "unknown job id" in one_error_line(r)


@pytest.mark.parametrize("args, text", [
    (["--env", "A-B=1"], "invalid environment variable name"),
    (["--env", "NOVALUE"], "KEY=VALUE"),
    (["--name", "bad\nname"], "newline"),
    (["--name", "../escape"], "invalid job name"),
    (["--queue", "debug\n#SBATCH --wrap=id"], "newline"),
    (["--walltime", "soon"], "invalid walltime"),
    (["--memory", "lots"], "invalid memory"),
    (["--mail-events", "begin"], "mail user"),
])
def test_invalid_input_exit_2_nothing_submitted(testbed: dict[str, str], sshq: Run,
                                                args: list[str], text: str) -> None:
    r = sshq("submit", "-p", "slurm", *args, "--command", "true")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert text in one_error_line(r)
    assert jobs_of(sshq("jobs", "--json")) == []


def test_usage_errors(testbed: dict[str, str], sshq: Run) -> None:
    r = sshq("poll")
    assert r.returncode == 2 and "--all" in one_error_line(r)
    r = sshq("submit", "-p", "local")
    assert r.returncode == 2
    one_error_line(r)
    r = sshq("submit", "-p", "nosuchplatform", "--command", "true")
    assert r.returncode == 2 and "unknown platform" in one_error_line(r)
    r = sshq("poll", "abc")
    assert r.returncode == 2 and "ids are numbers" in one_error_line(r)


# ---------------------------------------------------------------- input safety


def test_cli_arguments_and_env_values_byte_exact(testbed: dict[str, str], sshq: Run,
                                                 tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    values = ["it's", 'a "b"', f"$(touch {canary})", f"`touch {canary}`",
              f"; touch {canary}", "héllo wörld ☃", " two  words ", "", "x\ny"]
    script = tmp_path / "show.sh"
    script.write_text("#!/bin/bash\nprintf '%s\\0' \"$@\" \"$E1\" \"$E2\"\n")
    args = []
    for v in values:
        args += ["--arg", v]
    r = sshq("submit", "-p", "bg", "--json", *args, "--env", f"E1={values[2]}",
             "--env", "E2=two words", str(script))
    assert r.returncode == 0, r.stderr
    (job,) = jobs_of(r)
    assert job["name"] == "show"
    r = sshq("wait", str(job["id"]), "--interval", "0.2", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    r = sshq("cat-log", str(job["id"]))
    expected = b"".join(v.encode() + b"\0" for v in [*values, values[2], "two words"])
    assert r.stdout == expected
    assert not canary.exists()


# ---------------------------------------------------------------- one round trip


def test_cli_submit_three_scripts_is_one_agent_call(
    testbed: dict[str, str], cli_env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """In-process CLI run, counting agent calls (each is one SSH command)."""
    for k in ("SSHQ_CONFIG", "SSHQ_STATE_DIR"):
        monkeypatch.setenv(k, cli_env[k])
    calls: list[tuple[str, int]] = []
    real = sshq_client.call_agent

    async def counting(transport: Any, python: str, op: str, payload: dict[str, Any],
                       **kw: Any) -> dict[str, Any]:
        calls.append((op, len(payload.get("jobs", []))))
        return await real(transport, python, op, payload, **kw)

    monkeypatch.setattr(sshq_client, "call_agent", counting)

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exc:
            cli_main(list(argv))
        return int(exc.value.code or 0)

    scripts = []
    for n in ("a", "b", "c"):
        p = tmp_path / f"{n}.sh"
        p.write_text(f"#!/bin/bash\necho {n}\n")
        scripts.append(str(p))
    assert run("submit", "-p", "bg", "--json", *scripts) == 0
    first = json.loads(capsys.readouterr().out)
    assert [j["name"] for j in first] == ["a", "b", "c"]
    assert [c for c in calls if c[0] != "init"] == [("submit", 3)]
    assert [c[0] for c in calls].count("init") <= 1

    calls.clear()
    assert run("submit", "-p", "bg", "--json", *scripts) == 0
    second = json.loads(capsys.readouterr().out)
    assert [j["submit_num"] for j in second] == [2, 2, 2]
    assert calls == [("submit", 3)]  # remote-init is cached: ONE ssh command

    calls.clear()
    assert run("poll", "--all", "--json") == 0
    assert [c[0] for c in calls] == ["poll"]
    assert len(json.loads(capsys.readouterr().out)) >= 1


# ---------------------------------------------------------------- state database


async def test_state_db_is_private_and_wal(testbed: dict[str, str], sshq: Run,
                                           tmp_path: Path, cli_env: dict[str, str],
                                           config_file: Path) -> None:
    fresh = tmp_path / "fresh-state"
    env = dict(cli_env, SSHQ_STATE_DIR=str(fresh))
    r = sshq("submit", "-p", "local", "--command", "true", env=env)
    assert r.returncode == 0, r.stderr
    db = fresh / "sshq.db"
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    # While a client holds it open (WAL and shm files exist), all are private.
    c = AsyncClient(config_file, state_dir=fresh)
    try:
        await c.submit(JobSpec(command="true", name="again"), platform="local")
        files = sorted(p.name for p in fresh.iterdir() if p.name.startswith("sshq.db"))
        assert "sshq.db-wal" in files
        for name in files:
            assert stat.S_IMODE((fresh / name).stat().st_mode) == 0o600, name
    finally:
        await c.close()


# ---------------------------------------------------------------- Slurm options


def test_submit_every_option_to_slurm(slurm_testbed: dict[str, str], sshq: Run) -> None:
    (job,) = submit_json(
        sshq, "-p", "slurm", "--name", "sim", "--walltime", "0:10:00", "--cpus", "2",
        "--memory", "2G", "--queue", "debug", "--account", "proj1", "--env", "ALPHA=1",
        "--env", "BETA=two words", "--mail-user", "me@example.org",
        "--mail-events", "begin,end,fail",
        "--command", 'echo "alpha=$ALPHA beta=$BETA cpus=$SLURM_CPUS_PER_TASK" --seed 3')
    try:
        assert job["state"] == "submitted", job["message"]
        assert job["name"] == "sim" and job["job_runner"] == "slurm"
        r = sshq("cat-log", str(job["id"]), "--file", "job")
        script = r.stdout.decode()
        for line in ("--job-name=sim", "--time=00:10:00", "--cpus-per-task=2", "--mem=2048M",
                     "--partition=debug", "--account=proj1", "--mail-user=me@example.org",
                     "--mail-type=BEGIN,END,FAIL"):
            assert f"#SBATCH {line}\n" in script, line
        r = sshq("wait", str(job["id"]), "--json", "--timeout", "120")
        assert r.returncode == 0, r.stderr
        (done,) = jobs_of(r)
        assert done["state"] == "succeeded"
        r = sshq("cat-log", str(job["id"]))
        assert r.stdout == b"alpha=1 beta=two words cpus=2 --seed 3\n"
        tl = subprocess.run(["scontrol", "show", "job", job["job_id"]], capture_output=True,
                            text=True, timeout=30).stdout
        if tl:  # still remembered: Slurm got the resources asked for
            assert "TimeLimit=00:10:00" in tl and "Partition=debug" in tl
    finally:
        subprocess.run(["scancel", job["job_id"]], capture_output=True, timeout=30)


def test_submit_three_scripts_to_slurm(slurm_testbed: dict[str, str], sshq: Run,
                                       tmp_path: Path) -> None:
    scripts = []
    for n in ("a", "b", "c"):
        p = tmp_path / f"{n}.sh"
        p.write_text(f"#!/bin/bash\necho I am {n}\n")
        scripts.append(str(p))
    jobs = submit_json(sshq, "-p", "slurm", *scripts)
    try:
        assert [j["name"] for j in jobs] == ["a", "b", "c"]
        assert all(j["state"] == "submitted" and j["job_id"].isdigit() for j in jobs)
        r = sshq("wait", *(str(j["id"]) for j in jobs), "--timeout", "120")
        assert r.returncode == 0, r.stderr
        for j in jobs:
            assert sshq("cat-log", str(j["id"])).stdout == f"I am {j['name']}\n".encode()
    finally:
        subprocess.run(["scancel", *(j["job_id"] for j in jobs)], capture_output=True,
                       timeout=30)


# ---------------------------------------------------------------- non-UTF-8


def test_non_utf8_argument_reaches_the_job_byte_exact(testbed: dict[str, str],
                                                      cli_env: dict[str, str]) -> None:
    def run(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "sshq", *args], capture_output=True,
                              timeout=120, env=cli_env)

    r = run("submit", "-p", "local", "--json", "--arg", b"\xff\xfe latin-1 \xe9",
            "--command", "printf '%s\\0' \"$1\"")
    assert r.returncode == 0, r.stderr
    (job,) = jobs_of(r)
    r = run("wait", str(job["id"]), "--interval", "0.2", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert run("cat-log", str(job["id"])).stdout == b"\xff\xfe latin-1 \xe9\0"


def test_non_utf8_env_value_reaches_the_job_byte_exact(testbed: dict[str, str],
                                                       cli_env: dict[str, str]) -> None:
    def run(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "sshq", *args], capture_output=True,
                              timeout=120, env=cli_env)

    r = run("submit", "-p", "local", "--json", "--env", b"X=\xff\xfe \xe9",
            "--command", "printf '%s\\0' \"$X\"")
    assert r.returncode == 0, r.stderr
    (job,) = jobs_of(r)
    r = run("wait", str(job["id"]), "--interval", "0.2", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert run("cat-log", str(job["id"])).stdout == b"\xff\xfe \xe9\0"
