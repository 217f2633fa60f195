"""A key restricted to job management, on the real sshd and Slurm (issue 12).

A second key of the test user is installed with the line ``sshq agent
install`` prints (``restrict,command="... sshq-agent --restricted --run-dir
RUN" KEY sshq``) appended to the user's authorized_keys (as root; the line is
removed at the end).  Through that key: the whole job-management contract on
Slurm, with one audit line per request; and everything else refused: a shell
command, forwarding, a terminal, rsync or a request outside the run
directory, a direct farm, ssh-to-job, a background job, an old agent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from conftest import platform_toml
from helpers import SSHQ, record_agent_calls
from test_hostkeys_hops import keygen

import sshq.remote.protocol as protocol
from sshq import AsyncClient, JobSpec, JobState
from sshq.exceptions import InvalidInputError, RemoteError
from sshq.farm.wire import dispatcher_stdin
from sshq.remote.installed import bundle, bundle_version, read_public_key
from sshq.remote.operations import call_agent
from sshq.shipped.sshq_restricted import PROTOCOL

pytestmark = [pytest.mark.slurm, pytest.mark.sshd, pytest.mark.timeout(300)]

HOME = Path("/home/sshqtest")
AUTHORIZED_KEYS = HOME / ".ssh" / "authorized_keys"
AUDIT = HOME / ".sshq" / "audit.log"
LINE_RE = re.compile(
    r'restrict,command="(/\S+) /home/sshqtest/\.sshq/sshq-agent --restricted --run-dir'
    r' (/home/sshqtest/sshq-test/restricted-[0-9a-f]+)" (ssh-ed25519 [A-Za-z0-9+/=]+) sshq\n\Z')


class Bed:
    """The restricted key and its platforms."""

    def __init__(self, root: Path, testbed: dict[str, str]) -> None:
        self.root = root
        self.testbed = testbed
        self.key = keygen(root / "id_restricted")
        self.run_name = f"restricted-{uuid.uuid4().hex[:10]}"
        self.run_dir = HOME / "sshq-test" / self.run_name
        self.config = root / "platforms.toml"
        rd = f"~/sshq-test/{self.run_name}"
        key = {"identity_file": str(self.key), "agent": "installed"}
        self.config.write_text("".join([
            platform_toml(testbed, "setup", job_runner="slurm", transport="asyncssh",
                          run_dir=rd),
            _with(platform_toml(testbed, "rs", job_runner="slurm", transport="asyncssh",
                                run_dir=rd), key),
            _with(platform_toml(testbed, "rs-openssh", job_runner="slurm",
                                transport="openssh", run_dir=rd), key),
            _with(platform_toml(testbed, "rs-bg", job_runner="background",
                                transport="asyncssh", run_dir=rd), key),
            # the restricted key with the shipped agent: the program sent is skipped
            _with(platform_toml(testbed, "rs-shipped", job_runner="slurm",
                                transport="asyncssh", run_dir=rd),
                  {"identity_file": str(self.key)}),
        ]))
        self.state = root / "state"
        self.env = dict(os.environ, SSHQ_CONFIG=str(self.config), SSHQ_STATE_DIR=str(self.state))
        self.line = ""

    def sshq(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*SSHQ, *args], capture_output=True, timeout=timeout,
                              env=self.env, stdin=subprocess.DEVNULL)

    def ssh_argv(self, *options: str) -> list[str]:
        """The system ssh with the restricted key (no config file)."""
        t = self.testbed
        return ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={t['SSHQ_TEST_KNOWN_HOSTS']}",
                "-o", "StrictHostKeyChecking=yes", "-p", t["SSHQ_TEST_PORT"], *options,
                f"{t['SSHQ_TEST_USER']}@{t['SSHQ_TEST_HOST']}"]

    def client(self, state_dir: Path) -> AsyncClient:
        return AsyncClient(self.config, state_dir=state_dir)


def _with(table: str, extra: dict[str, str]) -> str:
    """A platform table with keys replaced or added."""
    lines = [ln for ln in table.splitlines() if ln.split(" = ")[0] not in extra]
    return "\n".join(lines + [f'{k} = "{v}"' for k, v in extra.items()]) + "\n"


def audit_lines() -> list[str]:
    try:
        return AUDIT.read_text().splitlines()
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def bed(slurm_testbed: dict[str, str], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Bed]:
    """The restricted key, installed with the printed line (removed at the end)."""
    if os.geteuid() != 0:
        pytest.skip("adding a key to the test user's authorized_keys needs root")
    b = Bed(tmp_path_factory.mktemp("restricted"), slurm_testbed)
    r = b.sshq("agent", "install", "-p", "setup", "--key", f"{b.key}.pub")
    assert r.returncode == 0, r.stderr.decode()
    b.line = r.stdout.decode()
    with AUTHORIZED_KEYS.open("a") as fh:
        fh.write(b.line)
    try:
        yield b
    finally:
        with AUTHORIZED_KEYS.open("r+") as fh:  # the same file (owner, mode): rewritten
            kept = [ln for ln in fh.read().splitlines(keepends=True) if ln != b.line]
            fh.seek(0)
            fh.write("".join(kept))
            fh.truncate()
        subprocess.run(["scancel", "-u", slurm_testbed["SSHQ_TEST_USER"], "-n",
                        "sshq-restricted-long"], capture_output=True, timeout=30)


# ---------------------------------------------------------------- install


def test_install_prints_the_line_alone_and_verified_files(bed: Bed) -> None:
    m = LINE_RE.match(bed.line)
    assert m, bed.line
    assert m[2] == str(bed.run_dir)
    assert m[3] == read_public_key(f"{bed.key}.pub")
    entry = HOME / ".sshq" / "sshq-agent"
    assert os.readlink(entry) == f"agent-{bundle_version()}/sshq-agent"
    vdir = HOME / ".sshq" / f"agent-{bundle_version()}"
    assert {p.name for p in vdir.iterdir()} - {"__pycache__"} == set(bundle())
    for name, data in bundle().items():
        on_disk = (vdir / name).read_bytes()
        assert hashlib.sha256(on_disk).hexdigest() == hashlib.sha256(data).hexdigest(), name
        assert stat.S_IMODE((vdir / name).stat().st_mode) & 0o077 == 0, name
    assert stat.S_IMODE((HOME / ".sshq").stat().st_mode) == 0o700


def test_install_again_is_idempotent_and_repairs_a_changed_file(bed: Bed) -> None:
    r = bed.sshq("agent", "install", "-p", "setup", "--key", f"{bed.key}.pub")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == bed.line
    assert "unchanged" in r.stderr.decode()
    victim = HOME / ".sshq" / f"agent-{bundle_version()}" / "sshq_restricted.py"
    good = victim.read_bytes()
    victim.write_bytes(good + b"\nraise SystemExit('tampered')\n")
    r = bed.sshq("agent", "install", "-p", "setup", "--key", f"{bed.key}.pub", "--json")
    assert r.returncode == 0, r.stderr.decode()
    (done,) = json.loads(r.stdout)
    assert done["changed"] is True and done["line"] + "\n" == bed.line
    assert victim.read_bytes() == good


def test_install_through_the_restricted_key_is_refused(bed: Bed) -> None:
    r = bed.sshq("agent", "install", "-p", "rs", "--key", f"{bed.key}.pub")
    assert r.returncode != 0
    assert "restricted" in r.stderr.decode() and "installing the agent" in r.stderr.decode()


def test_status_reports_the_protocol_and_version(bed: Bed) -> None:
    r = bed.sshq("agent", "status", "-p", "rs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["protocol"] == PROTOCOL and info["version"] == bundle_version()
    assert info["restricted"] is True and info["run_dir"] == str(bed.run_dir)
    assert info["up_to_date"] is True


# ---------------------------------------------------------------- the job contract


async def _contract(bed: Bed, platform: str, state_dir: Path, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_agent_calls(monkeypatch)
    before = len(audit_lines())
    async with bed.client(state_dir) as client:
        src = tmp_path / "src"
        (src / "data").mkdir(parents=True)
        (src / "data" / "in.txt").write_text("installed through rrsync\n")
        inst = await client.install(src, platform=platform)
        assert inst.method == "rsync" and inst.files_transferred == 1
        assert (bed.run_dir / "data" / "in.txt").read_text() == "installed through rrsync\n"

        (ok,) = await client.submit(
            JobSpec(command="echo hello; cat data/in.txt > out.txt; sleep 2",
                    work_dir=str(bed.run_dir), outputs=("out.txt",)), platform=platform)
        elements = await client.submit(
            JobSpec(command="echo element $SLURM_ARRAY_TASK_ID", array="1-3", name="arr"),
            platform=platform)
        (long,) = await client.submit(JobSpec(command="sleep 300", name="sshq-restricted-long"),
                                      platform=platform)
        assert ok.job_id and long.job_id and len(elements) == 3

        followed = bytearray()
        async for _, data in client.follow_log(ok.id, ("out",)):
            followed += data
        assert followed == b"hello\n"
        jobs = await client.wait([ok.id, *(e.id for e in elements)], timeout=240)
        assert all(j.state is JobState.SUCCEEDED for j in jobs), jobs
        assert await client.cat_log(ok.id) == b"hello\n"
        assert await client.cat_log(elements[1].id) == b"element 2\n"

        await client.poll([long.id])
        await client.kill([long.id], settle=10)
        (final,) = await client.wait([long.id], timeout=120)
        assert final.state in (JobState.FAILED, JobState.SUBMIT_FAILED), final

        (local,) = await client.retrieve([ok.id], dest=tmp_path / "back")
        assert (local / "job.out").read_bytes() == b"hello\n"
        assert (local / "outputs" / "out.txt").read_text() == "installed through rrsync\n"

        removed = await client.tidy(platform=platform)
        assert str(bed.run_dir / ".sshq") in removed
    lines = audit_lines()[before:]
    ops = [ln.split(" op=")[1].split()[0] for ln in lines]
    # one line per request: each agent call (in order), the follow stream, each rsync
    assert [op for op in ops if not op.startswith("rsync") and op != "follow"] \
        == [c["op"] for c in calls], (ops, calls)
    assert ops.count("follow") == 1, ops
    assert ops.count("rsync-receive") == 1 and ops.count("rsync-send") == 2, ops
    assert all(" outcome=ok" in ln for ln in lines), lines
    submits = [ln for ln in lines if " op=submit " in ln]
    assert any(f" jobs={ok.job_id} " in ln for ln in submits), submits
    kills = [ln for ln in lines if " op=kill " in ln]
    assert len(kills) == 1 and f" jobs={long.job_id} " in kills[0], kills
    assert all(" src=127.0.0.1:" in ln for ln in lines), lines
    assert stat.S_IMODE(AUDIT.stat().st_mode) == 0o600


@pytest.mark.parametrize("platform", ["rs", "rs-openssh"])
async def test_job_management_through_the_restricted_key(
        bed: Bed, platform: str, state_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await _contract(bed, platform, state_dir, tmp_path, monkeypatch)


async def test_the_restricted_key_serves_a_shipped_client_without_running_its_program(
        bed: Bed, state_dir: Path) -> None:
    before = len(audit_lines())
    async with bed.client(state_dir) as client:
        (job,) = await client.submit(JobSpec(command="echo shipped"), platform="rs-shipped")
        (job,) = await client.wait([job.id], timeout=120)
        assert job.state is JobState.SUCCEEDED
    lines = audit_lines()[before:]
    assert any(" op=submit " in ln and " outcome=ok" in ln for ln in lines), lines


def test_pilot_farm_through_the_restricted_key(bed: Bed, tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text("".join(f"echo task-{i}\n" for i in range(1, 7)))
    before = len(audit_lines())
    r = bed.sshq("farm", str(batch), "--via", "rs", "--nodes", "1", "--walltime",
                 "00:05:00", timeout=280)
    assert r.returncode == 0, r.stderr.decode()
    got = sorted(json.loads(ln)["stdout"].strip() for ln in r.stdout.decode().splitlines())
    assert got == sorted(f"task-{i}" for i in range(1, 7))
    ops = [ln.split(" op=")[1].split()[0] for ln in audit_lines()[before:]]
    assert "farm-prepare" in ops and "farm-collect" in ops and "submit" in ops, ops


async def test_pilot_jobs_run_the_installed_dispatcher(
        bed: Bed, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an installed-agent platform no dispatcher source travels: the spool
    calls send their header alone and the pilot job runs ~/.sshq's dispatcher
    (--farm-worker); the shipped platform sends it twice (the program run,
    the copy the pilot job runs)."""
    from sshq.farm import detached
    from sshq.farm.output import TaskResult
    from sshq.farm.wire import dispatcher_source
    from sshq.transport.asyncssh_ import AsyncSSHTransport

    mark = b"# sshq task-farm dispatcher."
    assert dispatcher_source().startswith(mark)
    sent: list[tuple[list[str], bytes]] = []
    real_run = AsyncSSHTransport.run
    real_stdin = detached.dispatcher_stdin

    async def run(self: AsyncSSHTransport, argv: Any, *, stdin: bytes = b"", **kw: Any) -> Any:
        sent.append((list(argv), stdin))
        return await real_run(self, argv, stdin=stdin, **kw)

    def stdin_of(header: dict[str, Any], **kw: Any) -> tuple[str, bytes]:
        nonce, data = real_stdin(header, **kw)
        sent.append(([f"dispatcher {header.get('mode')}"], data))
        return nonce, data

    monkeypatch.setattr(AsyncSSHTransport, "run", run)
    monkeypatch.setattr(detached, "dispatcher_stdin", stdin_of)
    batch = tmp_path / "batch.txt"
    batch.write_text("".join(f"echo pilot-{i}\n" for i in range(1, 5)))
    prepared = {}
    for platform in ("rs", "setup"):
        del sent[:]
        got: list[TaskResult] = []
        async with bed.client(state_dir / platform) as client:
            name, stats = await client.farm(batch, via=platform, nodes=1, walltime="00:05:00",
                                            out=got.append)
        assert sorted(r.stdout for r in got) == [b"pilot-%d\n" % i for i in range(1, 5)]
        assert stats.failed == 0
        prepare = [data for argv, data in sent if b'"mode": "prepare"' in data
                   and argv[0] != "dispatcher prepare"]
        assert len(prepare) == 1, [argv for argv, _ in sent]
        prepared[platform] = len(prepare[0])
        spool = bed.run_dir / "farm" / name / "pilots"
        script = bed.run_dir / "log" / "job" / f"farm-{name}-1" / "01" / "job"
        text = script.read_text()
        if platform == "rs":
            assert all(mark not in data for _, data in sent), [a for a, d in sent if mark in d]
            assert f'"$HOME"/.sshq/sshq-agent --farm-worker {spool}\n' in text, text
            assert "dispatcher.py" not in text
        else:   # the program, and the spool's copy
            assert prepare[0].count(mark) == 2
            assert f"{spool}/dispatcher.py worker {spool}\n" in text, text
    assert prepared["setup"] - prepared["rs"] >= 2 * len(dispatcher_source()), prepared


