"""sshq.farm.procs: find and kill the login user's own processes by pattern.

Pure parts (pattern and signal checks, the shipped module sshq_procs's
parsers, the validation of the agent's reply) are tested directly; the rest
(through the agent's ``procs`` operation) over the real test bed's sshd,
which runs on this machine: the tests (root) start a process with the same
marker locally and check that the test user's find/kill never touches it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from sshq.exceptions import CommandError, ConfigError, RemoteError
from sshq.farm import procs
from sshq.farm.procs import RemoteProcess, find_processes, kill_processes
from sshq.remote import protocol
from sshq.shipped import sshq_procs
from sshq.transport import CommandResult, HostParams, Transport
from sshq.transport.asyncssh_ import AsyncSSHTransport
from sshq.transport.local import LocalTransport

#: A process that sleeps argv[1] seconds; its later arguments are markers.
SLEEPER = "import sys,time; time.sleep(float(sys.argv[1]))"


class NoTransport(Transport):
    """Fails the test if anything is sent."""

    name = "none"

    async def run(self, argv: Sequence[str], *, stdin: bytes = b"",
                  timeout: float | None = None,
                  max_output: int | None = None) -> CommandResult:
        raise AssertionError(f"nothing should be sent: {argv!r}")

    async def stream(self, argv: Sequence[str], *, stdin: bytes = b"") -> AsyncIterator[bytes]:
        raise AssertionError("nothing should be sent")
        yield b""  # pragma: no cover


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("pattern", ["", "a\0b", "a\nb", "\n", "a\rb"])
async def test_bad_pattern_refused_before_sending(pattern: str) -> None:
    t = NoTransport(HostParams(host="nowhere"))
    with pytest.raises(ConfigError):
        await find_processes(t, pattern)
    with pytest.raises(ConfigError):
        await kill_processes(t, pattern)


@pytest.mark.parametrize("sig", ["", "SIG", "0", "128", "TERM; rm -rf ~", "-9", "_DFL",
                                 "$(touch x)", "TE RM"])
async def test_bad_signal_refused_before_sending(sig: str) -> None:
    with pytest.raises(ConfigError):
        await kill_processes(NoTransport(HostParams(host="nowhere")), "x", signal=sig)


@pytest.mark.parametrize(("given", "name"), [
    ("TERM", "TERM"), ("term", "TERM"), ("SIGKILL", "KILL"), ("sigusr1", "USR1"), ("9", "9"),
])
def test_check_signal_normalises(given: str, name: str) -> None:
    assert procs.check_signal(given) == name


def test_procs_module_is_bundled_with_the_agent() -> None:
    # (tests/test_agent_compat.py checks every shipped file for 3.6 and stdlib)
    assert "sshq_procs" in protocol.BUNDLED_MODULES
    src = protocol.agent_source()
    assert repr(Path(sshq_procs.__file__).read_bytes()).encode() in src
    assert b'"procs": op_procs' in src


# ------------------------------------------------- the remote half's parts

@pytest.mark.parametrize(("text", "secs"), [
    ("00:07", 7.0), ("  12:34", 754.0), ("02:38:16", 9496.0), ("3-04:05:06", 273906.0),
    ("", None), ("1:2:3:4", None), ("x-01:00", None), ("-", None), ("01:0a", None),
])
def test_parse_etime(text: str, secs: float | None) -> None:
    assert sshq_procs.parse_etime(text) == secs


def test_parse_ps_on_captured_output() -> None:
    # procps-ng 4 on Debian 12, `ps -A -ww -o pid= -o ppid= -o ruid= -o etime= -o args=`
    # (lines trimmed), plus one line in the days format and two broken lines
    out = (
        b"    1     0     0    02:38:16 /process_api --firecracker-init --addr 0.0.0.0:2024\n"
        b"    2     0     0    02:38:16 [kthreadd]\n"
        b" 4242     1  1001 3-04:05:06 python3 -c import sys  two  spaces \xff\n"
        b"  777     1  1001       00:09\n"
        b"garbage line here\n"
        b"  12     1  1001    bad args\n"
    )
    table = sshq_procs.parse_ps(out)
    assert sorted(table) == [1, 2, 777, 4242]
    assert table[4242] == {"ppid": 1, "uid": 1001, "elapsed": 273906.0,
                           "args": b"python3 -c import sys  two  spaces \xff", "start": None}
    assert table[2]["args"] == b"[kthreadd]"
    assert table[777]["args"] == b""


def test_parse_stat_comm_with_parenthesis() -> None:
    stat = (b"4242 (we) ird) (x) S 17 4242 4242 0 -1 4194560 102 0 0 0 0 0 0 0 20 0 1 0 "
            b"987654 2400256 400 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0\n")
    assert sshq_procs.parse_stat(stat) == (b"we) ird) (x", b"S", 17, 987654)


def test_select_excludes_self_ancestors_children_others_and_twins() -> None:
    def rec(ppid: int, uid: int, args: bytes) -> dict[str, Any]:
        return {"ppid": ppid, "uid": uid, "elapsed": 1.0, "args": args, "start": None}

    table = {
        1: rec(0, 0, b"init marker"),
        10: rec(1, 1001, b"sshd: me@notty marker"),   # ancestor
        11: rec(10, 1001, b"bash -c marker"),         # ancestor
        12: rec(11, 1001, b"python3 -c BOOT"),        # me
        13: rec(12, 1001, b"ps marker"),              # my child
        20: rec(1, 1001, b"python3 -c BOOT"),         # another finder (same command line)
        30: rec(1, 1001, b"sleep marker"),            # wanted
        31: rec(1, 1002, b"sleep marker"),            # another user
        32: rec(1, 1001, b"sleep other"),             # no match
        33: rec(30, 1001, b"xmarkerx"),               # wanted: substring
    }
    found = sshq_procs.select(table, b"marker", 1001, 12, (13,))
    assert [r["pid"] for r in found] == [30, 33]
    assert sshq_procs.select(table, b"BOOT", 1001, 12, ()) == []


def test_send_skips_a_vanished_pid() -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names no process now
    errors: list[str] = []
    rec = {"pid": child.pid, "start": None, "args": b"true", "uid": os.getuid()}
    assert sshq_procs.send([rec], signal.SIGTERM, errors) == []
    assert errors == []


def test_send_skips_a_pid_whose_start_time_changed() -> None:
    # the pid now names another process than the one listed (pid reuse)
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = sshq_procs.start_ticks(child.pid)
        assert isinstance(start, int)
        rec = {"pid": child.pid, "start": start + 1, "args": b"sleep 30", "uid": os.getuid()}
        assert sshq_procs.send([rec], signal.SIGTERM, []) == []
        assert child.poll() is None
        rec["start"] = start
        assert sshq_procs.send([rec], signal.SIGTERM, []) == [rec]
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def test_ps_fallback_lists_this_process() -> None:
    if shutil.which("ps") is None:
        pytest.skip("no ps here")
    table, ps_pid = sshq_procs.ps_table()
    me = table[os.getpid()]
    assert me["uid"] == os.getuid()
    assert me["ppid"] == os.getppid()
    assert me["elapsed"] >= 0
    assert table[ps_pid]["args"].startswith(b"ps -A -ww -o pid=")


def test_reply_lists_this_users_matching_processes_and_reports_bad_requests() -> None:
    child = subprocess.Popen([sys.executable, "-c", SLEEPER, "30", "sshq-reply-marker"])
    try:
        marker = f"{SLEEPER} 30 sshq-reply-marker".encode()
        r = sshq_procs.reply(marker.hex())
        assert r["uid"] == os.getuid() and r["errors"] == []
        assert [p["pid"] for p in r["procs"]] == [child.pid]
        assert bytes.fromhex(r["procs"][0]["args"]).endswith(marker)
        assert sshq_procs.reply("zz")["fatal"] == "the pattern is not hex"
        assert sshq_procs.reply("")["fatal"] == "the pattern is empty"
        bad = sshq_procs.reply(marker.hex(), "NOSUCHSIGNAL")
        assert bad["bad_signal"] is True and "unknown signal" in bad["fatal"]
        assert child.poll() is None
        r = sshq_procs.reply(marker.hex(), "KILL")
        assert [p["pid"] for p in r["procs"]] == [child.pid]
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


def good_reply(**procs_fields: Any) -> dict[str, Any]:
    proc = {"pid": 42, "elapsed": 1.5, "args": b"sleep 9 \xff".hex(), **procs_fields}
    return {"uid": 1001, "user": "me", "procs": [proc], "errors": []}


def test_reply_is_validated_into_remote_processes() -> None:
    (p,) = procs.processes_from_reply("h", good_reply())
    assert p == RemoteProcess(host="h", pid=42, user="me", elapsed=1.5,
                              args="sleep 9 \ufffd")


@pytest.mark.parametrize("reply", [
    good_reply(pid="42"), good_reply(pid=True), good_reply(pid=0), good_reply(pid=2**40),
    good_reply(pid=None), good_reply(elapsed=float("nan")), good_reply(elapsed=-1),
    good_reply(elapsed=float("inf")), good_reply(elapsed="1"), good_reply(args="zz"),
    good_reply(args=7), {"user": "me", "procs": "no"}, {"user": 7, "procs": []},
    {"procs": []}, {"user": "me", "procs": [[42]]},
    {"user": "me", "procs": [], "errors": "x"},
], ids=repr)
def test_malformed_replies_are_remote_errors(reply: dict[str, Any]) -> None:
    with pytest.raises(RemoteError, match="^h: unreadable process list"):
        procs.processes_from_reply("h", reply)


def test_fatal_replies() -> None:
    with pytest.raises(ConfigError, match="^h: unknown signal"):
        procs.processes_from_reply("h", {"fatal": "unknown signal 'X'", "bad_signal": True})
    with pytest.raises(RemoteError, match="^h: ps failed"):
        procs.processes_from_reply("h", {"fatal": "ps failed", "bad_signal": "yes"})


# ------------------------------------------------------------ real test bed

def host_params(testbed: dict[str, str]) -> HostParams:
    return HostParams(
        host=testbed["SSHQ_TEST_HOST"],
        port=int(testbed["SSHQ_TEST_PORT"]),
        user=testbed["SSHQ_TEST_USER"],
        identity_file=testbed["SSHQ_TEST_KEY"],
        known_hosts=testbed["SSHQ_TEST_KNOWN_HOSTS"],
    )


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid`` if it is still one of this test's sleepers (not a reused pid)."""
    try:
        if b"sshq-marker-" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


