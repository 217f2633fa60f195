"""Unit tests of the task farm's pure parts, and of its dispatcher run locally.

No SSH here: the frame reader, the batch reader, the journal, result
formatting and host resolution are tested directly; the dispatcher
(:mod:`sshq.shipped.dispatcher`) is started on this machine exactly as on a
host (``python3 -c BOOTSTRAP``, the source and header on stdin) and spoken
to in frames.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from sshq.client import AsyncClient
from sshq.exceptions import ConfigError, RemoteError
from sshq.farm.batch import count_tasks, read_batch
from sshq.farm.journal import RunDir, check_run_name, new_run_name
from sshq.farm.output import ResultWriter, TaskResult, output_paths, signal_name
from sshq.farm.run import resolve_hosts, split_specs
from sshq.farm.wire import MAX_FRAME, FrameReader, dispatcher_stdin, encode
from sshq.remote.protocol import BOOTSTRAP

NONCE = "0123456789abcdef01234567"
FENCE = f"SSHQ-BEGIN-{NONCE}\n".encode()


def feed_all(reader: FrameReader, *chunks: bytes) -> list[tuple[dict[str, Any], bytes]]:
    out = []
    for c in chunks:
        out.extend(reader.feed(c))
    return out


def raw_frame(head: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(head), len(payload)) + head + payload


# ---------------------------------------------------------------- wire

def test_encode_layout() -> None:
    data = encode({"type": "task", "id": 3}, b"xyz")
    hl, pl = struct.unpack(">II", data[:8])
    assert pl == 3 and data[-3:] == b"xyz"
    assert json.loads(data[8:8 + hl]) == {"type": "task", "id": 3}


def test_frames_after_fence() -> None:
    r = FrameReader(NONCE)
    got = feed_all(r, FENCE + encode({"type": "hello"})
                   + encode({"type": "output", "id": 1}, b"data"))
    assert got == [({"type": "hello"}, b""), ({"type": "output", "id": 1}, b"data")]
    assert r.started


def test_banner_before_fence_is_skipped() -> None:
    banner = (b"Welcome to the cluster!\n" + raw_frame(b'{"type":"bye"}')
              + b"SSHQ-BEGIN-ffffffffffffffffffffffff\n" + raw_frame(b'{"type":"heartbeat"}')
              + b"SSHQ-BEGIN-" + NONCE[:5].encode() + b"\n\xff\xfe\0")
    r = FrameReader(NONCE)
    assert feed_all(r, banner) == []
    assert not r.started
    got = feed_all(r, b"\n" + FENCE + encode({"type": "hello", "slots": 2}))
    assert got == [({"type": "hello", "slots": 2}, b"")]


def test_fence_without_newline_is_not_the_fence() -> None:
    r = FrameReader(NONCE)
    assert feed_all(r, FENCE[:-1] + b" " + encode({"type": "heartbeat"})) == []
    assert not r.started


def test_big_banner_does_not_grow_the_buffer() -> None:
    r = FrameReader(NONCE)
    for _ in range(64):
        assert feed_all(r, b"motd " * 20000) == []
    assert len(r._buf) <= len(FENCE)
    assert feed_all(r, FENCE + encode({"type": "hello"})) == [({"type": "hello"}, b"")]


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 13])
def test_split_feeds_any_boundary(cut: int) -> None:
    frames = [({"type": "hello", "slots": 4}, b""),
              ({"type": "output", "id": 7, "stream": 2}, bytes(range(256))),
              ({"type": "done", "id": 7, "stdout_bytes": 0}, b""),
              ({"type": "started", "id": 8, "cmd": "ü ✓"}, b"")]
    stream = b"banner\n" + FENCE + b"".join(encode(h, p) for h, p in frames)
    r = FrameReader(NONCE)
    got = feed_all(r, *(stream[i:i + cut] for i in range(0, len(stream), cut)))
    assert got == frames


def test_fence_split_across_feeds_after_long_banner() -> None:
    r = FrameReader(NONCE)
    stream = b"x" * 5000 + FENCE + encode({"type": "hello"})
    assert feed_all(r, stream[:5010]) == []
    assert feed_all(r, stream[5010:]) == [({"type": "hello"}, b"")]


def test_fence_like_bytes_after_start_are_data() -> None:
    r = FrameReader(NONCE)
    payload = b"\n" + FENCE + b"SSHQ-BEGIN-x\n"
    got = feed_all(r, FENCE + encode({"type": "output", "id": 1}, payload)
                   + encode({"type": "bye"}))
    assert got == [({"type": "output", "id": 1}, payload), ({"type": "bye"}, b"")]


def test_incomplete_frame_waits() -> None:
    r = FrameReader(NONCE)
    data = encode({"type": "output", "id": 1}, b"p" * 1000)
    assert feed_all(r, FENCE + data[:-1]) == []
    assert feed_all(r, data[-1:]) == [({"type": "output", "id": 1}, b"p" * 1000)]


@pytest.mark.parametrize(("bad", "what"), [
    (struct.pack(">II", MAX_FRAME + 1, 0), "too long"),
    (struct.pack(">II", 2, MAX_FRAME + 1), "too long"),
    (raw_frame(b"{not json"), "not JSON"),
    (raw_frame(b"\xff\xfe\xfd"), "not JSON"),
    (raw_frame(b"[1, 2]"), "not an object"),
    (raw_frame(b'"hello"'), "not an object"),
])
def test_malformed_frames(bad: bytes, what: str) -> None:
    r = FrameReader(NONCE)
    good = encode({"type": "hello"})
    got = []
    with pytest.raises(RemoteError, match=what):
        for f in r.feed(FENCE + good + bad):
            got.append(f)
    assert got == [({"type": "hello"}, b"")]


def test_dispatcher_stdin_layout() -> None:
    nonce, data = dispatcher_stdin({"slots": 3, "env": {"A": "b"}, "cwd": None})
    n, _, rest = data.partition(b"\n")
    src = rest[:int(n)]
    assert b"class Runner" in src and src.startswith(b"# sshq task-farm dispatcher")
    header = rest[int(n):]
    assert header.endswith(b"\n") and header.count(b"\n") == 1
    assert json.loads(header) == {"slots": 3, "env": {"A": "b"}, "cwd": None, "nonce": nonce}
    assert len(nonce) >= 16
    assert dispatcher_stdin({})[0] != nonce


# ---------------------------------------------------------------- batch

def test_read_batch_seq_is_line_number(tmp_path: Path) -> None:
    p = tmp_path / "batch"
    p.write_bytes("echo 1\n\n   \n# comment\n  # indented comment\necho 6 # not a comment\r\n"
                  "\t\n  lead and trail  \necho 'ü'\necho last".encode())
    assert list(read_batch(p)) == [
        (1, "echo 1"), (6, "echo 6 # not a comment"), (8, "  lead and trail  "),
        (9, "echo 'ü'"), (10, "echo last")]
    assert count_tasks(p) == (5, 10)


def test_read_batch_skip_bitmap(tmp_path: Path) -> None:
    p = tmp_path / "batch"
    p.write_text("a\nb\n\nc\nd\n")
    skip = bytearray(3)
    skip[2] = 1
    assert list(read_batch(p, skip=skip)) == [(1, "a"), (4, "c"), (5, "d")]
    skip = bytearray(10)
    skip[1] = skip[5] = 1
    assert list(read_batch(p, skip=skip)) == [(2, "b"), (4, "c")]


def test_read_batch_keeps_undecodable_bytes(tmp_path: Path) -> None:
    p = tmp_path / "batch"
    p.write_bytes(b"echo \xff\xfe\n")
    [(seq, cmd)] = list(read_batch(p))
    assert seq == 1 and cmd.encode("utf-8", "surrogateescape") == b"echo \xff\xfe"


def test_read_batch_rejects_nul(tmp_path: Path) -> None:
    p = tmp_path / "batch"
    p.write_bytes(b"echo ok\n# fine\necho a\0b\n")
    with pytest.raises(ConfigError, match=r":3: .*NUL"):
        list(read_batch(p))
    with pytest.raises(ConfigError, match="NUL"):
        count_tasks(p)


def test_read_batch_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        list(read_batch(tmp_path / "nope"))


def test_empty_batch(tmp_path: Path) -> None:
    p = tmp_path / "batch"
    p.write_text("\n# nothing\n")
    assert list(read_batch(p)) == []
    assert count_tasks(p) == (0, 2)


# ---------------------------------------------------------------- journal

@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "a b", "x" * 65, "é",
                                  "a\n", "_x"])
def test_bad_run_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid run name"):
        check_run_name(name)
    with pytest.raises(ConfigError):
        RunDir(tmp_path, name)


@pytest.mark.parametrize("name", ["a", "farm-1.x_y", "X" * 64, "0"])
def test_good_run_names(name: str) -> None:
    assert check_run_name(name) == name


def test_new_run_name_is_valid_and_fresh() -> None:
    names = {new_run_name() for _ in range(20)}
    assert len(names) > 1
    for n in names:
        assert check_run_name(n) == n and n.startswith("farm-")


def test_rundir_create_and_options(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("echo 1\n")
    rd = RunDir(tmp_path / "state", "r1")
    assert not rd.exists()
    with pytest.raises(ConfigError, match="no farm run"):
        rd.options()
    rd.create(batch, {"hosts": ["h"], "retries": 2})
    assert rd.exists()
    assert rd.options() == {"hosts": ["h"], "retries": 2}
    assert rd.batch.read_text() == "echo 1\n"
    batch.write_text("changed\n")
    assert rd.batch.read_text() == "echo 1\n"   # a copy
    with pytest.raises(ConfigError, match="exists already"):
        RunDir(tmp_path / "state", "r1").create(batch, {})


def test_rundir_create_missing_batch(tmp_path: Path) -> None:
    rd = RunDir(tmp_path, "r2")
    with pytest.raises(ConfigError, match="cannot read"):
        rd.create(tmp_path / "missing", {})
    assert not rd.exists()


def test_replay_no_journal(tmp_path: Path) -> None:
    reported, starts = RunDir(tmp_path, "r").replay()
    assert not any(reported) and starts == 0


def test_replay_with_truncated_last_line(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("".join(f"echo {i}\n" for i in range(1, 7)))
    rd = RunDir(tmp_path, "r")
    rd.create(batch, {})
    rd.open_journal()
    rd.log("run", resume=False)
    for seq in (1, 2, 3, 5):
        rd.log("start", seq=seq, host="h", attempt=1)
    rd.log("result", seq=2, host="h", exit_status=0, signal=None)
    rd.log("lost", seq=3, host="h")
    rd.log("result", seq=5, host="h", exit_status=1, signal=None)
    rd.log("start", seq=3, host="h", attempt=2)
    rd.close()
    rd.log("ignored", seq=1)   # closed: nothing written
    lines = (rd.path / "journal").read_text().splitlines()
    assert len(lines) == 9
    assert all("t" in json.loads(x) for x in lines)
    with open(rd.path / "journal", "a") as fh:   # a crash in the middle of a line
        fh.write('{"seq":3,"host":"h","exit_status":0,"sig')
    reported, starts = RunDir(tmp_path, "r").replay()
    assert starts == 5
    assert [s for s in range(len(reported)) if reported[s]] == [2, 5]
    assert list(read_batch(rd.batch, skip=reported)) == [
        (1, "echo 1"), (3, "echo 3"), (4, "echo 4"), (6, "echo 6")]
    # the next invocation appends after the cut line, and replay still works
    rd2 = RunDir(tmp_path, "r")
    rd2.open_journal()
    rd2.log("result", seq=3, host="h", exit_status=0, signal=None)
    rd2.close()
    reported, _ = rd2.replay()
    assert [s for s in range(len(reported)) if reported[s]] in ([2, 5], [2, 3, 5])


def test_replay_large_seq(tmp_path: Path) -> None:
    rd = RunDir(tmp_path, "r")
    rd.path.mkdir(parents=True)
    rd.batch.write_text("echo\n" * 100000)   # seqs beyond the batch are ignored
    (rd.path / "journal").write_text('{"e":"result","seq":100000}\n{"e":"result","seq":1}\n')
    reported, _ = rd.replay()
    assert reported[100000] and reported[1] and not reported[2] and not reported[99999]


# ---------------------------------------------------------------- output

KEYS = ["seq", "command", "host", "exit_status", "signal", "stdout", "stderr", "start", "end",
        "attempts"]


def test_to_json_plain() -> None:
    r = TaskResult(seq=4, command="echo ü", host="h1", exit_status=0, signal=None,
                   stdout="ü\n".encode(), stderr=b"", start=1.5, end=2.5, attempts=1)
    d = r.to_json()
    assert list(d) == KEYS
    assert d == {"seq": 4, "command": "echo ü", "host": "h1", "exit_status": 0, "signal": None,
                 "stdout": "ü\n", "stderr": "", "start": 1.5, "end": 2.5, "attempts": 1}
    assert r.ok


def test_to_json_b64_fallback() -> None:
    r = TaskResult(seq=1, command="x", host="h", exit_status=0, signal=None,
                   stdout=b"\xff\xfeok", stderr="fine ✓".encode(), attempts=1)
    d = r.to_json()
    assert "stdout" not in d and base64.b64decode(d["stdout_b64"]) == b"\xff\xfeok"
    assert d["stderr"] == "fine ✓" and "stderr_b64" not in d
    r = TaskResult(seq=1, command="x", host="h", exit_status=0, signal=None,
                   stdout=b"ok", stderr="é".encode("latin-1"), attempts=1)
    d = r.to_json()
    assert d["stdout"] == "ok" and base64.b64decode(d["stderr_b64"]) == b"\xe9"
    # a multi-byte character cut in the middle is not valid UTF-8 either
    r.stdout = "✓".encode()[:2]
    assert base64.b64decode(r.to_json()["stdout_b64"]) == "✓".encode()[:2]


def test_to_json_signal_timeout_error_files() -> None:
    r = TaskResult(seq=2, command="sleep 9", host="h", exit_status=None, signal="TERM",
                   attempts=2, timed_out=True, stdout_file="/o/2.stdout",
                   stderr_file="/o/2.stderr")
    d = r.to_json()
    assert d["timed_out"] is True and d["signal"] == "TERM" and d["exit_status"] is None
    assert d["stdout_file"] == "/o/2.stdout" and d["stderr_file"] == "/o/2.stderr"
    assert "stdout" not in d and "stderr" not in d and "error" not in d
    assert not r.ok
    r = TaskResult(seq=2, command="x", host=None, exit_status=None, signal=None, error="lost")
    assert r.to_json()["error"] == "lost" and "timed_out" not in r.to_json() and not r.ok


def test_signal_name() -> None:
    assert signal_name(15) == "TERM" and signal_name(9) == "KILL"
    assert signal_name(None) is None and signal_name(0) is None
    assert signal_name(200) == "200"


def test_result_writer_jsonl() -> None:
    import io
    buf = io.BytesIO()
    w = ResultWriter(buf, "jsonl")
    w.write(TaskResult(seq=1, command="echo 'ü'", host="h", exit_status=0, signal=None,
                       stdout="ü\n".encode(), attempts=1))
    w.write(TaskResult(seq=3, command="x", host="h", exit_status=1, signal=None,
                       stdout=b"\x80", attempts=1))
    lines = buf.getvalue().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    a, b = (json.loads(x) for x in lines[:2])
    assert a["stdout"] == "ü\n" and a["command"] == "echo 'ü'"
    assert b["stdout_b64"] == base64.b64encode(b"\x80").decode()


def test_jsonl_line_is_valid_utf8_even_for_undecodable_command(tmp_path: Path) -> None:
    """A command with bytes that are not UTF-8 must not make the line invalid JSON."""
    import io
    p = tmp_path / "b"
    p.write_bytes(b"echo \xff\n")
    [(seq, cmd)] = list(read_batch(p))
    buf = io.BytesIO()
    ResultWriter(buf, "jsonl").write(TaskResult(seq=seq, command=cmd, host="h", exit_status=0,
                                                signal=None, stdout=b"\xff\n", attempts=1))
    line = buf.getvalue()
    line.decode("utf-8")   # RFC 8259: JSON text is UTF-8
    d = json.loads(line)
    assert d["seq"] == 1 and "command" not in d
    assert base64.b64decode(d["command_b64"]) == b"echo \xff"
    assert base64.b64decode(d["stdout_b64"]) == b"\xff\n"


def test_result_writer_anet(tmp_path: Path) -> None:
    import io
    buf = io.BytesIO()
    w = ResultWriter(buf, "anet")
    w.write(TaskResult(seq=7, command="x", host="h", exit_status=0, signal=None,
                       stdout=b"\0\xffbin", stderr=b"not sent", attempts=1))
    f = tmp_path / "9.stdout"
    f.write_bytes(b"from file")
    w.write(TaskResult(seq=9, command="x", host="h", exit_status=0, signal=None,
                       stdout_file=str(f), stderr_file=str(tmp_path / "9.stderr"), attempts=1))
    w.write(TaskResult(seq=2**32 - 1, command="x", host="h", exit_status=0, signal=None))
    assert buf.getvalue() == (struct.pack("<II", 7, 5) + b"\0\xffbin"
                              + struct.pack("<II", 9, 9) + b"from file"
                              + struct.pack("<II", 2**32 - 1, 0))
    with pytest.raises(ValueError):
        ResultWriter(buf, "xml")


def test_output_paths(tmp_path: Path) -> None:
    assert output_paths(tmp_path, 12) == (tmp_path / "12.stdout", tmp_path / "12.stderr")


# ---------------------------------------------------------------- hosts

@pytest.fixture
async def plat_client(tmp_path: Path) -> Any:
    cfg = tmp_path / "platforms.toml"
    cfg.write_text(
        '[platforms.one]\nhosts = ["n1"]\nport = 2200\nuser = "u"\n'
        '[platforms.many]\nhosts = ["a1", "a2"]\n'
        '[platforms.loc]\nhosts = ["localhost"]\ntransport = "local"\n')
    c = AsyncClient(cfg, state_dir=tmp_path / "state")
    try:
        yield c
    finally:
        await c.close()


def test_split_specs() -> None:
    assert split_specs(["a,b", " c ", ",,", "d,"]) == ["a", "b", "c", "d"]


async def test_resolve_platforms_and_destinations(plat_client: Any) -> None:
    hosts = resolve_hosts(plat_client, ["one,many", "alice@node3:2222", "node4", "[::1]:22",
                                        "loc"])
    assert [h.label for h in hosts] == ["one", "many/a1", "many/a2", "alice@node3:2222", "node4",
                                        "[::1]:22", "loc"]
    p = {h.label: h.transport.params for h in hosts}
    assert (p["one"].host, p["one"].port, p["one"].user) == ("n1", 2200, "u")
    assert (p["alice@node3:2222"].host, p["alice@node3:2222"].port,
            p["alice@node3:2222"].user) == ("node3", 2222, "alice")
    assert (p["node4"].host, p["node4"].port, p["node4"].user) == ("node4", None, None)
    assert p["[::1]:22"].host == "::1" and p["[::1]:22"].port == 22


@pytest.mark.parametrize("spec", [
    "a b", "user@", "@host", "host:", "host:port", "host:1:2", "u@v@host", "host;rm -rf ~",
    "$(reboot)", "-oProxyCommand=x", "host/x", "[nothex]:22", "h:123456", "ü-host",
])
async def test_resolve_bad_destinations(plat_client: Any, spec: str) -> None:
    with pytest.raises(ConfigError, match="neither a platform nor an SSH destination"):
        resolve_hosts(plat_client, [spec])


@pytest.mark.parametrize("specs", [[], [""], [",", " , "]])
async def test_resolve_no_hosts(plat_client: Any, specs: list[str]) -> None:
    with pytest.raises(ConfigError, match="no hosts"):
        resolve_hosts(plat_client, specs)


@pytest.mark.parametrize("specs", [["h1,h1"], ["one", "one"], ["u@h", "u@h"]])
async def test_resolve_duplicates(plat_client: Any, specs: list[str]) -> None:
    with pytest.raises(ConfigError, match="more than once"):
        resolve_hosts(plat_client, specs)


# ---------------------------------------------------------------- dispatcher, locally

class LocalDispatcher:
    """The dispatcher started here as on a host; frames in, frames out."""

    def __init__(self, proc: asyncio.subprocess.Process, nonce: str) -> None:
        self.proc = proc
        self.reader = FrameReader(nonce)
        self.frames: deque[tuple[dict[str, Any], bytes]] = deque()
        self.hello: dict[str, Any] = {}

    @classmethod
    async def start(cls, header: dict[str, Any], *, env: dict[str, str] | None = None,
                    prefix: list[str] | None = None) -> LocalDispatcher:
        nonce, data = dispatcher_stdin(header)
        argv = [sys.executable, "-c", BOOTSTRAP]
        proc = await asyncio.create_subprocess_exec(
            *(prefix or []), *argv, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, limit=1 << 20)
        d = cls(proc, nonce)
        assert proc.stdin is not None
        proc.stdin.write(data)
        await proc.stdin.drain()
        head, _ = await d.next(10)
        assert head["type"] == "hello", head
        d.hello = head
        return d

    async def send(self, head: dict[str, Any], payload: bytes = b"") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode(head, payload))
        await self.proc.stdin.drain()

    async def next(self, timeout: float = 10) -> tuple[dict[str, Any], bytes]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the dispatcher")
            data = await asyncio.wait_for(self.proc.stdout.read(1 << 18), left)
            if not data:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                raise EOFError(f"dispatcher exited: {err.decode(errors='replace')}")
            self.frames.extend(self.reader.feed(data))
        return self.frames.popleft()

    async def until(self, kind: str, task_id: int | None = None, timeout: float = 10,
                    ) -> tuple[list[tuple[dict[str, Any], bytes]], dict[str, Any], bytes]:
        """Frames up to (not including) the first of ``kind`` (for ``task_id``), and it."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            head, payload = await self.next(max(0.01, deadline - time.monotonic()))
            if head.get("type") == kind and (task_id is None or head.get("id") == task_id):
                return seen, head, payload
            seen.append((head, payload))

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        await self.proc.wait()


