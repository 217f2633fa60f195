"""The dispatcher alone (run locally, as the farm runs it remotely): neither
side deadlocks when both directions are full."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from sshq.farm.wire import FrameReader, dispatcher_stdin, encode
from sshq.remote.protocol import BOOTSTRAP


def test_no_deadlock_when_both_pipes_are_full() -> None:
    # 300 tasks with 1 KiB commands (300 KiB of input, far beyond a 64 KiB pipe)
    # each printing 256 KiB (75 MiB of output), while the client writes every
    # task before it reads a byte: the dispatcher must keep taking tasks while
    # its stdout is blocked, and bounded memory must hold (output spills).
    n, size = 300, 256 * 1024
    proc = subprocess.Popen([sys.executable, "-c", BOOTSTRAP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    nonce, head = dispatcher_stdin({"slots": 4})
    proc.stdin.write(head)
    proc.stdin.flush()
    reader = FrameReader(nonce)
    frames = []
    while not frames:                      # the hello frame comes first
        frames.extend(reader.feed(proc.stdout.read1(65536)))
    assert frames[0][0]["type"] == "hello"
    pad = "#" * 1024
    written = threading.Event()

    def write_all() -> None:
        assert proc.stdin is not None
        for i in range(n):
            cmd = f"head -c {size} /dev/zero  {pad}"
            proc.stdin.write(encode({"type": "task", "id": i, "seq": i + 1, "cmd": cmd}))
        proc.stdin.write(encode({"type": "close"}))
        proc.stdin.flush()
        written.set()

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    time.sleep(3)                          # nobody reads stdout meanwhile
    assert written.wait(60), "the dispatcher stopped reading tasks while its stdout was full"
    got: dict[int, int] = {}
    out: dict[int, int] = {}
    deadline = time.monotonic() + 120
    while len(got) < n and time.monotonic() < deadline:
        data = proc.stdout.read1(1 << 20)
        if not data:
            break
        for h, payload in reader.feed(data):
            if h["type"] == "output":
                out[h["id"]] = out.get(h["id"], 0) + len(payload)
            elif h["type"] == "done":
                got[h["id"]] = out.pop(h["id"], 0) + h["stdout_bytes"]
                assert h["exit_status"] == 0
    proc.stdin.close()
    proc.wait(30)
    proc.stdout.close()
    assert len(got) == n
    assert set(got.values()) == {size}
