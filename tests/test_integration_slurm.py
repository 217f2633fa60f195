"""Integration tests against the real single-node Slurm of the test bed.

Every test here talks to the real sshd (127.0.0.1:2222, user sshqtest) and
submits real Slurm jobs with ``sbatch``.  Slurm's ``MinJobAge`` is 10 s, so
``squeue`` forgets a finished job some 10-30 s after it ended; the tests that
need that wait for it by asking ``squeue`` locally (as root), never by bare
sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_state

import sshq._client.core as sshq_client  # where agent calls are made
from sshq import AsyncClient, InvalidInputError, JobSpec, JobState
from sshq.remote.status import parse_status

pytestmark = pytest.mark.slurm

TEST_HOME = "/home/sshqtest"

# ---------------------------------------------------------------- helpers


def squeue_ids(job_ids: list[str]) -> set[str]:
    """The job ids slurmctld still knows, in any state (run locally as root).

    ``-t all``: without it squeue hides finished jobs (COMPLETED, FAILED...)
    that slurmctld still remembers until MinJobAge has passed.
    """
    r = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=30,
    )
    if r.returncode != 0:
        # "Invalid job id specified": none of them is known any more.
        return set()
    return set(r.stdout.split()) & set(job_ids)


async def wait_forgotten(job_ids: list[str], timeout: float = 150.0) -> None:
    """Wait until squeue no longer lists any of ``job_ids``."""
    deadline = time.monotonic() + timeout
    while True:
        known = squeue_ids(job_ids)
        if not known:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"squeue still lists {sorted(known)} after {timeout} s")
        await asyncio.sleep(0.5)


def pgrep_sshqtest(pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-u", "sshqtest", "-f", pattern], capture_output=True,
                       text=True, timeout=30)
    return r.stdout.split()




async def status_of(client: AsyncClient, sid: int) -> dict[str, str]:
    return parse_status((await client.cat_log(sid, "status")).decode())


@pytest.fixture
def scancel_at_end() -> Iterator[list[str]]:
    """Slurm job ids to cancel (as root) when the test ends, whatever happened."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


@pytest.fixture(autouse=True)
def _close_ssh_masters(state_dir: Path) -> Iterator[None]:
    """Stop the openssh ControlMaster processes this test started."""
    yield
    cm = state_dir / "cm"
    if cm.is_dir():
        for sock in cm.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "sshq-test"],
                           capture_output=True, timeout=30)


SLURM_PLATFORMS = ["slurm", "slurm-openssh"]


# ---------------------------------------------------------------- basic life


@pytest.mark.parametrize("platform", SLURM_PLATFORMS)
async def test_submit_wait_succeeded_status_file_and_layout(
    slurm_testbed: dict[str, str], client: AsyncClient, platform: str, run_id: str,
    scancel_at_end: list[str],
) -> None:
    spec = JobSpec(command='echo "hello from $SSHQ_JOB_NAME"; echo "to err" >&2', name="basic")
    (job,) = await client.submit(spec, platform=platform)
    scancel_at_end.append(job.job_id)
    assert job.state is JobState.SUBMITTED, job.message
    assert job.job_id.isdigit()
    assert job.job_runner == "slurm"
    assert job.submit_num == 1
    assert job.job_log_dir == f"{TEST_HOME}/sshq-test/{run_id}/log/job/basic/01"

    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.exit_status == 0
    assert job.signal is None
    assert job.start_time is not None and job.exit_time is not None
    assert job.submit_time is not None and job.submit_time <= job.exit_time

    assert await client.cat_log(job.id, "out") == b"hello from basic\n"
    assert await client.cat_log(job.id, "err") == b"to err\n"
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_ID"] == job.job_id
    assert st["SSHQ_JOB_RUNNER_NAME"] == "slurm"
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    assert "SSHQ_JOB_EXIT_SIGNAL" not in st
    for key in ("SSHQ_JOB_INIT_TIME", "SSHQ_JOB_EXIT_TIME", "SSHQ_JOB_RUNNER_SUBMIT_TIME"):
        assert st[key].endswith("Z") and "T" in st[key], key

    script = (await client.cat_log(job.id, "job")).decode()
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --job-name=basic\n" in script
    assert f"#SBATCH --output={job.job_log_dir}/job.out\n" in script
    assert f"#SBATCH --error={job.job_log_dir}/job.err\n" in script

    # Same name again: submit number 2, directory 02, NN points at the latest.
    (job2,) = await client.submit(spec, platform=platform)
    scancel_at_end.append(job2.job_id)
    assert job2.submit_num == 2
    assert job.job_log_dir.endswith("/01")
    assert job2.job_log_dir.endswith("/02")
    assert job2.job_log_dir.rsplit("/", 1)[0] == job.job_log_dir.rsplit("/", 1)[0]
    nn = Path(job.job_log_dir).parent / "NN"
    assert nn.is_symlink()
    assert os.readlink(nn) == "02"
    (job2,) = await client.wait([job2.id], timeout=120)
    assert job2.state is JobState.SUCCEEDED, job2.message
    assert job2.job_id != job.job_id
    st2 = await status_of(client, job2.id)
    assert st2["SSHQ_JOB_ID"] == job2.job_id
    # The first job's files are untouched by the second.
    assert await client.cat_log(job.id, "out") == b"hello from basic\n"


