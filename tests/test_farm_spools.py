"""Detached farm runs and pilot jobs (``--detach``, ``attach``, ``--via``) on the
real loopback sshd and the real single-node Slurm."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[bytes]]


def _batch(tmp_path: Path, n: int, cmd: str = "sleep 0.05; echo task-$SSHQ_FARM_SEQ") -> Path:
    p = tmp_path / "batch.txt"
    p.write_text("".join(f"{cmd}\n" for _ in range(n)))
    return p


def _results(out: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_detach_then_attach_reports_each_task_once(sshq: Run, tmp_path: Path) -> None:
    batch = _batch(tmp_path, 40)
    name = f"det-{time.time_ns()}"
    started = time.monotonic()
    res = sshq("farm", str(batch), "--hosts", "bg,local", "--detach", "--run", name)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b""                       # results come with attach
    assert f"sshq farm attach {name}".encode() in res.stderr
    assert time.monotonic() - started < 30         # it did not wait for the tasks
    first = sshq("farm", "attach", name)
    assert first.returncode == 0, first.stderr
    got = _results(first.stdout)
    assert sorted(r["seq"] for r in got) == list(range(1, 41))
    for r in got:
        assert r["stdout"] == f"task-{r['seq']}\n" and r["exit_status"] == 0
    assert {r["host"] for r in got} == {"bg", "local"}   # split over both hosts
    again = sshq("farm", "attach", name)
    assert again.returncode == 0, again.stderr
    assert again.stdout == b""                     # never reported twice


def _spool(cli_env: dict[str, str], name: str) -> Path:
    """The (first) remote spool directory of run ``name``, from its options."""
    opts = json.loads((Path(cli_env["SSHQ_STATE_DIR"]) / "farm" / name / "options.json")
                      .read_text())
    return Path(opts["spools"][0]["path"])


def test_detached_workers_survive_the_client_and_a_killed_worker_restarts(
        sshq: Run, cli_env: dict[str, str], tmp_path: Path) -> None:
    batch = _batch(tmp_path, 12, "sleep 0.3; echo ok-$SSHQ_FARM_SEQ")
    name = f"det2-{time.time_ns()}"
    assert sshq("farm", str(batch), "--hosts", "local", "--slots", "1", "--detach",
                "--run", name).returncode == 0
    spool = _spool(cli_env, name)
    assert spool.parent.parent.parent == tmp_path / "local-run"   # the platform's run_dir
    pid = int((spool / "worker.pid").read_text())
    time.sleep(1.0)
    subprocess.run(["kill", "-9", str(pid)], check=True)   # the worker dies mid-run
    res = sshq("farm", "attach", name, timeout=120)
    assert res.returncode == 0, res.stderr
    assert b"restarting" in res.stderr
    got = _results(res.stdout)
    assert sorted(r["seq"] for r in got) == list(range(1, 13))
    assert all(r["stdout"] == f"ok-{r['seq']}\n" for r in got)
    assert not spool.exists()                      # tidied once all were reported


@pytest.fixture
def gate() -> Iterator[Path]:
    """A directory the test bed's user (who runs the tasks) can write."""
    d = Path(tempfile.mkdtemp(prefix="sq-gate-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pilots() -> Iterator[list[str]]:
    """Run names whose pilot jobs are cancelled after the test, whatever happened
    (a pilot left running would hold one of the test node's 2 CPUs)."""
    names: list[str] = []
    yield names
    for name in names:
        for k in range(1, 6):
            subprocess.run(["scancel", f"--name=farm-{name}-{k}"[:67]], capture_output=True)


def test_via_slurm_pilot_jobs_share_one_queue(slurm_testbed: dict[str, str], sshq: Run,
                                              tmp_path: Path, gate: Path,
                                              pilots: list[str]) -> None:
    # the single test node has 2 CPUs: both pilots must be able to run at once,
    # so wait for jobs of earlier tests to end first
    deadline = time.monotonic() + 180
    while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                         text=True).stdout.strip() and time.monotonic() < deadline:
        time.sleep(1)
    # every task waits (at most 30 s) until both pilots have started one: proves
    # that the two pilot jobs take tasks from the same queue at the same time
    cmd = (f"touch {gate}/$SLURM_JOB_ID; n=0; while [ $(ls {gate} | wc -l) -lt 2 ]"
           " && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done; echo $SLURM_JOB_ID $SSHQ_FARM_SEQ")
    batch = _batch(tmp_path, 30, cmd)
    name = f"via-{time.time_ns()}"
    pilots.append(name)
    res = sshq("farm", str(batch), "--via", "slurm", "--nodes", "2", "--run", name,
               "--walltime", "00:05:00", timeout=240)
    assert res.returncode == 0, res.stderr
    got = _results(res.stdout)
    assert sorted(r["seq"] for r in got) == list(range(1, 31))
    job_ids = set()
    for r in got:
        job_id, seq = str(r["stdout"]).split()
        assert int(seq) == r["seq"]
        job_ids.add(job_id)
        assert str(r["host"]).startswith("slurm/")        # platform/node
    assert len(job_ids) == 2                       # the tasks ran inside the 2 pilot jobs
    jobs = json.loads(sshq("jobs", "--json").stdout)
    assert sorted(j["job_id"] for j in jobs if j["name"].startswith(f"farm-{name}")) \
        == sorted(job_ids)


def test_via_a_killed_pilots_tasks_are_taken_over(slurm_testbed: dict[str, str], sshq: Run,
                                                  cli_env: dict[str, str], tmp_path: Path,
                                                  pilots: list[str]) -> None:
    batch = _batch(tmp_path, 16, "sleep 1; echo done-$SSHQ_FARM_SEQ")
    name = f"via2-{time.time_ns()}"
    pilots.append(name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sshq", "farm", str(batch), "--via", "slurm", "--nodes", "2",
         "--run", name], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (Path(cli_env["SSHQ_STATE_DIR"]) / "farm" / name / "options.json").is_file() \
                or "spools" not in (Path(cli_env["SSHQ_STATE_DIR"]) / "farm" / name
                                    / "options.json").read_text():
            assert time.monotonic() < deadline, "the run never recorded its spool"
            time.sleep(0.2)
        workers = _spool(cli_env, name) / "workers"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if workers.is_dir() and len(list(workers.iterdir())) >= 2:
                break
        else:
            pytest.fail("the two pilots never started")
        jobs = json.loads(sshq("jobs", "--json").stdout)
        victim = next(j for j in jobs if j["name"].startswith(f"farm-{name}"))
        time.sleep(1.5)                            # both hold claimed tasks now
        assert sshq("kill", str(victim["id"])).returncode in (0, 1)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert proc.returncode == 0, err
    got = _results(out)
    assert sorted(r["seq"] for r in got) == list(range(1, 17))
    assert all(r["stdout"] == f"done-{r['seq']}\n" for r in got)


def test_attach_refuses_a_run_that_was_not_detached(sshq: Run, tmp_path: Path) -> None:
    batch = _batch(tmp_path, 2, "true")
    name = f"att-{time.time_ns()}"
    assert sshq("farm", str(batch), "--hosts", "local", "--run", name).returncode == 0
    res = sshq("farm", "attach", name)
    assert res.returncode != 0
    assert b"not detached" in res.stderr


@pytest.mark.parametrize("opt", [["--keep-order"], ["--output-dir", "/tmp/x"]])
def test_detach_refuses_options_it_cannot_honour(sshq: Run, tmp_path: Path,
                                                 opt: list[str]) -> None:
    batch = _batch(tmp_path, 2, "true")
    res = sshq("farm", str(batch), "--hosts", "local", "--detach", *opt)
    assert res.returncode == 2 and b"not available" in res.stderr

