"""A restricted platform's refusals made by the client, before connecting (issue 12).

A platform with ``agent = "installed"`` is treated as restricted: what its
key's forced command would refuse (a direct farm, ``farm find``/``killall``,
ssh-to-job, a farm's ``--deps`` copy or pause of a detached or pilot run, a
path that leaves the run directory) is refused by the client with the one
"restricted" message, before any connection.  The platforms point at a TCP
socket that listens and never answers: a connection attempt would show as a
pending connection there (and a client waiting for the SSH banner would time
out with a connection error, not the refusal).  A shipped platform at the same
address proves that the listener sees a client that does connect.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SSHQ
from test_hostkeys_hops import keygen

from sshq import AsyncClient, JobSpec, JobState
from sshq.exceptions import InvalidInputError, TransportError
from sshq.farm.journal import RunDir

#: The one wording of every client-side refusal (sshq.remote.installed.refuse_if_restricted).
RESTRICTED = "is restricted (agent = \"installed\")"


class Silent:
    """A listening TCP socket that never accepts: connections stay pending."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        """How many connections arrived (taken off the queue)."""
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1


class Bed:
    def __init__(self, root: Path, silent: Silent) -> None:
        self.root = root
        self.silent = silent
        self.state = root / "state"
        self.config = root / "platforms.toml"
        key = keygen(root / "id_none")
        (root / "known_hosts").write_text("")
        tables = []
        for name, transport, agent in (("rs", "asyncssh", "installed"),
                                       ("rs-openssh", "openssh", "installed"),
                                       ("plain", "asyncssh", "shipped")):
            tables.append("\n".join([
                f"[platforms.{name}]", 'hosts = ["127.0.0.1"]', f"port = {silent.port}",
                'user = "nobody"', f'identity_file = "{key}"',
                f'known_hosts = "{root / "known_hosts"}"', 'job_runner = "slurm"',
                f'transport = "{transport}"', f'agent = "{agent}"', "connect_timeout = 2",
                'run_dir = "~/sshq-run"']))
        self.config.write_text("\n\n".join(tables) + "\n")
        self.batch = root / "batch.txt"
        self.batch.write_text("echo one\necho two\n")
        self.env = dict(os.environ, SSHQ_CONFIG=str(self.config),
                        SSHQ_STATE_DIR=str(self.state))

    def sshq(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SSHQ, *args], capture_output=True, text=True, timeout=60,
                              env=self.env, stdin=subprocess.DEVNULL)

    def run_record(self, name: str, **options: object) -> RunDir:
        """A farm run's local record, as run_farm writes it."""
        rd = RunDir(self.state, name)
        rec = {"hosts": ["rs"], "format": "jsonl", "via": None, "nodes": 1, "slots": None,
               "retries": 0, "timeout": None, "speculate": True, "keep_order": False,
               "output_dir": None, "deps": None, **options}
        rd.create(self.batch, rec)
        return rd


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    silent = Silent()
    try:
        yield Bed(tmp_path, silent)
    finally:
        silent.sock.close()


def refused(bed: Bed, *args: str, what: str) -> None:
    r = bed.sshq(*args)
    assert r.returncode == 2, (args, r.returncode, r.stderr)
    assert RESTRICTED in r.stderr and what in r.stderr, (args, r.stderr)
    assert r.stderr.count("\n") == 1, r.stderr   # one line, no traceback
    assert bed.silent.connections() == 0, args


def test_the_listener_sees_a_client_that_connects(bed: Bed) -> None:
    """The control: the same command on a shipped platform at the same
    address connects (and fails with a connection error, not a refusal)."""
    r = bed.sshq("farm", "find", "sleep", "--hosts", "plain")
    assert r.returncode != 0 and RESTRICTED not in r.stderr, r.stderr
    assert bed.silent.connections() >= 1


@pytest.mark.parametrize("platform", ["rs", "rs-openssh"])
def test_direct_farms_and_find_killall(bed: Bed, platform: str) -> None:
    what = "a direct farm (--hosts) is refused"
    refused(bed, "farm", str(bed.batch), "--hosts", platform, what=what)
    refused(bed, "farm", str(bed.batch), "--hosts", f"plain,{platform}", what=what)
    refused(bed, "farm", str(bed.batch), "--hosts", platform, "--detach", what=what)
    refused(bed, "farm", "find", "sleep", "--hosts", platform,
            what="farm find/killall is refused")
    refused(bed, "farm", "killall", "sleep", "--hosts", platform,
            what="farm find/killall is refused")
    assert not (bed.state / "farm").exists() or not any((bed.state / "farm").iterdir())


