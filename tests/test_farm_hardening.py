"""The farm against what a task (untrusted) can do to its client, and as a user
meets it: bounded client memory whatever a task prints, bogus results in a
detached spool, two clients on one run, the end-of-run summary on a terminal,
``attach --format``, a reader that goes away.

Over the test bed's loopback sshd (platform ``bg``); the client is the real
``sshq`` command in a child process, whose peak memory is measured with
``os.wait4`` (the kernel's ``ru_maxrss`` of that process alone).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from sshq.farm.journal import RunDir
from sshq.farm.output import INLINE_MAX, Budget, StreamBuffer, TaskOutput, TaskResult

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(180)]

Sshq = Callable[..., subprocess.CompletedProcess[bytes]]

#: A client's peak RSS must stay under this (MiB).  An idle client is about
#: 50 MiB; before output was bounded, 214 MB of task output cost about 1.1 GiB.
RSS_BOUND_MIB = 160

#: ``seq 25000000``: 214 MB of output.
BIG_CMD = "seq 25000000"


def write_batch(tmp_path: Path, lines: list[str], name: str = "batch.txt") -> Path:
    p = tmp_path / name
    p.write_text("".join(x + "\n" for x in lines))
    return p


def jsonl(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def by_seq(results: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    seqs = [r["seq"] for r in results]
    assert len(seqs) == len(set(seqs)), f"a task reported twice: {seqs}"
    return {r["seq"]: r for r in results}


def sha_of_command(cmd: str) -> tuple[int, str]:
    """(length, sha256) of what ``sh -c cmd`` prints here."""
    proc = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    h = hashlib.sha256()
    n = 0
    while chunk := proc.stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    proc.stdout.close()
    assert proc.wait() == 0
    return n, h.hexdigest()


def sha_of_file(path: str | Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


#: Runs argv (after a result file's path) as a child of its own and writes
#: its exit status and ``ru_maxrss`` (kB) to that file.  A small process of
#: its own, because Linux carries a process's peak RSS across fork and exec
#: (fs/exec.c, ``setmax_mm_hiwater_rss``): a child of pytest itself would
#: report at least pytest's own peak, which earlier tests raise (to ~160 MiB).
_MEASURE = """\
import os, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write("%d %d" % (os.waitstatus_to_exitcode(status), ru.ru_maxrss))
"""


def measured(args: list[str], env: dict[str, str], *, timeout: float = 150,
             stdout: IO[bytes] | None = None) -> tuple[int, bytes, bytes, float]:
    """Run the ``sshq`` command; ``(exit status, stdout, stderr, peak RSS in MiB)``.

    stdout goes to ``stdout`` when given (and is then returned empty).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory() as d:
        res = Path(d) / "rusage"
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _MEASURE, str(res), sys.executable, "-m", "sshq",
             *args], env=env, stdin=subprocess.DEVNULL, stdout=stdout or out, stderr=err,
            start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"sshq {' '.join(args)} ran longer than {timeout} s") from None
        assert proc.returncode == 0, f"the measuring helper failed ({proc.returncode})"
        rc, rss = res.read_text().split()
        out.seek(0)
        err.seek(0)
        return int(rc), out.read(), err.read(), int(rss) / 1024


