"""``AsyncClient.poll_report``, the poll ``sshq serve``'s poller uses: what
failed is reported, never raised, and changes no job's state.  Real jobs on
the test bed's sshd (background job runner); the outage is the same
platform through a port where nothing listens, over the same state.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import platform_toml

from sshq import AsyncClient, Client, JobSpec, JobState


def _config(path: Path, testbed: dict[str, str], run_id: str, *, port: str | None = None
            ) -> Path:
    bed = dict(testbed, SSHQ_TEST_PORT=port) if port else testbed
    path.write_text(platform_toml(bed, "bg", job_runner="background", transport="asyncssh",
                                  run_dir=f"~/sshq-test/{run_id}", min_poll_interval=0.0))
    return path


async def test_poll_report_says_what_failed_and_changes_nothing(
        testbed: dict[str, str], tmp_path: Path, state_dir: Path, run_id: str) -> None:
    good = _config(tmp_path / "good.toml", testbed, run_id)
    down = _config(tmp_path / "down.toml", testbed, run_id, port="9")
    async with AsyncClient(good, state_dir=state_dir) as client:
        (job,) = await client.submit(JobSpec(command="sleep 3", name="report"),
                                     platform="bg")
        jobs, errors = await client.poll_report([job.id, job.id])
        assert errors == []
        assert [j.id for j in jobs] == [job.id]
        assert jobs[0].state is JobState.RUNNING, jobs[0].message
    async with AsyncClient(down, state_dir=state_dir) as client:
        await asyncio.sleep(4)  # the job has ended on the host
        jobs, errors = await client.poll_report([job.id])
        # one line per failed (platform, host): the job's login host as recorded
        assert len(errors) == 1 and errors[0].startswith(f"bg on {job.host}: "), errors
        assert "cannot connect" in errors[0]
        assert jobs[0].state is JobState.RUNNING  # no state changed
        assert (await client.jobs([job.id]))[0].state is JobState.RUNNING
    async with AsyncClient(good, state_dir=state_dir) as client:
        jobs, errors = await client.poll_report(all=True)
        assert errors == []
        assert [(j.id, j.state) for j in jobs] == [(job.id, JobState.SUCCEEDED)]


def test_poll_report_of_the_sync_client(testbed: dict[str, str], tmp_path: Path,
                                        state_dir: Path, run_id: str) -> None:
    with Client(_config(tmp_path / "good.toml", testbed, run_id), state_dir=state_dir) as c:
        (job,) = c.submit(JobSpec(command="true", name="sync"), platform="bg")
        c.wait([job.id], timeout=120, interval=0.2)
        jobs, errors = c.poll_report([job.id])
        assert errors == [] and jobs[0].state is JobState.SUCCEEDED
