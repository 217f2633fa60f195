"""sshq.Executor's results ride on the poll: the agent's ``poll`` brings the
files a job's entry names once its status file records an exit (bounded,
never blocking), the restricted agent keeps those paths inside the run
directory, and a round of the Executor is one agent call per host.

Run here, without a test bed: the shipped agent as a local process, the
installed restricted agent as sshd's forced command would run it, and the
Executor on the local platform (real background jobs on this machine).  The
Slurm side is in tests/test_executor.py.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from helpers import record_agent_calls
from test_executor_wire import agent  # the shipped agent, run here
from test_restricted_local import Home, home  # noqa: F401  (a fixture)

import sshq._client.jobs as client_jobs
from sshq import Executor, JobFailedError
from sshq.exceptions import RemoteError
from sshq.shipped import sshq_call
from sshq.shipped import sshq_jobstatus as js

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Boom(Exception):
    pass


def log_dir(top: Path, name: str, *, exited: bool, result: bytes | None = b"R" * 10,
            err: bytes = b"line 1\nlast line\n") -> Path:
    """A job log directory: its status file (an exit recorded or not), a
    result file and a job.err."""
    d = top / name
    d.mkdir(parents=True)
    status = f"{js.RUNNER_NAME}=background\n{js.INIT_TIME}=2026-01-01T00:00:00Z\n"
    if exited:
        status += f"{js.EXIT_STATUS}=0\n{js.EXIT_TIME}=2026-01-01T00:00:01Z\n"
    (d / js.STATUS_FILE).write_text(status)
    if result is not None:
        (d / sshq_call.RESULT_FILE).write_bytes(result)
    (d / js.LOG_FILES["err"]).write_bytes(err)
    return d


def files_of(d: Path) -> list[dict[str, Any]]:
    return [{"path": str(d / sshq_call.RESULT_FILE), "offset": 0, "max_bytes": 1 << 20},
            {"path": str(d / js.LOG_FILES["err"]), "tail": True, "max_bytes": 5}]


def job(key: str, d: Path, files: object = None, now: bool = False,
        runner: str = "background") -> dict[str, Any]:
    j: dict[str, Any] = {"key": key, "log_dir": str(d), "job_id": "", "bare_id": "",
                         "group": [], "runner": runner}
    if files is not None:
        j["files"] = files
    if now:
        j["files_now"] = True
    return j


def data(item: dict[str, Any]) -> bytes:
    assert item["ok"], item
    return base64.b64decode(item["data_b64"])


# ---- the agent's poll --------------------------------------------------------------------


def test_poll_brings_the_files_of_jobs_that_ended_and_only_those(tmp_path: Path) -> None:
    ended = log_dir(tmp_path, "ended", exited=True)
    running = log_dir(tmp_path, "running", exited=False)
    known_final = log_dir(tmp_path, "known-final", exited=False, result=None)
    fifo_dir = log_dir(tmp_path, "fifo", exited=True, result=None)
    os.mkfifo(fifo_dir / sshq_call.RESULT_FILE)  # nobody writes it: an open would hang
    quiet = log_dir(tmp_path, "quiet", exited=True)
    started = time.monotonic()
    reply = agent("poll", {"runners": {}, "jobs": [
        job("1", ended, files_of(ended)), job("2", running, files_of(running)),
        job("3", known_final, files_of(known_final), now=True),
        job("4", fifo_dir, files_of(fifo_dir)), job("5", quiet)]})
    assert time.monotonic() - started < 30
    files = reply["files"]
    assert set(files) == {"1", "3", "4"}   # not the running job, not one that asks none
    assert [data(i) for i in files["1"]] == [b"R" * 10, b"line\n"]
    assert files["1"][0]["size"] == 10 and files["1"][0]["offset"] == 0
    assert files["3"][0] == {"ok": False, "missing": True, "error": files["3"][0]["error"]}
    assert data(files["3"][1]) == b"line\n"
    assert not files["4"][0]["ok"] and "not a regular file" in files["4"][0]["error"]
    assert reply["status"]["1"]["exited"] and not reply["status"]["2"].get("exited")
    # a poll that asks for no files has the reply it always had
    plain = agent("poll", {"runners": {}, "jobs": [job("1", ended)]})
    assert "files" not in plain and plain["status"]["1"]["exited"]


def test_poll_files_share_one_budget(tmp_path: Path) -> None:
    a = log_dir(tmp_path, "a", exited=True, result=b"a" * 6)
    b = log_dir(tmp_path, "b", exited=True, result=b"b" * 6)
    reply = agent("poll", {"runners": {}, "files_budget": 8, "jobs": [
        job("1", a, files_of(a)[:1]), job("2", b, files_of(b)[:1])]})
    got = [data(reply["files"][k][0]) for k in ("1", "2")]
    assert got == [b"a" * 6, b"b" * 2]             # cut, and says how big the file is
    assert reply["files"]["2"][0]["size"] == 6
    huge = agent("poll", {"runners": {}, "files_budget": 1 << 40,
                          "jobs": [job("1", a, [dict(files_of(a)[0], max_bytes=1 << 40)])]})
    assert data(huge["files"]["1"][0]) == b"a" * 6  # (capped by the agent, not trusted)


# ---- the restricted agent -----------------------------------------------------------------


def test_restricted_poll_files_stay_inside_the_run_dir(home: Home) -> None:  # noqa: F811
    def poll(files: object) -> dict[str, Any]:
        return home.call("poll", {"runners": {}, "jobs": [job("1", inside, files,
                                                              runner="slurm")]})

    inside = log_dir(home.run_dir / "log", "j", exited=True)
    plain = home.call("poll", {"runners": {}, "jobs": [job("1", inside, runner="slurm")]})
    assert plain["status"]["1"]["exited"] and "files" not in plain   # a poll asking none
    ok = poll(files_of(inside))
    assert [data(i) for i in ok["files"]["1"]] == [b"R" * 10, b"line\n"]
    secret = home.path / "secret"
    secret.write_bytes(b"not yours")
    (home.run_dir / "link").symlink_to(secret)
    for path in (secret, home.run_dir / "link", home.run_dir / "log" / ".." / ".." / "secret"):
        with pytest.raises(RemoteError, match=r"restricted.*(outside the run directory|'\.\.')"):
            poll([{"path": str(path), "offset": 0, "max_bytes": 100}])
        assert "refused" in home.audit()[-1] and " op=poll " in home.audit()[-1]
    for malformed in ("x", [str(secret)], [{"offset": 0}]):
        with pytest.raises(RemoteError, match="restricted"):
            poll(malformed)


# ---- the Executor on this machine: one agent call per round ------------------------------


def square(x: int) -> int:
    return x * x


def mixed(x: int) -> int:
    if x == 3:
        raise Boom(f"no {x}")
    if x == 5:
        sys.stderr.write(f"dying at {x}\n")
        sys.stderr.flush()
        os._exit(9)
    return x * x


def big(n: int) -> bytes:
    return bytes([n]) * (9 << 20)


@pytest.fixture
def local_ex(tmp_path: Path) -> Iterator[Executor]:
    conf = tmp_path / "platforms.toml"
    conf.write_text(f'[platforms.here]\nhosts = ["localhost"]\ntransport = "local"\n'
                    f'job_runner = "background"\nrun_dir = "{tmp_path / "run"}"\n')
    ex = Executor("here", config=conf, state_dir=tmp_path / "state", python=sys.executable,
                  poll_interval=0.2, max_poll_interval=0.5)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)


def count_rounds(ex: Executor) -> list[int]:
    """Count the Executor's collection rounds (each returns one more 1)."""
    rounds: list[int] = []
    real: Callable[[], Awaitable[None]] = ex._round

    async def counted() -> None:
        rounds.append(1)
        await real()

    ex._round = counted  # type: ignore[method-assign]
    return rounds


