"""``sshq serve`` and ``sshq token``: a real server on loopback, driven with
httpx and curl, against the real sshd and Slurm of the test bed (issue 11).
"""
# ruff: noqa: F401, F811  (the fixtures imported from serve_helpers)

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import SSHQ
from serve_helpers import (
    Server,
    make_token,
    serve_env,
    serve_platforms_toml,
    server,
    wait_job,
)

FINAL = {"succeeded", "failed", "submit-failed"}


def sshq_cmd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SSHQ, *args], env=env, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def submit(c: httpx.Client, platform: str, *jobs: dict[str, Any], **extra: Any
           ) -> list[dict[str, Any]]:
    r = c.post("/api/v1/jobs", json={"platform": platform, "jobs": list(jobs), **extra})
    assert r.status_code == 201, r.text
    out: list[dict[str, Any]] = r.json()
    return out


# ---------------------------------------------------------------- tokens


def test_token_create_list_revoke(serve_env: dict[str, str], state_dir: Path) -> None:
    r = sshq_cmd(serve_env, "token", "create", "backend", "--platform", "bg", "--expires", "3")
    assert r.returncode == 0, r.stderr
    token = r.stdout.decode().strip()
    assert r.stdout.decode() == token + "\n"  # the token alone on stdout
    assert token.startswith("sshq_") and len(token) > 40
    assert "webhook secret" in r.stderr.decode()
    # only the hash is stored
    raw = (state_dir / "sshq.db").read_bytes() + b"".join(
        p.read_bytes() for p in state_dir.glob("sshq.db-*"))
    assert token.encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw
    listed = json.loads(sshq_cmd(serve_env, "token", "list", "--json").stdout)
    assert [(t["name"], t["platforms"]) for t in listed] == [("backend", ["bg"])]
    assert listed[0]["expires"] is not None
    assert token not in json.dumps(listed)
    # a second token of that name, an unknown platform, a bad name: refused
    for args in (["backend"], ["x", "--platform", "nowhere"], ["bad name"]):
        r = sshq_cmd(serve_env, "token", "create", *args)
        assert r.returncode == 2, r
        assert r.stdout == b""
    r = sshq_cmd(serve_env, "token", "revoke", "backend")
    assert r.returncode == 0
    assert json.loads(sshq_cmd(serve_env, "token", "list", "--json").stdout) == []
    assert sshq_cmd(serve_env, "token", "revoke", "backend").returncode == 2


def test_serve_refuses_non_loopback_without_tls(serve_env: dict[str, str]) -> None:
    for listen in ("0.0.0.0:8622", "192.0.2.1:8622", "example.org:8622"):
        r = sshq_cmd(serve_env, "serve", "--listen", listen)
        assert r.returncode == 2, r
        assert b"--tls-cert" in r.stderr
    r = sshq_cmd(serve_env, "serve", "--listen", "nonsense")
    assert r.returncode == 2 and b"HOST:PORT" in r.stderr


# ---------------------------------------------------------------- auth and errors


