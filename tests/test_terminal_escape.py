"""Text from the remote side reaches a terminal escaped and without control
characters: rich markup is shown as written, escape sequences are removed,
other control characters become U+FFFD.

The ``sshq`` command runs as a user runs it, once with its output piped
(tab-separated lines) and once with stdout on a pseudo-terminal (a rich
table; ``TERM=dumb`` so that every escape byte in it would be the data's).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import platform_toml

from sshq.model import JobState
from sshq.store import Store

Run = Callable[..., tuple[int, bytes, bytes]]

#: hostile values, and what a terminal must show of them
VALUES = {
    "[/bold]": "[/bold]",
    "[red]x": "[red]x",
    "a\x1b[31mb": "ab",                 # an ANSI colour: removed whole
    "c\x07d": "c\ufffdd",               # BEL
    "e\x9b": "e\ufffd",                 # a lone C1 (8-bit CSI)
    "f\x1b]0;title\x07g": "fg",         # OSC: set the window title
    "h\x9b2Ji": "hi",                   # 8-bit CSI: erase the screen
}


def test_clean() -> None:
    from sshq.cli.render import clean

    for raw, shown in VALUES.items():
        assert clean(raw) == shown
    assert clean("a\tb\nc\rd") == "a b c d"
    assert clean("a\tb\nc", keep="\t\n") == "a\tb\nc"
    assert clean("\x7f\x00\x85\x1b") == "\ufffd" * 4
    assert clean("ünï ✓ 日本") == "ünï ✓ 日本"


def assert_clean(data: bytes) -> None:
    """No control byte but CR/LF/TAB, nothing that could be markup's error."""
    text = data.decode("utf-8")
    bad = sorted({c for c in text if (ord(c) < 32 and c not in "\r\n\t")
                  or 0x7f <= ord(c) <= 0x9f})
    assert not bad, f"raw control characters {bad!r} in {text!r}"
    assert "Traceback" not in text and "internal error" not in text, text


@pytest.fixture(params=["pipe", "tty"])
def run(request: pytest.FixtureRequest, cli_env: dict[str, str]) -> Run:
    """Run ``sshq ARGS``; return (exit status, stdout, stderr)."""
    env = dict(cli_env, TERM="dumb", COLUMNS="300", LINES="50", PYTHONIOENCODING="utf-8")
    env.pop("NO_COLOR", None)

    def piped(*args: str, extra: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
        r = subprocess.run([sys.executable, "-m", "sshq", *args], capture_output=True,
                           timeout=180, env=dict(env, **(extra or {})))
        return r.returncode, r.stdout, r.stderr

    def on_tty(*args: str, extra: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 300, 0, 0))
        p = subprocess.Popen([sys.executable, "-m", "sshq", *args], stdin=subprocess.DEVNULL,
                             stdout=slave, stderr=subprocess.PIPE,
                             env=dict(env, **(extra or {})))
        os.close(slave)
        out = bytearray()
        try:
            while True:
                ready, _, _ = select.select([master], [], [], 180)
                assert ready, "sshq printed nothing for 180 s"
                try:
                    chunk = os.read(master, 65536)
                except OSError:    # EIO: the last writer closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            assert p.stderr is not None
            err = p.stderr.read()
            return p.wait(timeout=180), bytes(out), err
        finally:
            os.close(master)
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()

    return piped if request.param == "pipe" else on_tty


@pytest.fixture
def hostile_jobs(state_dir: Path) -> list[int]:
    """Final jobs whose recorded fields carry the hostile values (as a job
    runner's output or a job's own status file could put them there)."""
    store = Store(state_dir)
    try:
        rows = store.reserve_jobs("local", "localhost", "background",
                                  [f"job{k}" for k in range(len(VALUES))],
                                  [{} for _ in VALUES])
        for (sid, _), raw in zip(rows, VALUES, strict=True):
            store.update_job(sid, name=f"n{raw}", job_id=f"j{raw}", signal=f"s{raw}",
                             message=f"m{raw}", state=JobState.FAILED, host=f"h{raw}")
        return [sid for sid, _ in rows]
    finally:
        store.close()


@pytest.mark.parametrize("command", ["jobs", "poll", "wait", "kill"])
def test_recorded_remote_text_is_shown_escaped(run: Run, hostile_jobs: list[int],
                                               command: str) -> None:
    ids = [str(i) for i in hostile_jobs]
    args = {"jobs": [], "poll": ids, "wait": ids, "kill": ["--settle", "0", *ids]}[command]
    rc, out, err = run(command, *args)
    assert rc == (1 if command == "wait" else 0), err   # wait: the jobs failed
    assert_clean(out)
    assert_clean(err)
    text = out.decode()
    for shown in VALUES.values():
        for field in "njs":          # name, job id, signal: table columns
            assert field + shown in text, (field + shown, text)


def test_submit_shows_a_job_runners_hostile_error_escaped_fake_sbatch(
        run: Run, cli_env: dict[str, str], testbed: dict[str, str], tmp_path: Path) -> None:
    """A submission refused with hostile stderr (a fake ``sbatch``: its output
    is the point, not Slurm) is reported on stderr, escaped."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "sbatch").write_text(
        "#!/bin/sh\nprintf 'sbatch: error: [/bold] \\033[31mred\\033[0m \\007 [red]x \\302\\233\\n'"
        " >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    cfg = tmp_path / "fake-sbatch.toml"
    cfg.write_text(platform_toml(testbed, "fakeslurm", job_runner="slurm", transport="local",
                                 run_dir=str(tmp_path / "rd"), path_prepend=[str(fake)]))
    rc, out, err = run("submit", "-p", "fakeslurm", "--name", "esc", "--command", "true",
                       extra={"SSHQ_CONFIG": str(cfg)})
    assert rc == 1
    assert_clean(out)
    assert_clean(err)
    assert "submit-failed: slurm submit failed (exit 1): sbatch: error: [/bold] red \ufffd" \
           " [red]x \ufffd" in err.decode(), err.decode()