def task(tid: int, cmd: str, **kw: Any) -> dict[str, Any]:
    return {"type": "task", "id": tid, "seq": tid + 100, "cmd": cmd, "timeout": None,
            "attempt": 1, **kw}


@pytest.fixture
async def spool(tmp_path: Path) -> Any:
    """An environment whose TMPDIR is private, to see the dispatcher's spool."""
    d = tmp_path / "tmp"
    d.mkdir()
    env = dict(os.environ, TMPDIR=str(d), SSHQ_UNIT_MARK="inherited")
    return d, env


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_dispatcher_runs_tasks(spool: Any, tmp_path: Path) -> None:
    tmpdir, env = spool
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    d = await LocalDispatcher.start({"slots": 3, "env": {"EXTRA": "x y ✓"}, "cwd": str(cwd)},
                                    env=env)
    try:
        assert d.hello["slots"] == 3 and d.hello["cores"] >= 1 and d.hello["pid"] > 0
        cmd = ('echo "$SSHQ_FARM_SEQ $SSHQ_FARM_SLOT $SSHQ_FARM_ATTEMPT $EXTRA $SSHQ_UNIT_MARK";'
               ' pwd; echo "it\'s $(echo sub)" >&2; exit 5')
        await d.send(task(1, cmd, attempt=3))
        seen, head, payload = await d.until("done", 1)
        assert [h["type"] for h, _ in seen] == ["started"]
        s = seen[0][0]
        assert s["id"] == 1 and s["pid"] > 0 and s["start"] <= head["end"]
        assert head["exit_status"] == 5 and head["signal"] is None and head["timed_out"] is False
        assert head["killed"] is False and head["start"] <= head["end"]
        n1 = head["stdout_bytes"]
        assert payload[:n1] == f"101 1 3 x y ✓ inherited\n{cwd}\n".encode()
        assert payload[n1:] == b"it's sub\n"
        await d.send({"type": "close"})
        _, bye, _ = await d.until("bye")
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
        assert list(tmpdir.iterdir()) == []   # its spool is gone
    finally:
        await d.close()