def test_auth_and_bad_requests(server: Server, serve_env: dict[str, str]) -> None:
    full, _ = make_token(serve_env, "full")
    bg_only, _ = make_token(serve_env, "bgonly", "bg")
    with server.client(None) as anon:
        for path in ("/api/v1/platforms", "/api/v1/jobs", "/api/v1/jobs/1",
                     "/api/v1/events", "/api/v1/jobs/1/log/out"):
            r = anon.get(path)
            assert r.status_code == 401, (path, r.text)
            assert r.json() == {"detail": "missing or invalid token"}
            assert r.headers["www-authenticate"] == "Bearer"
        r = anon.post("/api/v1/jobs", json={"platform": "bg", "jobs": [{"command": "true"}]})
        assert r.status_code == 401
    for bad in ("sshq_not-a-token", full[:-1], full + "x", ""):
        with server.client(bad) as c:
            assert c.get("/api/v1/platforms").status_code == 401
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Basic {full}"}) as c:
        assert c.get("/api/v1/platforms").status_code == 401

    with server.client(full) as c:
        names = [p["name"] for p in c.get("/api/v1/platforms").json()]
        assert names == ["slurm", "bg", "bg2"]  # not the built-in localhost
        assert c.get("/api/v1/jobs/999999").status_code == 404
        assert c.get("/api/v1/jobs/notanumber").status_code == 422
        assert c.get("/api/v1/jobs/999999/log/out").status_code == 404
        assert c.get("/api/v1/jobs/1/log/passwd").status_code == 422
        assert c.get("/api/v1/jobs", params={"state": "bogus"}).status_code == 422
        assert c.get("/api/v1/jobs", params={"platform": "nowhere"}).status_code == 404
        r = c.post("/api/v1/jobs", json={"platform": "nowhere", "jobs": [{"command": "true"}]})
        assert r.status_code == 404 and "nowhere" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"platform": "localhost",
                                         "jobs": [{"command": "true"}]})
        assert r.status_code == 404
        for body in ({"platform": "bg"}, {"platform": "bg", "jobs": []},
                     {"platform": "bg", "jobs": [{"command": "true", "inputs": ["/etc/passwd"]}]},
                     {"platform": "bg", "jobs": [{"command": "true", "nodes": 0}]},
                     {"platform": "bg", "jobs": [{"command": "true"}], "extra": 1}):
            r = c.post("/api/v1/jobs", json=body)
            assert r.status_code == 422, (body, r.text)
        # refused by JobSpec: a clear message naming the job and field
        r = c.post("/api/v1/jobs", json={"platform": "bg", "jobs": [
            {"command": "true"}, {"command": "true", "name": "bad name!"}]})
        assert r.status_code == 422 and r.json()["detail"].startswith("jobs[1]: ")
        r = c.post("/api/v1/jobs", json={"platform": "bg", "jobs": [{"script": "x",
                                                                     "command": "y"}]})
        assert r.status_code == 422 and "exactly one" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"platform": "bg", "jobs": [{"command": "true"}],
                                         "callback_url": "file:///etc/passwd"})
        assert r.status_code == 422
        r = c.post("/api/v1/jobs", content=b"{", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        # size limits
        r = c.post("/api/v1/jobs", json={"platform": "bg",
                                         "jobs": [{"command": "true"}] * 1001})
        assert r.status_code == 413
        big = b'{"platform": "bg", "jobs": [{"command": "' + b"x" * (17 << 20) + b'"}]}'
        r = c.post("/api/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        assert c.get("/openapi.json").json()["paths"]["/api/v1/jobs"]
        assert c.get("/docs").status_code == 200
        (job,) = submit(c, "bg2", {"command": "true", "name": "other"})

    # a token limited to bg: 403 elsewhere, and it does not see bg2's jobs
    with server.client(bg_only) as c:
        assert [p["name"] for p in c.get("/api/v1/platforms").json()] == ["bg"]
        r = c.post("/api/v1/jobs", json={"platform": "bg2", "jobs": [{"command": "true"}]})
        assert r.status_code == 403
        assert c.get(f"/api/v1/jobs/{job['id']}").status_code == 403
        assert c.delete(f"/api/v1/jobs/{job['id']}").status_code == 403
        assert c.get(f"/api/v1/jobs/{job['id']}/log/out").status_code == 403
        assert c.get("/api/v1/jobs", params={"platform": "bg2"}).status_code == 403
        assert c.get("/api/v1/jobs").json() == []

    # revoked: 401 at once, the server still running
    assert sshq_cmd(serve_env, "token", "revoke", "full").returncode == 0
    with server.client(full) as c:
        assert c.get("/api/v1/platforms").status_code == 401
    log = server.log_text()
    assert full not in log and bg_only not in log
    assert "Traceback" not in log


# ---------------------------------------------------------------- jobs on Slurm


def test_submit_list_get_logs_kill_slurm(slurm_testbed: dict[str, str], server: Server,
                                         serve_env: dict[str, str]) -> None:
    token, _ = make_token(serve_env, "t")
    with server.client(token) as c:
        ok, long = submit(c, "slurm",
                          {"command": "echo hello from $SLURM_JOB_ID; echo oops >&2",
                           "name": "hello", "walltime": "0:05:00"},
                          {"command": "sleep 300", "name": "long", "walltime": 600})
        assert ok["platform"] == "slurm" and ok["job_runner"] == "slurm" and ok["job_id"]
        assert ok["state"] == "submitted" and "last_poll" in ok
        done = wait_job(c, ok["id"], FINAL)
        assert done["state"] == "succeeded" and done["exit_status"] == 0
        assert done["last_poll"] is not None
        r = c.get(f"/api/v1/jobs/{ok['id']}/log/out")
        assert r.status_code == 200
        assert r.content == f"hello from {ok['job_id']}\n".encode()
        assert c.get(f"/api/v1/jobs/{ok['id']}/log/err").content == b"oops\n"
        assert c.get(f"/api/v1/jobs/{ok['id']}/log/out", params={"offset": 6}).content == \
            f"from {ok['job_id']}\n".encode()
        status = c.get(f"/api/v1/jobs/{ok['id']}/log/status").text
        assert "SSHQ_JOB_EXIT_STATUS=0" in status
        # the list, from the database
        ids = [j["id"] for j in c.get("/api/v1/jobs").json()]
        assert ids == [ok["id"], long["id"]]
        assert [j["id"] for j in c.get("/api/v1/jobs", params={"state": "succeeded"}).json()
                ] == [ok["id"]]
        assert [j["id"] for j in c.get("/api/v1/jobs", params={"limit": 1}).json()
                ] == [long["id"]]
        assert c.get("/api/v1/jobs", params={"platform": "bg"}).json() == []
        # the same job object as `sshq jobs --json`
        cli = json.loads(sshq_cmd(serve_env, "jobs", "--json").stdout)
        got = c.get(f"/api/v1/jobs/{ok['id']}").json()
        assert {k: v for k, v in got.items() if k != "last_poll"} == cli[0]
        # kill
        wait_job(c, long["id"], {"running"})
        r = c.delete(f"/api/v1/jobs/{long['id']}")
        assert r.status_code == 200, r.text
        killed = wait_job(c, long["id"], FINAL)
        assert killed["state"] == "failed" and killed["signal"] == "TERM"
    assert token not in server.log_text()


def test_curl_submit_and_read(slurm_testbed: dict[str, str], server: Server,
                              serve_env: dict[str, str]) -> None:
    """A client that is not Python: curl."""
    token, _ = make_token(serve_env, "curl")
    body = json.dumps({"platform": "slurm", "jobs": [{"command": "echo via curl"}]})

    def curl(*args: str) -> tuple[int, bytes]:
        r = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H",
                            f"Authorization: Bearer {token}", *args], capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        out, _, code = r.stdout.rpartition(b"\n")
        return int(code), out

    code, out = curl("-H", "Content-Type: application/json", "-d", body,
                     f"{server.url}/api/v1/jobs")
    assert code == 201
    (job,) = json.loads(out)
    deadline = time.monotonic() + 180
    while True:
        code, out = curl(f"{server.url}/api/v1/jobs/{job['id']}")
        assert code == 200
        if json.loads(out)["state"] in FINAL or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert json.loads(out)["state"] == "succeeded"
    assert curl(f"{server.url}/api/v1/jobs/{job['id']}/log/out") == (200, b"via curl\n")
    code, _ = curl(f"{server.url}/api/v1/jobs/{job['id']}/log/nope")
    assert code == 422
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                        f"{server.url}/api/v1/jobs"], capture_output=True, timeout=60)
    assert r.stdout == b"401"


