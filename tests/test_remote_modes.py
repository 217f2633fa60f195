"""Issue 10, section 1: staged files keep their modes; sshq's remote directories
are never group/other-writable, and private where they hold inputs or job.env.

``sshq submit --input`` (the real CLI) on the real sshd (asyncssh and openssh
transports, user sshqtest), on this machine (local transport) and on the real
Slurm (an array job: one log directory per element); each also with a remote
``python`` that runs the agent under ``umask 000``, so that no mode comes from a
friendly umask.  The remote run directories are on this machine: the test
reads their modes directly (as root).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import platform_toml

pytestmark = pytest.mark.sshd

#: local mode -> the remote copy's mode (the permission bits, exactly; never
#: set-id bits)
INPUT_MODES = {0o600: 0o600, 0o640: 0o640, 0o755: 0o755, 0o400: 0o400, 0o4755: 0o755}
PRIVATE = 0o700


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory the remote test user can read (for the python wrapper)."""
    d = Path(tempfile.mkdtemp(prefix="sq-modes-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def modes_config(tmp_path: Path, testbed: dict[str, str], shared_tmp: Path) -> Path:
    """Platforms NAME and NAME-umask000 (the agent runs under umask 000), each
    with a run dir several levels below a parent that does not exist yet."""
    py = shared_tmp / "python-umask000"
    py.write_text('#!/bin/sh\numask 000\nexec python3 "$@"\n')
    py.chmod(0o755)
    text = ""
    for name, runner, transport in [("bg", "background", "asyncssh"),
                                    ("bg-openssh", "background", "openssh"),
                                    ("local", "background", "local"),
                                    ("slurm", "slurm", "asyncssh")]:
        for suffix, extra in [("", {}), ("-umask000", {"python": str(py)})]:
            top = (str(tmp_path / f"remote{suffix}") if transport == "local"
                   else f"~/sshq-test/modes-{uuid.uuid4().hex[:8]}")
            text += platform_toml(testbed, name + suffix, job_runner=runner,
                                  transport=transport, run_dir=f"{top}/a/b/run", **extra)
    p = tmp_path / "modes.toml"
    p.write_text(text)
    return p


@pytest.fixture
def sshq_modes(modes_config: Path, state_dir: Path
               ) -> Iterator[Callable[..., subprocess.CompletedProcess[bytes]]]:
    env = dict(os.environ, SSHQ_CONFIG=str(modes_config), SSHQ_STATE_DIR=str(state_dir))

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "sshq", *args], capture_output=True,
                              timeout=300, env=env)

    yield run
    cm = state_dir / "cm"
    if cm.is_dir():
        for sock in cm.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "sshq-test"],
                           capture_output=True, timeout=30)


def inputs(d: Path) -> dict[str, int]:
    """Local input files, one per mode; returns {path: expected remote mode}."""
    d.mkdir()
    out = {}
    for local, remote in INPUT_MODES.items():
        p = d / f"in-{local:o}.dat"
        p.write_bytes(f"mode {local:o}\n".encode())
        p.chmod(local)
        assert stat.S_IMODE(p.stat().st_mode) == local
        out[str(p)] = remote
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def group_or_other_writable(top: Path) -> list[str]:
    """Every directory at or under ``top`` (and its parents sshq made) that is
    group- or other-writable."""
    bad = []
    for root, dirs, _ in os.walk(top):
        for d in [root, *(os.path.join(root, x) for x in dirs)]:
            if not os.path.islink(d) and mode(Path(d)) & 0o022:
                bad.append(f"{d}: {mode(Path(d)):o}")
    return sorted(set(bad))


def check_run(job: dict[str, object], files: dict[str, int], *, elements: int = 0) -> None:
    log_dir = Path(str(job["job_log_dir"]))
    work_dir = Path(str(job["work_dir"]))
    if elements:  # an array element: log/job/<name>/<NN>/<index>
        log_dir = log_dir.parent
    run_dir = log_dir.parents[3]
    top = run_dir.parents[2]  # <top>/a/b/run: all made by sshq
    assert run_dir.name == "run" and (run_dir / ".sshq").is_dir()

    wrong = []
    # the staged inputs: their local mode bits, exactly
    for path, expected in files.items():
        remote = work_dir / Path(path).name
        assert remote.read_bytes() == Path(path).read_bytes()
        if mode(remote) != expected:
            wrong.append(f"input {remote}: {mode(remote):o}, not {expected:o}")

    # private where they hold inputs, job.env or sshq's own files
    private = [log_dir, work_dir, run_dir / ".sshq"]
    private += [log_dir / str(i) for i in range(1, elements + 1)]
    wrong += [f"private {p}: {mode(p):o}" for p in private if mode(p) != PRIVATE]
    assert (log_dir / "1" / "job.env" if elements else log_dir / "job.env").exists()

    # and none of the directories sshq made is group/other-writable
    wrong += [f"writable {d}" for d in group_or_other_writable(top)]
    assert not wrong, "\n".join(wrong)


def submit(sshq_modes: Callable[..., subprocess.CompletedProcess[bytes]], platform: str,
           files: dict[str, int], *extra: str) -> list[dict[str, object]]:
    args = ["submit", "-p", platform, "--wait", "--timeout", "240", "--json", "--name", "staged"]
    for f in files:
        args += ["--input", f]
    # the job checks its inputs too, from inside (the modes it sees)
    args += ["--command", "stat -c '%n %a' in-*.dat", *extra]
    r = sshq_modes(*args)
    assert r.returncode == 0, r.stderr
    jobs: list[dict[str, object]] = json.loads(r.stdout)
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    return jobs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("umask", ["", "-umask000"])
@pytest.mark.parametrize("platform", ["bg", "bg-openssh", "local"])
def test_inputs_keep_their_modes_and_dirs_are_private(
        sshq_modes: Callable[..., subprocess.CompletedProcess[bytes]], tmp_path: Path,
        platform: str, umask: str) -> None:
    files = inputs(tmp_path / "in")
    (job,) = submit(sshq_modes, platform + umask, files)
    check_run(job, files)
    seen = (Path(str(job["job_log_dir"])) / "job.out").read_text()
    for path, expected in files.items():  # the job saw the same modes
        assert f"{Path(path).name} {expected:o}\n" in seen, seen
    # a second submission (NN 02) into the existing directories changes none of it
    (again,) = submit(sshq_modes, platform + umask, files)
    assert str(again["job_log_dir"]).endswith("/02")
    check_run(again, files)


@pytest.mark.slurm
@pytest.mark.timeout(400)
@pytest.mark.parametrize("umask", ["", "-umask000"])
def test_slurm_array_element_dirs_are_private(
        slurm_testbed: dict[str, str], tmp_path: Path,
        sshq_modes: Callable[..., subprocess.CompletedProcess[bytes]], umask: str) -> None:
    files = inputs(tmp_path / "in")
    jobs = submit(sshq_modes, "slurm" + umask, files, "--array", "1-2")
    assert len(jobs) == 2
    assert [str(j["job_log_dir"]).rsplit("/", 1)[1] for j in jobs] == ["1", "2"]
    check_run(jobs[0], files, elements=2)
