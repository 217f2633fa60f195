"""Staging on the real sshd: install (rsync / SFTP / shared filesystem), tidy,
job input files and outputs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sshq import AsyncClient, JobSpec, JobState
from sshq.remote.staging import CYLC_EXCLUDES, sftp_push
from sshq.transport import HostParams
from sshq.transport.asyncssh_ import AsyncSSHTransport

Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("one\n")
    (d / "sub" / "b.txt").write_text("two\n")
    (d / ".hidden").write_text("secret\n")  # Cylc's excludes: .*
    (d / "log").mkdir()
    (d / "log" / "old.log").write_text("x\n")  # and /log
    return d


def remote(testbed: dict[str, str], *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={testbed['SSHQ_TEST_KNOWN_HOSTS']}",
         "-i", testbed["SSHQ_TEST_KEY"], "-p", testbed["SSHQ_TEST_PORT"],
         f"{testbed['SSHQ_TEST_USER']}@{testbed['SSHQ_TEST_HOST']}", *argv],
        capture_output=True, timeout=60)


@pytest.mark.parametrize("platform", ["bg", "bg-openssh"])
def test_install_rsync_only_changed_files_with_cylc_excludes(
        sshq: Run, testbed: dict[str, str], src: Path, run_id: str, platform: str) -> None:
    r = sshq("install", "-p", platform, str(src), "--json")
    assert r.returncode == 0, r.stderr
    (first,) = json.loads(r.stdout)
    assert first["method"] == "rsync" and first["shared_filesystem"] is False
    assert first["files_transferred"] == 2
    rd = first["remote_dir"]
    assert rd.endswith(f"/sshq-test/{run_id}")
    listing = remote(testbed, "cd", rd, "&&", "find", ".", "-type", "f").stdout.decode()
    assert "./a.txt" in listing and "./sub/b.txt" in listing
    assert ".hidden" not in listing and "old.log" not in listing
    (again,) = json.loads(sshq("install", "-p", platform, str(src), "--json").stdout)
    assert again["files_transferred"] == 0  # nothing changed, nothing travels
    (src / "a.txt").write_text("changed\n")
    (src / "c.txt").write_text("new\n")
    r = sshq("install", "-p", platform, str(src), "--exclude", "c.txt", "--json")
    (third,) = json.loads(r.stdout)
    assert third["files_transferred"] == 1
    assert remote(testbed, "cat", f"{rd}/a.txt").stdout == b"changed\n"
    assert remote(testbed, "test", "-e", f"{rd}/c.txt").returncode == 1


async def test_sftp_fallback_sends_only_changed_files(
        testbed: dict[str, str], src: Path, run_id: str) -> None:
    t = AsyncSSHTransport(HostParams(
        host=testbed["SSHQ_TEST_HOST"], port=int(testbed["SSHQ_TEST_PORT"]),
        user=testbed["SSHQ_TEST_USER"], identity_file=testbed["SSHQ_TEST_KEY"],
        known_hosts=testbed["SSHQ_TEST_KNOWN_HOSTS"]))
    rd = f"/home/{testbed['SSHQ_TEST_USER']}/sshq-test/{run_id}-sftp"
    try:
        assert await sftp_push(t, src, rd, CYLC_EXCLUDES, {}) == 2
        got = await t.run(["cat", f"{rd}/a.txt", f"{rd}/sub/b.txt"])
        assert got.stdout == b"one\ntwo\n"
        assert (await t.run(["test", "-e", f"{rd}/.hidden"])).exit_status == 1
        st = os.stat(src / "a.txt")
        same = {"a.txt": [st.st_size, int(st.st_mtime)]}  # as the agent's listing reports
        assert await sftp_push(t, src, rd, CYLC_EXCLUDES, same) == 1  # only sub/b.txt
    finally:
        await t.run(["rm", "-rf", rd])
        await t.close()


async def test_install_on_a_shared_filesystem_is_a_local_copy(
        config_file: Path, state_dir: Path, src: Path, tmp_path: Path) -> None:
    async with AsyncClient(config_file, state_dir=state_dir) as c:
        done = await c.install(src, platform="local")
        assert done.method == "local" and done.files_transferred == 2
        assert (Path(done.remote_dir) / "sub" / "b.txt").read_text() == "two\n"
        assert not (Path(done.remote_dir) / ".hidden").exists()
        again = await c.install(done.remote_dir, platform="local")
        assert again.method == "skipped"


def test_tidy_removes_service_files_never_results(
        sshq: Run, testbed: dict[str, str], src: Path) -> None:
    r = sshq("submit", "-p", "bg", "--wait", "--command", "echo kept")
    assert r.returncode == 0, r.stderr
    (inst,) = json.loads(sshq("install", "-p", "bg", str(src), "--json").stdout)
    rd = inst["remote_dir"]
    assert remote(testbed, "test", "-d", f"{rd}/.sshq").returncode == 0
    r = sshq("tidy", "-p", "bg", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [f"{rd}/.sshq"]
    assert remote(testbed, "test", "-d", f"{rd}/.sshq").returncode == 1
    assert remote(testbed, "cat", f"{rd}/log/job/job/01/job.out").stdout == b"kept\n"
    assert remote(testbed, "test", "-f", f"{rd}/a.txt").returncode == 0
    assert json.loads(sshq("tidy", "-p", "bg", "--json").stdout) == []


@pytest.mark.parametrize("platform", ["bg", "local"])
async def test_inputs_staged_and_outputs_retrieved_after_success(
        config_file: Path, state_dir: Path, tmp_path: Path, platform: str) -> None:
    data = tmp_path / "params.dat"
    data.write_bytes(b"\x00\xffbinary input\n")
    async with AsyncClient(config_file, state_dir=state_dir) as c:
        ok, bad = await c.submit([
            JobSpec(command="mkdir -p out && cat params.dat > out/copy.dat && echo r > res.txt",
                    name="stage", inputs=(str(data),), outputs=("res.txt", "out/copy.dat")),
            JobSpec(command="echo r > res.txt; exit 1", name="stagefail",
                    outputs=("res.txt",)),
        ], platform=platform)
        ok, bad = await c.wait([ok.id, bad.id], timeout=60, interval=0.2)
        assert ok.state is JobState.SUCCEEDED and bad.state is JobState.FAILED
        dest = tmp_path / "got"
        d_ok, d_bad = await c.retrieve([ok.id, bad.id], dest=dest)
        assert (d_ok / "job.out").exists()
        assert (d_ok / "outputs" / "res.txt").read_text() == "r\n"
        assert (d_ok / "outputs" / "out" / "copy.dat").read_bytes() == data.read_bytes()
        assert not (d_bad / "outputs").exists()  # outputs come back after success only


@pytest.mark.parametrize("bad", ["/abs/path", "../up", "a/../../b", "-rf", "x\ny"])
def test_outputs_must_stay_inside_the_work_dir(bad: str) -> None:
    from sshq.exceptions import InvalidInputError

    with pytest.raises(InvalidInputError):
        JobSpec(command="true", outputs=(bad,)).normalized()


def test_missing_input_is_refused_before_anything_is_sent(sshq: Run, tmp_path: Path) -> None:
    r = sshq("submit", "-p", "bg", "--command", "true", "--input", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert b"input file" in r.stderr
    assert json.loads(sshq("jobs", "--json").stdout) == []
