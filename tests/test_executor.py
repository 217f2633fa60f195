"""sshq.Executor on the real test bed: calls as Slurm jobs (map: one job
array) through the real sshd, and as farm tasks on the loopback host.

The remote interpreter is a venv of the test user, ``~/sshq-test-venv``:
Debian's python3, the client's Python minor version, with the client's
cloudpickle version.  .ci/setup-testbed.sh makes it (the newest cloudpickle
on PyPI, as the client's ``pip install '.[test]'`` gets); the
``remote_python`` fixture makes it (or makes it again, with the client's
cloudpickle version from PyPI) when it is missing or differs.  A second venv
holds another cloudpickle version for the mismatch test, and a wrapper
around the first one that reports Python 3.6 (``py36_python``) for the
minor-version mismatch test.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from helpers import record_agent_calls
from testbed import skip_or_fail

from sshq import (
    EnvironmentMismatchError,
    Executor,
    InvalidInputError,
    JobFailedError,
    JobState,
    RemoteFunctionError,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

# this module's functions and classes travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

VENV = "sshq-test-venv"                 # under the test user's home (.ci/setup-testbed.sh)
OTHER_VENV = "sshq-test-venv-other"
OTHER_CLOUDPICKLE = "3.0.0"             # any version but the client's


def bed_ssh(testbed: dict[str, str], command: str,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a shell command as the test user, over the real sshd."""
    return subprocess.run(
        ["ssh", "-i", testbed["SSHQ_TEST_KEY"], "-p", testbed["SSHQ_TEST_PORT"],
         "-o", f"UserKnownHostsFile={testbed['SSHQ_TEST_KNOWN_HOSTS']}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         f"{testbed['SSHQ_TEST_USER']}@{testbed['SSHQ_TEST_HOST']}", command],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ensure_venv(testbed: dict[str, str], name: str, cloudpickle_version: str) -> str:
    """The absolute path of the venv's python, with that cloudpickle (made if
    missing or different)."""
    home = bed_ssh(testbed, 'printf %s "$HOME"').stdout.strip()
    venv = f"{home}/{name}"
    python = f"{venv}/bin/python"
    probe = f"{shlex.quote(python)} -c 'import cloudpickle; print(cloudpickle.__version__)'"
    if bed_ssh(testbed, probe).stdout.strip() == cloudpickle_version:
        return python
    q = shlex.quote(venv)
    made = bed_ssh(testbed, f"rm -rf {q} && python3 -m venv {q} && {q}/bin/pip install -q"
                            f" cloudpickle=={cloudpickle_version}")
    if made.returncode != 0 or bed_ssh(testbed, probe).stdout.strip() != cloudpickle_version:
        skip_or_fail(f"cannot make the remote venv {venv}: {made.stderr.strip()[-300:]}",
                     f"cannot make the remote venv {venv}: {made.stderr.strip()[-300:]}")
    return python


@pytest.fixture(scope="session")
def remote_python(slurm_testbed: dict[str, str]) -> str:
    """The test user's venv python: same Python minor and cloudpickle as here."""
    return ensure_venv(slurm_testbed, VENV, cloudpickle.__version__)


@pytest.fixture(scope="session")
def other_python(slurm_testbed: dict[str, str]) -> str:
    """A venv python of the test user with another cloudpickle version."""
    assert OTHER_CLOUDPICKLE != cloudpickle.__version__
    return ensure_venv(slurm_testbed, OTHER_VENV, OTHER_CLOUDPICKLE)


#: What the fake interpreter of :func:`py36_python` reports.
FAKE_VERSION = (3, 6, 15)
FAKE_DIR = "sshq-test-fakepy36"         # under the test user's home


@pytest.fixture(scope="session")
def py36_python(slurm_testbed: dict[str, str], remote_python: str) -> str:
    """A remote "python3.6": a wrapper script of the test user that runs the
    test venv's python (the client's cloudpickle) with a ``sitecustomize``
    module first on ``PYTHONPATH`` that replaces ``sys.version_info`` by
    ``(3, 6, 15, "final", 0)`` before any code runs.

    The test bed has no interpreter of another minor version (Debian 12:
    only 3.11), so the version is faked, but in the interpreter itself: the
    pre-flight ``pyenv`` agent op runs it as the Executor would run the calls
    and reads ``sys.version_info`` as it always does; nothing in sshq is
    patched, and only the Python version differs.
    """
    home = bed_ssh(slurm_testbed, 'printf %s "$HOME"').stdout.strip()
    base = f"{home}/{FAKE_DIR}"
    wrapper = f"{base}/bin/python3.6"
    site = (f"import sys\nsys.version_info = ({', '.join(map(str, FAKE_VERSION))},"
            " 'final', 0)\n")
    script = ("#!/bin/sh\n# sshq tests: the test venv's python, reporting Python"
              f" {'.'.join(map(str, FAKE_VERSION))} (see {base}/site/sitecustomize.py)\n"
              f'PYTHONPATH={shlex.quote(base + "/site")}${{PYTHONPATH:+:$PYTHONPATH}}'
              f' exec {shlex.quote(remote_python)} "$@"\n')
    q = shlex.quote
    made = bed_ssh(slurm_testbed,
                   f"mkdir -p {q(base + '/bin')} {q(base + '/site')}"
                   f" && printf %s {q(site)} > {q(base + '/site/sitecustomize.py')}"
                   f" && printf %s {q(script)} > {q(wrapper)} && chmod 755 {q(wrapper)}")
    assert made.returncode == 0, made.stderr
    probe = bed_ssh(slurm_testbed, f"{q(wrapper)} -c 'import sys, cloudpickle;"
                                   " print(sys.version_info[:3], cloudpickle.__version__)'")
    assert probe.stdout.split() == [*f"{FAKE_VERSION}".split(), cloudpickle.__version__], probe
    return wrapper


@pytest.fixture
def make_executor(config_file: Path, state_dir: Path,
                  remote_python: str) -> Iterator[Callable[..., Executor]]:
    made: list[Executor] = []

    def make(platform: str = "slurm", **kw: Any) -> Executor:
        kw.setdefault("python", remote_python)
        ex = Executor(platform, config=config_file, state_dir=state_dir, poll_interval=0.5,
                      max_poll_interval=2.0, walltime="0:10:00", **kw)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Sample:
    name: str
    values: tuple[float, ...]
    tags: frozenset[str]


class Boom(Exception):
    pass


def square(x: int) -> int:
    return x * x


def describe(sample: Sample, *, scale: float = 1.0, suffix: str = "") -> Sample:
    return Sample(name=sample.name + suffix, values=tuple(v * scale for v in sample.values),
                  tags=sample.tags | {"seen"})


def explode(n: int) -> None:
    raise Boom(f"explode({n}) failed on purpose")


def square_or_fail(x: int) -> int:
    """x * x, but call 7 raises and call 13 ends its process (and so its job)."""
    if x == 7:
        raise Boom(f"no {x}")
    if x == 13:
        sys.stderr.write(f"dying at {x}\n")
        sys.stderr.flush()
        os._exit(9)
    return x * x


def count_rounds(ex: Executor) -> list[int]:
    """Count the Executor's collection rounds (each appends a 1)."""
    rounds: list[int] = []
    real = ex._round

    async def counted() -> None:
        rounds.append(1)
        await real()

    ex._round = counted  # type: ignore[method-assign]
    return rounds


def where_am_i(x: int) -> dict[str, Any]:
    return {"x": x, "farm_run": os.environ.get("SSHQ_FARM_RUN"),
            "job_id": os.environ.get("SLURM_JOB_ID"), "python": sys.executable}


def wait_running(fut: Any, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while fut.job is None or fut.job.state is not JobState.RUNNING:
        assert time.monotonic() < deadline, f"job not running in time: {fut.job}"
        assert not fut.done(), fut.exception()
        time.sleep(0.5)


def test_calls_return_values_lambda_function_kwargs_dataclass(
        make_executor: Callable[..., Executor], remote_python: str) -> None:
    ex = make_executor()
    sample = Sample(name="s", values=(1.0, 2.5), tags=frozenset({"a"}))
    futs = [ex.submit(lambda x, y: x ** y, 2, 10),
            ex.submit(square, 12),
            ex.submit(describe, sample, scale=2.0, suffix="-2"),
            ex.submit(where_am_i, 5)]
    assert futs[0].result(timeout=300) == 1024
    assert futs[1].result(timeout=300) == 144
    assert futs[2].result(timeout=300) == Sample(name="s-2", values=(2.0, 5.0),
                                                  tags=frozenset({"a", "seen"}))
    info = futs[3].result(timeout=300)
    assert info["python"].startswith(remote_python.rsplit("/bin/", 1)[0])
    assert info["job_id"] and info["farm_run"] is None
    ids = [f.id for f in futs]
    assert len(set(ids)) == 4 and all(isinstance(i, int) for i in ids)
    for f in futs:
        assert f.job is not None and f.job.job_runner == "slurm"
        assert f.job.state is JobState.SUCCEEDED


def test_map_is_one_array_submission(make_executor: Callable[..., Executor],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ex = make_executor()
    ex.submit(square, 1).result(timeout=300)  # the pre-flight check, out of the count
    calls = record_agent_calls(monkeypatch)
    rounds = count_rounds(ex)
    res = ex.map(square, range(20))
    assert [c["op"] for c in calls] == ["submit"]  # one SSH command sent it all
    assert list(res) == [i * i for i in range(20)]
    # each poll round is ONE agent call (one SSH command): the results ride on it
    assert [c["op"] for c in calls] == ["submit"] + ["poll"] * len(rounds)
    jobs = [f.job for f in res.futures]
    assert len({f.id for f in res.futures}) == 20
    array_ids = {j.job_id.split("_")[0] for j in jobs if j is not None}
    assert len(array_ids) == 1, array_ids   # elements of one array job
    assert sorted(int(j.job_id.split("_")[1]) for j in jobs if j) == list(range(1, 21))

    calls.clear()
    rounds.clear()
    res5 = ex.map(square, range(20), chunksize=5)
    assert [c["op"] for c in calls] == ["submit"]
    assert list(res5) == [i * i for i in range(20)]
    elements = {f.job.job_id for f in res5.futures if f.job is not None}
    assert len({f.id for f in res5.futures}) == 4 and len(elements) == 4
    assert len({e.split("_")[0] for e in elements}) == 1
    assert [c["op"] for c in calls] == ["submit"] + ["poll"] * len(rounds)


def test_map_errors_come_home_on_the_poll(make_executor: Callable[..., Executor],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ex = make_executor()
    ex.submit(square, 1).result(timeout=300)
    calls = record_agent_calls(monkeypatch)
    rounds = count_rounds(ex)
    res = ex.map(square_or_fail, range(20), chunksize=5)   # 4 array elements
    futs = res.futures
    assert len(futs) == 20
    errors = [f.exception(timeout=300) for f in futs]
    ok = [i for i, e in enumerate(errors) if e is None]
    assert ok == [*range(7), *range(8, 10), *range(15, 20)]
    assert [futs[i].result() for i in ok] == [i * i for i in ok]
    assert isinstance(errors[7], Boom) and "no 7" in str(errors[7])
    assert "in square_or_fail" in "\n".join(errors[7].__notes__)
    for i in range(10, 15):   # the element that died: each of its calls fails with it
        err = errors[i]
        assert isinstance(err, JobFailedError) and err.exit_status == 9, err
        assert "dying at 13" in err.err_tail and err.state == "failed"
    assert [c["op"] for c in calls] == ["submit"] + ["poll"] * len(rounds)


def test_exceptions_come_home_with_the_remote_traceback(
        make_executor: Callable[..., Executor]) -> None:
    ex = make_executor()
    fut = ex.submit(explode, 7)
    with pytest.raises(Boom, match=r"explode\(7\) failed on purpose") as info:
        fut.result(timeout=300)
    note = "\n".join(info.value.__notes__)
    assert "Remote traceback" in note and "in explode" in note
    assert info.value.remote_traceback.startswith("Traceback")  # type: ignore[attr-defined]

    def unpicklable() -> None:
        import threading
        raise ValueError(threading.Lock())

    with pytest.raises(RemoteFunctionError) as rinfo:
        ex.submit(unpicklable).result(timeout=300)
    assert rinfo.value.remote_type == "ValueError"
    assert "in unpicklable" in rinfo.value.remote_traceback


def test_sshq_kill_raises_job_failed_with_the_signal(
        make_executor: Callable[..., Executor],
        sshq: Callable[..., subprocess.CompletedProcess[bytes]]) -> None:
    ex = make_executor()
    fut = ex.submit(time.sleep, 600)
    wait_running(fut)
    killed = sshq("kill", str(fut.id))
    assert killed.returncode == 0, killed.stderr
    with pytest.raises(JobFailedError) as info:
        fut.result(timeout=300)
    err = info.value
    assert err.signal in {"TERM", "KILL"} and err.state == "failed", err
    assert err.id == fut.id and f"by signal {err.signal}" in str(err)


def test_environment_mismatch_queues_nothing(
        make_executor: Callable[..., Executor], other_python: str, run_id: str) -> None:
    name = f"mismatch-{run_id}"

    def squeue_names() -> str:
        return subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"],
                              capture_output=True, text=True, timeout=60).stdout.strip()

    ex = make_executor(python="/usr/bin/python3", name=name)   # no cloudpickle there
    with pytest.raises(EnvironmentMismatchError) as info:
        ex.submit(square, 2)
    msg = str(info.value)
    assert "/usr/bin/python3" in msg and "no cloudpickle" in msg
    assert f"cloudpickle {cloudpickle.__version__}" in msg and "fix:" in msg
    ex2 = make_executor(python=other_python, name=name)
    with pytest.raises(EnvironmentMismatchError) as info2:
        ex2.map(square, range(3))
    assert info2.value.remote_cloudpickle == OTHER_CLOUDPICKLE
    assert info2.value.local_cloudpickle == cloudpickle.__version__
    assert f"cloudpickle {OTHER_CLOUDPICKLE}" in str(info2.value)
    assert squeue_names() == ""
    assert ex._loop.call(ex.client.jobs()) == []


def test_python_minor_mismatch_queues_nothing(
        make_executor: Callable[..., Executor], py36_python: str, slurm_testbed: dict[str, str],
        run_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote python of another minor version (py36_python: it reports
    3.6.15, with the client's cloudpickle) is refused by the pre-flight
    check, naming both versions and the fix; Slurm gets no job."""
    name = f"pymismatch-{run_id}"

    def bed_jobs() -> set[str]:   # the test user's jobs as squeue lists them
        out = bed_ssh(slurm_testbed, "squeue -h -u \"$USER\" -t all -o '%i %j'")
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split("\n")) - {""}

    before = bed_jobs()
    calls = record_agent_calls(monkeypatch)
    ex = make_executor(python=py36_python, name=name)
    with pytest.raises(EnvironmentMismatchError) as info:
        ex.submit(square, 2)
    with pytest.raises(EnvironmentMismatchError) as info2:
        ex.map(square, range(3))
    local = platform.python_version()
    fake = ".".join(map(str, FAKE_VERSION))
    for err in (info.value, info2.value):
        msg = str(err)
        assert err.remote_python == fake and err.local_python == local
        assert err.remote_cloudpickle == err.local_cloudpickle == cloudpickle.__version__
        assert f"is Python {fake} with cloudpickle {cloudpickle.__version__}" in msg, msg
        assert f"this client is Python {local}" in msg and py36_python in msg
        minor = ".".join(local.split(".")[:2])
        assert f"fix: give python= an interpreter of Python {minor}" in msg, msg
    # only pre-flight checks went out (no check passed, so none was cached)
    assert {c["op"] for c in calls} == {"pyenv"}, calls
    assert ex._loop.call(ex.client.jobs()) == []
    new = bed_jobs() - before
    assert not [line for line in new if line.split()[-1:] == [name]], new


CLIENT_SCRIPT = """
import json, os, signal, sys
import cloudpickle
from sshq import Executor

def slow(x):
    import time
    time.sleep(2)
    return x * 7

ex = Executor("slurm", config=sys.argv[1], state_dir=sys.argv[2], python=sys.argv[3],
              walltime="0:10:00")
fut = ex.submit(slow, 6)
res = ex.map(slow, [1, 2, 3])
print(json.dumps([fut.id] + [f.id for f in res.futures]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_client(text: str, config_file: Path, state_dir: Path, remote_python: str,
                   tmp_path: Path) -> Any:
    """Run a client script that submits, prints its handles (JSON) and
    SIGKILLs itself; return what it printed."""
    script = tmp_path / "client.py"
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), str(config_file), str(state_dir),
                           remote_python], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return json.loads(proc.stdout)


def test_attach_collects_the_results_of_a_killed_client(
        make_executor: Callable[..., Executor], config_file: Path, state_dir: Path,
        remote_python: str, tmp_path: Path) -> None:
    ids = _killed_client(CLIENT_SCRIPT, config_file, state_dir, remote_python, tmp_path)
    ex = make_executor()
    futs = ex.attach(ids)
    assert [f.result(timeout=300) for f in futs] == [42, 7, 14, 21]
    assert [f.id for f in futs] == ids


def test_hosts_runs_calls_as_farm_tasks(make_executor: Callable[..., Executor],
                                        state_dir: Path) -> None:
    ex = make_executor("bg", hosts=["bg"])
    res = ex.map(where_am_i, range(6), chunksize=2)
    got = list(res)
    assert [g["x"] for g in got] == list(range(6))
    assert all(g["farm_run"] and g["job_id"] is None for g in got)
    assert len({g["farm_run"] for g in got}) == 1   # one farm run for the map
    assert all(f.id is None and f.job is None for f in res.futures)
    assert ex._loop.call(ex.client.jobs()) == []    # no job anywhere
    with pytest.raises(Boom):
        ex.submit(explode, 1).result(timeout=300)


def sleep_with_pid(path: str) -> None:
    """Record this process's pid in ``path`` (under the remote home), then sleep."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(600)


def bed_pid(testbed: dict[str, str], path: str, timeout: float = 240) -> int:
    """The pid ``sleep_with_pid`` wrote to ``path``, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        out = bed_ssh(testbed, f"cat {path} 2>/dev/null").stdout.strip()
        if out.isdigit():
            return int(out)
        assert time.monotonic() < deadline, f"no pid in {path}"
        time.sleep(0.5)


def bed_alive(testbed: dict[str, str], pid: int) -> bool:
    return bed_ssh(testbed, f"kill -0 {pid}").returncode == 0


def wait_gone(testbed: dict[str, str], pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while bed_alive(testbed, pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.5)


def bed_exists(testbed: dict[str, str], path: str) -> bool:
    return bed_ssh(testbed, f"test -e {path}").returncode == 0


def test_cancel_stops_the_farm_tasks(make_executor: Callable[..., Executor],
                                     slurm_testbed: dict[str, str], run_id: str) -> None:
    pids = f"sshq-test-pids-{run_id}"          # in the test user's home
    try:
        check_cancel_stops_the_farm_tasks(make_executor, slurm_testbed, run_id, pids)
    finally:
        bed_ssh(slurm_testbed, f"rm -rf {pids}")


def check_cancel_stops_the_farm_tasks(make_executor: Callable[..., Executor],
                                      slurm_testbed: dict[str, str], run_id: str,
                                      pids: str) -> None:
    ex = make_executor("bg", hosts=["bg"])
    fut = ex.submit(sleep_with_pid, f"~/{pids}/submit")
    res = ex.map(sleep_with_pid, [f"~/{pids}/map-{i}" for i in range(2)])
    assert fut.task is not None and fut.id is None
    run = fut.task.split("/")[0]
    pid = bed_pid(slurm_testbed, f"{pids}/submit")
    map_pids = [bed_pid(slurm_testbed, f"{pids}/map-{i}") for i in range(2)]
    deps = f"sshq-test/{run_id}/farm-deps/{run}"   # the calls' files on the host
    assert bed_exists(slurm_testbed, deps)

    assert fut.cancel() and fut.cancelled()
    wait_gone(slurm_testbed, pid)                    # the dispatcher killed it
    assert not bed_exists(slurm_testbed, deps)       # removed before cancel() returned
    assert all(bed_alive(slurm_testbed, p) for p in map_pids)   # another run: goes on

    res.close()   # leaving a map early cancels its calls: its run stops
    assert all(f.cancelled() for f in res.futures)
    for p in map_pids:
        wait_gone(slurm_testbed, p)

    # a stopped run's tasks without a result are cancelled for attach too
    again = make_executor("bg").attach([fut.task, res.futures[1].task or ""])
    assert all(f.cancelled() for f in again)


CLIENT_FARM_SCRIPT = """
import json, os, signal, sys
from sshq import Executor

def slow(x):
    import time
    time.sleep(3)
    return x * 7

ex = Executor("bg", config=sys.argv[1], state_dir=sys.argv[2], python=sys.argv[3],
              hosts=["bg"])
first = ex.submit(lambda: 42)
first.result(timeout=300)                    # reported before the client dies
res = ex.map(slow, [1, 2, 3], chunksize=2)   # tasks 1 and 2 of another run
print(json.dumps([first.task] + [f.task for f in res.futures]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_attach_collects_farm_tasks_of_a_killed_client(
        make_executor: Callable[..., Executor], config_file: Path, state_dir: Path,
        remote_python: str, slurm_testbed: dict[str, str], run_id: str,
        tmp_path: Path) -> None:
    handles = _killed_client(CLIENT_FARM_SCRIPT, config_file, state_dir, remote_python,
                             tmp_path)
    run = handles[1].split("/")[0]
    assert handles[1:] == [f"{run}/1", f"{run}/1", f"{run}/2"]
    journal = state_dir / "farm" / run / "journal"
    # (the run was recorded before map returned; its tasks had no result)
    assert (state_dir / "farm" / run / "options.json").is_file()
    assert not journal.exists() or '"e":"result"' not in journal.read_text()

    ex = make_executor("bg", hosts=["bg"])
    futs = ex.attach(handles)
    # the first from its output file here; the map's run resumed (its tasks
    # re-run): a chunk's handle gives the chunk's values
    assert [f.result(timeout=300) for f in futs] == [42, [7, 14], [7, 14], [21]]
    assert [f.task for f in futs] == handles
    runs = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [ev.get("resume") for ev in runs if ev["e"] == "run"][-1:] == [True]
    ex.shutdown()
    # every task has its result: the calls' files are gone, here and on the host
    assert not (state_dir / "farm" / run / "calls").exists()
    assert not bed_exists(slurm_testbed, f"sshq-test/{run_id}/farm-deps/{run}")
    # and the results stay: attach again, without any host
    futs2 = make_executor("bg").attach(handles[1:2])
    assert futs2[0].result(timeout=60) == [7, 14]


def test_attach_refuses_bad_farm_handles(make_executor: Callable[..., Executor]) -> None:
    ex = make_executor("bg", hosts=["bg"])
    fut = ex.submit(square, 3)
    assert fut.result(timeout=300) == 9
    run = (fut.task or "").split("/")[0]
    for bad in ["no-such-run/1", f"{run}/2", f"{run}/0", f"{run}", "../x/1", f"{run}/x"]:
        with pytest.raises(InvalidInputError):
            ex.attach([bad])
    assert ex.attach([fut.task or ""])[0].result(timeout=60) == 9


async def test_futures_work_from_asyncio(make_executor: Callable[..., Executor]) -> None:
    ex = make_executor("bg", hosts=["bg"])
    fut = ex.submit(square, 9)
    assert await asyncio.wait_for(asyncio.wrap_future(fut), 300) == 81