def test_follow_log_streams_until_the_end(slurm_testbed: dict[str, str], server: Server,
                                          serve_env: dict[str, str]) -> None:
    token, _ = make_token(serve_env, "f")
    with server.client(token) as c:
        (job,) = submit(c, "slurm", {"command": "for i in 1 2 3 4 5; do echo line $i;"
                                     " sleep 1; done", "name": "follow"})
        chunks = []
        with c.stream("GET", f"/api/v1/jobs/{job['id']}/log/out",
                      params={"follow": "true"}) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                chunks.append(chunk)
        # the stream ended by itself, with everything, the job final
        assert b"".join(chunks) == b"".join(b"line %d\n" % i for i in range(1, 6))
        assert len(chunks) > 1  # it came as it was written
        assert c.get(f"/api/v1/jobs/{job['id']}").json()["state"] in FINAL
        with c.stream("GET", f"/api/v1/jobs/{job['id']}/log/out",
                      params={"follow": "true", "offset": 7}) as r:
            assert r.read() == b"".join(b"line %d\n" % i for i in range(2, 6))


# ---------------------------------------------------------------- events


def read_events(c: httpx.Client, *, last_event_id: str | None = None,
                until: Any = None, timeout: float = 180) -> list[tuple[int, dict[str, Any]]]:
    """Read the event stream until ``until(events)`` is true."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    params = {} if last_event_id else {"after": "0"}
    got: list[tuple[int, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    with c.stream("GET", "/api/v1/events", headers=headers, params=params,
                  timeout=httpx.Timeout(timeout, read=30)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        eid = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                eid = int(line[4:])
            elif line.startswith("data: "):
                assert eid is not None
                got.append((eid, json.loads(line[6:])))
                if until(got):
                    return got
            assert time.monotonic() < deadline, got
    return got


def test_events_and_resume(slurm_testbed: dict[str, str], server: Server,
                           serve_env: dict[str, str]) -> None:
    token, _ = make_token(serve_env, "ev")
    other, _ = make_token(serve_env, "other", "bg2")
    with server.client(token) as c:
        (job,) = submit(c, "slurm", {"command": "sleep 4", "name": "ev"})

        def final(evs: list[tuple[int, dict[str, Any]]]) -> bool:
            return any(e["id"] == job["id"] and e["state"] in FINAL for _, e in evs)

        events = read_events(c, until=final)
        mine = [(i, e) for i, e in events if e["id"] == job["id"]]
        assert [e["state"] for _, e in mine] == ["submitted", "running", "succeeded"]
        ids = [i for i, _ in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        # resume after the first event: the rest, exactly, again
        again = read_events(c, last_event_id=str(mine[0][0]), until=final)
        assert [e["state"] for i, e in again if e["id"] == job["id"]] == \
            ["running", "succeeded"]
        assert [i for i, _ in again] == [i for i, _ in events if i > mine[0][0]]
    # a token limited to bg2 sees none of slurm's events
    with server.client(other) as c, c.stream("GET", "/api/v1/events",
                                              params={"after": "0"}, timeout=5) as r:
        lines: list[str] = []
        with pytest.raises(httpx.ReadTimeout):
            for line in r.iter_lines():
                lines.append(line)
        assert not [x for x in lines if x.startswith("data:")]
        assert c.get("/api/v1/events", headers={"Last-Event-ID": "x"}).status_code == 422


# ---------------------------------------------------------------- idempotency


def test_idempotent_retry(slurm_testbed: dict[str, str], server: Server,
                          serve_env: dict[str, str], state_dir: Path) -> None:
    token, _ = make_token(serve_env, "idem")
    other, _ = make_token(serve_env, "idem2")
    body = {"platform": "slurm", "jobs": [{"command": "true", "name": "i1"},
                                          {"command": "true", "name": "i2"}]}
    with server.client(token) as c:
        r1 = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert r1.status_code == 201 and "idempotent-replayed" not in r1.headers
        r2 = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert r2.status_code == 201 and r2.headers["idempotent-replayed"] == "true"
        assert [j["id"] for j in r2.json()] == [j["id"] for j in r1.json()]
        r3 = c.post("/api/v1/jobs", json=dict(body, jobs=body["jobs"][:1]),
                    headers={"Idempotency-Key": "k-1"})
        assert r3.status_code == 422 and "another request body" in r3.json()["detail"]
        bad = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "a b"})
        assert bad.status_code == 422
    # the key is the token's own: another token's same key submits anew
    with server.client(other) as c:
        r4 = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert r4.status_code == 201 and "idempotent-replayed" not in r4.headers
    # across a restart too
    server.stop()
    server.start()
    with server.client(token) as c:
        r5 = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert r5.headers["idempotent-replayed"] == "true"
        assert [j["id"] for j in r5.json()] == [j["id"] for j in r1.json()]
    db = sqlite3.connect(state_dir / "sshq.db")
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 4


def _remote(testbed: dict[str, str], command: str) -> str:
    r = subprocess.run(
        ["ssh", "-p", testbed["SSHQ_TEST_PORT"], "-i", testbed["SSHQ_TEST_KEY"],
         "-o", f"UserKnownHostsFile={testbed['SSHQ_TEST_KNOWN_HOSTS']}", "-o", "BatchMode=yes",
         f"{testbed['SSHQ_TEST_USER']}@{testbed['SSHQ_TEST_HOST']}", command],
        capture_output=True, timeout=60)
    return r.stdout.decode()


def _count_submits(testbed: dict[str, str], run_dir: str, name: str) -> int:
    """How many job log directories NN the remote side holds for a job name."""
    out = _remote(testbed, f"ls -d {run_dir}/log/job/{name}/[0-9]* 2>/dev/null | wc -l")
    return int(out.strip() or 0)


@pytest.mark.parametrize("moment", ["reserved", "sent"])
def test_sigkill_mid_submit_loses_nothing(slurm_testbed: dict[str, str], server: Server,
                                          serve_env: dict[str, str], state_dir: Path,
                                          run_id: str, moment: str) -> None:
    """SIGKILL the server mid-submit, restart it, retry the POST: no job lost,
    none submitted twice, and the event stream resumes from Last-Event-ID.

    ``reserved``: killed as soon as the batch's rows are reserved (nothing
    sent yet: the retry submits it).  ``sent``: killed once the agent has
    begun on the cluster (the retry returns the same jobs, which the poller
    adopts from their job status files).
    """
    token, _ = make_token(serve_env, "crash")
    names = [f"crash{i}" for i in range(6)]
    body = {"platform": "slurm", "jobs": [{"command": "echo done", "name": n} for n in names]}
    db = sqlite3.connect(state_dir / "sshq.db")
    with server.client(token) as c:
        # (remote-init first, so that the run dir below exists)
        submit(c, "slurm", {"command": "true", "name": "warmup"})
        run_dir = Path("/home") / slurm_testbed["SSHQ_TEST_USER"] / "sshq-test" / run_id
        last_event = db.execute("SELECT MAX(id) FROM api_events").fetchone()[0] or 0

        def post() -> None:
            try:
                c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "crash-1"})
            except httpx.HTTPError:
                pass  # the server died under it

        t = threading.Thread(target=post)
        t.start()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline
            if moment == "reserved":
                if db.execute("SELECT COUNT(*) FROM api_jobs").fetchone()[0] > 1:
                    break
            elif any((run_dir / "log" / "job" / n).exists() for n in names):
                break  # (the test runs as root, on the cluster's own machine)
            time.sleep(0.001)
        server.stop(signal.SIGKILL)
        t.join(30)
    reserved = [r[0] for r in db.execute("SELECT job FROM api_jobs ORDER BY job")][1:]
    unrecorded = db.execute("SELECT COUNT(*) FROM jobs WHERE job_id=''").fetchone()[0]
    assert unrecorded > 0  # the server died before it recorded the outcome
    server.start()
    with server.client(token) as c:
        r = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "crash-1"})
        assert r.status_code == 201, r.text
        got = [j["id"] for j in r.json()]
        if r.headers.get("idempotent-replayed") == "true":
            assert got == reserved
        else:  # nothing had been sent: the rows were dropped, the batch sent now
            assert moment == "reserved" and not set(got) & set(reserved)
        final = [wait_job(c, i, FINAL) for i in got]
        r = c.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "crash-1"})
        assert [j["id"] for j in r.json()] == got
        events = read_events(c, last_event_id=str(last_event), until=lambda evs: all(
            any(e["id"] == i and e["state"] in FINAL for _, e in evs) for i in got))
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == len(names) + 1
    for j, name in zip(final, names, strict=True):
        assert j["name"] == name
        # adopted and run, or provably never sent: never twice
        n = _count_submits(slurm_testbed, f"~/sshq-test/{run_id}", name)
        if j["state"] == "succeeded":
            assert n == 1, j
        else:
            assert j["state"] == "submit-failed" and "never submitted" in j["message"], j
            assert n == 0
        assert [e["state"] for _, e in events if e["id"] == j["id"]][-1] == j["state"]
    if moment == "sent":  # rows without job ids, the same ids, run: adopted
        assert got == reserved
        assert any(j["state"] == "succeeded" for j in final)


# ---------------------------------------------------------------- webhooks


class Receiver:
    """A small local HTTP server that records webhook POSTs (and fails the first
    ``fail_first`` of them with a 500)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.calls = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls += 1
                if outer.calls <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.got.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


