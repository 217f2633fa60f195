"""Jobs in container images (``--container-image``) against the real test bed.

Everything goes through the real sshd of the test bed to the user
``sshqtest``, whose jobs run with the background job runner:

* podman (rootless, set up by ``.ci/setup-testbed.sh``: runc, cgroupfs, vfs
  storage and the local image ``localhost/sshq-test:latest``, busybox + bash,
  built offline): the job runs in the image, its container is recorded in
  job.status, exit statuses and kills reach it, and ``sshq ssh-to-job``
  (``--command`` and an interactive terminal driven by tmux) runs inside the
  job's very own container: it sees the marker the job wrote into the
  container's private /tmp, which the host does not have;
* apptainer cannot be installed here: a FAKE ``apptainer`` (a shell script
  on the remote PATH through the platform's ``path_prepend``) logs its argv
  and runs the command after the image, so that the exact invocations of the
  job wrapper and of ssh-to-job are checked;
* invalid image names are refused before anything is submitted.

The podman tests skip when the test bed has no podman (SSHQ_TEST_PODMAN=0),
unless SSHQ_REQUIRE_TESTBED=1, where they fail.  Every job started here is
killed at the end and every container it recorded is removed.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml
from helpers import SshqCli, Tmux, exit_and_status, open_job_terminal
from testbed import require_part

#: A --command argument with quotes, $(), ; and printf formats.
HOSTILE_COMMAND = ('printf "%s\\n" "$HOSTILE"; echo "$(echo ok)"; printf "[%s]\\n" "$MYVAR";'
                   " echo 'single \"quoted\" $HOME' ; echo done")


def _hostile_value(canary: str) -> str:
    """An environment value that breaks careless quoting; running it creates ``canary``."""
    return (f"q'uote \"dq\" $(touch {canary}) `touch {canary}` ; semi && amp | pipe"
            " \\back\\slash $HOME ${PATH} * ?\tTAB\nsecond line -- é ü 日本語 ✓ ' \" end\\")


def _require_podman(testbed: dict[str, str]) -> str:
    """The test image, or skip (fail under SSHQ_REQUIRE_TESTBED=1) without podman."""
    require_part(testbed, "SSHQ_TEST_PODMAN", "podman")
    return testbed.get("SSHQ_TEST_PODMAN_IMAGE") or "localhost/sshq-test:latest"


# ---------------------------------------------------------------- the test bed


class Bed(SshqCli):
    """``sshq`` on this test's platforms, and helpers.

    ``pod``: podman; ``slowpod``: podman through a shim that takes
    :data:`SLOW_START` seconds to start a container; ``fakeapp``: the fake
    apptainer.
    """

    def __init__(self, testbed: dict[str, str], top: Path, state: Path) -> None:
        self.testbed = testbed
        self.user = testbed["SSHQ_TEST_USER"]
        self.home = pwd.getpwnam(self.user).pw_dir
        self.run_id = uuid.uuid4().hex[:10]
        self.run_dir = f"{self.home}/sshq-test/{self.run_id}"
        # The fake apptainer: a directory on the remote PATH (path_prepend).
        self.fake_dir = top / "fakebin"
        self.fake_dir.mkdir()
        self.fake_log = top / "fakebin" / "apptainer.log"
        self.fake_log.touch()
        self.fake_log.chmod(0o666)
        fake = self.fake_dir / "apptainer"
        fake.write_text(FAKE_APPTAINER.replace("@LOG@", shlex.quote(str(self.fake_log))))
        fake.chmod(0o755)
        # A podman that is slow to start a container (as when pulling an image).
        self.slow_dir = top / "slowbin"
        self.slow_dir.mkdir()
        slow = self.slow_dir / "podman"
        real = shutil.which("podman") or "/usr/bin/podman"
        slow.write_text(SLOW_PODMAN.replace("@PODMAN@", real))
        slow.chmod(0o755)
        for d in (top, self.fake_dir, self.slow_dir):
            d.chmod(0o755)
        self.config = top / "platforms.toml"
        self.config.write_text(
            platform_toml(testbed, "pod", job_runner="background", transport="asyncssh",
                          run_dir=f"~/sshq-test/{self.run_id}", container_runtime="podman")
            + platform_toml(testbed, "fakeapp", job_runner="background", transport="asyncssh",
                            run_dir=f"~/sshq-test/{self.run_id}",
                            container_runtime="apptainer", path_prepend=[str(self.fake_dir)])
            + platform_toml(testbed, "slowpod", job_runner="background", transport="asyncssh",
                            run_dir=f"~/sshq-test/{self.run_id}", container_runtime="podman",
                            path_prepend=[str(self.slow_dir)])
        )
        # Every job started here is killed (and its container removed) at the end.
        super().__init__(dict(os.environ, SSHQ_CONFIG=str(self.config),
                              SSHQ_STATE_DIR=str(state)))

    def wait_output(self, job: dict[str, Any], text: str, timeout: float = 60) -> None:
        """Wait until the job's stdout has ``text`` (the job really runs its script)."""
        out = Path(job["job_log_dir"]) / "job.out"
        deadline = time.monotonic() + timeout
        while True:
            if out.exists() and text in out.read_text(errors="replace"):
                return
            if time.monotonic() > deadline:
                polled = self.poll(job["id"])
                err = Path(job["job_log_dir"]) / "job.err"
                pytest.fail(f"job {job['id']} ({polled['state']}) did not print {text!r} in"
                            f" {timeout} s; stderr: {err.read_text() if err.exists() else ''}")
            time.sleep(0.2)

    def wait_final(self, sid: int, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.poll(sid)
            if job["state"] not in ("submitted", "running"):
                return job
            assert time.monotonic() < deadline, f"job {sid} still {job['state']}"
            time.sleep(0.3)

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as the test user through the test bed's sshd (system ssh)."""
        tb = self.testbed
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", tb["SSHQ_TEST_KEY"], "-p", tb["SSHQ_TEST_PORT"],
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={tb['SSHQ_TEST_KNOWN_HOSTS']}",
             f"{self.user}@{tb['SSHQ_TEST_HOST']}", command],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    def containers(self) -> list[str]:
        """Names of all the test user's podman containers, running or not."""
        r = self.ssh("podman ps -a --format '{{.Names}}'")
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    def fake_calls(self) -> list[list[str]]:
        """The argv of every call of the fake apptainer so far."""
        data = self.fake_log.read_text()
        return [rec.split("\x1f")[:-1] for rec in data.split("\x1e")[:-1]]