def test_a_round_is_one_poll_and_brings_values_errors_and_err_tails(
        local_ex: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    local_ex.submit(square, 1).result(timeout=60)   # the pre-flight check, out of the count
    calls = record_agent_calls(monkeypatch)
    rounds = count_rounds(local_ex)
    res = local_ex.map(mixed, range(8))
    futs = res.futures
    done = [f.exception(timeout=120) is None for f in futs]
    assert done == [True, True, True, False, True, False, True, True]
    assert [futs[i].result() for i in (0, 1, 2, 4, 6, 7)] == [0, 1, 4, 16, 36, 49]
    with pytest.raises(Boom, match="no 3"):
        futs[3].result()
    err = futs[5].exception()
    assert isinstance(err, JobFailedError) and err.exit_status == 9
    assert "dying at 5" in err.err_tail and "job.err ends: dying at 5" in str(err)
    ops = [c["op"] for c in calls]
    assert ops[0] == "submit" and set(ops[1:]) == {"poll"}, ops   # no read_many
    assert len(ops) - 1 == len(rounds), (ops, rounds)             # one per round
    assert len(futs) == 8


def test_an_agent_without_poll_files_falls_back_to_read_many(
        local_ex: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    # an installed agent older than this sshq ignores "files": so do we here,
    # by not asking for them
    monkeypatch.setattr(client_jobs, "_ask_files", lambda *a: None)
    calls = record_agent_calls(monkeypatch)
    assert list(local_ex.map(mixed, [1, 2])) == [1, 4]
    with pytest.raises(JobFailedError, match="dying at 5"):
        local_ex.submit(mixed, 5).result(timeout=60)
    assert "read_many" in [c["op"] for c in calls]


def test_results_over_the_poll_budget_are_read_on(local_ex: Executor,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    local_ex.submit(square, 1).result(timeout=60)
    calls = record_agent_calls(monkeypatch)
    values = list(local_ex.map(big, [1, 2], chunksize=1))  # 2 x 9 MiB: over 16 MiB
    assert values == [bytes([1]) * (9 << 20), bytes([2]) * (9 << 20)]
    ops = [c["op"] for c in calls]
    assert ops.count("read_many") >= 1 and ops.count("submit") == 1, ops