def journal(state_dir: Path, name: str) -> list[dict[str, Any]]:
    p = state_dir / "farm" / name / "journal"
    if not p.exists():
        return []
    events = []
    for line in p.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def gate_dir() -> Iterator[Path]:
    """A directory in /tmp the test bed's user can read (gate files for tasks)."""
    d = Path(tempfile.mkdtemp(prefix="sshq-farm-gate-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


# ---------------------------------------------------------------- 1. bounded memory

def test_output_buffers_stay_within_the_budget(tmp_path: Path) -> None:
    budget = Budget(10_000)
    outs = [TaskOutput(tmp_path, f"{i}.0", budget) for i in range(5)]
    for o in outs:
        for _ in range(6):
            o.add(1, b"x" * 1000)
            o.add(2, b"y" * 500)
            assert budget.used <= budget.limit
    assert any(s.spilled for o in outs for s in o.streams)   # over the budget: in files
    results = []
    for i, o in enumerate(outs):
        o.close()
        r = TaskResult(seq=i + 1, command="c", host="h", exit_status=0, signal=None)
        o.settle(r, tmp_path)
        o.fill(r)
        results.append(r)
    # small streams are carried in the result, whether they were in memory or in a file
    assert all(r.stdout == b"x" * 6000 and r.stderr == b"y" * 3000 for r in results)
    assert all(r.stdout_file is None and r.stderr_file is None for r in results)
    assert budget.used == 0
    assert list(tmp_path.iterdir()) == []   # spill files read back and removed


def test_a_long_stream_goes_to_a_file(tmp_path: Path) -> None:
    budget = Budget()
    o = TaskOutput(tmp_path, "3.9", budget)
    chunk = bytes(range(256)) * 4096   # 1 MiB
    for _ in range(5):
        o.add(1, chunk)
    o.add(2, b"err\n")
    assert budget.used <= INLINE_MAX + 4
    o.close()
    r = TaskResult(seq=3, command="c", host="h", exit_status=0, signal=None)
    o.settle(r, tmp_path)
    o.fill(r)
    assert r.stdout == b"" and r.stdout_file == str(tmp_path / "3.stdout")
    assert Path(r.stdout_file).read_bytes() == chunk * 5
    assert r.stderr == b"err\n" and r.stderr_file is None
    d = r.to_json()
    assert d["stdout_file"] == r.stdout_file and "stdout" not in d and d["stderr"] == "err\n"
    assert budget.used == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.stdout"]


def test_a_discarded_copy_leaves_nothing(tmp_path: Path) -> None:
    budget = Budget(100)
    b = StreamBuffer(tmp_path / ".1.0.stdout.part", budget)
    b.add(b"z" * 150)
    assert b.spilled and budget.used == 0
    b.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["jsonl", "anet"])
def test_big_output_goes_to_a_file_and_client_memory_stays_bounded(
        cli_env: dict[str, str], tmp_path: Path, state_dir: Path, fmt: str) -> None:
    name = f"big-{uuid.uuid4().hex[:8]}"
    b = write_batch(tmp_path, [
        BIG_CMD,
        "head -c 50000000 /dev/zero >&2; echo tail",   # 50 MB of NUL bytes on stderr
        "echo small",
    ])
    with open(tmp_path / "out", "wb") as out:
        rc, _, err, rss = measured(["farm", str(b), "--hosts", "bg", "--run", name,
                                    "--format", fmt], cli_env, stdout=out)
    assert rc == 0, err.decode(errors="replace")[-2000:]
    outdir = state_dir / "farm" / name / "output"
    big_path = outdir / "1.stdout"
    assert sha_of_file(big_path) == sha_of_command(BIG_CMD)
    assert sha_of_file(outdir / "2.stderr") == (50_000_000,
                                                hashlib.sha256(bytes(50_000_000)).hexdigest())
    # a clear line on stderr names each file
    assert re.search(rb"task 1: .*stdout \(\d+ bytes\) is in " + re.escape(str(big_path).encode()),
                     err), err
    assert str(outdir / "2.stderr").encode() in err
    if fmt == "jsonl":
        rs = by_seq(jsonl((tmp_path / "out").read_bytes()))
        assert rs[1]["stdout_file"] == str(big_path) and "stdout" not in rs[1]
        assert rs[1]["stderr"] == ""
        assert rs[2]["stderr_file"] == str(outdir / "2.stderr") and rs[2]["stdout"] == "tail\n"
        assert rs[3]["stdout"] == "small\n" and "stdout_file" not in rs[3]
    else:   # anet carries the bytes themselves, copied from the file
        got = {}
        with open(tmp_path / "out", "rb") as fh:
            while head := fh.read(8):
                seq, n = struct.unpack("<II", head)
                h = hashlib.sha256()
                left = n
                while left:
                    chunk = fh.read(min(left, 1 << 20))
                    assert chunk
                    h.update(chunk)
                    left -= len(chunk)
                got[seq] = (n, h.hexdigest())
        assert got[1] == sha_of_command(BIG_CMD)
        assert got[2] == (5, hashlib.sha256(b"tail\n").hexdigest())
        assert got[3] == (6, hashlib.sha256(b"small\n").hexdigest())
    assert rss < RSS_BOUND_MIB, f"the client peaked at {rss:.0f} MiB"


def test_resume_with_big_output_stays_bounded(cli_env: dict[str, str], tmp_path: Path,
                                              state_dir: Path, gate_dir: Path) -> None:
    name = f"bigres-{uuid.uuid4().hex[:8]}"
    gate = gate_dir / "go"
    b = write_batch(tmp_path, [
        "echo first",
        f"while [ ! -e {gate} ]; do sleep 0.1; done; {BIG_CMD}",
    ])
    proc = subprocess.Popen([sys.executable, "-m", "sshq", "farm", str(b), "--hosts", "bg",
                             "--run", name], env=cli_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["stdout"] == "first\n"
        wait_for(lambda: any(e.get("e") == "result" for e in journal(state_dir, name)), 30,
                 "the first result's journal line")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    gate.touch()
    rc, out, err, rss = measured(["farm", "--resume", name], cli_env)
    assert rc == 0, err.decode(errors="replace")[-2000:]
    [r] = jsonl(out)
    assert r["seq"] == 2
    assert r["stdout_file"] == str(state_dir / "farm" / name / "output" / "2.stdout")
    assert sha_of_file(r["stdout_file"]) == sha_of_command(BIG_CMD)
    assert rss < RSS_BOUND_MIB, f"the client peaked at {rss:.0f} MiB"


def test_attach_with_big_output_stays_bounded(cli_env: dict[str, str], tmp_path: Path,
                                              state_dir: Path) -> None:
    name = f"bigdet-{uuid.uuid4().hex[:8]}"
    b = write_batch(tmp_path, [BIG_CMD, "echo small"])
    rc, _, err, _ = measured(["farm", str(b), "--hosts", "bg", "--detach", "--run", name],
                             cli_env)
    assert rc == 0, err
    rc, out, err, rss = measured(["farm", "attach", name], cli_env)
    assert rc == 0, err.decode(errors="replace")[-2000:]
    rs = by_seq(jsonl(out))
    assert set(rs) == {1, 2}
    assert rs[1]["stdout_file"] == str(state_dir / "farm" / name / "output" / "1.stdout")
    assert sha_of_file(rs[1]["stdout_file"]) == sha_of_command(BIG_CMD)
    assert rs[2]["stdout"] == "small\n"
    assert str(rs[1]["stdout_file"]).encode() in err
    assert rss < RSS_BOUND_MIB, f"the client peaked at {rss:.0f} MiB"


# ---------------------------------------------------------------- 2. detached spools

def test_bogus_results_in_a_spool_are_ignored_and_never_journalled(
        sshq: Sshq, tmp_path: Path, state_dir: Path, run_id: str) -> None:
    name = f"bogus-{uuid.uuid4().hex[:8]}"
    res = f'"$HOME/sshq-test/{run_id}/farm/$SSHQ_FARM_RUN/bg/results"'
    meta = ('{"seq": %d, "exit_status": 0, "signal": null, "start": 1, "end": 2,'
            ' "timed_out": false}')
    b = write_batch(tmp_path, [
        f"echo '{meta % 99999999999}' > {res}/99999999999.json; echo one",
        f"printf '{{{{{{' > {res}/5000.json; echo junk > {res}/abc.json; echo two",
        f"head -c 20000000 /dev/zero > {res}/6000.json; echo three",
        f"echo '{meta % 5}' > {res}/5.json; echo x > {res}/5.out; echo four",  # 5: a comment
        "# not a task",
        f"echo '{meta % 6}' > {res}/-6.json; echo '[1]' > {res}/7.json; echo six",
    ])
    p = sshq("farm", str(b), "--hosts", "bg", "--detach", "--run", name)
    assert p.returncode == 0, p.stderr
    p = sshq("farm", "attach", name, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert b"Traceback" not in p.stderr and b"MemoryError" not in p.stderr
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == {1, 2, 3, 4, 6}
    assert [rs[s]["stdout"] for s in (1, 2, 3, 4, 6)] == ["one\n", "two\n", "three\n", "four\n",
                                                         "six\n"]
    assert p.stderr.count(b"warning") >= 5, p.stderr   # each bogus file is named
    for bogus in (b"99999999999.json", b"5000.json", b"abc.json", b"6000.json", b"5.json"):
        assert bogus in p.stderr, (bogus, p.stderr)
    seqs = [e["seq"] for e in journal(state_dir, name) if e.get("e") == "result"]
    assert sorted(seqs) == [1, 2, 3, 4, 6]
    again = sshq("farm", "attach", name, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout == b""


def test_attach_survives_a_bogus_seq_in_an_old_journal(sshq: Sshq, tmp_path: Path,
                                                       state_dir: Path) -> None:
    name = f"oldj-{uuid.uuid4().hex[:8]}"
    b = write_batch(tmp_path, ["echo one", "echo two"])
    assert sshq("farm", str(b), "--hosts", "bg", "--detach", "--run", name).returncode == 0
    with open(state_dir / "farm" / name / "journal", "a") as fh:
        fh.write('{"e":"result","seq":99999999999,"host":"bg","exit_status":0}\n'
                 '{"e":"result","seq":"1"}\n{"e":"result"}\n[1, 2]\n"x"\n'
                 '{"e":"result","seq":-4}\n{"e":"result","seq":true}\n')
    p = sshq("farm", "attach", name, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert sorted(r["seq"] for r in jsonl(p.stdout)) == [1, 2]


def test_replay_ignores_seqs_outside_the_batch(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("echo 1\necho 2\n# 3\necho 4\n")
    rd = RunDir(tmp_path, "r")
    rd.create(batch, {})
    (rd.path / "journal").write_text(
        '{"e":"result","seq":99999999999}\n{"e":"result","seq":2}\n{"e":"result","seq":5}\n'
        '{"e":"result","seq":0}\n{"e":"result","seq":-1}\n{"e":"result","seq":"4"}\n'
        '{"e":"result","seq":1.0}\n{"e":"result","seq":null}\n[]\n7\n{"e":"result"}\n'
        '{"e":"start","seq":4}\n{"e":"result","seq":4}\n')
    reported, starts = rd.replay()
    assert len(reported) == 5   # one byte per line of the batch, plus one
    assert [s for s in range(len(reported)) if reported[s]] == [2, 4]
    assert starts == 1


# ---------------------------------------------------------------- 3. one client per run

def _holder(state_dir: Path, name: str) -> str:
    try:
        return (state_dir / "farm" / name / "lock").read_text()
    except OSError:
        return ""


def test_a_second_client_on_a_live_run_is_refused(sshq: Sshq, cli_env: dict[str, str],
                                                  tmp_path: Path, state_dir: Path,
                                                  gate_dir: Path) -> None:
    name = f"lock-{uuid.uuid4().hex[:8]}"
    gate = gate_dir / "go"
    b = write_batch(tmp_path, [f'while [ ! -e {gate} ]; do sleep 0.1; done; echo "$SSHQ_FARM_SEQ"']
                    * 3)
    first = subprocess.Popen([sys.executable, "-m", "sshq", "farm", str(b), "--hosts", "bg",
                              "--run", name], env=cli_env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(e.get("e") == "start" for e in journal(state_dir, name)), 60,
                 "a task to start")
        p = sshq("farm", "--resume", name)
        assert p.returncode == 2, p.stderr
        msg = p.stderr.decode()
        assert f"pid {first.pid} on {socket.gethostname()}" in msg, msg
        assert "in use" in msg and msg.count("\n") == 1
        assert p.stdout == b""
        assert sum(e.get("e") == "run" for e in journal(state_dir, name)) == 1  # nothing ran
        assert first.poll() is None
    finally:
        first.kill()   # the holder dies: the kernel frees its lock
        first.wait()
    gate.touch()
    p = sshq("farm", "--resume", name)
    assert p.returncode == 0, p.stderr
    assert sorted(r["seq"] for r in jsonl(p.stdout)) == [1, 2, 3]


def test_a_second_attach_is_refused(sshq: Sshq, cli_env: dict[str, str], tmp_path: Path,
                                    state_dir: Path, gate_dir: Path) -> None:
    name = f"lockd-{uuid.uuid4().hex[:8]}"
    gate = gate_dir / "go"
    b = write_batch(tmp_path, [f"while [ ! -e {gate} ]; do sleep 0.1; done; echo done"] * 2)
    assert sshq("farm", str(b), "--hosts", "bg", "--detach", "--run", name).returncode == 0
    with tempfile.TemporaryFile() as out:
        first = subprocess.Popen([sys.executable, "-m", "sshq", "farm", "attach", name],
                                 env=cli_env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _holder(state_dir, name).startswith(f"{first.pid} "), 60,
                     "the first attach to hold the run")
            p = sshq("farm", "attach", name)
            assert p.returncode == 2, p.stderr
            assert f"pid {first.pid} on {socket.gethostname()}".encode() in p.stderr
            assert p.stdout == b""
            gate.touch()
            assert first.wait(timeout=120) == 0
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        out.seek(0)
        assert sorted(r["seq"] for r in jsonl(out.read())) == [1, 2]
    p = sshq("farm", "attach", name)   # the lock was released at the end
    assert p.returncode == 0 and p.stdout == b"", p.stderr


# ---------------------------------------------------------------- 4. summary on a terminal

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def test_a_run_on_a_terminal_ends_with_a_summary_line(cli_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    b = write_batch(tmp_path, ["echo a", "exit 3", "sleep 0.5; echo c", "echo d"])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {k: v for k, v in cli_env.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-m", "sshq", "farm", str(b), "--hosts", "bg"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    screen = bytearray()
    try:
        while True:   # read the terminal until the client is gone (EIO)
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, "no output on the terminal for 60 s"
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            screen += data
        rc = proc.wait(timeout=60)
        assert proc.stdout is not None
        out = proc.stdout.read()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert rc == 1
    assert sorted(r["seq"] for r in jsonl(out)) == [1, 2, 3, 4]
    text = _ANSI.sub(b"", bytes(screen)).decode(errors="replace")
    m = re.search(r"sshq: farm: 3 done, 1 failed, 0 retried, 0 speculative copies,"
                  r" (\d+\.\d) s, (\d+\.\d) tasks/s", text)
    assert m, text
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0


# ---------------------------------------------------------------- 5. attach --format

@pytest.mark.parametrize("sub", ["run", "attach"])
def test_help_documents_only_options_the_command_takes(sshq: Sshq, sub: str) -> None:
    import click

    from sshq.cli.farm import farm

    p = sshq("farm", sub, "--help")
    assert p.returncode == 0, p.stderr
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", p.stdout.decode()))
    cmd = farm.commands[sub]
    taken = {o for prm in cmd.params if isinstance(prm, click.Option)
             for o in (*prm.opts, *prm.secondary_opts)} | {"--help"}
    assert "--format" in mentioned
    assert mentioned <= taken, mentioned - taken


def test_attach_takes_format(sshq: Sshq, tmp_path: Path) -> None:
    name = f"fmt-{uuid.uuid4().hex[:8]}"
    b = write_batch(tmp_path, ["printf one", "printf two"])
    assert sshq("farm", str(b), "--hosts", "bg", "--detach", "--run", name).returncode == 0
    p = sshq("farm", "attach", name, "--format", "anet")
    assert p.returncode == 0, p.stderr
    frames = {}
    data = p.stdout
    while data:
        seq, n = struct.unpack("<II", data[:8])
        frames[seq] = data[8:8 + n]
        data = data[8 + n:]
    assert frames == {1: b"one", 2: b"two"}


# ---------------------------------------------------------------- 6. reader gone

def test_attach_reader_gone_exits_141(cli_env: dict[str, str], sshq: Sshq,
                                      tmp_path: Path) -> None:
    name = f"pipe-{uuid.uuid4().hex[:8]}"
    b = write_batch(tmp_path, ["echo first", "sleep 2; echo second", "sleep 2; echo third"])
    assert sshq("farm", str(b), "--hosts", "bg", "--slots", "1", "--detach",
                "--run", name).returncode == 0
    env = {k: v for k, v in cli_env.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "sshq", "farm", "attach", name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["stdout"] == "first\n"
        proc.stdout.close()   # like `| head -n 1`
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert rc == 141, err
    assert err == b""


# ---------------------------------------------------------------- terminal escapes

#: What a host could slip into a message or a process's command line: a window
#: title (OSC), a screen clear (CSI), an 8-bit CSI, a bell, a backspace.
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x9b31m\x07\x08"


def test_warnings_quoting_a_host_cannot_drive_the_terminal(
        capsys: pytest.CaptureFixture[str]) -> None:
    from sshq.cli.farm import _warn

    _warn("h1: dropped (the dispatcher did not start: \x1b]0;owned\x07bash:"
          " \x1b[31mpython3\x1b[0m: not found\r\x08)")
    err = capsys.readouterr().err
    assert err == ("sshq: warning: h1: dropped (the dispatcher did not start: bash: python3:"
                   " not found \ufffd)\n")


def test_find_and_killall_show_a_hosts_process_lines_without_escapes(sshq: Sshq) -> None:
    marker = f"sshq-esc-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                             f"{marker}{ESCAPES}tail"], stdin=subprocess.DEVNULL)
    try:
        p = sshq("farm", "find", marker, "--hosts", "local")
        assert p.returncode == 0, p.stderr
        (line,) = p.stdout.decode().splitlines()
        label, pid, _user, _elapsed, args = line.split("\t")
        assert (label, int(pid)) == ("local", proc.pid)
        assert args.endswith(f"{marker}\ufffd\ufffdtail"), args   # bell, backspace: U+FFFD
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", line), line
        listed = json.loads(sshq("farm", "find", marker, "--hosts", "local", "--json").stdout)
        assert listed[0]["args"].endswith(marker + ESCAPES + "tail")   # JSON keeps the data
        p = sshq("farm", "killall", marker, "--hosts", "local")
        assert p.returncode == 0, p.stderr
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", p.stdout.decode()), p.stdout
        assert proc.wait(10) != 0
    finally:
        proc.kill()
        proc.wait()
