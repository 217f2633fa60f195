"""``sshq ssh-to-job`` and ``sshq cat-log --follow`` against the real test bed.

A person's terminal is played by tmux: a private tmux server (``tmux -L``
with a unique socket name, killed at the end) runs ``sshq ssh-to-job ID`` in
a pane, ``send-keys`` types into it and ``capture-pane`` reads the screen.
Output is waited for by polling the pane (never by fixed sleeps).

To keep the run short on a 2-core machine, one long Slurm job and one long
background job are shared by the tests of this module (module fixtures);
every job started here is cancelled or killed at the end.  The state
directory is short (under /tmp) so that openssh ControlMaster sockets live
in it, and the masters are stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import bed_platforms_toml
from helpers import (
    SSHQ,
    SshqCli,
    Tmux,
    exit_and_status,
    open_job_terminal,
    stop_control_masters,
)
from testbed import require_part

from sshq import AsyncClient
from sshq.job_runners import HANDLERS

#: Canary files: a hostile environment value tries to create them.
CANARY = f"/tmp/sshq-canary-{uuid.uuid4().hex}"
CANARY_BT = f"/tmp/sshq-canary-bt-{uuid.uuid4().hex}"

#: An environment value that breaks any careless quoting on its way into the
#: job, into job.env and back out through ssh-to-job.
HOSTILE = (
    f"q'uote \"dq\" $(touch {CANARY}) `touch {CANARY_BT}` ; semi && amp | pipe"
    " \\back\\slash $HOME ${PATH} * ?\tTAB\nsecond line -- é ü 日本語 ✓ ' \" end\\"
)

#: A command line with quotes, $(), ; and printf formats, run by --command.
HOSTILE_COMMAND = 'printf "%s\\n" "$HOSTILE"; echo "$(echo ok)"; printf "[%s]\\n" "$MYVAR"'

# ---------------------------------------------------------------- the test bed


class Bed(SshqCli):
    """``sshq`` on a platforms file and a short state directory shared by this module."""

    def __init__(self, config: Path, state_dir: Path, testbed: dict[str, str]) -> None:
        super().__init__(dict(os.environ, SSHQ_CONFIG=str(config),
                              SSHQ_STATE_DIR=str(state_dir)))
        self.config = config
        self.state_dir = state_dir
        self.testbed = testbed

    def slurm_ids(self) -> list[str]:
        """Slurm job ids of the jobs started here (to scancel at the end, as root)."""
        return [j["job_id"] for j in self.started if j["job_runner"] == "slurm" and j["job_id"]]

    def wait_running(self, sid: int, timeout: float = 90.0) -> dict[str, Any]:
        """Poll until the job runs and its wrapper has written job.env."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.poll(sid)
            if job["state"] == "running" and os.path.exists(f"{job['job_log_dir']}/job.env"):
                return job
            if job["state"] not in ("submitted", "running"):
                pytest.fail(f"job {sid} became {job['state']} ({job['message']})")
            if time.monotonic() > deadline:
                pytest.fail(f"job {sid} still {job['state']} after {timeout} s")
            time.sleep(0.3)

    def cancel(self, sid: int, slurm_id: str | None = None) -> None:
        if slurm_id:
            subprocess.run(["scancel", slurm_id], capture_output=True, timeout=60)
        self.run("kill", "--settle", "1", str(sid), timeout=120)


@pytest.fixture(scope="module")
def bed(testbed: dict[str, str]) -> Iterator[Bed]:
    """This module's platforms (as conftest's) and a SHORT private state dir."""
    top = Path(tempfile.mkdtemp(prefix="sq-", dir="/tmp"))
    state = top / "s"
    state.mkdir()
    config = top / "platforms.toml"
    run_id = uuid.uuid4().hex[:10]
    config.write_text(bed_platforms_toml(testbed, f"~/sshq-test/{run_id}", str(top / "local")))
    b = Bed(config, state, testbed)
    try:
        yield b
    finally:
        if slurm_ids := b.slurm_ids():
            subprocess.run(["scancel", *slurm_ids], capture_output=True, timeout=60)
        b.kill_started()
        stop_control_masters(state)
        shutil.rmtree(top, ignore_errors=True)
        for c in (CANARY, CANARY_BT):
            if os.path.exists(c):
                os.unlink(c)


def _need_slurm(bed: Bed) -> None:
    require_part(bed.testbed, "SSHQ_TEST_SLURM", "Slurm")