#: FAKE apptainer (apptainer cannot be installed on the test bed): logs its
#: argv (fields ending in \x1f, calls ending in \x1e) and emulates
#: ``apptainer exec [--pwd DIR] [--bind SPEC] ... IMAGE CMD ARGS...`` by
#: running CMD ARGS on the host, in DIR.
FAKE_APPTAINER = r"""#!/bin/bash
# FAKE apptainer for sshq's tests (tests/test_containers.py): not a container.
{ printf '%s\x1f' "$@"; printf '\x1e'; } >>@LOG@
[ "$1" = exec ] || { echo "fake apptainer: only 'exec'" >&2; exit 64; }
shift
dir=
while [ $# -gt 0 ]; do
    case $1 in
        --pwd) dir=$2; shift 2 ;;
        --bind|-B) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
shift   # the image
[ -z "$dir" ] || cd "$dir" || exit 1
export SSHQ_FAKE_APPTAINER=1
exec "$@"
"""


#: Seconds the ``slowpod`` platform's podman takes before ``podman run``.
SLOW_START = 6

#: A podman shim on the ``slowpod`` platform's PATH: a slow image pull.
SLOW_PODMAN = f"""#!/bin/sh
[ "$1" = run ] && sleep {SLOW_START}
exec @PODMAN@ "$@"
"""


@pytest.fixture
def bed(testbed: dict[str, str], state_dir: Path) -> Iterator[Bed]:
    """This test's platforms; its jobs killed and their containers removed at the end."""
    top = Path(tempfile.mkdtemp(prefix="sq-ctr-", dir="/tmp"))
    b = Bed(testbed, top, state_dir)
    try:
        yield b
    finally:
        if b.started:
            b.kill_started()
            names = [n for j in b.started
                     if (n := _status(j).get("SSHQ_JOB_CONTAINER_NAME"))]
            if names:
                b.ssh("podman rm -f -t 0 " + " ".join(map(shlex.quote, names)) + " >/dev/null 2>&1")
        shutil.rmtree(top, ignore_errors=True)


