"""sshq.Executor without a test bed: the pickled calls and their limits, the
remote runner (sshq_call.py) run here as a job would run it, the result
format against hostile bytes, the pre-flight verdict, the agent's pyenv and
read_many operations, and calls through the local platform (real background
jobs on this machine)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from sshq import (
    EnvironmentMismatchError,
    Executor,
    InvalidInputError,
    JobFailedError,
    JobState,
    RemoteFunctionError,
)
from sshq.exceptions import RemoteError
from sshq.executor import _wire
from sshq.remote import protocol
from sshq.shipped import sshq_call

# functions and classes of this module travel by value (the remote side cannot
# import a test module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Point:
    x: int
    y: int


class Boom(Exception):
    pass


def scale(p: Point, k: int = 2) -> Point:
    return Point(x=p.x * k, y=p.y * k)


def fails(n: int) -> int:
    if n == 3:
        raise Boom(f"no {n}")
    return n * 10


# ---- the runner, run here as a job runs it ---------------------------------------


def stage(tmp: Path, fn: Any, calls: list[_wire.Call], chunksize: int = 1) -> _wire.PickledCalls:
    pc = _wire.pickle_calls(fn, calls, chunksize=chunksize, max_call_bytes=1 << 20)
    (tmp / sshq_call.FN_FILE).write_bytes(pc.fn)
    for k, blob in enumerate(pc.jobs, start=1):
        (tmp / sshq_call.calls_file(k)).write_bytes(blob)
    shutil.copy(sshq_call.__file__, tmp / sshq_call.RUNNER_FILE)
    return pc


def run_runner(tmp: Path, mode: str, index: int | None, *, limit: int = 1 << 20,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = _wire.runner_argv(sys.executable, mode, max_result_bytes=limit, index=index)
    return subprocess.run(argv, cwd=tmp, capture_output=True, timeout=60,
                          env=env if env is not None else dict(os.environ,
                                                               SSHQ_JOB_LOG_DIR=str(tmp)))


def values(data: bytes) -> list[tuple[bool, Any]]:
    res = _wire.parse_result(data, where="test")
    return [_wire.settle(res.outcome(i), where="test") for i in range(max(res.calls, 1))]


def test_runner_job_writes_values_and_exceptions_atomically(tmp_path: Path) -> None:
    stage(tmp_path, fails, [((n,), {}) for n in (1, 3, 4)], chunksize=3)
    res = run_runner(tmp_path, "job", 1)
    assert res.returncode == 0, res.stderr
    data = (tmp_path / sshq_call.RESULT_FILE).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # renamed into place
    parsed = _wire.parse_result(data, where="test")
    assert (parsed.calls, parsed.chunk, parsed.load_error) == (3, True, False)
    got = values(data)
    assert got[0] == (True, 10) and got[2] == (True, 40)
    ok, exc = got[1]
    assert not ok and type(exc) is Boom and str(exc) == "no 3"
    note = "\n".join(exc.__notes__)
    assert "Remote traceback" in note and "in fails" in note and "Boom: no 3" in note
    assert "sshq_call" not in note  # the runner's own frame is left out


def test_runner_array_index_and_dataclass_round_trip(tmp_path: Path) -> None:
    stage(tmp_path, scale, [((Point(x=1, y=2),), {"k": 5}), ((Point(x=0, y=1),), {})])
    env = dict(os.environ, SSHQ_JOB_LOG_DIR=str(tmp_path), SSHQ_ARRAY_INDEX="2")
    assert run_runner(tmp_path, "job", None, env=env).returncode == 0
    assert values((tmp_path / sshq_call.RESULT_FILE).read_bytes()) == [(True, Point(x=0, y=2))]


def test_runner_task_mode_keeps_stdout_for_the_result(tmp_path: Path) -> None:
    def noisy(x: int) -> int:
        print("hello from the function")
        return x + 1

    stage(tmp_path, noisy, [((41,), {})])
    res = run_runner(tmp_path, "task", 1)
    assert res.returncode == 0
    assert values(res.stdout) == [(True, 42)]
    assert b"hello from the function" in res.stderr


def test_runner_refuses_a_result_over_the_limit(tmp_path: Path) -> None:
    stage(tmp_path, lambda: b"x" * 5000, [((), {})])
    assert run_runner(tmp_path, "job", 1, limit=1000).returncode == 0
    [(ok, err)] = values((tmp_path / sshq_call.RESULT_FILE).read_bytes())
    assert not ok and isinstance(err, RemoteFunctionError)
    assert "over the limit of 1000 bytes" in str(err)


def test_runner_reports_what_it_cannot_load_for_every_call(tmp_path: Path) -> None:
    stage(tmp_path, fails, [((1,), {})])
    (tmp_path / sshq_call.FN_FILE).write_bytes(b"not a pickle")
    assert run_runner(tmp_path, "job", 1).returncode == 0
    parsed = _wire.parse_result((tmp_path / sshq_call.RESULT_FILE).read_bytes(), where="t")
    assert parsed.load_error and parsed.outcome(0) is parsed.outcome(5)
    ok, err = _wire.settle(parsed.outcome(0), where="t")
    assert not ok and isinstance(err, pickle.UnpicklingError)


def test_runner_outside_a_job_writes_nothing(tmp_path: Path) -> None:
    stage(tmp_path, fails, [((1,), {})])
    env = {k: v for k, v in os.environ.items() if k != "SSHQ_JOB_LOG_DIR"}
    res = run_runner(tmp_path, "job", 1, env=env)
    assert res.returncode == 2 and b"SSHQ_JOB_LOG_DIR" in res.stderr
    assert not (tmp_path / sshq_call.RESULT_FILE).exists()


def test_unpicklable_remote_exception_is_a_remote_function_error(tmp_path: Path) -> None:
    def raise_with_lock() -> None:
        raise ValueError(threading.Lock())

    def exits() -> None:
        raise SystemExit(3)

    for fn, kind in ((raise_with_lock, "ValueError"), (exits, "SystemExit")):
        stage(tmp_path, fn, [((), {})])
        assert run_runner(tmp_path, "job", 1).returncode == 0
        [(ok, err)] = values((tmp_path / sshq_call.RESULT_FILE).read_bytes())
        assert not ok and isinstance(err, RemoteFunctionError), err
        assert err.remote_type == kind and f"{kind}" in err.remote_traceback
        assert "Remote traceback" in "\n".join(err.__notes__)


# ---- hostile result bytes ------------------------------------------------------------------


def good_result(tmp_path: Path) -> bytes:
    stage(tmp_path, fails, [((n,), {}) for n in (1, 3)], chunksize=2)
    run_runner(tmp_path, "job", 1)
    return (tmp_path / sshq_call.RESULT_FILE).read_bytes()


def test_every_truncation_of_a_result_is_refused_cleanly(tmp_path: Path) -> None:
    data = good_result(tmp_path)
    for n in range(len(data)):
        with pytest.raises(RemoteError):
            _wire.parse_result(data[:n], where="job 7")
    with pytest.raises(RemoteError, match="bytes after"):
        _wire.parse_result(data + b"x", where="job 7")


@pytest.mark.parametrize("bad", [
    b"SSHQ-CALL-RESULT 2\n{}\n",
    sshq_call.RESULT_MAGIC + b"[1]\n",
    sshq_call.RESULT_MAGIC + b'{"calls": -1, "chunk": false, "load_error": false}\n',
    sshq_call.RESULT_MAGIC + b'{"calls": true, "chunk": false, "load_error": false}\n',
    sshq_call.RESULT_MAGIC + b'{"calls": 1, "chunk": false, "load_error": false}\n'
    + b'{"ok": true, "size": 99999999}\nxx',
    sshq_call.RESULT_MAGIC + b'{"calls": 1, "chunk": false, "load_error": false}\n'
    + b'{"ok": "yes", "size": 0}\n',
    sshq_call.RESULT_MAGIC + b"{" + b" " * (2 << 20),
])
def test_malformed_results_raise_remote_error(bad: bytes) -> None:
    with pytest.raises(RemoteError):
        _wire.parse_result(bad, where="job 7")


def test_remote_text_is_cut() -> None:
    huge = "x" * (sshq_call.MAX_TEXT * 3)
    rec = (b'{"ok": false, "type": "E", "message": "%s", "traceback": "%s", "size": 0}\n'
           % (huge.encode(), huge.encode()))
    data = sshq_call.RESULT_MAGIC + b'{"calls": 1, "chunk": false, "load_error": false}\n' + rec
    o = _wire.parse_result(data, where="t").outcome(0)
    assert len(o.message) == len(o.traceback) == sshq_call.MAX_TEXT


# ---- pickling and limits ---------------------------------------------------------------------


def test_pickle_calls_chunks_and_limits() -> None:
    pc = _wire.pickle_calls(fails, [((n,), {}) for n in range(7)], chunksize=3,
                            max_call_bytes=1 << 20)
    assert pc.counts == (3, 3, 1) and pc.chunk and len(pc.jobs) == 3
    with pytest.raises(InvalidInputError, match=r"arguments of call 2 of .*over the limit of 1000"):
        _wire.pickle_calls(fails, [((1,), {}), ((b"x" * 2000,), {})], chunksize=1,
                           max_call_bytes=1000)
    big = b"y" * 5000
    with pytest.raises(InvalidInputError, match="function .* over the limit of 1000 bytes"):
        _wire.pickle_calls(lambda: big, [((), {})], chunksize=1, max_call_bytes=1000)
    gen = (i for i in range(3))
    with pytest.raises(InvalidInputError, match="cannot pickle the arguments of call 1"):
        _wire.pickle_calls(fails, [((gen,), {})], chunksize=1, max_call_bytes=1 << 20)


# ---- the pre-flight verdict ------------------------------------------------------------------


LOCAL = ("3.11.7", "3.1.3")


def env(version: tuple[int, int, int], cp: str = "3.1.3", err: str = "") -> _wire.PyEnv:
    return _wire.PyEnv(version=version, cloudpickle=cp, cloudpickle_error=err, executable="/p")


def test_environment_rule() -> None:
    _wire.check_pyenv(env((3, 11, 2)), host="h", python="py", local=LOCAL)  # micro may differ
    with pytest.raises(EnvironmentMismatchError) as info:
        _wire.check_pyenv(env((3, 10, 12)), host="h", python="/v/bin/python", local=LOCAL)
    msg = str(info.value)
    assert "Python 3.10.12" in msg and "Python 3.11.7" in msg and "fix:" in msg
    assert "\n" not in msg and info.value.remote_python == "3.10.12"
    with pytest.raises(EnvironmentMismatchError, match="cloudpickle 2.2.1.*cloudpickle 3.1.3"):
        _wire.check_pyenv(env((3, 11, 7), "2.2.1"), host="h", python="py", local=LOCAL)
    with pytest.raises(EnvironmentMismatchError, match="no cloudpickle \\(ModuleNotFound"):
        _wire.check_pyenv(env((3, 11, 7), "", "ModuleNotFoundError: x"), host="h",
                          python="py", local=LOCAL)


@pytest.mark.parametrize("reply", [
    {}, {"stdout": 5}, {"stdout": "SSHQ-PYENV {bad json"},
    {"stdout": 'SSHQ-PYENV {"version": [3, "11", 2]}'},
    {"stdout": 'SSHQ-PYENV {"version": [3, 11, 99999]}'},
    {"exit": 127, "stdout": "", "stderr": "nopython: No such file or directory"},
])
def test_an_interpreter_that_gives_no_version_is_a_mismatch(reply: dict[str, Any]) -> None:
    with pytest.raises(EnvironmentMismatchError, match="cannot run the remote python"):
        _wire.parse_pyenv(reply, host="h", python="nopython")


# ---- the agent's operations, run here -----------------------------------------------------


def agent(op: str, payload: dict[str, Any]) -> dict[str, Any]:
    nonce, stdin = protocol.encode_request(op, payload)
    res = subprocess.run(["python3", "-c", protocol.BOOTSTRAP], input=stdin,
                         capture_output=True, timeout=60)
    frames = list(protocol.FrameParser(nonce).feed(res.stdout))
    assert frames, res.stderr
    return frames[0]


def test_agent_pyenv_reports_an_interpreter(tmp_path: Path) -> None:
    reply = agent("pyenv", {"python": sys.executable, "run_dir": str(tmp_path / "run")})
    found = _wire.parse_pyenv(reply, host="here", python=sys.executable)
    assert found.version == tuple(sys.version_info[:3])
    assert found.cloudpickle == cloudpickle.__version__
    _wire.check_pyenv(found, host="here", python=sys.executable)
    assert reply["init"]["run_dir"] == str(tmp_path / "run")
    missing = agent("pyenv", {"python": str(tmp_path / "no-python")})
    assert missing["exit"] == 127 and "init" not in missing
    with pytest.raises(EnvironmentMismatchError, match="no-python"):
        _wire.parse_pyenv(missing, host="here", python=str(tmp_path / "no-python"))


def test_agent_read_many_is_bounded_and_never_blocks(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"0123456789")
    os.mkfifo(tmp_path / "fifo")  # nobody writes it: an open for reading would hang
    files = [{"path": str(tmp_path / "a"), "offset": 2, "max_bytes": 3},
             {"path": str(tmp_path / "a"), "tail": True, "max_bytes": 4},
             {"path": str(tmp_path / "missing")},
             {"path": str(tmp_path / "fifo")},
             {"path": str(tmp_path)}]
    started = time.monotonic()
    out = agent("read_many", {"files": files})["files"]
    assert time.monotonic() - started < 30
    import base64
    assert out[0]["ok"] and base64.b64decode(out[0]["data_b64"]) == b"234"
    assert out[0]["size"] == 10 and out[0]["offset"] == 2
    assert base64.b64decode(out[1]["data_b64"]) == b"6789" and out[1]["offset"] == 6
    assert out[2] == {"ok": False, "missing": True, "error": out[2]["error"]}
    assert not out[3]["ok"] and not out[3]["missing"] and "not a regular file" in out[3]["error"]
    assert not out[4]["ok"] and not out[4]["missing"]
    budget = agent("read_many", {"files": files[:2], "budget": 4})["files"]
    assert [len(base64.b64decode(f["data_b64"])) for f in budget] == [3, 1]


# ---- the Executor on this machine: local transport, background jobs ------------------------


@pytest.fixture
def local_config(tmp_path: Path) -> Path:
    p = tmp_path / "platforms.toml"
    p.write_text(f'[platforms.here]\nhosts = ["localhost"]\ntransport = "local"\n'
                 f'job_runner = "background"\nrun_dir = "{tmp_path / "run"}"\n')
    return p


def executor(local_config: Path, tmp_path: Path, **kw: Any) -> Executor:
    return Executor("here", config=local_config, state_dir=tmp_path / "state",
                    python=sys.executable, poll_interval=0.2, max_poll_interval=0.5, **kw)


def test_executor_refuses_bad_fields_before_anything(local_config: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="sets command"):
        executor(local_config, tmp_path, command="x")
    with pytest.raises(InvalidInputError, match="unknown JobSpec field"):
        executor(local_config, tmp_path, wallclock="1:00:00")
    with pytest.raises(InvalidInputError, match="cpus"):
        executor(local_config, tmp_path, cpus=0)
    with executor(local_config, tmp_path) as ex, pytest.raises(ValueError):
        ex.map(fails, [1], chunksize=0)


def test_executor_size_limit_refused_before_submission(local_config: Path,
                                                       tmp_path: Path) -> None:
    with executor(local_config, tmp_path, max_call_bytes=1000) as ex:
        with pytest.raises(InvalidInputError, match="over the limit of 1000 bytes"):
            ex.submit(len, b"z" * 5000)
        with pytest.raises(InvalidInputError, match="call 2 of"):
            ex.map(len, [b"", b"z" * 5000])
        assert ex._loop.call(ex.client.jobs()) == []   # nothing recorded, nothing sent


def test_executor_local_submit_map_attach_and_cancel(local_config: Path,
                                                     tmp_path: Path) -> None:
    with executor(local_config, tmp_path) as ex:
        fut = ex.submit(scale, Point(x=2, y=3), k=10)
        assert fut.result(timeout=60) == Point(x=20, y=30)
        assert fut.id is not None and fut.job is not None
        assert fut.job.state is JobState.SUCCEEDED
        res = ex.map(fails, [1, 2, 4, 5, 6], chunksize=2)
        ids = [f.id for f in res.futures]
        assert len(set(ids)) == 3   # 5 calls, 2 a job: one batch of 3 background jobs
        assert list(res) == [10, 20, 40, 50, 60]
        with pytest.raises(Boom):
            list(ex.map(fails, [2, 3]))
        # attach: a chunk's future gives the chunk's values
        attached = ex.attach([ids[0], ids[4]])
        assert [f.result(timeout=60) for f in attached] == [[10, 20], [60]]
        sleeper = ex.submit(time.sleep, 300)
        deadline = time.monotonic() + 60
        while (sleeper.job is None or sleeper.job.state is not JobState.RUNNING) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sleeper.cancel() and sleeper.cancelled()
        job = ex._loop.call(ex.client.wait([sleeper.id], timeout=60))[0]
        assert job.state is JobState.FAILED and job.signal == "TERM"


def test_executor_job_that_dies_raises_job_failed(local_config: Path, tmp_path: Path) -> None:
    def die() -> None:
        sys.stderr.write("about to die\n")
        sys.stderr.flush()
        os._exit(7)

    with executor(local_config, tmp_path) as ex:
        fut = ex.submit(die)
        with pytest.raises(JobFailedError) as info:
            fut.result(timeout=60)
    err = info.value
    assert err.state == "failed" and err.exit_status == 7 and err.signal is None
    assert "about to die" in err.err_tail and "job.err ends: about to die" in str(err)
    assert err.id == fut.id and err.job is not None


def test_executor_wrong_python_queues_nothing(local_config: Path, tmp_path: Path) -> None:
    with Executor("here", config=local_config, state_dir=tmp_path / "state",
                  python=str(tmp_path / "nopython")) as ex:
        with pytest.raises(EnvironmentMismatchError, match="nopython"):
            ex.submit(fails, 1)
        assert ex._loop.call(ex.client.jobs()) == []