@pytest.mark.parametrize("platform", SLURM_PLATFORMS)
async def test_exit_3_is_failed(slurm_testbed: dict[str, str], client: AsyncClient,
                                platform: str, scancel_at_end: list[str]) -> None:
    (job,) = await client.submit(JobSpec(command="echo before; exit 3", name="three"),
                                 platform=platform)
    scancel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.FAILED
    assert job.exit_status == 3
    assert job.signal is None
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_EXIT_STATUS"] == "3"
    assert await client.cat_log(job.id) == b"before\n"


async def test_kill_running_job_records_term(slurm_testbed: dict[str, str], client: AsyncClient,
                                             scancel_at_end: list[str]) -> None:
    m = f"3{uuid.uuid4().int % 10**8:08d}"  # unique sleep: marks this job's process
    (job,) = await client.submit(JobSpec(command=f"echo started; sleep {m}", name="victim"),
                                 platform="slurm")
    scancel_at_end.append(job.job_id)
    job = await wait_for_state(client, job.id, JobState.RUNNING)
    # Slurm says RUNNING a moment before the batch script runs: wait for the
    # user's sleep, so the wrapper's traps are set.
    deadline = time.monotonic() + 60
    while not pgrep_sshqtest(f"sleep {m}"):
        assert time.monotonic() < deadline, "the job's sleep never started"
        await asyncio.sleep(0.2)
    assert "SSHQ_JOB_INIT_TIME" in await status_of(client, job.id)
    await client.kill([job.id])
    (job,) = await client.wait([job.id], timeout=60)
    assert job.state is JobState.FAILED
    assert job.signal == "TERM"
    assert job.exit_status is None
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_EXIT_SIGNAL"] == "TERM"
    assert "SSHQ_JOB_EXIT_TIME" in st
    deadline = time.monotonic() + 30
    while pgrep_sshqtest(f"sleep {m}") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert pgrep_sshqtest(f"sleep {m}") == []
    # A second kill of a final job is a no-op that changes nothing.
    (again,) = await client.kill([job.id])
    assert again.state is JobState.FAILED and again.signal == "TERM"


# ---------------------------------------------------------------- forgotten jobs


async def test_first_poll_after_slurm_forgot_the_jobs(
    slurm_testbed: dict[str, str], client: AsyncClient, scancel_at_end: list[str],
) -> None:
    """Jobs never polled while Slurm knew them: the status file decides.

    One submission of three jobs (they share the wait for Slurm to forget):
    exit 0, exit 5, and a wrapper killed by SIGKILL (records no exit).
    """
    specs = [
        JobSpec(command="echo ok", name="forgot-ok"),
        JobSpec(command="echo five; exit 5", name="forgot-five"),
        # The user's script kills the job wrapper (its parent) with SIGKILL:
        # no trap can run, so the status file records a start and no exit.
        JobSpec(command="echo dying; kill -9 $PPID; sleep 5", name="forgot-sigkill"),
    ]
    jobs = await client.submit(specs, platform="slurm")
    scancel_at_end.extend(j.job_id for j in jobs)
    assert [j.state for j in jobs] == [JobState.SUBMITTED] * 3, [j.message for j in jobs]
    # No sshq poll until squeue has forgotten all three.
    await wait_forgotten([j.job_id for j in jobs])
    stored = await client.jobs(ids=[j.id for j in jobs])
    assert [j.state for j in stored] == [JobState.SUBMITTED] * 3

    ok, five, killed = await client.poll([j.id for j in jobs])

    assert ok.state is JobState.SUCCEEDED, ok.message
    assert ok.exit_status == 0 and ok.signal is None
    assert ok.start_time is not None and ok.exit_time is not None

    assert five.state is JobState.FAILED, five.message
    assert five.exit_status == 5 and five.signal is None

    assert killed.state is JobState.FAILED, killed.message
    assert killed.exit_status is None
    assert killed.signal is None
    assert killed.message  # says why: the runner forgot it and no exit was recorded
    assert "no longer knows" in killed.message
    assert killed.start_time is not None
    st = await status_of(client, killed.id)
    assert "SSHQ_JOB_INIT_TIME" in st
    assert "SSHQ_JOB_EXIT_STATUS" not in st and "SSHQ_JOB_EXIT_SIGNAL" not in st