def _status(job: dict[str, Any]) -> dict[str, str]:
    """The job status file (the test bed's remote is this machine)."""
    try:
        text = (Path(job["job_log_dir"]) / "job.status").read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _wait_gone(bed: Bed, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while name in bed.containers():
        if time.monotonic() > deadline:
            r = bed.ssh("podman ps -a; ps -ef | grep -v grep | grep -E 'conmon|sleep'")
            pytest.fail(f"container {name} still exists {timeout} s after its job ended:\n"
                        f"{r.stdout}")
        time.sleep(0.5)


# ---------------------------------------------------------------- podman: the job


@pytest.mark.sshd
def test_podman_job_runs_in_image_and_records_container(bed: Bed) -> None:
    image = _require_podman(bed.testbed)
    script = ('test -e /run/.containerenv && echo IN-CONTAINER; echo "C=$container";'
              ' echo "SH=$(readlink /bin/sh)"; echo "PWD=$(pwd)"; echo "ID=$(id -u)";'
              ' printf "ARG=[%s]\\n" "$@"; echo "V=[$MYVAR]"; echo "SSHQ_ID=$SSHQ_ID"')
    job = bed.submit("pod", "--name", "inimage", "--container-image", image,
                     "--env", "MYVAR=a b", "--arg", "x y", "--arg", "$(no) 'q' ;",
                     "--command", script, wait=True)
    assert (job["state"], job["exit_status"], job["signal"]) == ("succeeded", 0, None), job
    out = (Path(job["job_log_dir"]) / "job.out").read_text()
    lines = out.splitlines()
    status = _status(job)
    name = status["SSHQ_JOB_CONTAINER_NAME"]
    assert status["SSHQ_JOB_CONTAINER_RUNTIME"] == "podman"
    assert status["SSHQ_JOB_CONTAINER_COMMAND"].endswith("/podman"), status
    assert status["SSHQ_JOB_CONTAINER_IMAGE"] == image
    assert re.fullmatch(r"sshq-[A-Za-z0-9._-]+", name), name
    # Inside podman's container, of the test image (whose /bin/sh is
    # busybox; the host's is not), with the job's everything.
    assert "IN-CONTAINER" in lines and "C=podman" in lines, out
    assert "SH=busybox" in lines, out
    assert os.path.realpath("/bin/sh") != "/bin/busybox"
    assert f"PWD={job['work_dir']}" in lines
    assert f"ID={pwd.getpwnam(bed.user).pw_uid}" in lines  # --userns=keep-id
    assert [ln for ln in lines if ln.startswith("ARG=")] == ["ARG=[x y]", "ARG=[$(no) 'q' ;]"]
    assert "V=[a b]" in lines and f"SSHQ_ID={job['id']}" in lines
    _wait_gone(bed, name)  # --rm


@pytest.mark.sshd
def test_podman_job_exit_status_propagates(bed: Bed) -> None:
    image = _require_podman(bed.testbed)
    job = bed.submit("pod", "--name", "fails", "--container-image", image,
                     "--command", "test -e /run/.containerenv || exit 99; echo bye; exit 7",
                     wait=True)
    assert (job["state"], job["exit_status"], job["signal"]) == ("failed", 7, None), job
    assert (Path(job["job_log_dir"]) / "job.out").read_text() == "bye\n"
    assert _status(job)["SSHQ_JOB_EXIT_STATUS"] == "7"
    _wait_gone(bed, _status(job)["SSHQ_JOB_CONTAINER_NAME"])


@pytest.mark.sshd
def test_podman_kill_ends_job_and_container(bed: Bed) -> None:
    image = _require_podman(bed.testbed)
    job = bed.submit("pod", "--name", "killme", "--container-image", image,
                     "--command", "echo started; sleep 600")
    bed.wait_output(job, "started")
    name = _status(job)["SSHQ_JOB_CONTAINER_NAME"]
    inspect = bed.ssh(f"podman inspect --format '{{{{.ImageName}}}} {{{{.State.Status}}}}' {name}")
    assert inspect.stdout.split() == [image, "running"], inspect.stderr
    r = bed.run("kill", str(job["id"]))
    assert r.returncode == 0, r.stderr.decode()
    job = bed.wait_final(job["id"])
    assert (job["state"], job["signal"]) == ("failed", "TERM"), job
    # The job's processes are gone with it: the container does not outlive it.
    _wait_gone(bed, name)


# ---------------------------------------------------------------- podman: ssh-to-job


@pytest.fixture
def marker_job(bed: Bed) -> tuple[dict[str, Any], str, str]:
    """A running podman job that wrote a marker into its container's own /tmp.

    Returns (job, marker path, marker text).
    """
    image = _require_podman(bed.testbed)
    path = f"/tmp/sshq-marker-{uuid.uuid4().hex}"
    text = f"marker-{uuid.uuid4().hex}"
    job = bed.submit("pod", "--name", "marked", "--container-image", image,
                     "--env", "MYVAR=a b", "--env", f"MARK={text}",
                     "--command", f'echo "$MARK" >{path}; echo started; sleep 600')
    bed.wait_output(job, "started")
    # The container's /tmp is its own: the host has no marker.
    assert not os.path.exists(path)
    return job, path, text


@pytest.mark.sshd
def test_ssh_to_job_command_runs_in_the_jobs_container(
    bed: Bed, marker_job: tuple[dict[str, Any], str, str],
) -> None:
    job, path, text = marker_job
    r = bed.run("ssh-to-job", str(job["id"]), "--command",
                f'cat {path}; pwd; echo "[$MYVAR]"; tr "\\0" " " </proc/1/cmdline; echo;'
                ' echo "SH=$(readlink /bin/sh)"; exit 3')
    assert r.returncode == 3, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert lines[:3] == [text, job["work_dir"], "[a b]"], lines
    # PID 1 of the command's PID namespace is the job's script (or an init
    # that runs it): the command is in the job's container...
    assert lines[3].endswith(f" {job['job_log_dir']}/job.user "), lines
    # ... of the test image (busybox /bin/sh; the host's is not).
    assert lines[4:] == ["SH=busybox"], lines
    # And the job was left alone.
    assert bed.poll(job["id"])["state"] == "running"


@pytest.mark.sshd
def test_ssh_to_job_hostile_command_byte_exact_in_container(bed: Bed) -> None:
    image = _require_podman(bed.testbed)
    work = f"{bed.run_dir}/work/hostile-{uuid.uuid4().hex[:8]}"
    canary = f"{work}/canary"  # the work dir is the same path inside and out
    hostile = _hostile_value(canary)
    job = bed.submit("pod", "--name", "hostile", "--container-image", image,
                     "--work-dir", work, "--env", "MYVAR=a b", "--env", f"HOSTILE={hostile}",
                     "--command", "echo started; sleep 600")
    bed.wait_output(job, "started")
    r = bed.run("ssh-to-job", str(job["id"]), "--command", HOSTILE_COMMAND)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == (hostile.encode() + b"\nok\n[a b]\nsingle \"quoted\" $HOME\ndone\n")
    r = bed.run("ssh-to-job", str(job["id"]), "--command", "test -e /run/.containerenv")
    assert r.returncode == 0, "--command did not run in the container"
    assert not os.path.exists(canary), "a $(...) or `...` in an environment value was executed"


@pytest.mark.sshd
def test_ssh_to_job_while_the_container_starts_is_not_silently_wrong(bed: Bed) -> None:
    """The wrapper has written job.env, its container is not running yet.

    A slow image pull (played by a podman shim that waits before ``podman
    run``) leaves a window where ssh-to-job finds the job's environment and
    container name but no container.  It must then run in the container
    (e.g. by waiting for it) or fail clearly (one ``sshq:`` line), never run
    elsewhere or pass on a runtime's error as its own.
    """
    image = _require_podman(bed.testbed)
    job = bed.submit("slowpod", "--name", "slow", "--container-image", image,
                     "--command", "echo started; sleep 600")
    deadline = time.monotonic() + 30
    while not ((Path(job["job_log_dir"]) / "job.env").exists()
               and "SSHQ_JOB_CONTAINER_NAME" in _status(job)):
        assert time.monotonic() < deadline, "the wrapper never got to its container"
        time.sleep(0.1)
    if "started" in (Path(job["job_log_dir"]) / "job.out").read_text():
        pytest.skip("missed the window: the container already runs")
    r = bed.run("ssh-to-job", str(job["id"]), "--command",
                "test -e /run/.containerenv && echo IN-CONTAINER")
    if r.returncode == 0:
        assert r.stdout == b"IN-CONTAINER\n"
    else:
        assert r.stdout == b""
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sshq: "), lines


# ---------------------------------------------------------------- podman: a terminal


@pytest.fixture
def tmux(bed: Bed) -> Iterator[Tmux]:
    t = Tmux(bed.env)
    try:
        yield t
    finally:
        t.kill()


@pytest.mark.sshd
def test_terminal_in_the_jobs_container(
    bed: Bed, marker_job: tuple[dict[str, Any], str, str], tmux: Tmux,
) -> None:
    job, path, text = marker_job
    open_job_terminal(tmux, job["id"])
    mark = len(tmux.screen())
    tmux.type(f'cat {path}; pwd; test -e /run/.containerenv && echo "IN-""CONTAINER"')
    tmux.wait_for(r"^IN-CONTAINER$", start=mark)
    screen = tmux.screen()[mark:]
    assert re.search(rf"^{re.escape(text)}$", screen, re.M), screen
    assert re.search(rf"^{re.escape(job['work_dir'])}$", screen, re.M), screen
    assert exit_and_status(tmux, 4) == 4
    assert bed.poll(job["id"])["state"] == "running"


# ---------------------------------------------------------------- apptainer (FAKE)


@pytest.mark.sshd
def test_fake_apptainer_invocations_of_wrapper_and_ssh_to_job(bed: Bed) -> None:
    """FAKE apptainer (a logging shell script on path_prepend), not a real one.

    Apptainer cannot be installed on the test bed; the fake checks the exact
    argv of the job wrapper's ``apptainer exec`` and of ssh-to-job's.  The
    job's own PATH (meant for inside the image) lacks the fake's directory:
    the runtime is found with the wrapper's PATH (path_prepend) all the same.
    """
    image = "/nonexistent/images/sshq-fake.sif"
    job = bed.submit("fakeapp", "--name", "fakeapp", "--container-image", image,
                     "--env", "MYVAR=a b", "--env", "PATH=/usr/bin:/bin",
                     "--arg", "x y", "--arg", "$(no) ;",
                     "--command", 'echo "started fake=$SSHQ_FAKE_APPTAINER pwd=$(pwd)"; sleep 600')
    bed.wait_output(job, "started")
    log_dir, work = job["job_log_dir"], job["work_dir"]
    assert (Path(log_dir) / "job.out").read_text().startswith(f"started fake=1 pwd={work}\n")
    status = _status(job)
    assert status["SSHQ_JOB_CONTAINER_RUNTIME"] == "apptainer"
    assert status["SSHQ_JOB_CONTAINER_IMAGE"] == image
    assert status["SSHQ_JOB_CONTAINER_COMMAND"] == str(bed.fake_dir / "apptainer")
    assert "SSHQ_JOB_CONTAINER_NAME" not in status
    assert bed.fake_calls() == [
        ["exec", "--pwd", work, "--bind", log_dir, image, f"{log_dir}/job.user", "x y",
         "$(no) ;"]]

    command = 'echo "fake=$SSHQ_FAKE_APPTAINER [$MYVAR]"; pwd; exit 5'
    r = bed.run("ssh-to-job", str(job["id"]), "--command", command)
    assert r.returncode == 5, r.stderr.decode()
    assert r.stdout.decode() == f"fake=1 [a b]\n{work}\n"
    calls = bed.fake_calls()
    assert len(calls) == 2, calls
    assert calls[1] == ["exec", "--pwd", work, image, "/bin/sh", "-c", command]


# ---------------------------------------------------------------- validation


@pytest.mark.sshd
@pytest.mark.parametrize("args", [
    ["--container-image", "-x"],
    ["--container-image=-x"],
    ["--container-image", "my image"],
    ["--container-image", "img\nname"],
    ["--container-image", ""],
], ids=["dash-separate", "dash-equals", "space", "newline", "empty"])
def test_invalid_container_image_is_refused_before_submission(bed: Bed, args: list[str]) -> None:
    r = bed.run("submit", "-p", "pod", *args, "--command", "true")
    assert r.returncode == 2, (r.returncode, r.stderr.decode())
    assert r.stdout == b""
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1 and "container-image" in err, err
    r = bed.run("jobs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout) == []
    assert not os.path.exists(bed.run_dir), "the platform was contacted"


@pytest.mark.sshd
def test_unknown_container_runtime_is_a_config_error(bed: Bed) -> None:
    bed.config.write_text(bed.config.read_text().replace(
        'container_runtime = "podman"', 'container_runtime = "docker"'))
    r = bed.run("submit", "-p", "pod", "--container-image", "alpine", "--command", "true")
    assert r.returncode == 2, (r.returncode, r.stderr.decode())
    assert "container_runtime" in r.stderr.decode() and "docker" in r.stderr.decode()
    assert not os.path.exists(bed.run_dir)
