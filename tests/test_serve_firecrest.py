"""The FirecREST v2 subset of ``sshq serve``, driven by pyfirecrest's own v2
client, unchanged, against the real sshd and Slurm (issue 11, section 2;
routes and shapes from shared/firecrest-v2-subset.md).
"""
# ruff: noqa: F401, F811  (the fixtures imported from serve_helpers)

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import firecrest
import httpx
import pytest
from firecrest.FirecrestException import FirecrestException
from serve_helpers import Server, make_token, serve_env, server


class _Auth:
    """What pyfirecrest asks of an authorization object (every version)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_access_token(self) -> str:
        return self.token


_OPEN: list[firecrest.v2.Firecrest] = []


def _client(server: Server, token: str) -> firecrest.v2.Firecrest:
    c = firecrest.v2.Firecrest(firecrest_url=f"{server.url}/firecrest",
                               authorization=_Auth(token))
    c.timeout = 120
    _OPEN.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close_session()


def _status(exc: pytest.ExceptionInfo[FirecrestException]) -> int:
    return int(exc.value.responses[-1].status_code)


def test_pyfirecrest_jobs_end_to_end(slurm_testbed: dict[str, str], server: Server,
                                     serve_env: dict[str, str], run_id: str,
                                     tmp_path: Path) -> None:
    token, _ = make_token(serve_env, "fc")
    fc = _client(server, token)
    systems = fc.systems()
    assert [s["name"] for s in systems] == ["slurm", "bg", "bg2"]
    home = Path("/home") / slurm_testbed["SSHQ_TEST_USER"]
    wd = f"{home}/sshq-test/{run_id}/fc-work"
    job = fc.submit("slurm", working_dir=wd,
                    script_str="#!/bin/bash\necho hello $GREETING from $SLURM_JOB_ID\n"
                               "echo oops >&2\n",
                    env_vars={"GREETING": "firecrest"})
    job_id = job["jobId"]
    assert job_id.isdigit()
    done = fc.wait_for_job("slurm", job_id, timeout=180)
    assert done[0]["status"]["state"] == "COMPLETED"
    assert done[0]["status"]["exitCode"] == 0
    assert done[0]["workingDirectory"] == wd
    (info,) = fc.job_info("slurm", job_id)
    assert info["jobId"] == job_id and info["time"]["end"] >= info["time"]["start"]
    assert any(j["jobId"] == job_id for j in fc.job_info("slurm"))
    assert fc.job_info("slurm", name="nobody") == []
    (meta,) = fc.job_metadata("slurm", job_id)
    assert meta["standardOutput"].endswith("/job.out")
    assert fc.view("slurm", meta["standardOutput"]) == f"hello firecrest from {job_id}\n"
    assert fc.head("slurm", meta["standardError"])["content"] == "oops\n"
    assert fc.tail("slurm", meta["standardOutput"], num_bytes=4)["content"] == f"{job_id[-3:]}\n"
    # files: the job's working directory and the run dir are the token's
    fc.mkdir("slurm", f"{wd}/sub/deeper", create_parents=True)
    src = tmp_path / "in.txt"
    src.write_bytes(b"line 1\nline 2\nline 3\n")
    fc.upload("slurm", src, f"{wd}/sub", "in.txt")
    names = {e["name"]: e for e in fc.list_files("slurm", wd)}
    assert names["sub"]["type"] == "d"
    rec = {e["name"] for e in fc.list_files("slurm", wd, recursive=True)}
    assert {"sub/in.txt", "sub/deeper"} <= rec
    st = fc.stat("slurm", f"{wd}/sub/in.txt")
    assert st["size"] == 21 and isinstance(st["mtime"], int)
    assert fc.head("slurm", f"{wd}/sub/in.txt", num_lines=2)["content"] == "line 1\nline 2\n"
    assert fc.tail("slurm", f"{wd}/sub/in.txt", num_lines=1)["content"] == "line 3\n"
    assert fc.head("slurm", f"{wd}/sub/in.txt", num_lines=1, exclude_trailing=True)[
        "content"] == "line 1\nline 2\n"
    out = tmp_path / "out.txt"
    fc.download("slurm", f"{wd}/sub/in.txt", out)
    assert out.read_bytes() == src.read_bytes()
    # '.' and '..' are resolved by name, before the confinement: inside stays allowed
    assert fc.head("slurm", f"{wd}/sub/./../sub/in.txt", num_lines=2)[
        "content"] == "line 1\nline 2\n"
    fc.rm("slurm", f"{wd}/sub")
    with pytest.raises(FirecrestException) as exc:
        fc.stat("slurm", f"{wd}/sub")
    assert _status(exc) == 404
    assert "No such file or directory" in exc.value.responses[-1].json()["message"]
    with pytest.raises(FileNotFoundError):
        fc.download("slurm", f"{wd}/nothing", out)
    with pytest.raises(FirecrestException) as exc:
        fc.mkdir("slurm", wd)
    assert _status(exc) == 400 and "File exists" in exc.value.responses[-1].json()["message"]
    # outside the run dir and the token's jobs' directories: 403
    for path in ("/etc/passwd", f"{home}/.ssh/authorized_keys", f"{wd}/../../../.ssh"):
        with pytest.raises(FirecrestException) as exc:
            fc.view("slurm", path)
        assert _status(exc) == 403, path
    with pytest.raises(FirecrestException) as exc:
        fc.mkdir("slurm", "/tmp/fc-escape")
    assert _status(exc) == 403


def test_pyfirecrest_cancel_and_errors(slurm_testbed: dict[str, str], server: Server,
                                       serve_env: dict[str, str], run_id: str) -> None:
    token, _ = make_token(serve_env, "fc2")
    limited, _ = make_token(serve_env, "fc3", "bg")
    fc = _client(server, token)
    wd = f"/home/{slurm_testbed['SSHQ_TEST_USER']}/sshq-test/{run_id}/cancel"
    job_id = fc.submit("slurm", working_dir=wd, script_str="sleep 300\n")["jobId"]
    deadline = time.monotonic() + 120
    while fc.job_info("slurm", job_id)[0]["status"]["state"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    fc.cancel_job("slurm", job_id)
    done = fc.wait_for_job("slurm", job_id, timeout=180)
    assert done[0]["status"]["state"] == "CANCELLED"
    assert done[0]["status"]["interruptSignal"] == 15
    # errors, in FirecREST's shape
    with pytest.raises(FirecrestException) as exc:
        fc.job_info("slurm", "999999999")
    assert _status(exc) == 404
    assert "Job not found" in exc.value.responses[-1].json()["message"]
    with pytest.raises(FirecrestException) as exc:
        fc.job_info("nowhere")
    assert _status(exc) == 404
    assert exc.value.responses[-1].json()["message"] == "System not found"
    with pytest.raises(FirecrestException) as exc:
        fc.submit("slurm", working_dir="relative/dir", script_str="true\n")
    assert _status(exc) == 400
    assert exc.value.responses[-1].json()["errorType"] in ("error", "validation")
    with pytest.raises(FirecrestException) as exc:
        _client(server, "sshq_wrong").systems()
    assert _status(exc) == 401
    assert exc.value.responses[-1].json()["message"] == "Access token is invalid."
    fl = _client(server, limited)
    assert [s["name"] for s in fl.systems()] == ["bg"]
    with pytest.raises(FirecrestException) as exc:
        fl.job_info("slurm")
    assert _status(exc) == 403
    # a 6 MiB upload is refused (pyfirecrest would stage it: not offered)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.post("/firecrest/filesystem/slurm/ops/upload", params={"path": wd},
                   files={"file": ("big", b"x" * (6 << 20))})
        assert r.status_code == 413 and r.json()["errorType"] == "error"
        r = c.post("/firecrest/compute/slurm/jobs", json={"job": {"script": "true"}})
        assert r.status_code == 400 and r.json()["errorType"] == "validation"
        r = c.post("/firecrest/compute/slurm/jobs", json={"job": {
            "script": "true", "workingDirectory": wd, "standardOutput": "/tmp/x"}})
        assert r.status_code == 400 and "standardOutput" in r.json()["message"]
        assert "f7t-appversion" not in r.headers
    assert token not in server.log_text()
