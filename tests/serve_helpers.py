"""What the ``sshq serve`` tests share: a real server process on loopback,
tokens made by the real ``sshq token`` command, platforms on the test bed.

The server is ``python -m sshq serve --listen 127.0.0.1:0`` (the port the
kernel picked is read from its "listening on" line); its stderr (uvicorn's
access log and sshq's warnings) is kept in a file, so that tests can check
that no token ever reaches it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import platform_toml
from helpers import SSHQ

#: Platforms for the server tests (min_poll_interval 1 s: the poller's pace).
PLATFORMS = ("slurm", "bg", "bg2")


def serve_platforms_toml(testbed: dict[str, str], run_dir: str, *,
                         port: str | None = None) -> str:
    """``slurm`` and ``bg`` (background) on the test bed, and ``bg2`` (another
    platform on the same host, for tokens limited to one platform).
    ``port``: another sshd port for every platform (an outage)."""
    bed = dict(testbed, SSHQ_TEST_PORT=port) if port else testbed
    return "".join(
        platform_toml(bed, name, job_runner=runner, transport="asyncssh",
                      run_dir=run_dir, min_poll_interval=1.0)
        for name, runner in (("slurm", "slurm"), ("bg", "background"), ("bg2", "background")))


class Server:
    """A running ``sshq serve`` process.

    Args:
        env: its environment (SSHQ_CONFIG, SSHQ_STATE_DIR).
        log: file for its stderr (appended: one file across restarts).
    """

    def __init__(self, env: dict[str, str], log: Path, *extra: str) -> None:
        self.env = env
        self.log = log
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> Server:
        """Start it and wait for its "listening on" line."""
        mark = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [*SSHQ, "serve", "--listen", "127.0.0.1:0", *self.extra], env=self.env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[mark:].decode(errors="replace")
            m = re.search(r"listening on (https?://\S+)", text)
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"sshq serve exited {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.05)
        pytest.fail(f"sshq serve did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with ``sig`` (SIGKILL: no clean-up at all) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self, token: str | None, **kw: Any) -> httpx.Client:
        """An httpx client for the server, with the token as Bearer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)

    def log_text(self) -> str:
        """Everything the server wrote on stderr so far."""
        return self.log.read_text(errors="replace")


def make_token(env: dict[str, str], name: str, *platforms: str) -> tuple[str, str]:
    """``sshq token create --json``: ``(token, webhook_secret)``."""
    args = [a for p in platforms for a in ("--platform", p)]
    r = subprocess.run([*SSHQ, "token", "create", name, *args, "--json"], env=env,
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode()
    d = json.loads(r.stdout)
    return d["token"], d["webhook_secret"]


def wait_job(c: httpx.Client, sid: int, states: set[str], timeout: float = 180.0
             ) -> dict[str, Any]:
    """GET the job until its state is in ``states`` (the server's poller moves it)."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"/api/v1/jobs/{sid}")
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {sid} still {job['state']} ({job['message']}), waiting for"
                        f" {states}")
        time.sleep(0.3)


@pytest.fixture
def serve_env(testbed: dict[str, str], tmp_path: Path, state_dir: Path,
              run_id: str) -> dict[str, str]:
    """Environment of the server and the ``sshq`` commands: config and state."""
    cfg = tmp_path / "platforms.toml"
    cfg.write_text(serve_platforms_toml(testbed, f"~/sshq-test/{run_id}"))
    env = dict(os.environ)
    env.update(SSHQ_CONFIG=str(cfg), SSHQ_STATE_DIR=str(state_dir), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def server(serve_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    """A started server (stopped at the end)."""
    s = Server(serve_env, tmp_path / "serve.log").start()
    try:
        yield s
    finally:
        s.stop()
