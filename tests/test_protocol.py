"""sshq.remote.protocol: the fenced frame parser, and the real agent run locally."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sshq.exceptions import RemoteError
from sshq.remote.protocol import (
    BOOTSTRAP,
    FrameParser,
    agent_argv,
    agent_program,
    agent_source,
    encode_request,
)

NONCE = "0123456789abcdef01234567"


def frame(obj: Any) -> bytes:
    data = json.dumps(obj).encode()
    return b"%d\n" % len(data) + data


def reply(*objs: Any, nonce: str = NONCE, banner: bytes = b"") -> bytes:
    return (banner + f"\nSSHQ-BEGIN-{nonce}\n".encode() + b"".join(frame(o) for o in objs)
            + f"0\nSSHQ-END-{nonce}\n".encode())


def parse(data: bytes, chunks: list[int] | None = None, nonce: str = NONCE
          ) -> tuple[list[Any], FrameParser]:
    p = FrameParser(nonce)
    out: list[Any] = []
    if chunks is None:
        out.extend(p.feed(data))
    else:
        i = 0
        for n in chunks:
            out.extend(p.feed(data[i:i + n]))
            i += n
        out.extend(p.feed(data[i:]))
    return out, p


FRAMES = [
    {"a": 1},
    {"text": "héllo\n日本語 \U0001F600", "nested": {"x": [1, 2, None]}},
    {"b64": base64.b64encode(bytes(range(256))).decode()},
    {},
    {"s": "SSHQ-END-" + NONCE + "\n0\n"},  # fence text inside a frame is just data
]


# -------------------------------------------------------------- the request


def test_bootstrap_is_safe_for_any_login_shell() -> None:
    assert "\n" not in BOOTSTRAP and "!" not in BOOTSTRAP and "'" not in BOOTSTRAP
    assert agent_argv() == ["python3", "-c", BOOTSTRAP]
    assert agent_argv("/opt/py/bin/python3")[0] == "/opt/py/bin/python3"


def test_encode_request_layout() -> None:
    nonce, data = encode_request("read", {"path": "/x"})
    src = agent_program()
    head, _, rest = data.partition(b"\n")
    assert int(head) == len(src)
    assert rest[: len(src)] == src
    req = json.loads(rest[len(src):])
    assert req == {"path": "/x", "op": "read", "nonce": nonce}
    assert len(nonce) >= 16 and all(c in "0123456789abcdef" for c in nonce)


def test_nonce_differs_per_call() -> None:
    nonces = {encode_request("init", {})[0] for _ in range(20)}
    assert len(nonces) == 20


# ------------------------------------------------------------------ parsing


def test_frames_in_one_chunk() -> None:
    got, p = parse(reply(*FRAMES))
    assert got == FRAMES
    assert p.started and p.finished


def test_no_frames() -> None:
    got, p = parse(reply())
    assert got == []
    assert p.finished


@pytest.mark.parametrize(
    "banner",
    [
        b"Welcome to HPC!\nMOTD: maintenance on Monday\n",
        b"12\n{\"forged\":1}\n",
        b"SSHQ-BEGIN-\n",
        b"SSHQ-BEGIN-" + NONCE[:10].encode() + b"\n",
        b"\x00\xff\xfe binary junk \r\n",
        b"x" * 100000,
    ],
)
def test_banner_before_fence_ignored(banner: bytes) -> None:
    got, p = parse(reply(*FRAMES, banner=banner))
    assert got == FRAMES
    assert p.finished


def test_forged_fence_with_wrong_nonce_ignored() -> None:
    forged = reply({"forged": True}, nonce="f" * 24)
    got, p = parse(reply({"real": True}, banner=forged))
    assert got == [{"real": True}]
    assert p.finished


def test_forged_fence_alone_yields_nothing() -> None:
    got, p = parse(reply({"forged": True}, nonce="f" * 24))
    assert got == []
    assert not p.started and not p.finished


def test_byte_by_byte() -> None:
    data = reply(*FRAMES, banner=b"banner\nSSHQ-BEGIN-zzz\n")
    got, p = parse(data, chunks=[1] * len(data))
    assert got == FRAMES
    assert p.finished


@pytest.mark.parametrize("seed", range(20))
def test_arbitrary_chunk_boundaries(seed: int) -> None:
    rng = random.Random(seed)
    data = reply(*FRAMES, banner=b"motd " * rng.randint(0, 50))
    chunks = []
    total = 0
    while total < len(data):
        n = rng.randint(0, 40)
        chunks.append(n)
        total += n
    got, p = parse(data, chunks=chunks)
    assert got == FRAMES
    assert p.finished


def test_frames_yielded_as_soon_as_complete() -> None:
    p = FrameParser(NONCE)
    data = reply({"first": 1}, {"second": 2})
    cut = data.index(b"{\"second")
    assert list(p.feed(data[:cut])) == [{"first": 1}]
    assert not p.finished
    assert list(p.feed(data[cut:])) == [{"second": 2}]
    assert p.finished


def test_truncated_reply_not_finished() -> None:
    data = reply({"a": 1})
    for cut in (len(data) - 1, len(data) - 12, len(data) - len(f"SSHQ-END-{NONCE}\n") - 1):
        got, p = parse(data[:cut])
        assert got == [{"a": 1}]
        assert not p.finished


def test_bytes_after_end_fence_ignored() -> None:
    got, p = parse(reply({"a": 1}) + b"5\n{bad}logout\n")
    assert got == [{"a": 1}]
    assert p.finished


def _started(body: bytes) -> bytes:
    return f"SSHQ-BEGIN-{NONCE}\n".encode() + body


@pytest.mark.parametrize(
    "body",
    [
        b"abc\n",
        b"-1\n{}",
        b" 2\n{}",
        b"2 \n{}",
        b"\n",
        b"9" * 40,  # a header that never ends
        b"5\n{bad}0\nSSHQ-END-" + NONCE.encode() + b"\n",
        b"3\n\xff\xfe\xfd0\nSSHQ-END-" + NONCE.encode() + b"\n",
        b"0\nSSHQ-END-" + b"f" * 24 + b"\n",
        b"0\nSSHQ-BEGIN-" + NONCE.encode() + b"\n",
    ],
)
def test_malformed_raises_remote_error(body: bytes) -> None:
    with pytest.raises(RemoteError, match="malformed"):
        parse(_started(body))


@pytest.mark.parametrize("chunk", [1, 7])
def test_malformed_raises_remote_error_when_fed_in_pieces(chunk: int) -> None:
    data = _started(b"5\n{bad}0\nSSHQ-END-" + NONCE.encode() + b"\n")
    with pytest.raises(RemoteError):
        parse(data, chunks=[chunk] * (len(data) // chunk + 1))


@pytest.mark.parametrize("obj", [5, "agent_error", None, [1]])
def test_non_object_frame_raises_remote_error(obj: Any) -> None:
    with pytest.raises(RemoteError):
        parse(reply(obj))


def test_agent_error_frame_raises() -> None:
    with pytest.raises(RemoteError, match="KeyError: 'op'"):
        parse(reply({"ok": 1}, {"agent_error": "KeyError: 'op'"}))


# --------------------------------------------------------- the real agent


def call_agent(op: str, payload: dict[str, Any], *, prefix: list[str] | None = None,
               cwd: Path | None = None) -> list[Any]:
    nonce, stdin = encode_request(op, payload)
    res = subprocess.run([*(prefix or []), *agent_argv("python3")], input=stdin,
                         capture_output=True, timeout=30, cwd=cwd)
    assert res.returncode == 0, res.stderr
    p = FrameParser(nonce)
    frames = list(p.feed(res.stdout))
    assert p.finished
    return frames


def test_real_agent_init(tmp_path: Path) -> None:
    run_dir = tmp_path / "a b" / "run $(x)"
    frames = call_agent("init", {"run_dir": str(run_dir)})
    assert len(frames) == 1
    info = frames[0]
    assert info["run_dir"] == str(run_dir)
    assert run_dir.is_dir()
    assert info["home"] == os.path.expanduser("~")
    assert info["hostname"] == socket.gethostname()
    assert info["python"].split(".")[0] == "3"


def test_real_agent_init_relative_run_dir(tmp_path: Path) -> None:
    frames = call_agent("init", {"run_dir": "rel/run"}, cwd=tmp_path)
    assert frames[0]["run_dir"] == str(tmp_path / "rel" / "run")
    assert (tmp_path / "rel" / "run").is_dir()


def test_real_agent_through_noisy_login_shell(tmp_path: Path) -> None:
    # a login shell that prints a banner, including a forged fence and frame
    noisy = ["sh", "-c",
             'echo "Welcome"; printf "SSHQ-BEGIN-forged\\n7\\n{\\"x\\":1}0\\n"; exec "$0" "$@"']
    frames = call_agent("init", {"run_dir": str(tmp_path / "r")}, prefix=noisy)
    assert [f["run_dir"] for f in frames] == [str(tmp_path / "r")]


def test_real_agent_read_invalid_utf8_exact(tmp_path: Path) -> None:
    data = b"ok\n\xff\xfe\x80 \xc3\x28 \xed\xa0\x80 end\x00\r\n" + bytes(range(256))
    path = tmp_path / "job.out"
    path.write_bytes(data)
    (f,) = call_agent("read", {"path": str(path)})
    assert f["ok"] is True
    assert base64.b64decode(f["data_b64"]) == data
    assert f["size"] == len(data)


def test_real_agent_read_offset_and_limit(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    path = tmp_path / "f"
    path.write_bytes(data)
    (f,) = call_agent("read", {"path": str(path), "offset": 10, "max_bytes": 100})
    assert base64.b64decode(f["data_b64"]) == data[10:110]
    assert f["size"] == len(data)


def test_real_agent_read_undecodable_file_name(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/name\xff.out"
    with open(raw, "wb") as fh:
        fh.write(b"\xfe")
    (f,) = call_agent("read", {"path": os.fsdecode(raw)})
    assert base64.b64decode(f["data_b64"]) == b"\xfe"


def test_real_agent_read_missing(tmp_path: Path) -> None:
    (f,) = call_agent("read", {"path": str(tmp_path / "nope")})
    assert f["ok"] is False
    assert "No such file" in f["error"]


def test_real_agent_unknown_op_is_remote_error() -> None:
    nonce, stdin = encode_request("no-such-op", {})
    res = subprocess.run(agent_argv("python3"), input=stdin, capture_output=True, timeout=30)
    p = FrameParser(nonce)
    with pytest.raises(RemoteError, match="no-such-op"):
        list(p.feed(res.stdout))


def test_program_sent_is_the_compressed_agent_source() -> None:
    # what the remote Python runs is agent_source(), byte for byte, as "sshq-agent"
    ns: dict[str, object] = {}
    real_compile = compile
    seen: list[tuple[bytes, str]] = []

    def spy(source: bytes, filename: str, mode: str) -> object:
        seen.append((source, filename))
        return real_compile(b"pass", filename, mode)

    ns["compile"] = spy
    exec(real_compile(agent_program(), "stub", "exec"), ns)
    assert seen == [(agent_source(), "sshq-agent")]
    assert len(agent_program()) < len(agent_source()) / 2
