"""``farm find``/``killall`` run through the agent call path with the platform's
``python``, ``login_shell`` and ``path_prepend`` (the CLI and the library).

The platform's ``python`` is a wrapper script on the real test bed's sshd (user
``sshqtest``): it records that it was used, then execs ``python3`` with a
``sitecustomize`` that, when the interpreter exits, records the environment
the interpreter started with (a login shell's, with ``login_shell``) and runs
a marker program by name: it is found only on the agent's PATH after
``path_prepend`` (the agent applies it to its own PATH).  Before, ``farm
find``/``killall`` started their own program with ``python3``, ignoring all
three.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml

from sshq import AsyncClient
from sshq.farm.procs import find_processes, kill_processes
from sshq.farm.run import resolve_hosts
from sshq.remote import protocol
from sshq.transport import Transport

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(180)]

SLEEPER = "import sys,time; time.sleep(float(sys.argv[1]))"
MARKER_PROGRAM = "sshq-procs-marker"

WRAPPER = """#!/bin/sh
# sshq test: the platform's python.  Records that it was used, then runs python3
# with a sitecustomize that records what the agent saw.
echo "wrapper $$" >> @LOG@
PYTHONPATH=@SITE@
export PYTHONPATH
exec python3 "$@"
"""

SITECUSTOMIZE = """\
import atexit, json, os, subprocess
_ENV = dict(os.environ)  # the environment the interpreter started with


def _record():
    try:  # by name: found only through the agent's PATH (path_prepend)
        ran = subprocess.call([@MARKER@], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    except OSError:
        ran = False
    with open(@LOG@, "a") as fh:
        fh.write(json.dumps({"env": _ENV, "path": os.environ.get("PATH", ""),
                             "marker": ran}) + "\\n")


atexit.register(_record)
"""

MARKER = """#!/bin/sh
echo "marker $$" >> @LOG@
"""


class Bed:
    """The wrapper, its site directory, the marker's directory and the log."""

    def __init__(self, top: Path, testbed: dict[str, str], state_dir: Path) -> None:
        self.top = top
        self.log = top / "log"
        self.log.touch()
        self.log.chmod(0o666)
        site = top / "site"
        bindir = top / "bin"
        site.mkdir()
        bindir.mkdir()
        self.bindir = str(bindir)
        (site / "sitecustomize.py").write_text(
            SITECUSTOMIZE.replace("@MARKER@", repr(MARKER_PROGRAM))
            .replace("@LOG@", repr(str(self.log))))
        marker = bindir / MARKER_PROGRAM
        marker.write_text(MARKER.replace("@LOG@", str(self.log)))
        self.wrapper = top / "python-wrapper"
        self.wrapper.write_text(WRAPPER.replace("@LOG@", str(self.log))
                                .replace("@SITE@", str(site)))
        for p in (marker, self.wrapper):
            p.chmod(0o755)
        for d in (top, site, bindir):
            d.chmod(0o755)
        run_dir = f"~/sshq-test/{uuid.uuid4().hex[:10]}"
        self.config = top / "platforms.toml"
        self.config.write_text("".join(
            platform_toml(testbed, name, job_runner="background", transport=transport,
                          run_dir=run_dir, python=str(self.wrapper),
                          path_prepend=[self.bindir]) + "login_shell = true\n"
            for name, transport in (("wrapped", "asyncssh"), ("wrapped-openssh", "openssh"))))
        self.env = dict(os.environ, SSHQ_STATE_DIR=str(state_dir))
        self.env.pop("SSHQ_CONFIG", None)

    def records(self) -> tuple[list[str], list[dict[str, Any]], list[str]]:
        """(wrapper lines, interpreter records, marker lines) since the last call;
        the log is emptied."""
        lines = self.log.read_text().splitlines()
        self.log.write_text("")
        wrapper = [x for x in lines if x.startswith("wrapper ")]
        marker = [x for x in lines if x.startswith("marker ")]
        recs = [json.loads(x) for x in lines if x.startswith("{")]
        return wrapper, recs, marker

    def sshq(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "sshq", *args, "--config",
                               str(self.config)], capture_output=True, timeout=120,
                              env=self.env, stdin=subprocess.DEVNULL)


@pytest.fixture
def bed(testbed: dict[str, str], state_dir: Path) -> Iterator[Bed]:
    top = Path(tempfile.mkdtemp(prefix="sq-procs-", dir="/tmp"))
    try:
        yield Bed(top, testbed, state_dir)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
