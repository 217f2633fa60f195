"""Login-node failover (Cylc's bad-host list): a host that refuses connections
is skipped for a while and the next host of the platform is used.

The dead "login node" is 127.0.0.9: loopback, where nothing listens on the
test bed's port, so connecting fails at once (connection refused).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sshq import AsyncClient, HostUnreachableError, JobSpec, JobState


def platform(testbed: dict[str, str], tmp_path: Path, hosts: list[str], runner: str) -> Path:
    cfg = tmp_path / "failover.toml"
    cfg.write_text(
        "[platforms.multi]\n"
        f"hosts = {hosts!r}\n".replace("'", '"')
        + f"port = {testbed['SSHQ_TEST_PORT']}\n"
        f'user = "{testbed["SSHQ_TEST_USER"]}"\n'
        f'identity_file = "{testbed["SSHQ_TEST_KEY"]}"\n'
        f'known_hosts = "{testbed["SSHQ_TEST_KNOWN_HOSTS"]}"\n'
        f'job_runner = "{runner}"\n'
        f'run_dir = "~/sshq-test/failover-{tmp_path.name}"\n'
        "bad_host_seconds = 300\n"
    )
    return cfg


async def test_submit_fails_over_and_remembers_the_bad_host(
        slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path) -> None:
    cfg = platform(slurm_testbed, tmp_path, ["127.0.0.9", slurm_testbed["SSHQ_TEST_HOST"]],
                   "slurm")
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        (job,) = await c.submit(JobSpec(command="echo over", name="fo"), platform="multi")
        assert job.state is JobState.SUBMITTED and job.host.endswith(
            f"@{slurm_testbed['SSHQ_TEST_HOST']}:{slurm_testbed['SSHQ_TEST_PORT']}")
        assert c.store.bad_hosts("multi") == {"127.0.0.9"}
        (job,) = await c.wait([job.id], timeout=120, interval=0.5)
        assert job.state is JobState.SUCCEEDED
        assert await c.cat_log(job.id) == b"over\n"


async def test_poll_of_a_batch_job_fails_over_to_another_login_host(
        slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path) -> None:
    good = slurm_testbed["SSHQ_TEST_HOST"]
    cfg = platform(slurm_testbed, tmp_path, [good, "127.0.0.9"], "slurm")
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        (job,) = await c.submit(JobSpec(command="echo shared", name="fo2"), platform="multi")
    # The job's login host goes down: the other login node sees the same files.
    cfg2 = platform(slurm_testbed, tmp_path, ["127.0.0.9", good], "slurm")
    async with AsyncClient(cfg2, state_dir=state_dir) as c:
        # Make the job's recorded host the dead one, as after a login node failure.
        c.store.update_job(job.id, host=f"{slurm_testbed['SSHQ_TEST_USER']}@127.0.0.9:"
                                         f"{slurm_testbed['SSHQ_TEST_PORT']}")
        (done,) = await c.wait([job.id], timeout=120, interval=0.5)
        assert done.state is JobState.SUCCEEDED
        assert await c.cat_log(job.id) == b"shared\n"


async def test_all_hosts_down_is_one_clear_transient_error(
        testbed: dict[str, str], tmp_path: Path, state_dir: Path) -> None:
    cfg = platform(testbed, tmp_path, ["127.0.0.9", "127.0.0.10"], "background")
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        with pytest.raises(HostUnreachableError) as info:
            await c.submit(JobSpec(command="true"), platform="multi")
        assert info.value.transient
        assert await c.jobs() == []  # nothing was sent, nothing recorded