@pytest.fixture
def marker() -> str:
    return f"sshq-marker-{uuid.uuid4().hex}"


@pytest.fixture
async def remote(testbed: dict[str, str]) -> AsyncIterator[Transport]:
    if os.geteuid() != 0:
        pytest.skip("these tests start a process of another user (root)")
    t = AsyncSSHTransport(host_params(testbed))
    try:
        yield t
    finally:
        await t.close()


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids this test started (killed at the end, whatever happened)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        kill_quietly(pid)


async def start_remote(t: Transport, *markers: str) -> int:
    """Start a detached sleeper over SSH as the test user; its pid."""
    res = await t.run(
        ["sh", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!', "sh",
         "python3", "-c", SLEEPER, "300", *markers],
        timeout=20,
    )
    assert res.exit_status == 0, res.stderr
    return int(res.stdout)


def start_local_root(marker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SLEEPER, "300", marker],
                            stdin=subprocess.DEVNULL)


async def find_until(t: Transport, pattern: str, pids: set[int],
                     timeout: float = 5.0) -> list[RemoteProcess]:
    """find_processes until exactly ``pids`` match (a new process may still be exec'ing)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await find_processes(t, pattern)
        if {p.pid for p in found} == pids or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


@pytest.mark.sshd
@pytest.mark.timeout(60)
async def test_find_and_kill_own_process_never_another_users(
    remote: Transport, testbed: dict[str, str], marker: str, started: list[int]
) -> None:
    root_proc = start_local_root(marker)
    started.append(root_proc.pid)
    pid = await start_remote(remote, marker)
    started.append(pid)

    found = await find_until(remote, marker, {pid})
    assert [p.pid for p in found] == [pid]
    (p,) = found
    assert p.host == remote.host
    assert p.user == testbed["SSHQ_TEST_USER"]
    assert 0.0 <= p.elapsed < 30.0
    assert p.args == f"python3 -c {SLEEPER} 300 {marker}"

    # root's process with the same marker is there, and root (local) sees only it
    local = LocalTransport(HostParams(host="localhost"))
    assert [q.pid for q in await find_processes(local, marker)] == [root_proc.pid]
    assert (await find_processes(local, marker))[0].user == "root"

    killed = await kill_processes(remote, marker)
    assert [q.pid for q in killed] == [pid]
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not alive(pid)
    assert await find_processes(remote, marker) == []
    assert await kill_processes(remote, marker, signal="KILL") == []

    assert root_proc.poll() is None, "another user's process was killed"
    root_proc.kill()
    root_proc.wait()


@pytest.mark.sshd
@pytest.mark.timeout(60)
async def test_kill_with_named_signal_and_several_processes(
    remote: Transport, marker: str, started: list[int]
) -> None:
    a = await start_remote(remote, marker, "a")
    b = await start_remote(remote, marker, "b")
    started.extend([a, b])
    pids = {a, b}
    assert {p.pid for p in await find_until(remote, marker, pids)} == pids
    assert [p.pid for p in await find_processes(remote, f"{marker} b")] == [b]
    killed = await kill_processes(remote, marker, signal="sigkill")
    assert {p.pid for p in killed} == pids
    assert await find_until(remote, marker, set()) == []


@pytest.mark.sshd
@pytest.mark.timeout(60)
async def test_never_lists_itself_nor_a_concurrent_twin(remote: Transport) -> None:
    # the agent's own command line holds these; concurrent calls see each other.
    # Every agent call started with "python3" has this very command line (the
    # test user's agents of other tests too): none may be listed.  (An agent
    # started by another test with another interpreter path may be: that one
    # is no twin.)
    own = " ".join(protocol.agent_argv("python3"))
    for pattern in ("sshq-agent", protocol.BOOTSTRAP):
        results = await asyncio.gather(*(find_processes(remote, pattern) for _ in range(3)))
        assert [p for ps in results for p in ps if p.args == own] == [], pattern
    # SIGCONT: harmless to whatever else it might reach
    signalled = await kill_processes(remote, protocol.BOOTSTRAP, signal="CONT")
    assert [p for p in signalled if p.args == own] == []


async def test_never_lists_its_ancestors() -> None:
    # the local transport runs the program as a child of this test process:
    # pytest (and whatever started it) are ancestors, with their command lines
    local = LocalTransport(HostParams(host="localhost"))
    me = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    found = await find_processes(local, me)
    assert os.getpid() not in {p.pid for p in found}
    assert os.getppid() not in {p.pid for p in found}


@pytest.fixture
def canary_dir() -> Iterator[Path]:
    """A directory the remote test user could create files in."""
    d = Path(tempfile.mkdtemp(prefix="sshq-canary-", dir="/tmp"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.sshd
@pytest.mark.timeout(60)
async def test_hostile_patterns_are_plain_bytes(
    remote: Transport, canary_dir: Path, marker: str, started: list[int]
) -> None:
    c = canary_dir
    hostile = [
        f"'; touch {c}/quote; echo '",
        f"$(touch {c}/dollar)",
        f"`touch {c}/backtick`",
        f"\"; touch {c}/dq; \"",
        f"x; touch {c}/semi",
        f"| touch {c}/pipe",
        "'; rm -rf ~; echo '",
        "-e ",
        "--help ",
        "* ",
        ".* ",
        "\\",
        "é ünïcode \udcff",
    ]
    # each is made unique with the marker: the test user's processes belong to
    # every test running on this machine, and kill must touch none of theirs
    for word in hostile:
        for pattern in (word + marker, marker + word):
            assert await find_processes(remote, pattern) == [], pattern
            assert await kill_processes(remote, pattern) == [], pattern
    # a process whose command line holds the hostile text is found by it, byte-exact
    word = f"{marker}'$(touch {c}/inner)\"`x`;*"
    pid = await start_remote(remote, word)
    started.append(pid)
    found = await find_until(remote, f"'$(touch {c}/inner)\"`x`;*", {pid})
    assert [p.pid for p in found] == [pid]
    assert found[0].args.endswith(word)
    assert await find_processes(remote, f"{marker}.*") == []  # not a regex
    assert [p.pid for p in await kill_processes(remote, word)] == [pid]
    assert list(c.iterdir()) == []
    assert Path(os.path.expanduser("~sshqtest")).is_dir()


@pytest.mark.sshd
@pytest.mark.timeout(60)
async def test_remote_failures(remote: Transport) -> None:
    with pytest.raises(ConfigError, match="unknown signal"):
        await kill_processes(remote, "sshq-no-such-process", signal="NOSUCHSIGNAL")
    with pytest.raises(CommandError):
        await find_processes(remote, "x", python="python3-does-not-exist")