async def client(bed: Bed, state_dir: Path) -> AsyncIterator[AsyncClient]:
    c = AsyncClient(bed.config, state_dir=state_dir)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def login_only(client: AsyncClient) -> set[str]:
    """NAME=value lines of the test user's environment that only a login shell
    has (on the test bed: /etc/profile's PATH, /etc/profile.d's SGE_ROOT)."""
    (h,) = resolve_hosts(client, ["wrapped"])

    async def env(argv: list[str]) -> set[str]:
        res = await h.transport.run(argv, timeout=60)
        assert res.exit_status == 0, res.stderr
        return set(res.stdout.decode().splitlines())

    plain = await env(["env"])
    login = await env([*protocol.LOGIN_SHELL, "env"])
    volatile = ("_=", "SHLVL=", "SSH_", "OLDPWD=", "PWD=")
    only = {x for x in login - plain if "=" in x and not x.startswith(volatile)}
    assert only, "a login shell gives the test user no environment of its own here"
    return only


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids of the sleepers this test started (SIGKILLed at the end)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            if b"sshq-marker-" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


async def start_sleeper(t: Transport, marker: str) -> int:
    """A detached sleeper of the test user, ``marker`` on its command line; its pid."""
    res = await t.run(["sh", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!', "sh",
                       "python3", "-c", SLEEPER, "300", marker], timeout=30)
    assert res.exit_status == 0, res.stderr
    return int(res.stdout)


def gone(pid: int) -> bool:
    """True once ``pid`` ended (a zombie counts as ended), within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return True
        if stat[stat.rfind(b")") + 2:][:1] == b"Z":
            return True
        time.sleep(0.05)
    return False


def check_used_all_three(bed: Bed, login_only: set[str], calls: int) -> None:
    """The last ``calls`` agent calls went through the wrapper, from a login
    shell, with path_prepend on the agent's PATH."""
    wrapper, recs, marker = bed.records()
    assert len(wrapper) == calls, "the platform's python was not used"
    assert len(recs) == calls
    for rec in recs:
        env = {f"{k}={v}" for k, v in rec["env"].items()}
        assert login_only <= env, "the agent was not started from a login shell"
        assert rec["path"].split(":")[0] == bed.bindir, rec["path"]
        assert rec["marker"] is True, "the marker program was not found on PATH"
    assert len(marker) == calls


@pytest.mark.parametrize("platform", ["wrapped", "wrapped-openssh"])
async def test_cli_find_and_killall_use_python_login_shell_and_path_prepend(
    bed: Bed, client: AsyncClient, login_only: set[str], started: list[int],
    platform: str,
) -> None:
    marker = f"sshq-marker-{uuid.uuid4().hex}"
    (h,) = resolve_hosts(client, [platform])
    pid = await start_sleeper(h.transport, marker)
    started.append(pid)
    bed.records()

    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    calls = 0
    while not found and time.monotonic() < deadline:  # the sleeper may still be exec'ing
        res = bed.sshq("farm", "find", marker, "-H", platform, "--json")
        calls += 1
        assert res.returncode == 0, res.stderr.decode()
        found = json.loads(res.stdout)
    assert [(p["host"], p["pid"]) for p in found] == [(platform, pid)]
    check_used_all_three(bed, login_only, calls)

    res = bed.sshq("farm", "killall", marker, "-H", platform, "--json")
    assert res.returncode == 0, res.stderr.decode()
    assert [p["pid"] for p in json.loads(res.stdout)] == [pid]
    assert gone(pid)
    check_used_all_three(bed, login_only, 1)


async def test_library_find_and_kill_use_python_login_shell_and_path_prepend(
    bed: Bed, client: AsyncClient, login_only: set[str], started: list[int],
) -> None:
    (h,) = resolve_hosts(client, ["wrapped"])
    assert (h.python, h.login_shell, h.path_prepend) == (str(bed.wrapper), True,
                                                        (bed.bindir,))
    how: dict[str, Any] = {"python": h.python, "login_shell": h.login_shell,
                           "path_prepend": h.path_prepend}
    marker = f"sshq-marker-{uuid.uuid4().hex}"
    pid = await start_sleeper(h.transport, marker)
    started.append(pid)
    bed.records()

    calls = 0
    deadline = time.monotonic() + 10
    while True:
        found = await find_processes(h.transport, marker, **how)
        calls += 1
        if found or time.monotonic() > deadline:
            break
    assert [p.pid for p in found] == [pid]
    check_used_all_three(bed, login_only, calls)

    killed = await kill_processes(h.transport, marker, signal="KILL", **how)
    assert [p.pid for p in killed] == [pid]
    assert gone(pid)
    check_used_all_three(bed, login_only, 1)

    # without login_shell nor path_prepend, the same wrapper sees neither
    assert await find_processes(h.transport, marker, python=h.python) == []
    wrapper, recs, marker_lines = bed.records()
    assert len(wrapper) == 1 and len(recs) == 1
    env = {f"{k}={v}" for k, v in recs[0]["env"].items()}
    assert not login_only & env
    assert bed.bindir not in recs[0]["path"].split(":")
    assert recs[0]["marker"] is False and marker_lines == []
