"""Job arrays: one submission, one sshq job per element, each polled on its own
(real Slurm through the real sshd)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest
from helpers import wait_for_state

from sshq import AsyncClient, JobSpec, JobState
from sshq.exceptions import InvalidInputError
from sshq.model.resources import MAX_ARRAY_ELEMENTS, parse_array

Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.mark.parametrize(("text", "indices"), [
    ("1-3", (1, 2, 3)), ("0-6:3", (0, 3, 6)), ("1,3,5-7", (1, 3, 5, 6, 7)),
    ("1-4%2", (1, 2, 3, 4)), ("7", (7,)), ("3,1,3", (1, 3)),
])
def test_parse_array(text: str, indices: tuple[int, ...]) -> None:
    assert parse_array(text) == indices


@pytest.mark.parametrize("text", ["", "a-b", "3-1", "1-5:0", "1-3%x", "-1", "1;2",
                                  f"0-{MAX_ARRAY_ELEMENTS}"])
def test_parse_array_refuses(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_array(text)


async def test_array_elements_are_jobs_of_their_own(
        slurm_testbed: dict[str, str], client: AsyncClient) -> None:
    jobs = await client.submit(JobSpec(
        command='echo "element $SSHQ_ARRAY_INDEX"; exit $((SSHQ_ARRAY_INDEX - 1))',
        name="arr", array="1-3"), platform="slurm")
    assert len(jobs) == 3
    base = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{base}_{i}" for i in (1, 2, 3)]
    assert [j.job_log_dir.rsplit("/", 2)[1:] for j in jobs] == [["01", "1"], ["01", "2"],
                                                               ["01", "3"]]
    done = await client.wait([j.id for j in jobs], timeout=120, interval=0.5)
    assert [(j.state, j.exit_status) for j in done] == [
        (JobState.SUCCEEDED, 0), (JobState.FAILED, 1), (JobState.FAILED, 2)]
    for j, i in zip(done, (1, 2, 3), strict=True):
        assert await client.cat_log(j.id) == f"element {i}\n".encode()


async def test_one_element_killed_the_others_run_on(
        slurm_testbed: dict[str, str], client: AsyncClient) -> None:
    jobs = await client.submit(JobSpec(command="sleep 120", name="arrk", array="1-2"),
                               platform="slurm")
    try:
        for j in jobs:
            await wait_for_state(client, j.id, JobState.RUNNING, timeout=90)
        (killed,) = await client.kill([jobs[0].id])
        (killed,) = await client.wait([killed.id], timeout=60, interval=0.5)
        assert killed.state is JobState.FAILED and killed.signal == "TERM", killed
        (other,) = await client.poll([jobs[1].id])
        assert other.state is JobState.RUNNING, other
    finally:
        await client.kill([j.id for j in jobs])


def test_cli_array_json(slurm_testbed: dict[str, str], sshq: Run) -> None:
    r = sshq("submit", "-p", "slurm", "--array", "1-2", "--command", "true", "--wait",
             "--json")
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"]
    assert len({j["id"] for j in jobs}) == 2 and jobs[0]["job_id"].endswith("_1")


@pytest.mark.parametrize("platform", ["bg", "local"])
async def test_runners_without_array_support_refuse_it(
        testbed: dict[str, str], client: AsyncClient, platform: str) -> None:
    with pytest.raises(InvalidInputError, match="array"):
        await client.submit(JobSpec(command="true", array="1-2"), platform=platform)
    assert await client.jobs() == []
