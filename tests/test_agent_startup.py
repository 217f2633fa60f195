"""The remote agent's start-up: what every agent call imports, and its thread map.

Every agent call starts a fresh remote interpreter, so the modules the agent
imports before it reads its request are paid on every SSH command
(bench/RESULTS.md, "Where the time goes").  Run here with the local
``python3``, as the remote host would.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from sshq.remote.protocol import BOOTSTRAP, encode_request
from sshq.shipped import agent

#: Modules the agent needs only for some operations (imported there), or not
#: at all at run time (typing: type comments only).
NOT_AT_START = ("concurrent.futures", "typing", "shutil", "socket")


def test_an_agent_call_does_not_import_what_it_does_not_use(tmp_path: Path) -> None:
    """A whole agent call (bootstrap, bundle, one operation), then the modules loaded."""
    nonce, stdin = encode_request("listing", {"path": str(tmp_path)})
    probe = BOOTSTRAP + ";import sys;sys.stderr.write(repr(sorted(sys.modules)))"
    res = subprocess.run(["python3", "-S", "-c", probe], input=stdin, capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"SSHQ-END-{nonce}".encode() in res.stdout
    loaded = set(eval(res.stderr.decode().strip().splitlines()[-1]))  # noqa: S307 (our repr)
    assert {"json", "subprocess", "sshq_jobstatus"} <= loaded  # (the probe saw the agent's)
    assert not [m for m in NOT_AT_START if m in loaded]


def test_thread_map_keeps_the_order_and_uses_the_threads() -> None:
    workers = 4
    barrier = threading.Barrier(workers, timeout=60)  # (the timeout only ends a hang)
    lock = threading.Lock()
    active = [0, 0]  # now, most

    def fn(x: int) -> int:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        if x < workers:  # the first items meet: they run at once
            barrier.wait()
        with lock:
            active[0] -= 1
        return x * x

    items = list(range(25))
    assert agent.thread_map(fn, items, workers) == [x * x for x in items]
    assert active[1] == workers


def test_thread_map_does_every_item_and_raises_the_first_error() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            done.append(x)
        if x in (7, 3, 12):
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 3"):
        agent.thread_map(fn, list(range(20)), 3)
    assert sorted(done) == list(range(20))


def test_submit_all_runs_one_job_per_item_in_order(tmp_path: Path) -> None:
    """op_submit's batch, with the real agent code: results in the request's order."""
    jobs = []
    for i in range(6):
        log_dir = tmp_path / "log" / f"j{i}" / "01"
        jobs.append({
            "key": str(i), "log_dir": str(log_dir), "work_dir": str(tmp_path / "work"),
            "job_b64": "IyEvYmluL3NoCnRydWUK",  # "#!/bin/sh\ntrue\n"
            "submit_argv": ["sh", "-c", f"echo 'Submitted batch job {100 + i}'"],
            "id_regex": r"Submitted batch job (?P<id>\d+)", "runner": "slurm",
            "timeout": 60,
        })
    results = agent.submit_all({"concurrency": 3}, jobs)
    assert [r["key"] for r in results] == [str(i) for i in range(6)]
    assert [r["job_id"] for r in results] == [str(100 + i) for i in range(6)]
    assert json.loads(json.dumps(results)) == results  # (a reply frame carries them)