def test_webhook_signed_retried(slurm_testbed: dict[str, str], server: Server,
                                serve_env: dict[str, str], receiver: Receiver) -> None:
    token, secret = make_token(serve_env, "hook")
    with server.client(token) as c:
        (job,) = submit(c, "slurm", {"command": "sleep 4", "name": "hooked"},
                        callback_url=receiver.url)
        (plain,) = submit(c, "slurm", {"command": "true", "name": "plain"})
        wait_job(c, job["id"], FINAL)
        wait_job(c, plain["id"], FINAL)
    deadline = time.monotonic() + 120
    while not any(json.loads(b)["state"] in FINAL for _, b in receiver.got):
        assert time.monotonic() < deadline, receiver.got
        time.sleep(0.2)
    states = []
    for headers, body in receiver.got:
        want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Sshq-Signature"], want)
        obj = json.loads(body)
        assert obj["id"] == job["id"]  # only the job that asked for it
        states.append(obj["state"])
    # in order, the first two attempts having failed (500) and been retried
    assert receiver.calls >= len(receiver.got) + 2
    assert states == ["submitted", "running", "succeeded"]
    ids = [int(h["X-Sshq-Event-Id"]) for h, _ in receiver.got]
    assert ids == sorted(ids)


def test_webhook_survives_restart(slurm_testbed: dict[str, str], server: Server,
                                  serve_env: dict[str, str], state_dir: Path) -> None:
    """A delivery pending when the server stops is made after it starts again."""
    token, secret = make_token(serve_env, "hook2")
    recv = Receiver(fail_first=10**6)  # refuses everything, for now
    try:
        with server.client(token) as c:
            (job,) = submit(c, "slurm", {"command": "true", "name": "later"},
                            callback_url=recv.url)
            wait_job(c, job["id"], FINAL)
        while recv.calls == 0:
            time.sleep(0.1)
        server.stop(signal.SIGKILL)
        db = sqlite3.connect(state_dir / "sshq.db")
        pending = db.execute("SELECT COUNT(*) FROM api_deliveries WHERE done IS NULL"
                             ).fetchone()[0]
        assert pending >= 1
        recv.fail_first = 0
        server.start()
        deadline = time.monotonic() + 120
        while not any(json.loads(b)["state"] == "succeeded" for _, b in recv.got):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for headers, body in recv.got:
            want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Sshq-Signature"] == want
    finally:
        recv.close()