async def test_dispatcher_puts_path_prepend_before_the_tasks_path(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 1, "path_prepend": ["/opt/pp a", "/opt/pp-b"]},
                                    env=env)
    try:
        await d.send(task(1, 'echo "$PATH"'))
        _, head, payload = await d.until("done", 1)
        assert payload[:head["stdout_bytes"]] == f"/opt/pp a:/opt/pp-b:{env['PATH']}\n".encode()
    finally:
        await d.close()


async def test_dispatcher_banner_before_fence(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start(
        {"slots": 1}, env=env,
        prefix=["sh", "-c", 'printf "motd\\nSSHQ-BEGIN-nope\\n\\0\\0\\0\\1"; exec "$@"', "sh"])
    try:
        await d.send(task(0, "printf '\\0\\0\\0\\1x'"))
        _, head, payload = await d.until("done", 0)
        assert head["exit_status"] == 0 and payload == b"\0\0\0\1x"
    finally:
        await d.close()


async def test_dispatcher_respects_slots(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 2}, env=env)
    try:
        for i in range(5):
            await d.send(task(i, "sleep 0.3"))
        running = peak = 0
        done = set()
        while len(done) < 5:
            head, _ = await d.next()
            if head["type"] == "started":
                running += 1
                peak = max(peak, running)
            elif head["type"] == "done":
                running -= 1
                done.add(head["id"])
                assert head["exit_status"] == 0
        assert peak == 2
    finally:
        await d.close()


