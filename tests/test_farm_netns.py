"""``sshq farm`` against real hosts: network namespaces, each with its own sshd.

The real ``sshq farm`` command runs as a subprocess over three hosts
(``h1``, ``h2``, ``h3``: one platform each, made from tests/netns.py's
hosts) while the tests crash hosts (every process of the namespace
SIGKILLed: sshd, sessions, dispatcher, tasks), cut their link, SIGKILL the
client and resume the run, and make one host slow.  Whatever happens, every
task is reported exactly once, with its own exit status and output.

Some batches are *gated*: each task sleeps a little unless a gate file
exists, so that the run lasts as long as the test needs (until a host has
been dropped, say) and then ends quickly once the test creates the file.
The hosts share this machine's file system, so the tasks see the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns import NetnsHost, NetnsHosts

pytestmark = pytest.mark.sshd

#: Platform names (= the hosts' labels in results and SSHQ_FARM_HOST).
LABELS = ("h1", "h2", "h3")
#: Generous: this runs on a small, loaded machine.
CLI_TIMEOUT = 180.0


# ---------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _restored(netns_hosts: NetnsHosts) -> Iterator[None]:
    """Every test leaves the shared hosts up (link up, sshd listening)."""
    yield
    netns_hosts.restore()


@dataclass
class Running:
    """One ``sshq farm`` process, its stdout and stderr going to files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)

    def lines(self) -> list[bytes]:
        return self.out.read_bytes().splitlines(keepends=True)

    def n_results(self) -> int:
        return self.out.read_bytes().count(b"\n")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        """Wait until ``cond()``; fail (with the CLI's stderr) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"sshq farm exited ({self.proc.returncode}) before {what};"
                            f" stderr:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s; stderr:\n{self.stderr()}")
            time.sleep(0.05)

    def wait_results(self, n: int, timeout: float = 60.0) -> None:
        self.wait_for(f"{n} results", lambda: self.n_results() >= n, timeout)

    def finish(self, timeout: float = CLI_TIMEOUT) -> int:
        """Wait for the CLI to exit; its exit status (killed and failed on timeout)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            pytest.fail(f"sshq farm still running after {timeout} s; {self.n_results()}"
                        f" results; stderr:\n{self.stderr()}")

    def results(self) -> list[dict[str, Any]]:
        """The JSONL results (every line must be a complete JSON object)."""
        return [json.loads(line) for line in self.lines()]


@dataclass
class FarmBed:
    """The platforms file, a state dir and a world-readable work dir for a test."""

    hosts: NetnsHosts
    config: Path
    state_dir: Path
    work: Path
    env: dict[str, str]
    running: list[Running] = field(default_factory=list)

    def host(self, label: str) -> NetnsHost:
        return self.hosts[LABELS.index(label)]

    def batch(self, commands: list[str]) -> Path:
        p = self.work / f"batch-{len(list(self.work.glob('batch-*')))}"
        p.write_text("".join(c + "\n" for c in commands))
        return p

    def start(self, *args: str) -> Running:
        """Start ``sshq --config PLATFORMS farm ARGS`` in the background."""
        k = len(self.running)
        out, err = self.work / f"out-{k}.jsonl", self.work / f"err-{k}.txt"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sshq", "--config", str(self.config), "farm", *args],
                stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=self.env)
        r = Running(proc, out, err)
        self.running.append(r)
        return r

    def run(self, batch: Path, name: str, *args: str) -> Running:
        return self.start(str(batch), "--hosts", ",".join(LABELS), "--run", name, *args)

    def journal(self, name: str) -> list[dict[str, Any]]:
        path = self.state_dir / "farm" / name / "journal"
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by SIGKILL
        return events

    def gate(self) -> Path:
        """A file path the hosts' user can test for (create it to open the gate)."""
        return self.work / "gate"


