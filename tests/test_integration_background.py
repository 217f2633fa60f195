"""Integration tests of the background job runner: over the real sshd (asyncssh
and openssh transports, user sshqtest) and on this machine (local transport).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sshq import AsyncClient, InvalidInputError, JobSpec, JobState
from sshq.remote.status import parse_status

pytestmark = pytest.mark.sshd

PLATFORMS = ["bg", "bg-openssh", "local"]


def _close_masters(state_dir: Path) -> None:
    cm = state_dir / "cm"
    if cm.is_dir():
        for sock in cm.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "sshq-test"],
                           capture_output=True, timeout=30)


@pytest.fixture(autouse=True)
def _close_ssh_masters(state_dir: Path) -> Iterator[None]:
    """Stop the openssh ControlMaster processes this test started."""
    yield
    _close_masters(state_dir)


def job_user(platform: str) -> str:
    """The user background jobs of ``platform`` run as."""
    return "sshqtest" if platform != "local" else str(os.getuid())


def marker() -> str:
    """A unique ``sleep`` duration: its command line marks one test's process."""
    return f"3{random.randrange(10**8):08d}"


def pgrep(platform: str, pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-u", job_user(platform), "-f", pattern],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.split()


async def wait_until(cond: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def status_of(client: AsyncClient, sid: int) -> dict[str, str]:
    return parse_status((await client.cat_log(sid, "status")).decode())


def kill_leftovers(platform: str, pattern: str) -> None:
    for pid in pgrep(platform, pattern):
        subprocess.run(["kill", "-KILL", pid], capture_output=True)


# ---------------------------------------------------------------- life


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_submit_wait_succeeded(testbed: dict[str, str], client: AsyncClient,
                                     platform: str) -> None:
    spec = JobSpec(command='echo "hi $GREETING"; echo oops >&2', name="hello",
                   environment={"GREETING": "there"})
    (job,) = await client.submit(spec, platform=platform)
    assert job.state is JobState.SUBMITTED, job.message
    assert job.job_runner == "background"
    assert job.job_id.isdigit()
    assert job.submit_num == 1 and job.job_log_dir.endswith("/log/job/hello/01")
    (job,) = await client.wait([job.id], timeout=60, interval=0.2)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.exit_status == 0 and job.signal is None
    assert job.start_time is not None and job.exit_time is not None
    assert await client.cat_log(job.id, "out") == b"hi there\n"
    assert await client.cat_log(job.id, "err") == b"oops\n"
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_ID"] == job.job_id
    assert st["SSHQ_JOB_PID"] == job.job_id  # the wrapper is the job
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    assert "SSHQ_JOB_INIT_TIME" in st and "SSHQ_JOB_EXIT_TIME" in st

    (job2,) = await client.submit(spec, platform=platform)
    assert job2.submit_num == 2 and job2.job_log_dir.endswith("/log/job/hello/02")
    # Remote run dirs are on this machine too (readable as root).
    assert os.readlink(Path(job.job_log_dir).parent / "NN") == "02"
    (job2,) = await client.wait([job2.id], timeout=60, interval=0.2)
    assert job2.state is JobState.SUCCEEDED


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_exit_status_failed(testbed: dict[str, str], client: AsyncClient,
                                  platform: str) -> None:
    (job,) = await client.submit(JobSpec(command="exit 3", name="three"), platform=platform)
    (job,) = await client.wait([job.id], timeout=60, interval=0.2)
    assert job.state is JobState.FAILED
    assert job.exit_status == 3 and job.signal is None


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_kill_records_term_and_leaves_no_process(
    testbed: dict[str, str], client: AsyncClient, platform: str,
) -> None:
    m = marker()
    pattern = f"sleep {m}"
    try:
        (job,) = await client.submit(JobSpec(command=f"echo started; sleep {m}", name="victim"),
                                     platform=platform)
        assert job.state is JobState.SUBMITTED, job.message
        # The user's sleep runs: the wrapper has set its traps.
        await wait_until(lambda: pgrep(platform, pattern), "the job's sleep to start")
        (job,) = await client.poll([job.id])
        assert job.state is JobState.RUNNING
        (job,) = await client.kill([job.id])
        (job,) = await client.wait([job.id], timeout=30, interval=0.2)
        assert job.state is JobState.FAILED
        assert job.signal == "TERM"
        assert job.exit_status is None
        assert (await status_of(client, job.id))["SSHQ_JOB_EXIT_SIGNAL"] == "TERM"
        # No process of the job is left behind (give the TERM a moment to land).
        deadline = time.monotonic() + 10
        while pgrep(platform, pattern) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pgrep(platform, pattern) == []
    finally:
        kill_leftovers(platform, pattern)


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_walltime_enforced_by_wrapper_is_xcpu(
    testbed: dict[str, str], client: AsyncClient, platform: str,
) -> None:
    m = marker()
    pattern = f"sleep {m}"
    try:
        (job,) = await client.submit(
            JobSpec(command=f"sleep {m}", name="overtime", walltime=timedelta(seconds=2)),
            platform=platform)
        assert job.state is JobState.SUBMITTED, job.message
        (job,) = await client.wait([job.id], timeout=60, interval=0.3)
        assert job.state is JobState.FAILED
        assert job.signal == "XCPU"
        assert job.exit_status is None
        assert job.start_time is not None and job.exit_time is not None
        assert 1.0 <= (job.exit_time - job.start_time).total_seconds() <= 20
        deadline = time.monotonic() + 10
        while pgrep(platform, pattern) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pgrep(platform, pattern) == []
    finally:
        kill_leftovers(platform, pattern)


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_wrapper_killed_hard_is_failed_without_exit(
    testbed: dict[str, str], client: AsyncClient, platform: str,
) -> None:
    (job,) = await client.submit(
        JobSpec(command="echo dying; kill -9 $PPID; sleep 1", name="sigkill"),
        platform=platform)
    (job,) = await client.wait([job.id], timeout=60, interval=0.2)
    assert job.state is JobState.FAILED
    assert job.exit_status is None and job.signal is None
    assert "no longer knows" in job.message
    st = await status_of(client, job.id)
    assert "SSHQ_JOB_INIT_TIME" in st
    assert "SSHQ_JOB_EXIT_STATUS" not in st and "SSHQ_JOB_EXIT_SIGNAL" not in st


# ---------------------------------------------------------------- input


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_hostile_strings_byte_exact(testbed: dict[str, str], client: AsyncClient,
                                          platform: str, tmp_path: Path) -> None:
    canary = f"/tmp/sshq-canary-{uuid.uuid4().hex}"
    values = [
        "it's", 'say "hi"', f"$(touch {canary})", f"`touch {canary}`", f"x; touch {canary}",
        f"x | touch {canary}", f"x & touch {canary}", " spaced  out ", "héllo wörld ☃",
        "$HOME ${PATH}", "", "-e", "a\nb\n", "\\", "*", "'\"'",
    ]
    env = {f"V{i}": v for i, v in enumerate(values)}
    script = ("#!/bin/bash\nprintf '%s\\0' \"$@\"\nprintf 'ENV\\0'\nprintf '%s\\0' "
              + " ".join(f'"$V{i}"' for i in range(len(values))) + "\n").encode()
    (job,) = await client.submit(
        JobSpec(script=script, name="hostile", arguments=tuple(values), environment=env),
        platform=platform)
    (job,) = await client.wait([job.id], timeout=60, interval=0.2)
    assert job.state is JobState.SUCCEEDED, job.message
    blob = b"".join(v.encode() + b"\0" for v in values)
    assert await client.cat_log(job.id) == blob + b"ENV\0" + blob
    assert not os.path.exists(canary)


async def test_background_refuses_what_it_cannot_express(
    testbed: dict[str, str], client: AsyncClient,
) -> None:
    for bad in ({"queue": "debug"}, {"cpus": 2}, {"memory": "1G"}, {"account": "x"}):
        with pytest.raises(InvalidInputError):
            await client.submit(JobSpec(command="true", **bad), platform="bg")  # type: ignore[arg-type]
    assert await client.jobs() == []


# ---------------------------------------------------------------- logs


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_follow_log_streams_until_the_end(testbed: dict[str, str], client: AsyncClient,
                                                platform: str) -> None:
    (job,) = await client.submit(
        JobSpec(command="for i in 1 2 3 4 5 6 7 8 9 10; do echo out $i; sleep 0.2; done;"
                        " echo bye >&2; exit 7", name="ticker"),
        platform=platform)
    got: dict[str, bytes] = {"out": b"", "err": b""}
    t_first = None
    async for name, data in client.follow_log(job.id):
        if t_first is None:
            t_first = time.monotonic()
        got[name] += data
    t_end = time.monotonic()
    assert got["out"] == b"".join(b"out %d\n" % i for i in range(1, 11))
    assert got["err"] == b"bye\n"
    assert t_first is not None and t_end - t_first > 1.0
    (job,) = await client.jobs(ids=[job.id])
    assert job.state is JobState.FAILED and job.exit_status == 7


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_retrieve(testbed: dict[str, str], client: AsyncClient, platform: str,
                        tmp_path: Path) -> None:
    a, b = await client.submit(
        [JobSpec(command="echo first", name="fetch"), JobSpec(command="echo second",
                                                              name="fetch")],
        platform=platform)
    await client.wait([a.id, b.id], timeout=60, interval=0.2)
    dest = tmp_path / "dest"
    da, db = await client.retrieve([a.id, b.id], dest=dest)
    assert da == dest / "fetch" / "01" and db == dest / "fetch" / "02"
    assert (da / "job.out").read_bytes() == b"first\n"
    assert (db / "job.out").read_bytes() == b"second\n"
    assert parse_status((db / "job.status").read_text())["SSHQ_JOB_EXIT_STATUS"] == "0"


# ---------------------------------------------------------------- openssh


async def test_openssh_with_a_long_state_dir(testbed: dict[str, str], config_file: Path,
                                             tmp_path: Path) -> None:
    """Unix socket paths must fit in ~104 bytes: a long state dir (like pytest's
    tmp_path) must not break the openssh transport's ControlMaster socket.

    (Found failing with 'ControlPath too long' at 4ea7d97; fixed in 0a08d62.)
    """
    long_state = tmp_path / "a-state-directory-with-a-rather-long-but-ordinary-name"
    assert len(str(long_state)) + len("/cm/") + 40 >= 104
    c = AsyncClient(config_file, state_dir=long_state)
    try:
        (job,) = await c.submit(JobSpec(command="echo ok", name="long"), platform="bg-openssh")
        assert job.state is JobState.SUBMITTED, job.message
        (job,) = await c.wait([job.id], timeout=60, interval=0.2)
        assert job.state is JobState.SUCCEEDED
    finally:
        await c.close()
        # The ControlMaster socket went to a shared fallback directory; its master
        # may serve other sshq runs as this user, so it is left to ControlPersist.


# ---------------------------------------------------------------- environment


async def test_job_environment_path_does_not_break_the_wrapper(
    testbed: dict[str, str], client: AsyncClient,
) -> None:
    (job,) = await client.submit(
        JobSpec(command='echo "path=$PATH"', name="ownpath",  # builtins only
                environment={"PATH": "/opt/nothing-here/bin"}),
        platform="local")
    (job,) = await client.wait([job.id], timeout=60, interval=0.2)
    assert job.state is JobState.SUCCEEDED, (job.exit_status, await client.cat_log(job.id,
                                                                                    "err"))
    assert await client.cat_log(job.id) == b"path=/opt/nothing-here/bin\n"
    assert job.exit_time is not None


async def test_job_environment_cannot_redirect_the_wrapper(
    testbed: dict[str, str], client: AsyncClient, tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        (job,) = await client.submit(
            JobSpec(command="echo hi", name="redirect",
                    environment={"SSHQ_JOB_LOG_DIR": str(elsewhere)}),
            platform="local")
    except InvalidInputError:
        return  # refused before anything was sent: fine
    (job,) = await client.wait([job.id], timeout=60, interval=0.2)
    assert list(elsewhere.iterdir()) == [], "the wrapper wrote outside its job log dir"
    assert (Path(job.job_log_dir) / "job.user").exists()


# ---------------------------------------------------------------- sync facade


def test_sync_client(testbed: dict[str, str], config_file: Path, state_dir: Path) -> None:
    from sshq import Client

    with Client(config_file, state_dir=state_dir) as c:
        (job,) = c.submit(JobSpec(command="echo sync", name="sync"), platform="bg")
        (job,) = c.wait([job.id], timeout=60, interval=0.2)
        assert job.state is JobState.SUCCEEDED
        assert c.cat_log(job.id) == b"sync\n"
        assert [j.id for j in c.jobs(state="succeeded")] == [job.id]
        (again,) = c.poll([job.id])
        assert again.state is JobState.SUCCEEDED


# ---------------------------------------------------------------- shared run dir


async def test_two_state_dirs_sharing_a_run_dir_never_share_a_log_dir(
    testbed: dict[str, str], config_file: Path, state_dir: Path,
) -> None:
    """A second sshq (its own state database) submitting the same name to the
    same run directory must not reuse the first one's job log directory."""
    other_state = Path(tempfile.mkdtemp(prefix="sq-", dir="/tmp"))
    try:
        async with AsyncClient(config_file, state_dir=state_dir) as a, \
                AsyncClient(config_file, state_dir=other_state) as b:
            (ja,) = await a.submit(JobSpec(command="echo from-a", name="shared"), platform="bg")
            (jb,) = await b.submit(JobSpec(command="echo from-b", name="shared"), platform="bg")
            assert ja.job_log_dir.endswith("/01")
            assert jb.state is JobState.SUBMITTED, jb.message
            assert jb.submit_num == 2 and jb.job_log_dir.endswith("/02")
            await a.wait([ja.id], timeout=60, interval=0.2)
            await b.wait([jb.id], timeout=60, interval=0.2)
            assert await a.cat_log(ja.id) == b"from-a\n"
            assert await b.cat_log(jb.id) == b"from-b\n"
            assert os.readlink(Path(ja.job_log_dir).parent / "NN") == "02"
    finally:
        shutil.rmtree(other_state, ignore_errors=True)


async def test_failed_kill_command_is_reported_on_the_job(
        client: AsyncClient, testbed: dict[str, str]) -> None:
    # The wrapper dies by SIGKILL (no exit recorded); `kill` of its pid then fails.
    (job,) = await client.submit(JobSpec(command="kill -9 $PPID", name="gone"),
                                 platform="local")
    for _ in range(100):
        (job,) = await client.jobs(ids=[job.id])
        if not os.path.exists(f"/proc/{job.job_id}"):
            break
        await asyncio.sleep(0.1)
    (killed,) = await client.kill([job.id], settle=0.5)
    assert killed.message.startswith("kill failed:"), killed
    assert "No such process" in killed.message or "exit" in killed.message