async def test_dispatcher_kill_running_task(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 2}, env=env)
    try:
        await d.send(task(1, "echo started; sleep 1000 & wait"))
        _, s, _ = await d.until("started", 1)
        await asyncio.sleep(0.3)   # let it print
        t0 = time.monotonic()
        await d.send({"type": "kill", "id": 1})
        _, head, payload = await d.until("done", 1, timeout=5)
        assert time.monotonic() - t0 < 1.5   # TERM, not the KILL 2 s later
        assert head["killed"] is True and head["exit_status"] is None
        assert head["signal"] == signal.SIGTERM
        assert payload[:head["stdout_bytes"]] == b"started\n"
        await asyncio.sleep(0.2)
        assert not pid_alive(s["pid"])
        # the whole process group went: no sleep 1000 left of this task
        await d.send(task(2, "echo next"))
        _, head, payload = await d.until("done", 2)
        assert payload == b"next\n"
    finally:
        await d.close()


async def test_dispatcher_kill_pending_task(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 1}, env=env)
    try:
        await d.send(task(1, "sleep 0.5"))
        await d.send(task(2, "echo never"))
        await d.until("started", 1)
        await d.send({"type": "kill", "id": 2})
        seen, head, payload = await d.until("done", 2, timeout=5)
        assert head["killed"] is True and head["exit_status"] is None and payload == b""
        seen2, head1, _ = await d.until("done", 1)
        assert head1["exit_status"] == 0
        assert not any(h["type"] == "started" and h["id"] == 2 for h, _ in seen + seen2)
        # killing an unknown or finished task is harmless
        await d.send({"type": "kill", "id": 99})
        await d.send({"type": "kill", "id": 1})
        await d.send({"type": "close"})
        rest, _, _ = await d.until("bye")
        assert not any(h["type"] == "started" for h, _ in rest)
    finally:
        await d.close()


