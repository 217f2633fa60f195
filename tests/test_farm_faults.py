"""Farm faults on the loopback test bed: a dispatcher killed mid-run is
restarted and its tasks run again; each task is still reported once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sshq.remote.protocol import BOOTSTRAP


def _dispatchers_of(run: str) -> set[int]:
    """The dispatchers running tasks of ``run`` (parents of the tasks' shells)."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if f"SSHQ_FARM_RUN={run}".encode() in env.split(b"\0"):
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            try:   # the task's shell, not its children: the parent runs BOOTSTRAP
                if BOOTSTRAP.encode() in Path(f"/proc/{ppid}/cmdline").read_bytes():
                    found.add(ppid)
            except OSError:
                continue
    return found


def test_killed_dispatcher_is_restarted_and_every_task_reported_once(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    n = 40
    batch = tmp_path / "b.txt"
    batch.write_text("".join("sleep 0.3; echo k-$SSHQ_FARM_SEQ\n" for _ in range(n)))
    name = f"kill-disp-{os.getpid()}"
    out = tmp_path / "out.jsonl"
    with open(out, "wb") as fo:
        proc = subprocess.Popen([sys.executable, "-m", "sshq", "farm", str(batch), "--hosts",
                                 "bg", "--slots", "2", "--run", name],
                                stdout=fo, stderr=subprocess.PIPE, env=cli_env)
    try:
        deadline = time.monotonic() + 60
        victims: set[int] = set()
        while not victims:
            assert time.monotonic() < deadline, "no task of the run appeared"
            if out.read_bytes().count(b"\n") >= 4:
                victims = _dispatchers_of(name)
            time.sleep(0.05)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    got = [json.loads(x) for x in out.read_bytes().splitlines()]
    assert sorted(r["seq"] for r in got) == list(range(1, n + 1))
    assert all(r["stdout"] == f"k-{r['seq']}\n" and r["exit_status"] == 0 for r in got)
    journal = [json.loads(x) for x in
               (Path(cli_env["SSHQ_STATE_DIR"]) / "farm" / name / "journal").read_text()
               .splitlines()]
    lost = [e for e in journal if e["e"] == "lost"]
    assert lost, "the killed dispatcher's tasks were not re-queued"
    assert any(r["attempts"] >= 2 for r in got if r["seq"] in {e["seq"] for e in lost})
