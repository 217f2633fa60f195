"""Remote-init travels inside the first submit call (one SSH command from a
fresh state directory), over the real sshd with the background and Slurm runners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml

import sshq._client.core as sshq_client
from sshq import AsyncClient, JobSpec, JobState


def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    ops: list[str] = []
    real = sshq_client.call_agent

    async def counting(transport: Any, python: str, op: str, payload: dict[str, Any],
                       **kw: Any) -> dict[str, Any]:
        ops.append(op)
        return await real(transport, python, op, payload, **kw)

    monkeypatch.setattr(sshq_client, "call_agent", counting)
    return ops


@pytest.mark.parametrize("runner", ["background", "slurm"])
async def test_first_submit_is_one_call_and_paths_are_real(
        slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path, run_id: str,
        runner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text(platform_toml(slurm_testbed, "p", job_runner=runner, transport="asyncssh",
                                  run_dir=f"~/sshq-test/{run_id}"))
    ops = count_calls(monkeypatch)
    async with AsyncClient(conf, state_dir=state_dir) as c:
        (job,) = await c.submit(JobSpec(command='echo "$SSHQ_JOB_LOG_DIR"', name="first"),
                                platform="p")
        assert ops == ["submit"]
        assert job.job_log_dir.endswith("/log/job/first/01") and "SSHQ-RUN-DIR" not in (
            job.job_log_dir + job.work_dir)
        (job,) = await c.wait([job.id], timeout=120, interval=0.5)
        assert job.state is JobState.SUCCEEDED, job.message
        # the script saw the real run dir, not the placeholder
        assert (await c.cat_log(job.id)).decode().strip() == job.job_log_dir
        ops.clear()
        (again,) = await c.submit(JobSpec(command="true", name="first"), platform="p")
        assert ops == ["submit"] and again.submit_num == 2


async def test_a_run_dir_no_script_can_hold_verbatim_is_rendered_again(
        slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path, run_id: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a space (or a quote) in the run dir: the agent will not paste it into
    # scripts; it says so, and the client renders them with the real path
    conf = tmp_path / "p.toml"
    conf.write_text(platform_toml(slurm_testbed, "p", job_runner="background",
                                  transport="asyncssh",
                                  run_dir=f"~/sshq-test/{run_id}/with space"))
    ops = count_calls(monkeypatch)
    async with AsyncClient(conf, state_dir=state_dir) as c:
        (job,) = await c.submit(JobSpec(command="pwd", name="sp"), platform="p")
        assert ops == ["submit", "submit"]
        assert "/with space/log/job/sp/01" in job.job_log_dir
        (job,) = await c.wait([job.id], timeout=120, interval=0.5)
        assert job.state is JobState.SUCCEEDED, job.message
        assert (await c.cat_log(job.id)).decode().strip().endswith("/with space/work/sp")


async def test_a_spec_the_runner_cannot_express_sends_nothing_and_records_nothing(
        slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path, run_id: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sshq import InvalidInputError

    conf = tmp_path / "p.toml"
    conf.write_text(platform_toml(slurm_testbed, "p", job_runner="background",
                                  transport="asyncssh", run_dir=f"~/sshq-test/{run_id}"))
    ops = count_calls(monkeypatch)
    async with AsyncClient(conf, state_dir=state_dir) as c:
        with pytest.raises(InvalidInputError, match="queue"):
            await c.submit([JobSpec(command="true", name="ok"),
                            JobSpec(command="true", name="q", queue="debug")], platform="p")
        assert ops == [] and await c.jobs() == []