async def test_dispatcher_pause_holds_queued_tasks(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 1}, env=env)
    try:
        await d.send(task(1, "sleep 0.3"))
        await d.send(task(2, "echo two"))
        await d.until("started", 1)
        await d.send({"type": "pause"})
        seen, _, _ = await d.until("done", 1)
        assert not any(h["type"] == "started" for h, _ in seen)
        with pytest.raises(TimeoutError):
            await d.until("started", 2, timeout=1.0)
        await d.send({"type": "resume"})
        _, head, payload = await d.until("done", 2)
        assert head["exit_status"] == 0 and payload == b"two\n"
    finally:
        await d.close()


async def test_dispatcher_timeout(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 3}, env=env)
    try:
        t0 = time.monotonic()
        await d.send(task(1, "sleep 1000", timeout=0.5))
        await d.send(task(2, "trap '' TERM; echo stubborn; sleep 1000; echo never", timeout=0.5))
        await d.send(task(3, "echo quick", timeout=0.5))
        results = {}
        while len(results) < 3:
            _, head, payload = await d.until("done", timeout=10)
            results[head["id"]] = (head, payload, time.monotonic() - t0)
        h1, _, el1 = results[1]
        assert h1["timed_out"] is True and h1["signal"] == signal.SIGTERM
        assert h1["exit_status"] is None
        assert h1["killed"] is False and 0.4 < el1 < 2.0
        h2, p2, el2 = results[2]
        assert h2["timed_out"] is True and h2["signal"] == signal.SIGKILL
        assert h2["exit_status"] is None
        assert 2.3 < el2 < 5 and p2[:h2["stdout_bytes"]] == b"stubborn\n"
        h3, p3, _ = results[3]
        assert h3["timed_out"] is False and h3["exit_status"] == 0 and p3 == b"quick\n"
    finally:
        await d.close()