# ---------------------------------------------------------------- batching


async def test_batches_cost_one_agent_call_per_host(
    slurm_testbed: dict[str, str], client: AsyncClient, monkeypatch: pytest.MonkeyPatch,
    scancel_at_end: list[str],
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    real = sshq_client.call_agent

    async def counting(transport: Any, python: str, op: str, payload: dict[str, Any],
                       **kw: Any) -> dict[str, Any]:
        calls.append((op, payload))
        return await real(transport, python, op, payload, **kw)

    monkeypatch.setattr(sshq_client, "call_agent", counting)

    # First contact: remote-init travels inside the ONE submit call (then cached).
    three = await client.submit(
        [JobSpec(command="sleep 60", name=n) for n in ("a", "b", "c")], platform="slurm")
    scancel_at_end.extend(j.job_id for j in three)
    assert [j.state for j in three] == [JobState.SUBMITTED] * 3, [j.message for j in three]
    assert [op for op, _ in calls] == ["submit"]
    assert len(calls[0][1]["jobs"]) == 3
    assert calls[0][1]["init"]["run_dir"]
    assert all(j.job_log_dir.startswith("/") and "SSHQ-RUN-DIR" not in j.job_log_dir
               for j in three)
    assert [j.name for j in three] == ["a", "b", "c"]
    assert len({j.job_id for j in three}) == 3

    # Remote-init is cached: the next batch is exactly one SSH command.
    calls.clear()
    fifty = await client.submit(
        [JobSpec(command="sleep 60", name=f"many{i:02d}") for i in range(50)],
        platform="slurm")
    scancel_at_end.extend(j.job_id for j in fifty)
    assert [op for op, _ in calls] == ["submit"]
    assert all(j.state is JobState.SUBMITTED for j in fifty), {j.message for j in fifty}
    assert len({j.job_id for j in fifty}) == 50

    # Polling all 53 active jobs: one call.
    calls.clear()
    polled = await client.poll(all=True)
    assert [op for op, _ in calls] == ["poll"]
    assert len(calls[0][1]["jobs"]) == 53
    assert {j.id for j in polled} == {j.id for j in three + fifty}
    assert all(j.state in (JobState.SUBMITTED, JobState.RUNNING) for j in polled)

    # Killing all of them: one call.
    calls.clear()
    await client.kill([j.id for j in three + fifty], settle=0)
    assert [op for op, _ in calls] == ["kill"]
    # scancel went through for every job: none stays pending or running.
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run(["squeue", "-h", "-t", "PD,R", "-o", "%i", "-j",
                            ",".join(j.job_id for j in three + fifty)],
                           capture_output=True, text=True, timeout=30)
        if not r.stdout.split():
            break
        assert time.monotonic() < deadline, f"still pending/running: {r.stdout.split()}"
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------- hostile input


def hostile_strings(canary: str) -> list[str]:
    return [
        "it's",
        'say "hi"',
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"x; touch {canary}",
        f"x | touch {canary}",
        f"x && touch {canary} &",
        "  leading and  double  spaces ",
        "héllo wörld ☃",
        "$HOME ${HOME} $((1+1)) $1 $@",
        "back\\slash \\n \\0",
        "*",
        "-n",
        "",
        "!! !$",
        "tab\there",
        "~",
        "%s %d %%",
        "{a,b}",
        "line one\nline two\n",
        "'\"'\"'",
        "SSHQ_USER_SCRIPT_delim",
    ]


@pytest.mark.parametrize("platform", SLURM_PLATFORMS)
async def test_hostile_arguments_and_env_values_reach_the_job_byte_exact(
    slurm_testbed: dict[str, str], client: AsyncClient, platform: str,
    scancel_at_end: list[str],
) -> None:
    canary = f"/tmp/sshq-canary-{uuid.uuid4().hex}"
    values = hostile_strings(canary)
    env = {f"H{i}": v for i, v in enumerate(values)}
    env_refs = " ".join(f'"$H{i}"' for i in range(len(values)))
    script = (
        "#!/bin/bash\n"
        "printf '%s\\0' \"$@\"\n"
        "printf 'ENV\\0'\n"
        f"printf '%s\\0' {env_refs}\n"
    ).encode()
    spec = JobSpec(script=script, name="hostile", arguments=tuple(values), environment=env)
    (job,) = await client.submit(spec, platform=platform)
    scancel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.message
    expected = (b"".join(v.encode() + b"\0" for v in values) + b"ENV\0"
                + b"".join(v.encode() + b"\0" for v in values))
    out = await client.cat_log(job.id, "out")
    assert out == expected
    assert await client.cat_log(job.id, "err") == b""
    assert not os.path.exists(canary), "a hostile string was run by a shell"
    for d in (job.work_dir, job.job_log_dir, TEST_HOME):
        assert not os.path.exists(os.path.join(d, "CANARY"))


@pytest.mark.parametrize("bad", [
    pytest.param({"name": "bad\nname"}, id="name-newline"),
    pytest.param({"name": "bad\x00name"}, id="name-nul"),
    pytest.param({"environment": {"A-B": "1"}}, id="env-key-dash"),
    pytest.param({"environment": {"OK": "a\x00b"}}, id="env-value-nul"),
    pytest.param({"queue": "debug\n#SBATCH --wrap=touch /tmp/x"}, id="queue-newline"),
    pytest.param({"account": "proj\rx"}, id="account-cr"),
    pytest.param({"arguments": ("a\x00b",)}, id="arg-nul"),
    pytest.param({"directives": ("--comment=a\nb",)}, id="directive-newline"),
])
async def test_invalid_input_refused_before_anything_is_sent(
    slurm_testbed: dict[str, str], client: AsyncClient, run_id: str, bad: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real = sshq_client.call_agent

    async def counting(transport: Any, python: str, op: str, payload: dict[str, Any],
                       **kw: Any) -> dict[str, Any]:
        calls.append(op)
        return await real(transport, python, op, payload, **kw)

    monkeypatch.setattr(sshq_client, "call_agent", counting)
    good = JobSpec(command="echo fine", name="good")
    with pytest.raises(InvalidInputError):
        await client.submit([good, JobSpec(command="echo bad", **bad)], platform="slurm")
    assert calls == []
    assert await client.jobs() == []
    assert not os.path.exists(f"{TEST_HOME}/sshq-test/{run_id}")


# ---------------------------------------------------------------- sbatch refuses


async def test_sbatch_failure_is_submit_failed_with_its_error(
    slurm_testbed: dict[str, str], client: AsyncClient,
) -> None:
    ok_spec = JobSpec(command="echo fine", name="fine")
    bad_spec = JobSpec(command="echo never", name="nopart", queue="nopartition")
    ok, bad = await client.submit([ok_spec, bad_spec], platform="slurm")
    assert bad.state is JobState.SUBMIT_FAILED
    assert bad.job_id == ""
    assert "invalid partition" in bad.message.lower()
    assert ok.state is JobState.SUBMITTED, ok.message
    (ok,) = await client.wait([ok.id], timeout=120)
    assert ok.state is JobState.SUCCEEDED
    st = await status_of(client, bad.id)
    assert "SSHQ_JOB_RUNNER_SUBMIT_FAILED" in st
    # A final job is left alone by later polls.
    (bad2,) = await client.poll([bad.id])
    assert bad2.state is JobState.SUBMIT_FAILED and bad2.message == bad.message


def test_cli_sbatch_failure(slurm_testbed: dict[str, str],
                            sshq: Callable[..., subprocess.CompletedProcess[bytes]]) -> None:
    r = sshq("submit", "-p", "slurm", "--queue", "nopartition", "--command", "echo never")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "invalid partition" in err.lower()
    assert "Traceback" not in err
    r = sshq("jobs", "--json")
    (job,) = json.loads(r.stdout)
    assert job["state"] == "submit-failed"
    assert "invalid partition" in job["message"].lower()


def test_cli_sbatch_failure_is_one_stderr_line(
        slurm_testbed: dict[str, str],
        sshq: Callable[..., subprocess.CompletedProcess[bytes]]) -> None:
    r = sshq("submit", "-p", "slurm", "--queue", "nopartition", "--command", "echo never")
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("sshq: ")
    assert "invalid partition" in lines[0].lower()


async def test_run_dir_with_a_space(slurm_testbed: dict[str, str], tmp_path: Path,
                                    state_dir: Path, run_id: str,
                                    scancel_at_end: list[str]) -> None:
    t = slurm_testbed
    cfg = tmp_path / "spaced.toml"
    cfg.write_text(
        "[platforms.spaced]\n"
        f'hosts = ["{t["SSHQ_TEST_HOST"]}"]\nport = {t["SSHQ_TEST_PORT"]}\n'
        f'user = "{t["SSHQ_TEST_USER"]}"\nidentity_file = "{t["SSHQ_TEST_KEY"]}"\n'
        f'known_hosts = "{t["SSHQ_TEST_KNOWN_HOSTS"]}"\n'
        f'job_runner = "slurm"\nrun_dir = "~/sshq-test/{run_id}/my runs"\n')
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        (job,) = await c.submit(JobSpec(command="echo spaced", name="sp"), platform="spaced")
        if job.job_id:
            scancel_at_end.append(job.job_id)
        assert job.state is JobState.SUBMITTED, job.message
        (job,) = await c.wait([job.id], timeout=120)
        assert job.state is JobState.SUCCEEDED, job.message
        assert await c.cat_log(job.id) == b"spaced\n"


# ---------------------------------------------------------------- bytes


async def test_invalid_utf8_output(slurm_testbed: dict[str, str], client: AsyncClient,
                                   sshq: Callable[..., subprocess.CompletedProcess[bytes]],
                                   scancel_at_end: list[str]) -> None:
    raw = b"\xff\xfe ok\n"
    (job,) = await client.submit(JobSpec(command="printf '\\xff\\xfe ok\\n'", name="badutf8"),
                                 platform="slurm")
    scancel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.message
    assert await client.cat_log(job.id) == raw
    await client.close()  # the CLI shares the state directory

    r = sshq("cat-log", str(job.id))
    assert r.returncode == 0, r.stderr
    assert r.stdout == raw

    r = sshq("cat-log", str(job.id), "--json")
    assert r.returncode == 0, r.stderr
    (obj,) = json.loads(r.stdout)
    assert obj["id"] == job.id
    assert obj["file"] == "out"
    assert "\ufffd" in obj["content"]
    assert obj["content"].endswith(" ok\n")
    assert base64.b64decode(obj["content_b64"]) == raw


async def test_retrieve(slurm_testbed: dict[str, str], client: AsyncClient, tmp_path: Path,
                        scancel_at_end: list[str]) -> None:
    (job,) = await client.submit(JobSpec(command="echo retrieved", name="fetchme"),
                                 platform="slurm")
    scancel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED
    dest = tmp_path / "dest"
    (local,) = await client.retrieve([job.id], dest=dest)
    assert local == dest / "fetchme" / "01"
    assert (local / "job.out").read_bytes() == b"retrieved\n"
    assert (local / "job.err").read_bytes() == b""
    st = parse_status((local / "job.status").read_text())
    assert st["SSHQ_JOB_ID"] == job.job_id and st["SSHQ_JOB_EXIT_STATUS"] == "0"
    assert (local / "job").read_bytes().startswith(b"#!/bin/bash\n")


# ---------------------------------------------------------------- follow


@pytest.mark.timeout(240)
def test_cat_log_follow_streams_live(slurm_testbed: dict[str, str], cli_env: dict[str, str],
                                     sshq: Callable[..., subprocess.CompletedProcess[bytes]],
                                     scancel_at_end: list[str]) -> None:
    r = sshq("submit", "-p", "slurm", "--name", "ticker", "--json", "--command",
             "for i in $(seq 1 25); do echo line $i; sleep 0.2; done; exit 7")
    assert r.returncode == 0, r.stderr
    (job,) = json.loads(r.stdout)
    scancel_at_end.append(job["job_id"])
    with subprocess.Popen(
        [sys.executable, "-m", "sshq", "cat-log", str(job["id"]), "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            t_first = time.monotonic()
            rest = proc.stdout.read()
            t_end = time.monotonic()
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert first == b"line 1\n", err
    assert first + rest == b"".join(b"line %d\n" % i for i in range(1, 26))
    # The job prints for ~5 s: the first line must arrive long before the end.
    assert t_end - t_first > 2.0, (t_end - t_first)
    assert proc.returncode == 7, err
