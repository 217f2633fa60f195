"""Shared helpers for the sshq benchmarks (bench/*.py): the test bed, ssh, Slurm clean-up.

Not part of sshq.  Everything here talks to the real test bed written by
``.ci/setup-testbed.sh`` (``/var/lib/sshq-testbed/testbed.env``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The test bed's facts have one home, shared with the tests: tests/testbed.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import testbed

SUBMITTED_RE = re.compile(r"Submitted batch job (\d+)")


def load_testbed() -> dict[str, str]:
    """The test bed's facts (tests/testbed.py); exits with a message if there is none."""
    env = testbed.load_testbed()
    if env is None:
        sys.exit(f"no test bed: {testbed.TESTBED_ENV} is missing ({testbed.SETUP_HINT})")
    return env


def new_tag() -> str:
    """A short random tag: remote directory name and job name prefix of one run."""
    return "sb" + secrets.token_hex(4)


class Bed:
    """The test bed: ssh argv, remote commands, platforms files."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.host = env["SSHQ_TEST_HOST"]
        self.port = env["SSHQ_TEST_PORT"]
        self.user = env["SSHQ_TEST_USER"]
        self.key = env["SSHQ_TEST_KEY"]
        self.known_hosts = env["SSHQ_TEST_KNOWN_HOSTS"]
        self.slurm = env.get("SSHQ_TEST_SLURM") == "1"
        self._home: str | None = None

    def ssh_argv(self, *extra: str) -> list[str]:
        """The ssh command line of the brief (plus ``extra`` options), up to the destination."""
        return [
            "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-i", self.key, "-p", self.port,
            *extra, f"{self.user}@{self.host}",
        ]

    def ssh(self, command: str, *, input: bytes | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """Run a remote shell command line (no multiplexing)."""
        p = subprocess.run(
            [*self.ssh_argv("-o", "ControlMaster=no", "-o", "ControlPath=none"), command],
            input=input, capture_output=True, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"remote command failed ({p.returncode}): {command}\n"
                               f"{p.stderr.decode(errors='replace')}")
        return p

    @property
    def home(self) -> str:
        if self._home is None:
            self._home = self.ssh("echo $HOME").stdout.decode().strip()
        return self._home

    def platform_toml(self, name: str, *, job_runner: str, run_dir: str,
                      transport: str = "asyncssh", **extra: object) -> str:
        """One [platforms.NAME] table pointing at the test bed (as tests/conftest.py)."""
        lines = [
            f"[platforms.{name}]",
            f'hosts = ["{self.host}"]',
            f"port = {self.port}",
            f'user = "{self.user}"',
            f'identity_file = "{self.key}"',
            f'known_hosts = "{self.known_hosts}"',
            f'job_runner = "{job_runner}"',
            f'transport = "{transport}"',
            f'run_dir = "{run_dir}"',
        ]
        for k, v in extra.items():
            lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}")
        return "\n".join(lines) + "\n"

    def remove_remote_dir(self, tag: str) -> None:
        """rm -rf ~/sshq-bench/<tag> (and ~/sshq-bench if it is then empty)."""
        q = shlex.quote(tag)
        self.ssh(f'rm -rf "$HOME/sshq-bench/"{q}; rmdir "$HOME/sshq-bench" 2>/dev/null; true',
                 check=False)


# ---------------------------------------------------------------- Slurm clean-up


def _squeue_mine(user: str, prefix: str) -> list[str]:
    p = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i %j"], capture_output=True,
                       text=True)
    ids = []
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith(prefix):
            ids.append(parts[0])
    return ids


def cancel_jobs(user: str, prefix: str, *, whole_user: bool = False,
                timeout: float = 120) -> float:
    """Cancel this run's Slurm jobs and wait until squeue no longer shows them.

    Only jobs whose name starts with ``prefix`` (this run's tag) are cancelled,
    so other engineers' jobs for the same test user survive; ``whole_user``
    does ``scancel -u USER`` instead, as the brief literally says.  Runs as
    root on the test bed.  Returns the seconds it took.
    """
    t0 = time.monotonic()
    while True:
        if whole_user:
            subprocess.run(["scancel", "-u", user], check=False)
            left = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i"],
                                  capture_output=True, text=True).stdout.split()
        else:
            left = _squeue_mine(user, prefix)
            for i in range(0, len(left), 500):
                subprocess.run(["scancel", *left[i:i + 500]], check=False,
                               capture_output=True)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            print(f"warning: {len(left)} job(s) still in squeue after {timeout} s",
                  file=sys.stderr)
            return time.monotonic() - t0
        time.sleep(0.5)


# ---------------------------------------------------------------- reporting


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(headers: Sequence[str], rows_in: Iterable[Sequence[object]]) -> str:
    rows = [["" if c is None else str(c) for c in r] for r in rows_in]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line, sep]
    for r in rows:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(out)


def machine_facts() -> dict[str, str]:
    def sh(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"
    import sshq
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": sh(["nproc"]),
        "slurm": sh(["sinfo", "--version"]),
        "python3 (system)": sh(["python3", "--version"]),
        "python (bench)": sys.version.split()[0],
        "sshq": getattr(sshq, "__version__", "?"),
        "sshq git": sh(["git", "-C", str(Path(__file__).resolve().parent.parent), "describe",
                        "--always", "--dirty"]),
        "kernel": sh(["uname", "-r"]),
        "load": sh(["cat", "/proc/loadavg"]),
    }


# ---------------------------------------------------------------- instrumentation


@contextmanager
def timed_agent() -> Iterator[list[tuple[float, float, int]]]:
    """Time sshq's agent calls from the inside, without touching src/.

    While active, the remote command sshq runs is wrapped in ``sh -c`` that
    notes ``date +%s.%N`` before and after (on stderr), and the asyncssh
    transport's ``run`` is timed.  Yields a list that receives, per agent
    call, ``(channel wall s, remote agent wall s, bytes in + out)``.
    """
    import sshq.remote.operations as ops
    from sshq.transport.asyncssh_ import AsyncSSHTransport

    records: list[tuple[float, float, int]] = []
    orig_argv = ops.agent_argv  # type: ignore[attr-defined]
    orig_run = AsyncSSHTransport.run

    def timed_argv(*a: Any, **kw: Any) -> list[str]:
        prog = ('t0=$(date +%s.%N); "$@"; rc=$?; t1=$(date +%s.%N);'
                ' echo "SSHQBENCH_AGENT $t0 $t1" >&2; exit $rc')
        return ["sh", "-c", prog, "sh", *orig_argv(*a, **kw)]

    async def timed_run(self_: Any, argv: Any, *, stdin: bytes = b"",
                        timeout: float | None = None) -> Any:
        t0 = time.perf_counter()
        res = await orig_run(self_, argv, stdin=stdin, timeout=timeout)
        chan = time.perf_counter() - t0
        m = re.search(rb"SSHQBENCH_AGENT (\S+) (\S+)", res.stderr)
        agent = float(m.group(2)) - float(m.group(1)) if m else float("nan")
        records.append((chan, agent, len(stdin) + len(res.stdout)))
        return res

    setattr(ops, "agent_argv", timed_argv)  # noqa: B010
    setattr(AsyncSSHTransport, "run", timed_run)  # noqa: B010
    try:
        yield records
    finally:
        setattr(ops, "agent_argv", orig_argv)  # noqa: B010
        setattr(AsyncSSHTransport, "run", orig_run)  # noqa: B010


def drive(bench: Any, json_out: str | None, raw: Callable[[], dict[str, Any]]) -> None:
    """Run a benchmark object (setup?, run, cleanup, report) as root, print the
    machine facts and the report, and write ``{"facts": ..., **raw()}`` as JSON
    to ``json_out`` when given."""
    if os.geteuid() != 0:
        sys.exit("run as root on the test bed (it cancels the benchmark's Slurm jobs)")
    facts = machine_facts()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()), file=sys.stderr)
    print(f"run tag {bench.tag}; remote dir {bench.remote_base}; local tmp {bench.tmp}",
          file=sys.stderr)
    t0 = time.monotonic()
    try:
        if hasattr(bench, "setup"):
            bench.setup()
        bench.run()
    finally:
        bench.cleanup()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    print(f"load average at the end: {Path('/proc/loadavg').read_text().strip()}")
    print(bench.report())
    print(f"(benchmark wall time {time.monotonic() - t0:.0f} s)")
    if json_out:
        Path(json_out).write_text(json.dumps({"facts": facts, **raw()}, indent=2, default=str))