async def test_dispatcher_spills_big_output(spool: Any) -> None:
    tmpdir, env = spool
    d = await LocalDispatcher.start({"slots": 2}, env=env)
    try:
        n_out = 3 * (1 << 20) + 12345
        cmd = (f"head -c {n_out} /dev/zero | tr '\\0' 'a'; printf 'tail'; "
               "head -c 1500000 /dev/zero | tr '\\0' 'e' >&2; echo small-not >/dev/null")
        await d.send(task(1, cmd))
        await d.send(task(2, "echo small; echo err >&2"))
        out = {1: bytearray(), 2: bytearray()}
        seen, head, payload = await d.until("done", 1, timeout=30)
        for h, p in seen:
            if h["type"] == "output":
                assert h["id"] == 1 and len(p) <= 1 << 18
                out[h["stream"]] += p
        n1 = head["stdout_bytes"]
        out[1] += payload[:n1]
        out[2] += payload[n1:]
        assert len(out[1]) == n_out + 4 and out[1].endswith(b"atail")
        assert out[1].count(b"a") == n_out + 1
        assert bytes(out[2]) == b"e" * 1500000
        assert head["exit_status"] == 0
        await d.send({"type": "close"})
        rest, _, _ = await d.until("bye", timeout=10)
        small = [(h, p) for h, p in seen + rest if h["type"] == "done" and h["id"] == 2]
        assert len(small) == 1
        h2, p2 = small[0]
        assert p2[:h2["stdout_bytes"]] == b"small\n" and p2[h2["stdout_bytes"]:] == b"err\n"
        await asyncio.wait_for(d.proc.wait(), 10)
        assert list(tmpdir.iterdir()) == []
    finally:
        await d.close()


