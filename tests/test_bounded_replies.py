"""Issue 10, section 1: nothing a remote host sends can make the client's memory grow
without bound.

- A job whose job.status is 300 MB: one ``sshq poll`` keeps the client small
  (the agent reads at most 64 KiB of a status file and replies with fields).
- A remote ``python`` that prints 1.5 GB and no fence: the client stops at the
  reply cap with a RemoteError naming the host and the cap, on the asyncssh and
  openssh transports (real sshd) and the local one, its memory bounded.
- The caps each layer holds: ``Transport.run(max_output=...)``, the frame
  parser's preamble and frame caps, the agent's 16 MiB per log read (and
  ``cat_log`` reading a bigger file whole, 16 MiB at a time) and per runner
  command output.

Peak memory is the CLI process's own high-water mark (VmHWM), written by the
process itself as it exits; each CLI run also has an address-space limit, so
that a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml

from sshq import AsyncClient, JobSpec, JobState, RemoteError
from sshq.remote import protocol
from sshq.remote.protocol import FrameParser, agent_argv, encode_request
from sshq.shipped import agent
from sshq.transport import HostParams, Transport
from sshq.transport.asyncssh_ import AsyncSSHTransport
from sshq.transport.bounded import STDERR_KEEP
from sshq.transport.local import LocalTransport
from sshq.transport.openssh import OpenSSHTransport

MiB = 1024 * 1024
#: What the client may reach (bytes of peak RSS) in one CLI command.
POLL_RSS_LIMIT = 200 * MiB
FLOOD_RSS_LIMIT = 400 * MiB  # "well under 1 GB": the reply cap (64 MiB) and its copies
#: A CLI run's address-space limit: a regression fails with MemoryError, the
#: machine keeps its memory.
ADDRESS_SPACE_LIMIT = 3 * 1024 * MiB

TRANSPORTS = ("asyncssh", "openssh", "local")


# ---------------------------------------------------------------- measuring the CLI

_MEASURE = """\
import atexit, runpy, sys
def _hwm(path=sys.argv[1]):
    with open("/proc/self/status") as src, open(path, "w") as dst:
        dst.write(src.read())