@pytest.fixture
def bed(netns_hosts: NetnsHosts, state_dir: Path) -> Iterator[FarmBed]:
    work = Path(tempfile.mkdtemp(prefix="sqfarm-", dir="/tmp"))
    work.chmod(0o755)   # the tasks run as the test bed's user and look for the gate
    config = work / "platforms.toml"
    config.write_text("".join(
        h.platform_toml(label, "~/sshq-test/farm-netns", connect_timeout=5)
        for label, h in zip(LABELS, netns_hosts, strict=True)))
    env = dict(os.environ, SSHQ_STATE_DIR=str(state_dir))
    env.pop("SSHQ_CONFIG", None)
    b = FarmBed(netns_hosts, config, state_dir, work, env)
    try:
        yield b
    finally:
        for r in b.running:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- helpers

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _live(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _farm_procs(host: NetnsHost, run: str | None = None) -> list[str]:
    """Live farm processes on ``host``: dispatchers (``sshq-agent`` on their command
    line) and tasks (of run ``run``: SSHQ_FARM_RUN in their environment)."""
    found = []
    for pid in host.pids():
        cmd = _cmdline(pid)
        if not _live(pid):
            continue
        if "sshq-agent" in cmd or (
                run is not None and f"SSHQ_FARM_RUN={run}\0".encode() in _environ(pid)):
            found.append(f"{pid} {cmd[:120]}")
    return found


def _procs_matching(host: NetnsHost, text: str) -> list[int]:
    return [pid for pid in host.pids() if text in _cmdline(pid) and _live(pid)]


def _check_exactly_once(results: list[dict[str, Any]], seqs: set[int]) -> dict[int, dict]:
    """Every seq of ``seqs`` reported exactly once (and nothing else); results by seq."""
    counts = Counter(r["seq"] for r in results)
    twice = sorted(s for s, n in counts.items() if n > 1)
    missing = sorted(seqs - set(counts))
    extra = sorted(set(counts) - seqs)
    assert not twice and not missing and not extra, (
        f"reported more than once: {twice[:20]}; never reported: {missing[:20]}"
        f" ({len(missing)}); unknown seqs: {extra[:20]}")
    return {r["seq"]: r for r in results}


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("crashed_host_returns", [True, False],
                         ids=["crashed-host-restarted", "crashed-host-stays-dead"])
def test_host_crash_and_partition_every_task_reported_once(
        bed: FarmBed, crashed_host_returns: bool) -> None:
    """Mid-run, h1 crashes (every process of it killed) and h2's link goes down for
    4 s.  Every task is still reported exactly once with its own exit status
    and output; h1's tasks in flight are re-run elsewhere.  If h1 never comes
    back it is dropped with a warning and the run completes on h2 and h3."""
    name = "crash-" + ("back" if crashed_host_returns else "dead")
    gate = bed.gate()
    # Gated (see the module docstring): enough work to outlast h1's dropping.
    n = 300 if crashed_host_returns else 1500
    token = os.urandom(4).hex()
    commands = [
        f"[ -e {gate} ] || sleep 0.{5 + i % 16:02d}; echo out-{i}-{token};"
        f" echo err-{i} >&2; exit $(( $SSHQ_FARM_SEQ % 3 ))"
        for i in range(1, n + 1)
    ]
    # (sleep 0.05 .. 0.20; the exit status comes from SSHQ_FARM_SEQ, so it is
    # only right if the task ran with its own seq)
    run = bed.run(bed.batch(commands), name, "--slots", "3" if crashed_host_returns else "2")
    h1, h2 = bed.host("h1"), bed.host("h2")
    run.wait_results(30, timeout=90)
    h1.kill_all()
    h2.link_down()
    t_down, wall_down = time.monotonic(), time.time()
    time.sleep(4)
    h2.link_up()
    if crashed_host_returns:
        time.sleep(max(0.0, t_down + 5 - time.monotonic()))
        h1.start_sshd()
    else:
        run.wait_for("warning that h1 was dropped",
                     lambda: re.search(r"\bh1: dropped\b", run.stderr()) is not None,
                     timeout=120)
    gate.touch()
    rc = run.finish()
    stderr = run.stderr()

    by_seq = _check_exactly_once(run.results(), set(range(1, n + 1)))
    for i, r in by_seq.items():
        assert r["command"] == commands[i - 1]
        assert r["stdout"] == f"out-{i}-{token}\n", r
        assert r["stderr"] == f"err-{i}\n", r
        assert r["exit_status"] == i % 3, r
        assert r["signal"] is None and "error" not in r, r
        assert r["host"] in LABELS and r["attempts"] >= 1, r
    n_failed = sum(1 for i in range(1, n + 1) if i % 3)
    assert rc == 1, stderr
    assert f"{n_failed} of {n} task(s) failed" in stderr

    events = bed.journal(name)
    lost_h1 = {e["seq"] for e in events if e["e"] == "lost" and e["host"] == "h1"}
    assert lost_h1, "h1 held no task when it crashed: the test proved nothing"
    for seq in lost_h1:   # re-run and reported once (checked above) from a live host
        assert by_seq[seq]["host"] in LABELS
    reported_at = {e["seq"]: e["t"] for e in events if e["e"] == "result"}
    assert any(e["e"] == "start" and e["host"] == "h2" and e["t"] < wall_down
               and reported_at[e["seq"]] > wall_down for e in events), (
        "h2 held no task when its link went down: the test proved nothing")
    dropped = [e for e in events if e["e"] == "host" and e.get("dropped")]
    if crashed_host_returns:
        assert "dropped" not in stderr, stderr
        assert not dropped
    else:
        assert [e["host"] for e in dropped] == ["h1"], dropped
        assert "the run goes on with the other hosts" in stderr
        t_drop = next(e["t"] for e in events if e["e"] == "host")
        # h2 and h3 went on after h1 was dropped.
        assert any(r["end"] > t_drop and r["host"] != "h1" for r in by_seq.values())
        assert not any(r["host"] == "h1" and r["start"] > t_drop for r in by_seq.values())


def test_client_sigkill_then_resume_reports_every_task_once(bed: FarmBed) -> None:
    """SIGKILL the client mid-run: its dispatchers (and their tasks) exit, and
    ``sshq farm --resume NAME`` runs only the unreported tasks; across both
    outputs every task is reported exactly once, those in flight included."""
    name = "killed"
    n = 200
    batch = bed.batch(["sleep 0.1; echo $SSHQ_FARM_SEQ"] * n)
    first = bed.run(batch, name, "--slots", "2")
    first.wait_results(40, timeout=90)
    # Every host runs a dispatcher for this run right now.
    for h in bed.hosts:
        assert _farm_procs(h), f"no dispatcher on {h.name}"
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(30) == -signal.SIGKILL
    n_first = first.n_results()
    assert n_first < n, "the run ended before the client was killed"

    # The orphaned dispatchers die with their channel, and take their tasks along.
    deadline = time.monotonic() + 30
    left = [p for h in bed.hosts for p in _farm_procs(h, name)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for h in bed.hosts for p in _farm_procs(h, name)]
    assert not left, f"farm processes still alive 30 s after the client died: {left}"

    events = bed.journal(name)
    reported_before = {e["seq"] for e in events if e["e"] == "result"}
    in_flight = {e["seq"] for e in events if e["e"] == "start"} - reported_before
    assert in_flight, "no task was running when the client was killed"

    second = bed.start("--resume", name)
    rc = second.finish()
    assert rc == 0, second.stderr()
    r1, r2 = first.results(), second.results()
    assert len(r1) == n_first
    assert {r["seq"] for r in r1} == reported_before
    by_seq = _check_exactly_once(r1 + r2, set(range(1, n + 1)))
    for i, r in by_seq.items():
        assert r["stdout"] == f"{i}\n" and r["exit_status"] == 0, r
    # The second invocation ran exactly what had no reported result.
    assert {r["seq"] for r in r2} == set(range(1, n + 1)) - reported_before
    assert in_flight <= {r["seq"] for r in r2}
    # ... and it left nothing behind either.
    deadline = time.monotonic() + 30
    while (left := [p for h in bed.hosts for p in _farm_procs(h, name)]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left


def test_slow_host_beaten_by_speculative_copies(bed: FarmBed) -> None:
    """h2 takes 60 s per task, the others 0.3 s: once the queue is empty, h2's
    tasks are started again on h1/h3, the first copy wins, h2's copies are
    killed (while the run still goes on) and each task is reported once."""
    name = "spec"
    n = 24
    commands = [f"case $SSHQ_FARM_HOST in h2) sleep 61;; *) sleep 0.3;; esac; echo s-{i}"
                for i in range(1, n + 1)]
    # A last, long task keeps the run going after h2's copies should have been killed.
    commands.append("case $SSHQ_FARM_HOST in h2) sleep 62;; *) sleep 5;; esac; echo tail")
    h2 = bed.host("h2")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), len(_procs_matching(h2, "sleep 61"))))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        t0 = time.monotonic()
        run = bed.run(bed.batch(commands), name, "--slots", "2")
        rc = run.finish()
        elapsed = time.monotonic() - t0
        t_exit = time.monotonic()
    finally:
        stop.set()
        watcher.join(10)
    stderr = run.stderr()
    assert rc == 0, stderr
    assert elapsed < 45, f"the run took {elapsed:.0f} s: h2's 60 s tasks were waited for"
    by_seq = _check_exactly_once(run.results(), set(range(1, n + 2)))
    for i, r in by_seq.items():
        assert r["stdout"] == ("tail\n" if i == n + 1 else f"s-{i}\n"), r
        assert r["exit_status"] == 0 and r["signal"] is None, r
        assert r["host"] in ("h1", "h3"), r

    events = bed.journal(name)
    on_h2 = {e["seq"] for e in events if e["e"] == "start" and e["host"] == "h2"}
    speculated = {e["seq"] for e in events if e["e"] == "speculate"}
    assert on_h2 - {n + 1}, "h2 started none of the tasks"
    assert on_h2 - {n + 1} <= speculated, "an h2 task was not started again elsewhere"
    for seq in on_h2:
        assert by_seq[seq]["attempts"] >= 2, by_seq[seq]

    # h2's losing copies were killed while the run went on (not only when its
    # dispatcher went away at the end) ...
    seen = [t for t, k in samples if k > 0]
    assert seen, "never saw h2's slow tasks running"
    assert any(k == 0 and seen[0] < t < t_exit - 1.0 for t, k in samples), (
        "h2's slow copies were still running when the run ended")
    # ... and nothing of the run is left on h2.
    deadline = time.monotonic() + 15
    while (left := _procs_matching(h2, "sleep 6")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [_cmdline(p) for p in left]


def test_dead_host_is_dropped_with_a_warning_run_goes_on(bed: FarmBed) -> None:
    """h1's sshd is dead before the run starts: it keeps failing while h2 and h3
    work, is dropped with a warning, and the run completes on the others."""
    name = "dead-host"
    bed.host("h1").kill_all()
    gate = bed.gate()
    n = 600   # gated: 0.3 s each (at most about 45 s) until h1 is dropped
    commands = [f"[ -e {gate} ] || sleep 0.3; echo d-$SSHQ_FARM_SEQ"] * n
    run = bed.run(bed.batch(commands), name, "--slots", "2")
    run.wait_for("warning that h1 was dropped",
                 lambda: re.search(r"\bh1: dropped\b", run.stderr()) is not None,
                 timeout=120)
    gate.touch()
    rc = run.finish()
    stderr = run.stderr()
    assert rc == 0, stderr
    assert re.search(r"sshq: warning: h1: dropped \(.+\); the run goes on with the other"
                     r" hosts", stderr), stderr
    by_seq = _check_exactly_once(run.results(), set(range(1, n + 1)))
    for i, r in by_seq.items():
        assert r["stdout"] == f"d-{i}\n" and r["exit_status"] == 0, r
        assert r["host"] in ("h2", "h3"), r
    dropped = [e for e in bed.journal(name) if e["e"] == "host" and e.get("dropped")]
    assert [e["host"] for e in dropped] == ["h1"]


def test_plain_destinations_through_ssh_config_find_and_killall(bed: FarmBed) -> None:
    """--hosts given as ~/.ssh/config aliases (no platforms): the farm runs on each
    namespace host, and `farm find` / `farm killall` see only the marked processes.
    (The namespace hosts share this machine's process table, so every host lists
    all three.)"""
    home = bed.work / "home"
    bed.hosts.ssh_home(home)
    env = dict(bed.env, HOME=str(home))
    aliases = [h.alias for h in bed.hosts]
    batch = bed.batch([f"sleep 0.2; echo $SSHQ_FARM_HOST-{i}" for i in range(30)])
    res = subprocess.run([sys.executable, "-m", "sshq", "farm", str(batch), "--hosts",
                          ",".join(aliases)], capture_output=True, env=env, timeout=CLI_TIMEOUT)
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in res.stdout.splitlines()]
    assert sorted(r["seq"] for r in got) == list(range(1, 31))
    for r in got:
        assert r["host"] in aliases and r["stdout"].startswith(r["host"] + "-")
    assert len({r["host"] for r in got}) >= 2          # spread over the hosts
    # a marked process of the hosts' user (the namespace hosts share this
    # machine's process table, so every host lists it): found through each
    # alias, then killed
    marker = f"sleep 300.{os.getpid()}"        # unique on this machine
    user = bed.hosts[0].user
    subprocess.run(["su", user, "-s", "/bin/sh", "-c", f"setsid {marker} </dev/null"
                    " >/dev/null 2>&1 &"], check=True, timeout=30)
    try:
        out = subprocess.run([sys.executable, "-m", "sshq", "farm", "find", marker,
                              "--hosts", ",".join(aliases), "--json"],
                             capture_output=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        found = json.loads(out.stdout)
        assert {p["host"] for p in found} == set(aliases), found
        assert len({p["pid"] for p in found}) == 1 and all(p["user"] == user for p in found)
        killed = subprocess.run([sys.executable, "-m", "sshq", "farm", "killall", marker,
                                 "--hosts", ",".join(aliases), "--json"],
                                capture_output=True, env=env, timeout=60)
        assert killed.returncode == 0, killed.stderr
        # (hosts that looked at the same moment may each have signalled it)
        assert {p["pid"] for p in json.loads(killed.stdout)} == {found[0]["pid"]}
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True)
        assert left.stdout.strip() == b"" or all(
            _proc_state(int(pid)) == "Z" for pid in left.stdout.split())
    finally:
        subprocess.run(["pkill", "-KILL", "-f", marker], capture_output=True)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_detached_hosts_sharing_a_file_system_share_one_queue(bed: FarmBed) -> None:
    """The namespace hosts share /home: --detach then uses ONE spool whose workers
    claim tasks (no static split).  One host crashes mid-run (its worker and
    sessions die); the others take over its claimed tasks, and attach reports
    every task exactly once."""
    name = "detach-shared"
    n = 60
    batch = bed.batch(["sleep 0.3; echo s-$SSHQ_FARM_SEQ"] * n)
    res = subprocess.run([sys.executable, "-m", "sshq", "--config", str(bed.config), "farm",
                          str(batch), "--hosts", ",".join(LABELS), "--detach", "--run", name,
                          "--slots", "2"], capture_output=True, env=bed.env, timeout=CLI_TIMEOUT)
    assert res.returncode == 0, res.stderr
    opts = json.loads((bed.state_dir / "farm" / name / "options.json").read_text())
    (spool,) = opts["spools"]
    assert sorted(spool["workers"]) == sorted(LABELS) and spool["tasks"] == n
    results = Path(spool["path"]) / "results"
    deadline = time.monotonic() + 60
    while len(list(results.glob("*.json"))) < 6:
        assert time.monotonic() < deadline, "the detached workers produced nothing"
        time.sleep(0.2)
    bed.host("h1").kill_all()          # h1's worker dies holding claimed tasks
    bed.host("h1").start_sshd()
    att = subprocess.run([sys.executable, "-m", "sshq", "--config", str(bed.config), "farm",
                          "attach", name], capture_output=True, env=bed.env,
                         timeout=CLI_TIMEOUT)
    assert att.returncode == 0, att.stderr
    got = [json.loads(x) for x in att.stdout.splitlines()]
    by_seq = _check_exactly_once(got, set(range(1, n + 1)))
    for i, r in by_seq.items():
        assert r["stdout"] == f"s-{i}\n" and r["exit_status"] == 0, r
    assert {r["host"] for r in got} <= set(LABELS)
    assert len({r["host"] for r in got}) >= 2      # the queue was shared
    assert not Path(spool["path"]).exists()         # tidied after the last result