async def test_dispatcher_dies_with_its_channel(spool: Any) -> None:
    tmpdir, env = spool
    d = await LocalDispatcher.start({"slots": 1}, env=env)
    try:
        await d.send(task(1, "sleep 1000"))
        _, s, _ = await d.until("started", 1)
        assert pid_alive(s["pid"])
        assert d.proc.stdin is not None
        d.proc.stdin.close()
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
        for _ in range(50):
            if not pid_alive(s["pid"]):
                break
            await asyncio.sleep(0.05)
        assert not pid_alive(s["pid"])
        assert list(tmpdir.iterdir()) == []
    finally:
        await d.close()


async def test_dispatcher_hostile_commands(spool: Any) -> None:
    _, env = spool
    d = await LocalDispatcher.start({"slots": 4}, env=env)
    cases = {
        0: ("printf '%s\\n' \"it's \\\"q\\\"\" 'back\\slash'", "it's \"q\"\nback\\slash\n"),
        1: ("echo $(echo sub) `echo tick` ${HOME:+set}", "sub tick set\n"),
        2: ("echo 'ünï ✓ 日本 🎉'", "ünï ✓ 日本 🎉\n"),
        3: ("printf '\\n" + FENCE.decode().strip() + "\\n'", "\n" + FENCE.decode()),
        4: ("printf '%s' " + "x" * 100000, "x" * 100000),
    }
    try:
        for i, (cmd, _) in cases.items():
            await d.send(task(i, cmd))
        got: dict[int, bytes] = {}
        while len(got) < len(cases):
            _, head, payload = await d.until("done", timeout=10)
            assert head["exit_status"] == 0, payload
            got[head["id"]] = payload[:head["stdout_bytes"]]
        for i, (_, want) in cases.items():
            assert got[i] == want.encode(), i
    finally:
        await d.close()