# ---------------------------------------------------------------- what it refuses


def test_a_shell_command_runs_nothing(bed: Bed, tmp_path: Path) -> None:
    marker = Path(f"/tmp/sshq-restricted-{uuid.uuid4().hex}")
    for command in (["id"], ["touch", str(marker)], ["sh", "-c", f"touch {marker}"]):
        r = subprocess.run([*bed.ssh_argv(), *command], capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 1, r
        assert r.stdout == b""
        err = r.stderr.decode()
        assert err.count("\n") == 1 and "restricted" in err and "refused" in err, err
    assert not marker.exists()
    assert " op=command " in audit_lines()[-1] and "outcome=refused" in audit_lines()[-1]


def test_forwarding_and_a_terminal_are_refused(bed: Bed) -> None:
    # -R: the server refuses the remote forward
    r = subprocess.run([*bed.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-R",
                                      "0:127.0.0.1:22")],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 255 and b"forwarding failed" in r.stderr, r
    # -L: the local end listens, the server refuses each connection through it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*bed.ssh_argv("-N", "-L", f"{port}:127.0.0.1:"
                                           f"{bed.testbed['SSHQ_TEST_PORT']}")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:  # until ssh listens
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        with conn:
            conn.settimeout(20)
            got = conn.recv(100)  # the forwarded sshd would say "SSH-2.0-..."
        assert not got.startswith(b"SSH-"), got
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"prohibited" in err or b"open failed" in err, err
    # -t: no terminal; ssh gives up (nothing runs)
    marker = Path(f"/tmp/sshq-restricted-{uuid.uuid4().hex}")
    before = len(audit_lines())
    r = subprocess.run([*bed.ssh_argv("-tt"), "touch", str(marker)], capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 255 and b"PTY allocation request failed" in r.stderr, r
    assert not marker.exists() and len(audit_lines()) == before
    # without -t, a login (no command) is refused by the forced command
    r = subprocess.run(bed.ssh_argv("-T"), capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and b"restricted" in r.stderr and b"interactive login" in r.stderr


def _rsync(bed: Bed, *args: str) -> subprocess.CompletedProcess[bytes]:
    ssh = " ".join(bed.ssh_argv()[:-1])
    return subprocess.run(["rsync", "-a", "-e", ssh, *args], capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_rsync_outside_the_run_directory_is_refused(bed: Bed, tmp_path: Path) -> None:
    dest = f"{bed.testbed['SSHQ_TEST_USER']}@{bed.testbed['SSHQ_TEST_HOST']}"
    src = tmp_path / "f.txt"
    src.write_text("x\n")
    outside = f"/tmp/sshq-restricted-{uuid.uuid4().hex}"
    for args in ([str(src), f"{dest}:{outside}/"],             # push outside
                 [f"{dest}:/etc/hostname", str(tmp_path / "got")],  # pull outside
                 [str(src), f"{dest}:{bed.run_dir}/../escape/"],  # ".." out of it
                 [str(src), f"{dest}:.ssh/"]):                  # the home's .ssh
        r = _rsync(bed, *args)
        assert r.returncode != 0, args
        assert b"restricted" in r.stderr, r.stderr
    assert not Path(outside).exists() and not (tmp_path / "got").exists()
    assert not (bed.run_dir.parent / "escape").exists()
    # the same push into the run directory works: the refusal was the path's
    r = _rsync(bed, str(src), f"{dest}:{bed.run_dir}/pushed/")
    assert r.returncode == 0, r.stderr
    assert (bed.run_dir / "pushed" / "f.txt").read_text() == "x\n"


async def _call(bed: Bed, state_dir: Path, op: str, payload: dict[str, Any]) -> Any:
    async with bed.client(state_dir) as client:
        plat = client.config.platform("rs")
        t = client.pool.transport(plat, plat.hosts[0])
        return await call_agent(t, plat.python, op, payload, installed=True, timeout=60)


async def test_requests_outside_the_run_directory_are_refused(bed: Bed,
                                                              state_dir: Path) -> None:
    link = bed.run_dir / "etc-link"
    bed.run_dir.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to("/etc")
        os.lchown(link, (HOME / ".ssh").stat().st_uid, (HOME / ".ssh").stat().st_gid)
    job = {"key": "1", "log_dir": "/tmp", "job_id": "1", "bare_id": "1", "group": [],
           "runner": "slurm"}
    runners = protocol_runners()
    for op, payload in [
        ("read", {"path": "/etc/passwd"}),
        ("read", {"path": f"{link}/passwd"}),                  # a symbolic link out
        ("read", {"path": f"{bed.run_dir}/../../.ssh/authorized_keys"}),
        ("poll", {"jobs": [job], "runners": runners}),          # a log directory outside
        ("follow", {"files": {"out": "/etc/passwd"}, "log_dir": "/tmp"}),
        ("listing", {"path": "/home"}),
        ("init", {"run_dir": "/tmp/elsewhere"}),
        ("procs", {"pattern": "73", "signal": None}),
    ]:
        with pytest.raises(RemoteError, match="restricted"):
            await _call(bed, state_dir, op, payload)
        assert "outcome=refused" in audit_lines()[-1], (op, audit_lines()[-1])


def protocol_runners() -> dict[str, Any]:
    from sshq.job_runners import HANDLERS
    from sshq.remote.operations import runner_templates

    return runner_templates([HANDLERS["slurm"]])


async def test_a_work_directory_outside_is_refused(bed: Bed, state_dir: Path) -> None:
    async with bed.client(state_dir) as client:
        with pytest.raises(RemoteError, match="restricted: work directory /tmp"):
            await client.submit(JobSpec(command="true", work_dir="/tmp/sq-outside"),
                                platform="rs")


async def test_a_changed_submit_command_is_refused(bed: Bed, state_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sshq.job_runners.slurm import SlurmHandler

    real = SlurmHandler.submit_argv
    monkeypatch.setattr(SlurmHandler, "submit_argv",
                        lambda self, f, d: [*real(self, f, d)[:-1], "--hold", f])
    async with bed.client(state_dir) as client:
        with pytest.raises(RemoteError, match="sshq agent install"):
            await client.submit(JobSpec(command="true"), platform="rs")


async def test_background_jobs_need_allow_background(bed: Bed, state_dir: Path) -> None:
    async with bed.client(state_dir) as client:
        with pytest.raises(RemoteError, match="allow-background"):
            await client.submit(JobSpec(command="true"), platform="rs-bg")


def test_direct_farm_find_and_ssh_to_job_say_restricted(bed: Bed, tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("echo x\n")
    for args in (["farm", str(batch), "--hosts", "rs"],
                 ["farm", "find", "sleep", "--hosts", "rs"],
                 ["farm", "killall", "sleep", "--hosts", "rs"]):
        r = bed.sshq(*args)
        assert r.returncode == 2, (args, r)
        assert "restricted" in r.stderr.decode(), r.stderr
    r = bed.sshq("submit", "-p", "rs", "--json", "--command", "sleep 120", "--name",
                 "sshq-restricted-long")
    assert r.returncode == 0, r.stderr.decode()
    (job,) = json.loads(r.stdout)
    for args in ([], ["--command", "id"]):
        r = bed.sshq("ssh-to-job", str(job["id"]), *args)
        assert r.returncode == 2 and "ssh-to-job is refused" in r.stderr.decode(), r.stderr
        assert "restricted" in r.stderr.decode()
    bed.sshq("kill", "--settle", "0", str(job["id"]))


async def test_the_server_refuses_them_too(bed: Bed, state_dir: Path) -> None:
    """What the client refuses before connecting, the forced command refuses
    when asked anyway."""
    async with bed.client(state_dir) as client:
        plat = client.config.platform("rs")
        t = client.pool.transport(plat, plat.hosts[0])
        # a direct farm's dispatcher (stream mode)
        _, stdin = dispatcher_stdin({"slots": 1, "env": {}, "cwd": "."})
        r = await t.run(protocol.agent_argv("python3"), stdin=stdin, timeout=60)
        assert r.exit_status == 1 and b"direct farm" in r.stderr and b"restricted" in r.stderr
        # ssh-to-job's step into a Slurm job
        r = await t.run(["srun", "--jobid=1", "--overlap", "bash", "-c", "id"], timeout=60)
        assert r.exit_status == 1 and b"restricted" in r.stderr and r.stdout == b""
        # SFTP (the subsystem reaches the forced command as "internal-sftp")
        with pytest.raises((asyncssh.Error, OSError)):
            async with t.sftp() as sftp:
                await sftp.listdir("/")
    assert "command=internal-sftp" in audit_lines()[-1], audit_lines()[-1]


async def test_an_older_agent_says_to_install_again(bed: Bed, state_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "PROTOCOL", PROTOCOL + 1)
    async with bed.client(state_dir) as client:
        with pytest.raises(RemoteError, match=r"speaks protocol \d+, this sshq needs \d+: run"
                                              r" `sshq agent install`"):
            await client.tidy(platform="rs")


def test_a_request_over_the_cap_is_refused(bed: Bed) -> None:
    big = b'{"op": "read", "nonce": "' + b"a" * (65 * 1024 * 1024) + b'"}\n'
    r = subprocess.run([*bed.ssh_argv(), "python3", ".sshq/sshq-agent"], input=big,
                       capture_output=True, timeout=120)
    assert r.returncode == 1 and b"over" in r.stderr and b"restricted" in r.stderr, r.stderr


# ---------------------------------------------------------------- fewer bytes, one command


async def test_one_command_per_operation_and_fewer_bytes(
        bed: Bed, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    sent: list[tuple[str, int]] = []
    from sshq.transport.asyncssh_ import AsyncSSHTransport

    real = AsyncSSHTransport.run

    async def counting(self: AsyncSSHTransport, argv: Any, *, stdin: bytes = b"",
                       **kw: Any) -> Any:
        sent.append((self.params.identity_file or "", len(stdin)))
        return await real(self, argv, stdin=stdin, **kw)

    monkeypatch.setattr(AsyncSSHTransport, "run", counting)
    sizes = {}
    for platform in ("setup", "rs"):
        async with bed.client(state_dir / platform) as client:
            (job,) = await client.submit(JobSpec(command="true"), platform=platform)
            await client.wait([job.id], timeout=120)
            del sent[:]
            await client.poll([job.id])
            assert len(sent) == 1, sent   # one SSH command for the poll
            sizes[platform] = sent[0][1]
    assert sizes["rs"] * 5 < sizes["setup"], sizes
    with capsys.disabled():
        print(f"\npoll request bytes: shipped {sizes['setup']}, installed {sizes['rs']}")


# ---------------------------------------------------------------- sshq serve's fs


async def test_fs_inside_the_run_directory(bed: Bed, state_dir: Path, tmp_path: Path) -> None:
    """sshq serve's FirecREST filesystem operations through the restricted key."""
    d = f"{bed.run_dir}/fs-{uuid.uuid4().hex[:8]}"
    roots = [str(bed.run_dir)]

    async def fs(action: str, path: str, **kw: Any) -> Any:
        return await _call(bed, state_dir, "fs", dict(kw, action=action, path=path, roots=roots))

    before = len(audit_lines())
    assert (await fs("mkdir", f"{d}/sub", parent=True))["ok"] is True
    data = b"staged through fs\n" * 1000
    assert (await fs("upload", f"{d}/sub", name="f.txt",
                     data_b64=base64.b64encode(data).decode()))["ok"] is True
    listed = await fs("ls", d, recursive=True)
    assert sorted(e["name"] for e in listed["output"]) == ["sub", "sub/f.txt"]
    assert (await fs("stat", f"{d}/sub/f.txt"))["output"]["size"] == len(data)
    got = await fs("read", f"{d}/sub/f.txt", tail=True, max=18)
    assert base64.b64decode(got["data_b64"]) == b"staged through fs\n"
    assert (await fs("rm", f"{d}/sub"))["ok"] is True
    assert not Path(f"{d}/sub").exists()
    # a link that leads out: itself listed and removed, never followed
    outside = tmp_path / "target"
    outside.mkdir()
    (outside / "keep").write_text("x")
    outside.chmod(0o755)
    tmp_path.chmod(0o755)
    os.symlink(outside, f"{d}/out")
    assert (await fs("stat", f"{d}/out"))["output"]["size"] == len(str(outside))
    with pytest.raises(RemoteError, match=r"restricted: fs path .*/out/keep is outside the"
                                          r" run directory"):
        await fs("read", f"{d}/out/keep")
    with pytest.raises(RemoteError, match="is outside the run directory"):
        await fs("ls", f"{d}/out", dereference=True)
    assert (await fs("rm", f"{d}/out"))["ok"] is True
    assert (outside / "keep").read_text() == "x" and not os.path.lexists(f"{d}/out")
    # (other tests may use the key meanwhile: this test's lines name its paths)
    lines = [ln for ln in audit_lines()[before:] if f" path={d}" in ln]
    assert [ln.split(" op=")[1].split()[0] for ln in lines] == ["fs"] * 10, lines
    assert sum(" outcome=refused" in ln for ln in lines) == 2, lines


async def test_fs_outside_the_run_directory_is_refused(bed: Bed, state_dir: Path) -> None:
    run = str(bed.run_dir)
    bed.run_dir.mkdir(parents=True, exist_ok=True)
    big = base64.b64encode(b"x" * (5 * 1024 * 1024 + 1)).decode()
    for action, path, kw in [
        ("ls", "/etc", {}),
        ("read", "/etc/passwd", {}),
        ("stat", str(HOME / ".ssh" / "authorized_keys"), {}),
        ("mkdir", f"{HOME}/sshq-test/escaped", {}),
        ("rm", f"{run}/x/../..", {}),                        # ".." out of it
        ("rm", f"{run}/..", {}),
        ("upload", f"{run}/..", {"name": "f", "data_b64": ""}),
        ("rm", run, {}),                                     # the run directory itself
        ("upload", run, {"name": "big", "data_b64": big}),   # over the size cap
        ("chmod", run, {}),
    ]:
        before = len(audit_lines())
        with pytest.raises(RemoteError, match="restricted") as info:
            await _call(bed, state_dir, "fs", dict(kw, action=action, path=path,
                                                   roots=[run, "/"]))
        assert "refused by the restricted sshq agent" in str(info.value), info.value
        (line,) = [ln for ln in audit_lines()[before:] if " op=fs " in ln
                   and ln.endswith(f" path={path}")]
        assert "outcome=refused" in line, line
    assert bed.run_dir.is_dir() and not (HOME / "sshq-test" / "escaped").exists()
    assert not (bed.run_dir / "big").exists()


# ---------------------------------------------------------------- sshq.Executor


def _pyenv_facts(reply: dict[str, Any], python: str) -> Any:
    from sshq.executor._wire import parse_pyenv

    env = parse_pyenv(reply, host="h", python=python)
    return env.version, env.executable, env.cloudpickle, bool(env.cloudpickle_error)


async def test_executor_pyenv_is_answered_from_files(bed: Bed, state_dir: Path) -> None:
    """The pre-flight check through the restricted key: the same facts as the
    shipped agent's (which runs the interpreter), the interpreter not run."""
    import cloudpickle
    from test_executor import VENV, ensure_venv

    venv_python = ensure_venv(bed.testbed, VENV, cloudpickle.__version__)
    async with bed.client(state_dir) as client:
        plat = client.config.platform("setup")
        t = client.pool.transport(plat, plat.hosts[0])
        facts = {}
        for python in (venv_python, "python3"):
            shipped = await call_agent(t, plat.python, "pyenv", {"python": python}, timeout=60)
            before = len(audit_lines())
            read = await _call(bed, state_dir, "pyenv", {"python": python})
            assert read.get("read_only") is True and "read_only" not in shipped
            facts[python] = _pyenv_facts(read, python)
            assert facts[python] == _pyenv_facts(shipped, python), python
            (line,) = [ln for ln in audit_lines()[before:] if " op=pyenv " in ln
                       and f" python={python}" in ln]
            assert " outcome=ok" in line, line
        assert facts[venv_python][2] == cloudpickle.__version__
        assert facts["python3"][2] == "" and facts["python3"][3]  # the system's: none
        for python in ("/bin/sh", "sh", "/usr/bin/env"):
            with pytest.raises(RemoteError, match="restricted: the python .* is neither the"
                                                  " agent's own"):
                await _call(bed, state_dir, "pyenv", {"python": python})
            assert [ln for ln in audit_lines() if " op=pyenv " in ln][-1].endswith(
                f" python={python}"), python
            assert "outcome=refused" in [ln for ln in audit_lines() if " op=pyenv " in ln][-1]
        missing = await _call(bed, state_dir, "pyenv", {"python": f"{bed.run_dir}/no/python"})
        assert missing["exit"] == 127 and "No such file" in missing["stderr"]


def square(x: int) -> int:
    return x * x


def test_an_executor_on_the_restricted_platform(bed: Bed, tmp_path: Path) -> None:
    """End to end: pre-flight, a call and a map as Slurm jobs, values home."""
    import cloudpickle
    from test_executor import VENV, ensure_venv

    from sshq import Executor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    python = ensure_venv(bed.testbed, VENV, cloudpickle.__version__)
    before = len(audit_lines())
    with Executor("rs", config=bed.config, state_dir=tmp_path / "state", python=python,
                  poll_interval=0.5, max_poll_interval=2.0, walltime="0:10:00") as ex:
        assert ex.submit(square, 12).result(timeout=240) == 144
        assert list(ex.map(square, range(5), timeout=240)) == [0, 1, 4, 9, 16]
        assert ex.submit(lambda: __import__("sys").executable).result(timeout=240) == python
    lines = audit_lines()[before:]
    (line,) = [ln for ln in lines if " op=pyenv " in ln and f" python={python}" in ln]
    assert " outcome=ok" in line, line
    ops = [ln.split(" op=")[1].split()[0] for ln in lines]
    assert "submit" in ops and "poll" in ops, ops


def test_config_refuses_an_installed_agent_on_a_local_platform(tmp_path: Path) -> None:
    from sshq.config import parse_config

    with pytest.raises(Exception, match="needs an SSH transport"):
        parse_config('[platforms.x]\ntransport = "local"\nagent = "installed"\n')
    with pytest.raises(Exception, match="agent must be one of"):
        parse_config('[platforms.x]\nagent = "maybe"\n')


def test_client_refuses_before_connecting(tmp_path: Path) -> None:
    """No sshd at all: the refusal cannot have come from a host."""
    from sshq.config import parse_config
    from sshq.remote.installed import refuse_if_restricted

    plat = parse_config('[platforms.x]\nhosts = ["192.0.2.1"]\nagent = "installed"\n')["x"]
    with pytest.raises(InvalidInputError, match="restricted"):
        refuse_if_restricted(plat, "ssh-to-job")
