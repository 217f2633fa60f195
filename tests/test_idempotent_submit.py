"""Submission is idempotent: sshq killed mid-submission never loses a job nor
submits one twice (issue: "a test kills the client at that exact point").

Each scenario runs a real client in a subprocess that dies (os._exit, as from
SIGKILL: no cleanup runs) at a chosen point of the submission, on the real
sshd and Slurm; a fresh client then polls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sshq import AsyncClient, JobState

CRASH = textwrap.dedent("""
    import asyncio, os, sys
    import sshq._client.core as client_mod  # where agent calls are made
    import sshq._client.jobs as jobs_part
    from sshq import AsyncClient, JobSpec

    point = sys.argv[3]
    real_call_agent = client_mod.call_agent

    async def call_agent(t, python, op, payload, **kw):
        if op == "submit" and point == "before-send":
            os._exit(9)
        reply = await real_call_agent(t, python, op, payload, **kw)
        if op == "submit" and point == "reply-lost":
            os._exit(9)  # the agent submitted; sshq dies before reading its reply
        return reply

    def record(self, *args):
        os._exit(9)  # the runner accepted the jobs; sshq dies before recording their ids

    client_mod.call_agent = call_agent
    if point == "after-accept":
        jobs_part.Jobs._record_submissions = record

    async def main():
        c = AsyncClient(sys.argv[1], state_dir=sys.argv[2])
        await c.submit([JobSpec(command="echo adopted-" + n, name="crash" + n)
                        for n in ("a", "b")], platform=sys.argv[4])

    asyncio.run(main())
""")


def crash(config_file: Path, state_dir: Path, point: str, platform: str) -> None:
    r = subprocess.run([sys.executable, "-c", CRASH, str(config_file), str(state_dir), point,
                        platform], capture_output=True, timeout=120)
    assert r.returncode == 9, r.stderr.decode()


@pytest.mark.parametrize("platform", ["slurm", "bg"])
async def test_killed_after_the_runner_accepted_then_adopted(
        slurm_testbed: dict[str, str], config_file: Path, state_dir: Path,
        platform: str) -> None:
    crash(config_file, state_dir, "after-accept", platform)
    async with AsyncClient(config_file, state_dir=state_dir) as c:
        intents = await c.jobs()
        assert len(intents) == 2
        assert all(j.job_id == "" and j.state is JobState.SUBMITTED for j in intents)
        polled = await c.poll(all=True)
        assert all(j.job_id for j in polled), polled  # adopted from job.status
        assert all("adopted" in j.message or j.state.is_final for j in polled)
        done = await c.wait([j.id for j in polled], timeout=120, interval=0.5)
        assert [j.state for j in done] == [JobState.SUCCEEDED] * 2
        for j, n in zip(done, ("a", "b"), strict=True):
            assert await c.cat_log(j.id) == f"adopted-{n}\n".encode()
        # exactly one job per intent: one job log directory each, one job id each
        assert len({j.job_id for j in done}) == 2
        assert all(j.job_log_dir.endswith("/01") for j in done)


async def test_killed_before_sending_is_never_submitted(
        testbed: dict[str, str], config_file: Path, state_dir: Path) -> None:
    crash(config_file, state_dir, "before-send", "bg")
    async with AsyncClient(config_file, state_dir=state_dir) as c:
        polled = await c.poll(all=True)
        assert len(polled) == 2
        for j in polled:
            assert j.state is JobState.SUBMIT_FAILED
            assert j.job_id == ""
            assert "never submitted" in j.message


def test_cli_poll_all_adopts(slurm_testbed: dict[str, str], config_file: Path,
                             state_dir: Path, cli_env: dict[str, str]) -> None:
    crash(config_file, state_dir, "after-accept", "slurm")
    r = subprocess.run([sys.executable, "-m", "sshq", "poll", "--all", "--json"],
                       env=cli_env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert len(jobs) == 2 and all(j["job_id"] for j in jobs), jobs


@pytest.mark.parametrize("platform", ["slurm", "bg"])
async def test_killed_before_reading_the_reply_of_a_first_submission(
        slurm_testbed: dict[str, str], config_file: Path, state_dir: Path,
        platform: str) -> None:
    # A fresh state dir: remote-init travelled inside the submit call, so the
    # intents name the run dir by a placeholder; the next poll resolves it
    # (remote-init) and adopts both jobs from their job status files.
    crash(config_file, state_dir, "reply-lost", platform)
    async with AsyncClient(config_file, state_dir=state_dir) as c:
        intents = await c.jobs()
        assert len(intents) == 2
        assert all(j.job_log_dir.startswith("/SSHQ-RUN-DIR-") for j in intents), intents
        polled = await c.poll(all=True)
        assert all(j.job_id for j in polled), polled
        assert all(not j.job_log_dir.startswith("/SSHQ-RUN-DIR-") for j in polled)
        done = await c.wait([j.id for j in polled], timeout=120, interval=0.5)
        assert [j.state for j in done] == [JobState.SUCCEEDED] * 2
        out = [(await c.cat_log(j.id)).decode() for j in done]
        assert sorted(out) == ["adopted-a\n", "adopted-b\n"]