def _long_job(bed: Bed, platform: str) -> dict[str, Any]:
    """A long job with MYVAR='a b' and the hostile variable; waits until it runs."""
    job = bed.submit(platform, "--name", "attach", "--env", "MYVAR=a b",
                     "--env", f"HOSTILE={HOSTILE}", "--command", "sleep 600")
    return bed.wait_running(job["id"])


@pytest.fixture(scope="module")
def slurm_job(bed: Bed) -> Iterator[dict[str, Any]]:
    """A running Slurm job (platform slurm, asyncssh), cancelled at the end."""
    _need_slurm(bed)
    job = _long_job(bed, "slurm")
    yield job
    bed.cancel(job["id"], job["job_id"])


@pytest.fixture(scope="module")
def bg_job(bed: Bed) -> Iterator[dict[str, Any]]:
    """A running background job (platform bg, asyncssh), killed at the end."""
    job = _long_job(bed, "bg")
    yield job
    bed.cancel(job["id"])


@pytest.fixture(params=["slurm", "bg"])
def long_job(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The shared running job of each job runner."""
    job: dict[str, Any] = request.getfixturevalue(f"{request.param}_job")
    return job


@pytest.fixture
def fresh_job(bed: Bed) -> Iterator[Callable[..., dict[str, Any]]]:
    """Submit jobs for one test; every one is cancelled when the test ends."""
    mine: list[dict[str, Any]] = []

    def submit(platform: str, *args: str, wait: bool = False) -> dict[str, Any]:
        job = bed.submit(platform, *args, wait=wait)
        mine.append(job)
        return job

    yield submit
    for job in mine:
        bed.cancel(job["id"], job["job_id"] if job["job_runner"] == "slurm" else None)


# ---------------------------------------------------------------- tmux, as a person


@pytest.fixture
def tmux(bed: Bed) -> Iterator[Callable[..., Tmux]]:
    servers: list[Tmux] = []

    def start(**kw: int) -> Tmux:
        t = Tmux(bed.env, **kw)
        servers.append(t)
        return t

    yield start
    for t in servers:
        t.kill()


# ---------------------------------------------------------------- interactive


@pytest.mark.slurm
@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_terminal_in_slurm_job_env_cwd_and_exit_status(
    bed: Bed, slurm_job: dict[str, Any], fresh_job: Callable[..., dict[str, Any]],
    tmux: Callable[..., Tmux], transport: str,
) -> None:
    if transport == "asyncssh":
        job = slurm_job
    else:
        job = fresh_job("slurm-openssh", "--name", "attach-ossh", "--env", "MYVAR=a b",
                        "--env", f"HOSTILE={HOSTILE}", "--command", "sleep 600")
        job = bed.wait_running(job["id"])
        assert job["platform"] == "slurm-openssh"
    t = tmux()
    open_job_terminal(t, job["id"])
    mark = len(t.screen())
    t.type('echo "ID=$SLURM_JOB_ID"; pwd; echo "V=[$MYVAR]"; echo "STEP=$SLURM_STEP_ID"')
    t.wait_for(r"^V=\[a b\]$", start=mark)
    screen = t.screen()[mark:]
    assert re.search(rf"^ID={job['job_id']}$", screen, re.MULTILINE), screen
    assert re.search(rf"^{re.escape(job['work_dir'])}$", screen, re.MULTILINE), screen
    assert exit_and_status(t, 7) == 7
    # The same job, non-interactively, over the same transport.
    r = bed.run("ssh-to-job", str(job["id"]), "--command", HOSTILE_COMMAND)
    assert (r.returncode, r.stdout) == (0, HOSTILE.encode() + b"\nok\n[a b]\n"), r.stderr
    assert not os.path.exists(CANARY) and not os.path.exists(CANARY_BT)


@pytest.mark.slurm
def test_terminal_window_size_changes_reach_the_job(
    bed: Bed, slurm_job: dict[str, Any], tmux: Callable[..., Tmux],
) -> None:
    t = tmux(width=120, height=40)
    open_job_terminal(t, slurm_job["id"])
    rows, cols = t.pane_size()
    mark = len(t.screen())
    t.type('echo "SIZE=$(stty size)"')
    t.wait_for(rf"^SIZE={rows} {cols}$", start=mark)

    t.resize(97, 31)
    new_rows, new_cols = t.pane_size()
    assert (new_rows, new_cols) != (rows, cols)
    # The remote side may see the change a moment later: ask until it does.
    deadline = time.monotonic() + 20
    while True:
        mark = len(t.screen())
        t.type('echo "SIZE=$(stty size)"')
        m = t.wait_for(r"^SIZE=(\d+) (\d+)$", start=mark)
        if (int(m.group(1)), int(m.group(2))) == (new_rows, new_cols):
            break
        assert time.monotonic() < deadline, f"remote size {m.group(0)}, want {new_rows} {new_cols}"
        time.sleep(0.5)
    assert exit_and_status(t, 0) == 0


@pytest.mark.slurm
def test_terminal_ctrl_c_goes_to_the_remote_shell(
    bed: Bed, slurm_job: dict[str, Any], tmux: Callable[..., Tmux],
) -> None:
    t = tmux()
    open_job_terminal(t, slurm_job["id"])
    mark = len(t.screen())
    t.type("echo SLEEPING; sleep 100")
    t.wait_for(r"^SLEEPING$", start=mark)
    time.sleep(0.5)  # let sleep start (no output to wait for)
    t.key("C-c")
    # The remote side got SIGINT: sleep died of it (status 130), long before
    # its 100 s (a line typed while it ran would wait for it)...
    mark = len(t.screen())
    t.type('echo "SLEEP_RC=$? $SSHQ_ID"')
    t.wait_for(rf"^SLEEP_RC=130 {slurm_job['id']}$", start=mark)
    # ... and the session (sshq, ssh, srun) is still open.
    mark = len(t.screen())
    t.type('echo "al""ive $SSHQ_ID"')
    t.wait_for(rf"^alive {slurm_job['id']}$", start=mark)
    assert not re.search(r"^SSHQ_RC=", t.screen(), re.MULTILINE)
    assert exit_and_status(t, 3) == 3


@pytest.mark.sshd
def test_terminal_in_background_job(
    bed: Bed, bg_job: dict[str, Any], tmux: Callable[..., Tmux],
) -> None:
    t = tmux()
    open_job_terminal(t, bg_job["id"])
    mark = len(t.screen())
    t.type('pwd; echo "V=[$MYVAR]"; echo "H=$(hostname)"')
    t.wait_for(r"^V=\[a b\]$", start=mark)
    screen = t.screen()[mark:]
    assert re.search(rf"^{re.escape(bg_job['work_dir'])}$", screen, re.MULTILINE), screen
    status = (Path(bg_job["job_log_dir"]) / "job.status").read_text()
    host = re.search(r"^SSHQ_JOB_HOST=(.*)$", status, re.MULTILINE)
    assert host and f"H={host.group(1)}" in screen.splitlines()
    assert exit_and_status(t, 7) == 7


# ---------------------------------------------------------------- --command


def test_hostile_command_and_value_byte_exact(bed: Bed, long_job: dict[str, Any]) -> None:
    r = bed.run("ssh-to-job", str(long_job["id"]), "--command", HOSTILE_COMMAND)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == HOSTILE.encode() + b"\nok\n[a b]\n"
    assert not os.path.exists(CANARY), "a $(...) in an environment value was executed"
    assert not os.path.exists(CANARY_BT), "a `...` in an environment value was executed"


def test_command_runs_in_job_cwd_and_host(bed: Bed, long_job: dict[str, Any]) -> None:
    r = bed.run("ssh-to-job", str(long_job["id"]), "--command",
                'pwd; echo "$SSHQ_ID"; echo "$SLURM_JOB_ID"')
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert lines[:2] == [long_job["work_dir"], str(long_job["id"])]
    if long_job["job_runner"] == "slurm":
        assert lines[2] == long_job["job_id"]


def test_command_exit_status_is_sshq_exit_status(bed: Bed, long_job: dict[str, Any]) -> None:
    r = bed.run("ssh-to-job", str(long_job["id"]), "--command", "echo before; exit 42")
    assert r.returncode == 42, r.stderr.decode()
    assert r.stdout == b"before\n"

    r = bed.run("ssh-to-job", str(long_job["id"]), "--json", "--command",
                'echo "$MYVAR"; echo oops >&2; exit 5')
    assert r.returncode == 5, r.stderr.decode()
    (obj,) = json.loads(r.stdout)
    assert obj["id"] == long_job["id"]
    assert obj["state"] == "running"
    assert obj["command_exit_status"] == 5
    assert obj["stdout"] == "a b\n"
    assert "oops" in obj["stderr"]


@pytest.mark.slurm
async def test_api_ssh_to_job_returns_job_id(bed: Bed, slurm_job: dict[str, Any]) -> None:
    async with AsyncClient(bed.config, state_dir=bed.state_dir) as c:
        result = await c.ssh_to_job(slurm_job["id"], "echo $SLURM_JOB_ID", timeout=60)
    assert result.exit_status == 0, result.stderr
    assert result.stdout.decode().strip() == slurm_job["job_id"]


def test_job_env_snapshot_is_private(bed: Bed, long_job: dict[str, Any]) -> None:
    path = f"{long_job['job_log_dir']}/job.env"
    # Over ssh, as the job's user sees it...
    r = bed.run("ssh-to-job", str(long_job["id"]), "--command", f"stat -c '%a %U' {path}")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split()[0] == "600"
    # ... and on the file system (the test bed's "remote" is this machine).
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert "MYVAR=" in Path(path).read_text()


@pytest.mark.sshd
def test_local_platform_job_env_and_command(
    bed: Bed, fresh_job: Callable[..., dict[str, Any]],
) -> None:
    job = fresh_job("local", "--env", "MYVAR=a b", "--command", "sleep 600")
    job = bed.wait_running(job["id"])
    st = os.stat(f"{job['job_log_dir']}/job.env")
    assert stat.S_IMODE(st.st_mode) == 0o600
    r = bed.run("ssh-to-job", str(job["id"]), "--command", 'pwd; echo "[$MYVAR]"; exit 9')
    assert r.returncode == 9, r.stderr.decode()
    assert r.stdout.decode() == f"{job['work_dir']}\n[a b]\n"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("platform", "command", "state"), [
    pytest.param("bg", "true", "succeeded", marks=pytest.mark.sshd),
    pytest.param("slurm", "exit 1", "failed", marks=pytest.mark.slurm),
])
def test_ssh_to_job_on_finished_job(bed: Bed, fresh_job: Callable[..., dict[str, Any]],
                                    platform: str, command: str, state: str) -> None:
    if platform == "slurm":
        _need_slurm(bed)
    job = fresh_job(platform, "--command", command, wait=True)
    assert job["state"] == state
    for args in (["ssh-to-job", str(job["id"])],
                 ["ssh-to-job", str(job["id"]), "--command", "touch " + CANARY]):
        r = bed.run(*args)
        assert r.returncode == 2
        assert r.stdout == b""
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert state in lines[0] and "not running" in lines[0], lines
    assert not os.path.exists(CANARY)


@pytest.mark.slurm
def test_ssh_to_job_on_pending_job(bed: Bed, fresh_job: Callable[..., dict[str, Any]]) -> None:
    _need_slurm(bed)
    job = fresh_job("slurm", "--directive=--hold", "--command", "true")
    assert bed.poll(job["id"])["state"] == "submitted"
    for args in (["ssh-to-job", str(job["id"])],
                 ["ssh-to-job", str(job["id"]), "--command", "true"]):
        r = bed.run(*args)
        assert r.returncode == 2
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert "submitted" in lines[0], lines


@pytest.mark.slurm
def test_ssh_to_job_before_the_env_snapshot_exists_is_not_silently_wrong(
    bed: Bed, slurm_job: dict[str, Any], fresh_job: Callable[..., dict[str, Any]],
) -> None:
    """A job Slurm runs, whose script has not reached the wrapper yet.

    BASH_ENV (read by the job script's bash before its first line) delays the
    start like a slow site prolog or file system does.  ssh-to-job must then
    either give the job's environment (e.g. by waiting for the snapshot) or
    fail clearly; it must not open the job's work directory with a foreign
    environment and exit 0.
    """
    slow = Path(f"/tmp/sshq-slow-start-{uuid.uuid4().hex}.sh")
    slow.write_text("sleep 20\n")
    slow.chmod(0o644)
    try:
        work_dir = str(Path(slurm_job["work_dir"]).parent)  # exists already
        job = fresh_job("slurm", "--name", "slow-start", "--work-dir", work_dir,
                        "--env", "MYVAR=a b", f"--directive=--export=ALL,BASH_ENV={slow}",
                        "--command", "sleep 600")
        deadline = time.monotonic() + 90
        while bed.poll(job["id"])["state"] != "running":
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.3)
        if os.path.exists(f"{job['job_log_dir']}/job.env"):
            pytest.skip("missed the window before the wrapper wrote job.env")
        r = bed.run("ssh-to-job", str(job["id"]), "--command", 'echo "[$MYVAR]"')
        if r.returncode == 0:
            assert r.stdout == b"[a b]\n", "ran with a foreign environment, exit 0"
        else:
            assert r.stdout == b""
            lines = r.stderr.decode().splitlines()
            assert len(lines) == 1 and lines[0].startswith("sshq: "), lines
    finally:
        slow.unlink()


def test_slurm_attach_error_recognises_srun_refusing_overlap() -> None:
    handler = HANDLERS["slurm"]
    # What srun < 20.11 (no --overlap yet) prints for it: GNU getopt's message
    # for an unknown long option.  Not captured here (this Slurm supports
    # --overlap); the format is getopt_long's "%s: unrecognized option '%s'".
    old_srun = ("srun: unrecognized option '--overlap'\n"
                'Try "srun --help" for more information\n')
    why = handler.attach_error(1, old_srun)
    assert why and "overlap" in why
    # Ordinary failures of the step or the command are not a refusal of --overlap.
    for stderr in ("srun: error: vm: task 0: Exited with exit code 42\n",
                   "srun: error: Unable to create step for job 12: Job/step already"
                   " completing or completed\n",
                   "bash: overlap: command not found\n", ""):
        assert handler.attach_error(1, stderr) is None, stderr


# ---------------------------------------------------------------- cat-log --follow


class Reader:
    """Read a stream line by line in a thread, stamping each line's arrival."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[tuple[float, bytes]] = []
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._t.start()

    def _run(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self.lines.append((time.monotonic(), line))

    def wait_for(self, data: bytes, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if data in line:
                    return when
            time.sleep(0.05)
        pytest.fail(f"{data!r} not read within {timeout} s; read: {self.lines}")

    def join(self) -> None:
        self._t.join(timeout=30)


@contextlib.contextmanager
def follow(bed: Bed, sid: int) -> Iterator[subprocess.Popen[bytes]]:
    """``sshq cat-log SID --follow`` running, its output piped; killed if still running."""
    with subprocess.Popen([*SSHQ, "cat-log", str(sid), "--follow"], env=bed.env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slurm
def test_cat_log_follow_streams_live_and_exits_with_job_status(
    bed: Bed, fresh_job: Callable[..., dict[str, Any]],
) -> None:
    _need_slurm(bed)
    job = fresh_job("slurm", "--name", "ticker", "--command",
                    'echo to-err >&2; for i in $(seq 1 15); do echo "line $i"; sleep 0.2; done;'
                    " exit 3")
    with follow(bed, job["id"]) as proc:
        out, err = Reader(proc.stdout), Reader(proc.stderr)
        first = out.wait_for(b"line 1\n", timeout=120)
        rc = proc.wait(timeout=90)
        ended = time.monotonic()
        out.join()
        err.join()
    assert rc == 3, b"".join(line for _, line in err.lines)
    assert [line for _, line in out.lines] == [f"line {i}\n".encode() for i in range(1, 16)]
    assert b"to-err\n" in [line for _, line in err.lines]
    # Live: the first line came while the job was still printing (some 2.8 s).
    last = out.lines[-1][0]
    assert last - first > 1.5, (first, last)
    assert ended - first > 1.5, (first, ended)


@pytest.mark.sshd
def test_cat_log_follow_ctrl_c_leaves_job_running(
    bed: Bed, fresh_job: Callable[..., dict[str, Any]],
) -> None:
    job = fresh_job("bg", "--name", "follow-int", "--command",
                    "echo started; while :; do sleep 0.5; echo tick; done")
    bed.wait_running(job["id"])
    with follow(bed, job["id"]) as proc:
        out, err = Reader(proc.stdout), Reader(proc.stderr)
        out.wait_for(b"started", timeout=30)
        out.wait_for(b"tick", timeout=30)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C on sshq's terminal sends it
        rc = proc.wait(timeout=30)
        out.join()
        err.join()
    assert rc == 130, err.lines
    polled = bed.poll(job["id"])
    assert polled["state"] == "running", polled
    # Still writing its log after sshq stopped following.
    size = os.path.getsize(f"{job['job_log_dir']}/job.out")
    deadline = time.monotonic() + 10
    while os.path.getsize(f"{job['job_log_dir']}/job.out") == size:
        assert time.monotonic() < deadline, "the job stopped when sshq stopped following"
        time.sleep(0.2)
