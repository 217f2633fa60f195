"""Helpers shared by the integration tests (not fixtures: plain functions and classes).

- waiting for a job's state, a job's status file; sshq's command line as a
  user runs it (:class:`SshqCli`);
- the FAKE job runners' plumbing (tests/fakes/NAME copied where the test user
  runs it) and the "job runner forgot the jobs before the first poll" scenario
  that every job runner's tests play;
- a person's terminal, played by tmux (:class:`Tmux`), and ``ssh-to-job`` in it;
- stopping the OpenSSH ControlMasters a test's state directory holds.

The test bed's facts and the skip-or-fail rule are in tests/testbed.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import sshq._client.core as sshq_client_core  # where agent calls are made
from sshq import AsyncClient, Job, JobSpec, JobState
from sshq.remote.status import parse_status
from sshq.shipped import agent

#: The real ``sshq`` command, run as a user would.
SSHQ = [sys.executable, "-m", "sshq"]
#: The FAKE job runners (tests/fakes/NAME: pbs, lsf, htcondor).
FAKES = Path(__file__).resolve().parent / "fakes"


# ---------------------------------------------------------------- jobs and sshq


async def wait_for_state(client: AsyncClient, sid: int, state: JobState,
                         timeout: float = 60.0, interval: float = 0.25) -> Job:
    """Poll until job ``sid`` reaches ``state``; fail on another final state or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        (job,) = await client.poll([sid])
        if job.state is state:
            return job
        if job.state.is_final:
            pytest.fail(f"job {sid} became {job.state.value} ({job.message}) waiting for"
                        f" {state.value}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {sid} still {job.state.value} after {timeout} s")
        await asyncio.sleep(interval)


async def status_of(client: AsyncClient, sid: int) -> dict[str, str]:
    """Job ``sid``'s status file (``job.status``), parsed."""
    return parse_status((await client.cat_log(sid, "status")).decode())


def expand_ids(template: Sequence[str], ids: Sequence[str], sep: str | None) -> list[str]:
    """The command the remote agent builds for ``ids`` (one chunk; [] for no ids:
    the agent then runs nothing)."""
    plain = [w for w in template if w != agent.GROUP]  # jobs with no group words
    chunks: list[list[str]] = agent.expand(plain, list(ids), sep)
    return chunks[0] if chunks else []


def record_agent_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """From now on, record every agent call sshq makes (``call_agent`` of sshq's client).

    Returns a list that fills as calls are made: ``{"op": OP}``, appended
    before the call is sent, and ``"reply": REPLY`` added once it answers.
    """
    calls: list[dict[str, Any]] = []
    real = sshq_client_core.call_agent

    async def recording(transport: Any, python: str, op: str, payload: dict[str, Any],
                        **kw: Any) -> dict[str, Any]:
        call: dict[str, Any] = {"op": op}
        calls.append(call)
        reply: dict[str, Any] = await real(transport, python, op, payload, **kw)
        call["reply"] = reply
        return reply

    monkeypatch.setattr(sshq_client_core, "call_agent", recording)
    return calls


def stop_control_masters(state_dir: Path) -> None:
    """Stop the OpenSSH ControlMasters whose sockets are in ``state_dir/cm``."""
    cm = state_dir / "cm"
    if cm.is_dir():
        for sock in cm.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "sshq-test"],
                           capture_output=True, timeout=30)