def test_resuming_or_attaching_a_direct_farm(bed: Bed) -> None:
    """Runs recorded before the platform became restricted."""
    bed.run_record("old-run")
    refused(bed, "farm", "--resume", "old-run", what="a direct farm (--hosts) is refused")
    bed.run_record("old-run-2", hosts=["plain"])  # resumed onto the restricted platform
    refused(bed, "farm", "--resume", "old-run-2", "--hosts", "rs",
            what="a direct farm (--hosts) is refused")
    bed.run_record("detached", spools=[{"host": "rs", "path": "/x/farm/detached/rs",
                                         "tasks": 2, "jobs": [], "workers": []}])
    refused(bed, "farm", "attach", "detached", what="a direct farm (--hosts) is refused")


def test_a_pilot_farm_with_deps(bed: Bed) -> None:
    deps = bed.root / "deps"
    deps.mkdir()
    refused(bed, "farm", str(bed.batch), "--via", "rs", "--deps", str(deps),
            what="farm --deps (stage the directory with `sshq install` instead) is refused")


@pytest.mark.parametrize("via", [True, False])
def test_pause_and_resume_of_a_detached_or_pilot_run(bed: Bed, via: bool) -> None:
    rd = bed.run_record("pilots", via="rs" if via else None, spools=[
        {"host": "rs", "path": "/x/farm/pilots/pilots", "tasks": 2, "jobs": [7],
         "workers": []}])
    for verb in ("pause", "resume"):
        refused(bed, "farm", verb, "pilots", what="farm pause/resume of a detached or pilot"
                                                  " run")
        assert not rd.paused_flag.exists()


def test_pause_of_a_run_on_a_shipped_platform_is_no_refusal(bed: Bed) -> None:
    bed.run_record("plain-pilots", hosts=["plain"], via="plain", spools=[
        {"host": "plain", "path": "/x/farm/p/pilots", "tasks": 2, "jobs": [7],
         "workers": []}])
    r = bed.sshq("farm", "pause", "plain-pilots")
    assert r.returncode != 0 and RESTRICTED not in r.stderr, r.stderr
    assert bed.silent.connections() >= 1


def _running_job(client: AsyncClient) -> int:
    host = f"nobody@127.0.0.1:{client.config.platform('rs').port}"
    ((sid, _),) = client.store.reserve_jobs("rs", host, "slurm", ["j"], [{}])
    client.store.update_job(sid, job_id="4242", state=JobState.RUNNING, message="",
                            job_log_dir="/x/log/job/j/01", work_dir="/x/work/j")
    return sid


async def test_ssh_to_job(bed: Bed) -> None:
    async with AsyncClient(bed.config, state_dir=bed.state) as client:
        sid = _running_job(client)
        with pytest.raises(InvalidInputError, match="ssh-to-job is refused") as info:
            await client.ssh_to_job_argv(sid)
        assert RESTRICTED in str(info.value)
        with pytest.raises(InvalidInputError, match="ssh-to-job is refused"):
            await client.ssh_to_job(sid, "id")
    assert bed.silent.connections() == 0
    refused(bed, "ssh-to-job", str(sid), what="ssh-to-job is refused")
    refused(bed, "ssh-to-job", str(sid), "--command", "id", what="ssh-to-job is refused")


async def test_a_work_directory_leaving_the_run_directory(bed: Bed) -> None:
    async with AsyncClient(bed.config, state_dir=bed.state) as client:
        with pytest.raises(InvalidInputError, match=r"work directory '/home/nobody/sshq-run/"
                                                    r"\.\./elsewhere' \(a '\.\.' component\)"):
            await client.submit(JobSpec(command="true",
                                        work_dir="/home/nobody/sshq-run/../elsewhere"),
                                platform="rs")
        # the same spec on a shipped platform is sent (and fails to connect)
        with pytest.raises(TransportError):
            await client.submit(JobSpec(command="true",
                                        work_dir="/home/nobody/sshq-run/../elsewhere"),
                                platform="plain")
    assert bed.silent.connections() >= 1
    r = bed.sshq("submit", "-p", "rs", "--work-dir", "/w/../x", "--command", "true", "--json")
    assert r.returncode == 2 and RESTRICTED in r.stderr, r.stderr
    assert json.loads(bed.sshq("jobs", "--json").stdout or "[]") == [], "nothing recorded"


def test_an_executor_farm_on_a_restricted_platform(bed: Bed) -> None:
    """Executor(hosts=[restricted platform]): refused before the pre-flight connects."""
    from sshq import Executor

    with Executor("rs", hosts=["rs"], config=bed.config, state_dir=bed.state) as ex:
        with pytest.raises(InvalidInputError, match="a direct farm \\(Executor hosts=\\)") \
                as info:
            ex.submit(abs, -1)
        assert RESTRICTED in str(info.value)
    assert bed.silent.connections() == 0