def collect_locally(spool: Path) -> list[tuple[dict[str, Any], bytes]]:
    """The dispatcher's ``collect`` reply for one spool, run here."""
    import subprocess

    nonce, data = dispatcher_stdin({"mode": "collect",
                                    "spools": [{"spool": str(spool), "ack": [], "tidy": False}]})
    p = subprocess.run([sys.executable, "-c", BOOTSTRAP], input=data, capture_output=True,
                       timeout=60, check=True)
    return list(FrameReader(nonce).feed(p.stdout))


def test_collect_reads_results_written_by_an_older_worker(tmp_path: Path) -> None:
    # a run detached before the dispatcher's keys became whole words: its
    # worker (the spool's own copy of the dispatcher) wrote rc/sig/t0/t1/to
    spool = tmp_path / "spool"
    (spool / "results").mkdir(parents=True)
    (spool / "tasks.jsonl").write_text("".join(
        json.dumps({"t": "task", "id": s, "seq": s, "cmd": "x"}) + "\n" for s in (1, 2, 3)))
    old = {"seq": 1, "rc": 3, "sig": None, "t0": 10.0, "t1": 11.5, "to": True, "attempt": 2,
           "node": "n1", "host": "h"}
    new = {"seq": 2, "exit_status": None, "signal": 9, "start": 20.0, "end": 21.0,
           "timed_out": False, "killed": False, "attempt": 1, "node": "n2", "host": "h"}
    (spool / "results" / "1.json").write_text(json.dumps(old))
    (spool / "results" / "1.out").write_bytes(b"one\n")
    (spool / "results" / "2.json").write_text(json.dumps(new))
    frames = collect_locally(spool)
    done = {h["id"]: h for h, _ in frames if h["type"] == "done"}
    assert set(done) == {1, 2}
    assert [(h["type"], p) for h, p in frames if h["type"] == "output"] == [("output", b"one\n")]
    assert {k: done[1][k] for k in ("exit_status", "signal", "start", "end", "timed_out",
                                    "attempt")} == {
        "exit_status": 3, "signal": None, "start": 10.0, "end": 11.5, "timed_out": True,
        "attempt": 2}
    assert {k: done[2][k] for k in ("exit_status", "signal", "start", "end", "timed_out")} == {
        "exit_status": None, "signal": 9, "start": 20.0, "end": 21.0, "timed_out": False}
    (state,) = [h for h, _ in frames if h["type"] == "state"]
    assert (state["tasks"], state["results"]) == (3, 2)