class SshqCli:
    """The real ``sshq`` command with one environment, as a user runs it.

    ``env`` holds ``SSHQ_CONFIG`` and ``SSHQ_STATE_DIR``.  :meth:`submit` and
    :meth:`poll` use ``--json``; every job submitted is kept in :attr:`started`
    (its JSON object), for the test to end it (:meth:`kill_started`).
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[dict[str, Any]] = []

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """Run ``sshq ARGS``, output captured, stdin /dev/null."""
        return subprocess.run([*SSHQ, *args], capture_output=True, timeout=timeout,
                              env=self.env, stdin=subprocess.DEVNULL)

    def submit(self, platform: str, *args: str, wait: bool = False) -> dict[str, Any]:
        """``sshq submit -p PLATFORM --json [--wait] ARGS``: the job; fails if submit-failed."""
        r = self.run("submit", "-p", platform, "--json", *(["--wait"] if wait else []), *args,
                     timeout=180)
        assert r.stdout, r.stderr.decode()
        (job,) = json.loads(r.stdout)
        assert isinstance(job, dict)
        self.started.append(job)
        assert job["state"] != "submit-failed", job["message"]
        return job

    def poll(self, sid: int) -> dict[str, Any]:
        """``sshq poll --json SID``: the job."""
        r = self.run("poll", "--json", str(sid))
        assert r.returncode == 0, r.stderr.decode()
        (job,) = json.loads(r.stdout)
        assert isinstance(job, dict)
        return job

    def kill_started(self) -> None:
        """``sshq kill --settle 1`` every job :meth:`submit` started."""
        if self.started:
            self.run("kill", "--settle", "1", *(str(j["id"]) for j in self.started),
                     timeout=120)


# ---------------------------------------------------------------- the FAKE job runners


def copy_fake(name: str, parent: Path, owner: str | None = None) -> Path:
    """A private copy of the FAKE ``tests/fakes/NAME``: ``ROOT/bin`` and ``ROOT/state``.

    Args:
        name: the fake (a directory of tests/fakes).
        parent: where ROOT is made (``fakes-<random>``, mode 0755): the test
            bed's directory for a fake the test user runs through sshd, or a
            test's tmp_path for one run directly.
        owner: the user who runs the fake and so owns ``state`` (None: as made).

    Returns:
        ROOT; ``bin`` and its commands are mode 0755, ``state`` is empty.
    """
    root = Path(tempfile.mkdtemp(prefix="fakes-", dir=parent))
    root.chmod(0o755)
    shutil.copytree(FAKES / name, root / "bin", ignore=shutil.ignore_patterns("__pycache__"))
    for p in [root / "bin", *(root / "bin").iterdir()]:
        p.chmod(0o755)
    (root / "state").mkdir(mode=0o755)
    if owner is not None:
        pw = pwd.getpwnam(owner)
        os.chown(root / "state", pw.pw_uid, pw.pw_gid)
    return root


def forgotten_specs(sleep_after_kill: int = 5) -> list[JobSpec]:
    """Three jobs for "the job runner forgot them before sshq's first poll".

    They exit 0, exit 5, and SIGKILL their job wrapper (no trap can run: the
    status file records a start and no exit).  Submit them, wait until the job
    runner forgets them, poll once and check with :func:`check_forgotten`.
    """
    return [
        JobSpec(command="echo ok", name="forgot-ok"),
        JobSpec(command="echo five; exit 5", name="forgot-five"),
        JobSpec(command=f"echo dying; kill -9 $PPID; sleep {sleep_after_kill}",
                name="forgot-sigkill"),
    ]


async def check_forgotten(client: AsyncClient, jobs: Sequence[Job]) -> tuple[Job, Job, Job]:
    """Poll :func:`forgotten_specs` jobs the job runner forgot; the status files decide.

    Checks that sshq still had them as submitted, then polls once: succeeded
    (0), failed (5), failed with neither exit status nor signal ("no longer
    knows").  Returns the three polled jobs.
    """
    stored = await client.jobs(ids=[j.id for j in jobs])
    assert [j.state for j in stored] == [JobState.SUBMITTED] * 3
    ok, five, killed = await client.poll([j.id for j in jobs])
    assert ok.state is JobState.SUCCEEDED and ok.exit_status == 0, ok.message
    assert five.state is JobState.FAILED and five.exit_status == 5, five.message
    assert killed.state is JobState.FAILED, killed.message
    assert killed.exit_status is None and killed.signal is None
    assert "no longer knows" in killed.message
    return ok, five, killed


# ---------------------------------------------------------------- a person's terminal


class Tmux:
    """A private tmux server with one pane: a terminal a person types into.

    Its own server (``tmux -L`` with a unique socket name, no config file),
    started with ``SSHQ_CONFIG`` and ``SSHQ_STATE_DIR`` from ``env`` and a bare
    bash (prompt ``local$``); :meth:`kill` ends it.
    """

    def __init__(self, env: dict[str, str], *, width: int = 200, height: int = 50) -> None:
        self.socket = f"sshq-test-{uuid.uuid4().hex[:12]}"
        self.target = "main"
        self.socket_path = ""
        self._tmux("new-session", "-d", "-s", self.target, "-x", str(width), "-y", str(height),
                   *[a for k in ("SSHQ_CONFIG", "SSHQ_STATE_DIR") for a in ("-e", f"{k}={env[k]}")],
                   "env PS1='local$ ' bash --norc --noprofile")
        try:
            self.socket_path = self._tmux("display-message", "-p", "#{socket_path}").strip()
        except BaseException:
            self.kill()
            raise

    def _tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"tmux {args[0]}: {r.stderr}"
        return r.stdout

    def type(self, text: str) -> None:
        """Type a line (literally) and press Enter."""
        self._tmux("send-keys", "-t", self.target, "-l", text)
        self._tmux("send-keys", "-t", self.target, "Enter")

    def key(self, key: str) -> None:
        """Press ``key`` (tmux's key names: ``C-c``, ``Enter``, ...)."""
        self._tmux("send-keys", "-t", self.target, key)

    def resize(self, width: int, height: int) -> None:
        """Resize the window (the terminal's size changes)."""
        self._tmux("resize-window", "-t", self.target, "-x", str(width), "-y", str(height))

    def screen(self) -> str:
        """The pane's text, scrollback included, wrapped lines joined.

        Trailing blank lines are dropped, so that the length of a capture
        marks where later output starts.
        """
        return self._tmux("capture-pane", "-p", "-J", "-t", self.target, "-S", "-500").rstrip()

    def pane_size(self) -> tuple[int, int]:
        """(rows, columns) of the pane."""
        rows, cols = self._tmux("display-message", "-p", "-t", self.target,
                                "#{pane_height} #{pane_width}").split()
        return int(rows), int(cols)

    def wait_for(self, pattern: str, timeout: float = 20.0, *, start: int = 0) -> re.Match[str]:
        """Poll the pane until ``pattern`` (a regex, per line) appears after char ``start``."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            m = rx.search(text, start)
            if m:
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} on the terminal after {timeout} s; screen:\n{text}")
            time.sleep(0.2)

    def kill(self) -> None:
        """End the tmux server (and what runs in it); leave no socket file behind."""
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30)
        if self.socket_path and self.socket_path.endswith(self.socket):
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)


def open_job_terminal(t: Tmux, sid: int) -> None:
    """Run ``sshq ssh-to-job SID`` in the pane; return once the job's shell answers.

    The probe prints a value only the job's environment has ($SSHQ_ID from
    job.env), so the local shell cannot answer it; it is retyped if keys
    typed before the remote shell started were lost.  Fails if sshq ends
    first (the pane shows ``SSHQ_RC=N``) or after 45 s.
    """
    cmd = " ".join(shlex.quote(a) for a in SSHQ)
    t.type(f"{cmd} ssh-to-job {sid}; echo SSHQ_RC=$?")
    deadline = time.monotonic() + 45
    while True:
        t.type('echo "READY<$SSHQ_ID>"')
        try:
            t.wait_for(rf"^READY<{sid}>$", timeout=8)
            return
        except pytest.fail.Exception:
            if re.search(r"^SSHQ_RC=\d+$", t.screen(), re.MULTILINE) or \
                    time.monotonic() > deadline:
                raise


def exit_and_status(t: Tmux, code: int) -> int:
    """Type ``exit CODE`` in the job's shell; sshq's exit status as the pane shows it."""
    t.type(f"exit {code}")
    return int(t.wait_for(r"^SSHQ_RC=(\d+)$").group(1))