# ---------------------------------------------------------------- outage


def test_ssh_outage_changes_no_state(slurm_testbed: dict[str, str], server: Server,
                                     serve_env: dict[str, str], run_id: str) -> None:
    """With the cluster unreachable, reads answer the last known state and the
    time of the last successful poll stays put, even after the job ended."""
    token, _ = make_token(serve_env, "out")
    with server.client(token) as c:
        (job,) = submit(c, "slurm", {"command": "sleep 6", "name": "outage"})
        before = wait_job(c, job["id"], {"running"})
        while c.get(f"/api/v1/jobs/{job['id']}").json()["last_poll"] is None:
            time.sleep(0.2)
    server.stop()
    # the same platforms, through a port where nothing listens
    cfg = Path(serve_env["SSHQ_CONFIG"])
    good = cfg.read_text()
    cfg.write_text(serve_platforms_toml(slurm_testbed, f"~/sshq-test/{run_id}", port="9"))
    mark = len(server.log_text())
    server.start()
    try:
        with server.client(token) as c:
            first = c.get(f"/api/v1/jobs/{job['id']}").json()
            # the job ends on the cluster; the server's polls fail meanwhile
            while "SSHQ_JOB_EXIT_TIME" not in _remote(
                    slurm_testbed, f"cat {job['job_log_dir']}/job.status"):
                time.sleep(0.5)
            while server.log_text()[mark:].count("failed (no state changed)") < 2:
                time.sleep(0.2)
            after = c.get(f"/api/v1/jobs/{job['id']}").json()
            assert after["state"] == before["state"] == "running"
            assert after["last_poll"] == first["last_poll"] is not None
            assert c.get("/api/v1/jobs").json()[0]["state"] == "running"
            assert "Traceback" not in server.log_text()
    finally:
        server.stop()
        cfg.write_text(good)
    server.start()
    with server.client(token) as c:
        assert wait_job(c, job["id"], FINAL)["state"] == "succeeded"


# ---------------------------------------------------------------- TLS


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls(serve_env: dict[str, str], tmp_path: Path) -> None:
    from sshq.cli.serve import parse_listen

    assert parse_listen("0.0.0.0:8622", tls=True) == ("0.0.0.0", 8622)
    assert parse_listen("[::1]:8622", tls=False) == ("::1", 8622)
    cert, key = _self_signed(tmp_path)
    r = sshq_cmd(serve_env, "serve", "--tls-cert", str(cert))
    assert r.returncode == 2 and b"both" in r.stderr
    token, _ = make_token(serve_env, "tls")
    s = Server(serve_env, tmp_path / "tls.log", "--tls-cert", str(cert), "--tls-key", str(key))
    s.start()
    try:
        assert s.url.startswith("https://127.0.0.1:")
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=s.url, verify=ctx,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            assert c.get("/api/v1/platforms").status_code == 200
        with httpx.Client(base_url=s.url.replace("https:", "http:")) as c, \
                pytest.raises(httpx.HTTPError):
            c.get("/api/v1/platforms")
    finally:
        s.stop()