atexit.register(_hwm)
sys.argv = ["sshq"] + sys.argv[2:]
runpy.run_module("sshq", run_name="__main__", alter_sys=True)
"""


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def sshq_measured(env: dict[str, str], *args: str,
                  timeout: float = 300) -> tuple[int, bytes, bytes, int]:
    """Run ``sshq ARGS``; return (exit status, stdout, stderr, its peak RSS in bytes)."""
    with tempfile.TemporaryDirectory(prefix="sq-rss-") as d:
        status = Path(d) / "status"
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(status), *args],
                           capture_output=True, timeout=timeout, env=env,
                           preexec_fn=_limit_address_space)
        text = status.read_text() if status.exists() else ""
    hwm = [line.split() for line in text.splitlines() if line.startswith("VmHWM:")]
    assert hwm and hwm[0][2] == "kB", (r.returncode, r.stderr, text)
    return r.returncode, r.stdout, r.stderr, int(hwm[0][1]) * 1024


def test_measure_can_see_a_big_client(cli_env: dict[str, str], tmp_path: Path) -> None:
    # The measure itself can fail: a client holding 300 MB shows it.
    env = dict(cli_env, PYTHONSTARTUP="")
    code = "x = bytearray(300 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"
    runner = tmp_path / "sitecustomize.py"
    runner.write_text(code + "\n")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    rc, _, err, rss = sshq_measured(env, "--version")
    assert rc == 0, err
    assert rss > 300 * MiB


# ---------------------------------------------------------------- a 300 MB job.status

#: The job makes its own status file 300 MB (a hole: cheap on disk), ending
#: in a newline; the wrapper then appends the exit as usual.
GROW_STATUS = ('f="$SSHQ_JOB_LOG_DIR/job.status"\n'
               "truncate -s +314572800 \"$f\"\n"
               "printf '\\n' >>\"$f\"\n")


@pytest.mark.sshd
@pytest.mark.timeout(300)
@pytest.mark.parametrize("platform", ["local", "bg", "bg-openssh"])
async def test_300_mb_status_file_one_poll_stays_small(
        testbed: dict[str, str], client: AsyncClient, cli_env: dict[str, str],
        platform: str) -> None:
    big, small = await client.submit([JobSpec(command=GROW_STATUS, name="big"),
                                      JobSpec(command="true", name="small")],
                                     platform=platform)
    status = Path(big.job_log_dir) / "job.status"
    done = Path(small.job_log_dir) / "job.status"
    deadline = 120.0
    while not (status.exists() and status.stat().st_size > 300 * MiB
               and b"SSHQ_JOB_EXIT_STATUS=0" in tail(status)
               and b"SSHQ_JOB_EXIT_STATUS=0" in tail(done)):
        deadline -= 0.2
        assert deadline > 0, "the jobs did not end"
        await asyncio.sleep(0.2)
    assert status.stat().st_blocks * 512 < 16 * MiB  # sparse indeed

    rc, out, err, rss = sshq_measured(cli_env, "poll", "--json", str(big.id), str(small.id))
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["big"]["state"] == "succeeded", rows  # the exit at its end was seen
    assert rows["big"]["exit_status"] == 0
    assert str(status.stat().st_size) in rows["big"]["message"]  # and the size is said
    assert rows["small"]["state"] == "succeeded" and not rows["small"]["message"]
    assert rss < POLL_RSS_LIMIT, f"one poll peaked at {rss / MiB:.0f} MiB"


def tail(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read()
    except OSError:
        return b""


# ---------------------------------------------------------------- a flooding "python"


@pytest.fixture
def flood_dir() -> Iterator[Path]:
    """A directory the test user can read, for the flooding python wrapper."""
    d = Path(tempfile.mkdtemp(prefix="sq-flood-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def flooding_python(d: Path, nbytes: int) -> Path:
    """A ``python`` that prints ``nbytes`` NUL bytes (no fence), then exits."""
    p = d / "python"
    p.write_text(f"#!/bin/sh\nhead -c {nbytes} /dev/zero\nexit 0\n")
    p.chmod(0o755)
    return p


def flood_config(tmp_path: Path, testbed: dict[str, str], python: Path) -> Path:
    rd = f"~/sshq-test/flood-{uuid.uuid4().hex[:8]}"
    text = "".join(
        platform_toml(testbed, f"flood-{t}", job_runner="background", transport=t,
                      run_dir=str(tmp_path / "run") if t == "local" else rd,
                      python=str(python))
        for t in TRANSPORTS)
    p = tmp_path / "flood.toml"
    p.write_text(text)
    return p


def procs_running(pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=30)
    return r.stdout.split()


@pytest.mark.sshd
@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_python_printing_1_5_gb_without_a_fence(
        testbed: dict[str, str], tmp_path: Path, state_dir: Path, flood_dir: Path,
        cli_env: dict[str, str], transport: str) -> None:
    nbytes = 1_500_000_000 + random.randrange(10**6)  # unique: marks this test's process
    python = flooding_python(flood_dir, nbytes)
    config = flood_config(tmp_path, testbed, python)
    platform = f"flood-{transport}"
    cap = str(protocol.MAX_REPLY)
    host = "localhost" if transport == "local" else testbed["SSHQ_TEST_HOST"]
    marker = f"head -c {nbytes}"
    try:
        # the CLI: exits with the error on one line, its memory bounded
        env = dict(cli_env, SSHQ_CONFIG=str(config), SSHQ_STATE_DIR=str(state_dir / "cli"))
        rc, _, err, rss = sshq_measured(env, "submit", "-p", platform, "--command", "true")
        line = err.decode("utf-8", "replace").strip()
        assert host in line and cap in line and "\n" not in line, line
        assert rc == RemoteError.exit_code, line
        assert rss < FLOOD_RSS_LIMIT, f"the client peaked at {rss / MiB:.0f} MiB"
        await no_process_left(marker)

        # the API: a RemoteError naming the host and the cap
        async with AsyncClient(config, state_dir=state_dir / "api") as c:
            with pytest.raises(RemoteError) as info:
                await c.submit(JobSpec(command="true", name="flood"), platform=platform)
            msg = str(info.value)
            assert host in msg and cap in msg, msg
            assert "\n" not in msg and len(msg) < 400, msg
            # the command is closed at the cap, while the client goes on
            await no_process_left(marker)
    finally:
        _close_masters(state_dir)
        for pid in procs_running(marker):
            subprocess.run(["kill", "-KILL", pid], capture_output=True, timeout=30)


async def no_process_left(marker: str) -> None:
    for _ in range(100):
        if not procs_running(marker):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"the flooding command still runs: {procs_running(marker)}")


def _close_masters(state_dir: Path) -> None:
    for cm in state_dir.glob("*/cm"):
        for sock in cm.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "sshq-test"],
                           capture_output=True, timeout=30)


# ---------------------------------------------------------------- each transport's cap


def make_transport(name: str, testbed: dict[str, str], control_dir: Path) -> Transport:
    params = HostParams(host=testbed["SSHQ_TEST_HOST"], port=int(testbed["SSHQ_TEST_PORT"]),
                        user=testbed["SSHQ_TEST_USER"], identity_file=testbed["SSHQ_TEST_KEY"],
                        known_hosts=testbed["SSHQ_TEST_KNOWN_HOSTS"], connect_timeout=10.0)
    if name == "asyncssh":
        return AsyncSSHTransport(params)
    if name == "openssh":
        return OpenSSHTransport(params, control_dir=str(control_dir / "cm"))
    return LocalTransport(params)


@pytest.fixture(params=TRANSPORTS)
async def transport(request: pytest.FixtureRequest, testbed: dict[str, str]
                    ) -> AsyncIterator[Transport]:
    d = Path(tempfile.mkdtemp(prefix="sq-cap-", dir="/tmp"))
    t = make_transport(request.param, testbed, d)
    try:
        yield t
    finally:
        await t.close()
        if isinstance(t, OpenSSHTransport):
            subprocess.run(["ssh", *t.ssh_options(), "-O", "exit", "--", t.params.host],
                           capture_output=True, timeout=15, check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.sshd
@pytest.mark.timeout(120)
async def test_run_stops_at_max_output_and_names_host_and_cap(transport: Transport) -> None:
    cap = 3 * MiB + 17
    with pytest.raises(RemoteError) as info:
        await transport.run(["head", "-c", str(512 * MiB), "/dev/zero"], max_output=cap,
                            timeout=60)
    msg = str(info.value)
    assert transport.host in msg and str(cap) in msg, msg
    # the cap is no limit below it, and the transport still works after it
    exact = await transport.run(["head", "-c", str(cap), "/dev/zero"], max_output=cap,
                                timeout=60)
    assert exact.exit_status == 0 and exact.stdout == b"\0" * cap


@pytest.mark.sshd
@pytest.mark.timeout(120)
async def test_stderr_keeps_its_first_bytes_only(transport: Transport) -> None:
    r = await transport.run(["sh", "-c", "head -c 50000000 /dev/zero >&2; echo done"],
                            timeout=60)
    assert r.exit_status == 0 and r.stdout == b"done\n"
    assert len(r.stderr) == STDERR_KEEP


# ---------------------------------------------------------------- the frame parser


def test_preamble_without_a_fence_is_capped() -> None:
    p = FrameParser("abc", host="somehost")
    chunk = b"banner line\n" * 65536
    with pytest.raises(RemoteError) as info:
        for _ in range(protocol.MAX_PREAMBLE // len(chunk) + 2):
            list(p.feed(chunk))
    msg = str(info.value)
    assert "somehost" in msg and str(protocol.MAX_PREAMBLE) in msg


def test_frame_over_the_cap_is_refused_from_its_header() -> None:
    p = FrameParser("abc", host="somehost")
    header = b"SSHQ-BEGIN-abc\n%d\n{" % (protocol.MAX_FRAME + 1)
    with pytest.raises(RemoteError) as info:
        list(p.feed(header))  # refused before its bytes arrive
    msg = str(info.value)
    assert "somehost" in msg and str(protocol.MAX_FRAME) in msg


def test_caps_nest() -> None:
    # a log read (16 MiB, base64) fits a frame; a frame and a preamble fit a reply
    assert agent.MAX_READ_BYTES * 4 // 3 + 4096 < protocol.MAX_FRAME
    assert protocol.MAX_FRAME + protocol.MAX_PREAMBLE < protocol.MAX_REPLY


# ---------------------------------------------------------------- the agent's own caps


def run_agent(op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    nonce, stdin = encode_request(op, payload)
    res = subprocess.run(agent_argv("python3"), input=stdin, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    p = FrameParser(nonce)
    frames = list(p.feed(res.stdout))
    assert p.finished
    return frames


def sparse_file(path: Path, size: int) -> bytes:
    """A file of ``size`` bytes: random head and tail around a hole; its sha256."""
    head, tail = os.urandom(4096), os.urandom(4096)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size - len(tail))
        fh.seek(0, os.SEEK_END)
        fh.write(tail)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.digest()


@pytest.mark.timeout(120)
def test_agent_read_is_at_most_16_mib_whatever_is_asked(tmp_path: Path) -> None:
    path = tmp_path / "job.out"
    sparse_file(path, 20 * MiB)
    (f,) = run_agent("read", {"path": str(path), "max_bytes": 10**12})
    assert f["ok"] is True and f["size"] == 20 * MiB
    assert len(base64.b64decode(f["data_b64"])) == agent.MAX_READ_BYTES == 16 * MiB


@pytest.mark.timeout(120)
def test_agent_caps_a_runner_command_output() -> None:
    res = agent.run(["sh", "-c", "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero >&2"])
    assert res["exit"] == 0
    assert len(res["stdout"]) == agent.MAX_COMMAND_OUTPUT
    assert len(res["stderr"]) < agent.MAX_COMMAND_OUTPUT + 200
    assert "cut at" in res["stderr"]


@pytest.mark.sshd
@pytest.mark.timeout(300)
@pytest.mark.parametrize("platform", ["local", "bg"])
async def test_cat_log_of_a_log_bigger_than_one_read_is_whole(
        testbed: dict[str, str], client: AsyncClient, platform: str) -> None:
    (job,) = await client.submit(JobSpec(command="true", name="biglog"), platform=platform)
    (job,) = await client.wait([job.id], timeout=120, interval=0.2)
    assert job.state is JobState.SUCCEEDED, job.message
    out = Path(job.job_log_dir) / "job.out"
    size = 80 * MiB + 12345  # more than the old single 64 MiB read, five agent reads
    digest = sparse_file(out, size)
    data = await client.cat_log(job.id, "out")
    assert len(data) == size
    assert hashlib.sha256(data).digest() == digest
    assert await client.cat_log(job.id, "out", offset=size - 10) == data[-10:]
