"""Farm runs through ``sshq serve`` (``/api/v1/farm``, issue 11 section 1): a
real server on loopback, driven with httpx and curl; the farm's hosts are the
test bed's platforms (its sshd on 127.0.0.1, Slurm for pilot jobs).
"""
# ruff: noqa: F401, F811  (the fixtures imported from serve_helpers)

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import SSHQ
from serve_helpers import Server, make_token, serve_env, server

from sshq.server.farm import MAX_COMMAND_BYTES, MAX_COMMANDS, FarmTable
from sshq.store import Store

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(240)]

FARM = "/api/v1/farm"


def post_farm(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post(FARM, json=body)
    assert r.status_code == 202, r.text
    status: dict[str, Any] = r.json()
    assert r.headers["location"] == f"{FARM}/{status['name']}"
    return status


def jsonl(c: httpx.Client, name: str, **params: Any) -> list[dict[str, Any]]:
    """GET the results as JSON lines (every line one object)."""
    r = c.get(f"{FARM}/{name}/results", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    if not r.content:
        return []
    assert r.content.endswith(b"\n")
    return [json.loads(line) for line in r.content.split(b"\n")[:-1]]


def read_sse(c: httpx.Client, name: str, *, headers: dict[str, str] | None = None,
             params: dict[str, str] | None = None,
             until: Callable[[list[tuple[int, dict[str, Any]]]], bool] | None = None,
             ) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any] | None]:
    """Read the SSE stream: ``([(id, result), ...], end status or None)``, up to
    the ``end`` event, or until ``until(results)`` is true.  Asks for it with
    ``Accept: text/event-stream`` (as a browser's EventSource does) unless
    ``params`` has ``format``."""
    got: list[tuple[int, dict[str, Any]]] = []
    if "format" not in (params or {}):
        headers = {"Accept": "text/event-stream", **(headers or {})}
    with c.stream("GET", f"{FARM}/{name}/results", headers=headers or {},
                  params=params or {}, timeout=httpx.Timeout(180, read=60)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        eid: int | None = None
        event = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                eid = int(line[4:])
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "end":
                    return got, data
                assert event == "result" and eid is not None
                got.append((eid, data))
                eid = event = None
                if until is not None and until(got):
                    return got, None
    return got, None


def wait_status(c: httpx.Client, name: str, pred: Callable[[dict[str, Any]], bool],
                timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"{FARM}/{name}")
        assert r.status_code == 200, r.text
        st: dict[str, Any] = r.json()
        if pred(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def out_bytes(r: dict[str, Any], name: str = "stdout") -> bytes:
    if f"{name}_b64" in r:
        return base64.b64decode(r[f"{name}_b64"])
    return str(r[name]).encode()


def processes(marker: str) -> list[str]:
    """Command lines of the processes on this machine (the test bed's host)
    whose command line holds ``marker``."""
    r = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if "pgrep" not in line]


# ---------------------------------------------------------------- results


COMMANDS = ["echo one", "echo oops >&2; exit 3", "printf '\\377\\376'",
            "sleep 1; echo \"$SSHQ_FARM_SEQ of $SSHQ_FARM_RUN\"", "sleep 60"]


def test_run_results_as_jsonl_and_sse_with_resume(server: Server, serve_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    token, _ = make_token(serve_env, "farm")
    with server.client(token) as c:
        st = post_farm(c, commands=COMMANDS, hosts=["bg"], name="web1", slots=2, timeout=3,
                      speculate=False)
        assert st["name"] == "web1" and st["total"] == len(COMMANDS)
        assert st["options"]["slots"] == 2 and st["options"]["timeout"] == 3
        assert st["options"]["speculate"] is False
        assert st["hosts"] == ["bg"]
        # JSON lines: the stream follows the run to its end
        results = jsonl(c, "web1")
        by_seq = {r["seq"]: r for r in results}
        assert sorted(by_seq) == [1, 2, 3, 4, 5] and len(results) == 5
        assert by_seq[1]["stdout"] == "one\n" and by_seq[1]["exit_status"] == 0
        assert by_seq[2]["exit_status"] == 3 and by_seq[2]["stderr"] == "oops\n"
        assert out_bytes(by_seq[3]) == b"\xff\xfe" and "stdout" not in by_seq[3]
        assert by_seq[4]["stdout"] == "4 of web1\n"
        assert by_seq[5]["timed_out"] is True and by_seq[5]["signal"] == "TERM"
        st = c.get(f"{FARM}/web1").json()
        assert st["state"] == "finished" and st["finished"] is True
        assert (st["done"], st["failed"], st["reported"], st["running"]) == (3, 2, 5, 0)
        assert st["ended"] is not None and st["error"] is None

        # the same objects as `sshq farm --format jsonl` on the same batch
        batch = tmp_path / "batch"
        batch.write_text("".join(cmd + "\n" for cmd in COMMANDS))
        cli = subprocess.run([*SSHQ, "farm", str(batch), "--hosts", "bg", "--timeout", "3",
                              "--no-speculate"],
                             env=serve_env,
                             capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        cli_by_seq = {r["seq"]: r for r in map(json.loads, cli.stdout.splitlines())}
        for seq, mine in by_seq.items():
            theirs = cli_by_seq[seq]
            assert set(mine) == set(theirs), seq
            for k in set(mine) - {"start", "end", "stdout"}:
                assert mine[k] == theirs[k], (seq, k)
            if seq != 4:  # (the run's name is in its output)
                assert mine.get("stdout") == theirs.get("stdout")

        # SSE (Accept header): ids 1..n in report order, then the end with the status
        events, end = read_sse(c, "web1", headers={"Accept": "text/event-stream"})
        assert [i for i, _ in events] == [1, 2, 3, 4, 5]
        assert [r for _, r in events] == results
        assert end is not None and end["state"] == "finished" and end["reported"] == 5
        # Last-Event-ID resumes after that result; ?format=sse and ?after= too
        again, end = read_sse(c, "web1", headers={"Last-Event-ID": "2"},
                              params={"format": "sse"})
        assert again == events[2:] and end is not None
        assert jsonl(c, "web1", after=3) == results[3:]
        r = c.get(f"{FARM}/web1/results", headers={"Last-Event-ID": "x",
                                                    "Accept": "text/event-stream"})
        assert r.status_code == 422
        # the run is listed
        listed = c.get(FARM).json()
        assert [x["name"] for x in listed] == ["web1"]
        assert c.get(FARM, params={"state": "running"}).json() == []
    assert token not in server.log_text()
    assert "Traceback" not in server.log_text()


def test_results_follow_a_running_run(server: Server, serve_env: dict[str, str]) -> None:
    """A client connecting mid-run gets the results so far at once, then each
    as it is reported, and the stream ends with the run; the status counts
    the running tasks."""
    token, _ = make_token(serve_env, "follow")
    marker = f"flw{uuid.uuid4().hex[:8]}"
    gate = f"/tmp/{marker}"
    cmds = ["echo first",
            f"while [ ! -e {gate} ]; do sleep 0.2; done; echo {marker} second",
            f"while [ ! -e {gate} ]; do sleep 0.2; done; echo {marker} third"]
    with server.client(token) as c:
        post_farm(c, commands=cmds, hosts=["bg"], name="flw")
        st = wait_status(c, "flw", lambda s: s["reported"] == 1 and s["running"] == 2)
        assert st["state"] == "running" and not st["finished"] and st["done"] == 1
        # not following: what is there now, at once
        now = jsonl(c, "flw", follow="false")
        assert [r["stdout"] for r in now] == ["first\n"]
        got: list[tuple[int, dict[str, Any]]] = []

        def opened(evs: list[tuple[int, dict[str, Any]]]) -> bool:
            # the first result arrived on the open stream: let the others finish
            Path(gate).touch()
            return False

        try:
            got, end = read_sse(c, "flw", params={"format": "sse"}, until=opened)
        finally:
            Path(gate).unlink(missing_ok=True)
        assert [i for i, _ in got] == [1, 2, 3]
        assert sorted(r["stdout"] for _, r in got[1:]) == [f"{marker} second\n",
                                                            f"{marker} third\n"]
        assert end is not None and end["state"] == "finished" and end["running"] == 0


def test_curl_posts_and_reads_a_run(server: Server, serve_env: dict[str, str]) -> None:
    """A client that is not Python."""
    token, _ = make_token(serve_env, "curl")

    def curl(*args: str) -> tuple[int, bytes]:
        r = subprocess.run(["curl", "-sS", "-N", "-w", "\n%{http_code}", "-H",
                            f"Authorization: Bearer {token}", *args], capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        out, _, code = r.stdout.rpartition(b"\n")
        return int(code), out

    body = json.dumps({"commands": ["echo via curl", "echo again"], "hosts": ["bg"]})
    code, out = curl("-H", "Content-Type: application/json", "-d", body,
                     f"{server.url}{FARM}")
    assert code == 202, out
    name = json.loads(out)["name"]
    assert name.startswith("farm-")  # generated
    code, out = curl(f"{server.url}{FARM}/{name}/results")
    assert code == 200
    lines = [json.loads(x) for x in out.splitlines()]
    assert sorted(r["stdout"] for r in lines) == ["again\n", "via curl\n"]
    code, out = curl("-H", "Accept: text/event-stream", f"{server.url}{FARM}/{name}/results")
    assert code == 200
    text = out.decode()
    assert "id: 1\nevent: result\ndata: {" in text and "id: 2\n" in text
    assert "event: end\n" in text
    code, out = curl(f"{server.url}{FARM}/{name}")
    assert code == 200 and json.loads(out)["state"] == "finished"


# ---------------------------------------------------------------- refusals


def test_auth_limits_and_bad_requests(server: Server, serve_env: dict[str, str],
                                      state_dir: Path) -> None:
    full, _ = make_token(serve_env, "full")
    bg2_only, _ = make_token(serve_env, "bg2only", "bg2")
    ok = {"commands": ["true"], "hosts": ["bg"]}
    with server.client(None) as anon:
        assert anon.post(FARM, json=ok).status_code == 401
        for path in (FARM, f"{FARM}/x", f"{FARM}/x/results", f"{FARM}/x/output/1/stdout"):
            r = anon.get(path)
            assert r.status_code == 401 and r.json() == {"detail": "missing or invalid token"}
        assert anon.delete(f"{FARM}/x").status_code == 401

    with server.client(bg2_only) as c:
        # a platform outside the token's, or any SSH destination: 403
        for hosts in (["bg"], ["bg2", "bg"], ["sshqtest@127.0.0.1:2222"]):
            r = c.post(FARM, json=dict(ok, hosts=hosts))
            assert r.status_code == 403, (hosts, r.text)
        r = c.post(FARM, json={"commands": ["true"], "via": "slurm"})
        assert r.status_code == 403
    with server.client(full) as c:
        post_farm(c, commands=["true"], hosts=["bg"], name="seen")
        bad: list[tuple[dict[str, Any], int, str]] = [
            (dict(ok, hosts=["a@b@c"]), 422, "neither a platform"),
            (dict(ok, hosts=["localhost"]), 404, "localhost"),
            (dict(ok, hosts=[]), 422, "hosts (or via)"),
            (dict(ok, hosts=["bg,bg2"]), 422, "hosts[0]"),
            (dict(ok, hosts=["bg", "bg"]), 422, "more than once"),
            (dict(ok, commands=[]), 422, ""),
            (dict(ok, commands=["true", "echo a\necho b"]), 422, "commands[1]: a command is one"),
            (dict(ok, commands=["a\rb"]), 422, "one line"),
            (dict(ok, commands=["a\0b"]), 422, "one line"),
            (dict(ok, commands=["   "]), 422, "commands[0]: blank or a comment"),
            (dict(ok, commands=["  # note"]), 422, "blank or a comment"),
            (dict(ok, commands=["x" * (MAX_COMMAND_BYTES + 1)]), 413, "commands[0]"),
            (dict(ok, commands=["true"] * (MAX_COMMANDS + 1)), 413, "at most"),
            (dict(ok, via="slurm"), 422, "not both"),
            (dict(ok, nodes=2), 422, "with via"),
            ({"commands": ["true"], "via": "slurm", "keep_order": True}, 422, "keep_order"),
            ({"commands": ["true"], "via": "slurm", "walltime": "soon"}, 422, "walltime"),
            ({"commands": ["true"], "via": "nowhere"}, 404, "nowhere"),
            (dict(ok, name="../etc"), 422, "name"),
            (dict(ok, name="seen"), 409, "exists already"),
            (dict(ok, slots=0), 422, ""),
            (dict(ok, timeout=-1), 422, ""),
            (dict(ok, output_dir="/tmp"), 422, ""),
            (dict(ok, deps="/etc"), 422, ""),
        ]
        for body, status, text in bad:
            r = c.post(FARM, json=body)
            assert r.status_code == status, (body if len(str(body)) < 300 else status, r.text)
            assert text in json.dumps(r.json()["detail"]) if text else True
        r = c.post(FARM, content=b"{", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        # nothing was made for any of them
        runs = sorted(p.name for p in (state_dir / "farm").iterdir() if not
                      p.name.startswith("."))
        assert runs == ["seen"]
        assert [x["name"] for x in c.get(FARM).json()] == ["seen"]
        for path in (f"{FARM}/nothere", f"{FARM}/nothere/results", f"{FARM}/..%2Fx",
                     f"{FARM}/seen/output/99/stdout", f"{FARM}/seen/output/1/stdout"):
            assert c.get(path).status_code == 404, path
        assert c.get(f"{FARM}/seen/output/1/passwd").status_code == 422
        assert c.delete(f"{FARM}/nothere").status_code == 404
        assert c.get(f"{FARM}/seen/results", params={"after": -1}).status_code == 422
    # the bg2 token does not see a run on bg
    with server.client(bg2_only) as c:
        assert c.get(f"{FARM}/seen").status_code == 403
        assert c.get(f"{FARM}/seen/results").status_code == 403
        assert c.delete(f"{FARM}/seen").status_code == 403
        assert c.get(FARM).json() == []
    log = server.log_text()
    assert full not in log and bg2_only not in log and "Traceback" not in log


def test_ssh_destinations_are_refused_without_the_opt_in(server: Server,
                                                         serve_env: dict[str, str],
                                                         state_dir: Path) -> None:
    """A host that is not a platform is an SSH destination the server would
    reach with its own keys: refused (403, naming the option) by a server
    started without --allow-farm-destinations, even for a token not limited
    to platforms; nothing is made."""
    full, _ = make_token(serve_env, "full")
    with server.client(full) as c:
        for hosts in (["sshqtest@127.0.0.1:2222"], ["bg", "127.0.0.1"], ["sqdest"]):
            r = c.post(FARM, json={"commands": ["true"], "hosts": hosts, "name": "dest"})
            assert r.status_code == 403, (hosts, r.text)
            assert "--allow-farm-destinations" in r.json()["detail"], r.text
            assert repr(hosts[-1]) in r.json()["detail"]
        r = c.post(FARM, json={"commands": ["true"], "hosts": ["a@b@c"]})
        assert r.status_code == 422 and "neither a platform" in r.text
        assert c.get(FARM).json() == []
    assert not (state_dir / "farm" / "dest").exists()


def test_ssh_destinations_with_the_opt_in(serve_env: dict[str, str], testbed: dict[str, str],
                                          tmp_path: Path, state_dir: Path) -> None:
    """With --allow-farm-destinations a token not limited to platforms runs on
    a destination (an alias of the server's ~/.ssh/config, as sshq farm
    would); a token limited to platforms still may not.  A run on a
    destination left running is not resumed by a server started without the
    option: it fails, saying why."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(
        f"Host sqdest\n    HostName {testbed['SSHQ_TEST_HOST']}\n"
        f"    Port {testbed['SSHQ_TEST_PORT']}\n    User {testbed['SSHQ_TEST_USER']}\n"
        f"    IdentityFile {testbed['SSHQ_TEST_KEY']}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {testbed['SSHQ_TEST_KNOWN_HOSTS']}\n")
    env = dict(serve_env, HOME=str(home))
    log = tmp_path / "serve.log"
    server = Server(env, log, "--allow-farm-destinations").start()
    try:
        full, _ = make_token(env, "full")
        bg_only, _ = make_token(env, "bgonly", "bg")
        with server.client(bg_only) as c:
            r = c.post(FARM, json={"commands": ["true"], "hosts": ["sqdest"]})
            assert r.status_code == 403 and "only its platforms" in r.text, r.text
        with server.client(full) as c:
            post_farm(c, commands=['echo "$SSHQ_FARM_HOST"', "id -un"], hosts=["sqdest"],
                      name="dest", slots=1)
            rs = {r["seq"]: r for r in jsonl(c, "dest")}
            assert sorted(rs) == [1, 2] and all(r["exit_status"] == 0 for r in rs.values())
            assert {r["host"] for r in rs.values()} == {"sqdest"}
            assert rs[1]["stdout"] == "sqdest\n"
            assert rs[2]["stdout"] == f"{testbed['SSHQ_TEST_USER']}\n"
            # a run on the destination alone, left running by a SIGKILL
            post_farm(c, commands=["echo on-dest", "sleep 120"], hosts=["sqdest"],
                      name="left", slots=1)
            wait_status(c, "left", lambda st: st["reported"] == 1)
        server.stop(signal.SIGKILL)
        server = Server(env, log).start()
        with server.client(full) as c:
            st = wait_status(c, "left", lambda st: st["state"] != "running", timeout=60)
            assert st["state"] == "failed" and st["reported"] == 1, st
            assert "--allow-farm-destinations" in st["error"] and "'sqdest'" in st["error"]
            assert c.get(f"{FARM}/dest").json()["state"] == "finished"
            r = c.post(FARM, json={"commands": ["true"], "hosts": ["sqdest"]})
            assert r.status_code == 403 and "--allow-farm-destinations" in r.text
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()


def test_a_task_result_is_kept_once(state_dir: Path) -> None:
    """The table keeps a task's first result: a second one (the task re-run
    after a crash between the result and its journal line) is dropped and
    takes no number."""
    store = Store(state_dir)
    store.close()
    t = FarmTable(store.path)
    try:
        t.insert("a", "tok", ["bg"], {}, 3)
        t.insert("b", "tok", ["bg"], {}, 1)
        assert t.add_result("a", 2, True, '{"seq": 2, "first": true}')
        assert t.add_result("b", 1, False, '{"seq": 1}')
        assert not t.add_result("a", 2, True, '{"seq": 2, "first": false}')
        assert t.add_result("a", 1, False, '{"seq": 1}')
        rows, more = t.results_after("a", 0)
        assert rows == [(1, '{"seq": 2, "first": true}'), (2, '{"seq": 1}')] and not more
        assert t.results_after("a", 1, max_bytes=1) == ([(2, '{"seq": 1}')], False)
        assert t.results_after("a", 0, max_bytes=1) == ([(1, '{"seq": 2, "first": true}')],
                                                        True)
        assert t.counts("a") == (1, 1)
    finally:
        t.close()


# ---------------------------------------------------------------- stop, output, restart


def test_delete_stops_the_run_and_kills_its_tasks(server: Server,
                                                  serve_env: dict[str, str]) -> None:
    token, _ = make_token(serve_env, "stop")
    marker = f"stp{uuid.uuid4().hex[:8]}"
    cmds = ["echo quick"] + [f"sleep 300; echo {marker}"] * 3
    with server.client(token) as c:
        post_farm(c, commands=cmds, hosts=["bg"], name="stp", slots=2)
        wait_status(c, "stp", lambda s: s["reported"] == 1 and s["running"] >= 1)
        deadline = time.monotonic() + 60
        while not processes(marker):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = c.delete(f"{FARM}/stp")
        assert r.status_code == 200, r.text
        st = r.json()
        assert st["state"] == "stopped" and st["finished"] and st["reported"] == 1
        # the dispatcher killed its tasks when its channel closed
        deadline = time.monotonic() + 60
        while processes(marker):
            assert time.monotonic() < deadline, processes(marker)
            time.sleep(0.2)
        # the results so far stay; the stream ends at once
        assert [r["stdout"] for r in jsonl(c, "stp")] == ["quick\n"]
        # DELETE again: nothing changes
        again = c.delete(f"{FARM}/stp").json()
        assert again["state"] == "stopped" and again["ended"] == st["ended"]
    # a stopped run is not resumed by the next server
    server.stop()
    server.start()
    with server.client(token) as c:
        assert c.get(f"{FARM}/stp").json()["state"] == "stopped"
    assert not processes(marker)


def test_long_output_is_served_from_its_file(server: Server, serve_env: dict[str, str]) -> None:
    """A stream over the farm's inline limit (4 MiB) goes to a file, which the
    result names and the server serves."""
    token, _ = make_token(serve_env, "big")
    size = 5_000_000
    with server.client(token) as c:
        post_farm(c, commands=[f"head -c {size} /dev/urandom | od -An -v | head -c {size};"
                               " echo small >&2"], hosts=["bg"], name="big")
        (res,) = jsonl(c, "big")
        assert "stdout" not in res and res["stderr"] == "small\n"
        assert res["stdout_url"] == f"{FARM}/big/output/1/stdout"
        assert "stderr_url" not in res
        r = c.get(res["stdout_url"])
        assert r.status_code == 200 and len(r.content) == size
        assert r.content == Path(res["stdout_file"]).read_bytes()
        assert r.content.startswith(b" ") and r.content.count(b"\n") > 1000
        r = c.get(f"{FARM}/big/output/1/stderr")
        assert r.status_code == 404 and "carried in its result" in r.json()["detail"]


def test_server_sigkill_mid_run_resumes_every_task_once(server: Server,
                                                        serve_env: dict[str, str],
                                                        state_dir: Path) -> None:
    """SIGKILL the server mid-run and start it again: the run is resumed from
    the farm's journal (tasks without a result run again), every task has
    exactly one result, and the SSE stream resumes from Last-Event-ID."""
    token, _ = make_token(serve_env, "crash")
    n = 12
    with server.client(token) as c:
        post_farm(c, commands=['sleep 0.5; echo "$SSHQ_FARM_SEQ"'] * n, hosts=["bg"],
                  name="crash", slots=2)
        first, _ = read_sse(c, "crash", params={"format": "sse"},
                            until=lambda evs: len(evs) >= 3)
    server.stop(signal.SIGKILL)
    db = sqlite3.connect(state_dir / "sshq.db")
    kept = db.execute("SELECT COUNT(*) FROM api_farm_results WHERE farm='crash'").fetchone()[0]
    assert 3 <= kept < n
    assert db.execute("SELECT state FROM api_farms").fetchone()[0] == "running"
    server.start()
    with server.client(token) as c:
        rest, end = read_sse(c, "crash", headers={"Last-Event-ID": str(first[-1][0])})
        assert end is not None and end["state"] == "finished", end
        assert [i for i, _ in rest] == list(range(first[-1][0] + 1, n + 1))
        results = [r for _, r in first + rest]
        assert Counter(r["seq"] for r in results) == Counter(range(1, n + 1))
        assert all(r["stdout"] == f"{r['seq']}\n" for r in results)
        assert jsonl(c, "crash") == results  # the whole run, in the same order
    runs = [json.loads(line) for line in (state_dir / "farm" / "crash" / "journal")
            .read_text().splitlines() if '"e":"run"' in line]
    assert [r["resume"] for r in runs] == [False, True]


# ---------------------------------------------------------------- pilot jobs (Slurm)


@pytest.mark.slurm
def test_pilot_jobs_via_slurm_survive_a_restart(slurm_testbed: dict[str, str], server: Server,
                                                serve_env: dict[str, str]) -> None:
    """``via``: the tasks run in a pilot job; the server is SIGKILLed after the
    first result and started again: it attaches to the spool again and each
    task has one result."""
    token, _ = make_token(serve_env, "pilot")
    cmds = ["echo first"] + [f"sleep 2; echo {i}" for i in range(2, 5)]
    with server.client(token) as c:
        st = post_farm(c, commands=cmds, via="slurm", nodes=1, walltime="0:10:00",
                       name="pilot", slots=1)
        assert st["options"]["via"] == "slurm" and st["options"]["nodes"] == 1
        first, _ = read_sse(c, "pilot", params={"format": "sse"},
                            until=lambda evs: len(evs) >= 1)
    server.stop(signal.SIGKILL)
    server.start()
    with server.client(token) as c:
        rest, end = read_sse(c, "pilot", headers={"Last-Event-ID": "1"})
        assert end is not None and end["state"] == "finished", end
        results = [r for _, r in first + rest]
        assert Counter(r["seq"] for r in results) == Counter(range(1, 5))
        assert sorted(r["stdout"] for r in results) == ["2\n", "3\n", "4\n", "first\n"]
        assert all(r["host"].startswith("slurm") for r in results)
        # the pilot job is an sshq job on the platform
        pilots = [j for j in c.get("/api/v1/jobs").json() if j["name"].startswith("farm-pilot")]
        assert len(pilots) == 1


@pytest.mark.slurm
def test_delete_kills_the_pilot_jobs(slurm_testbed: dict[str, str], server: Server,
                                     serve_env: dict[str, str]) -> None:
    token, _ = make_token(serve_env, "pilotstop")
    with server.client(token) as c:
        post_farm(c, commands=["echo started", "sleep 600"], via="slurm", walltime="0:15:00",
                  name="pstop")
        read_sse(c, "pstop", params={"format": "sse"}, until=lambda evs: len(evs) >= 1)
        (pilot,) = [j for j in c.get("/api/v1/jobs").json() if j["name"] == "farm-pstop-1"]
        st = c.delete(f"{FARM}/pstop").json()
        assert st["state"] == "stopped" and st["reported"] == 1
        deadline = time.monotonic() + 120
        while True:
            job = c.get(f"/api/v1/jobs/{pilot['id']}").json()
            if job["state"] in ("failed", "succeeded"):
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "failed"
        r = subprocess.run(["squeue", "-h", "-j", job["job_id"]], capture_output=True,
                           text=True)
        assert r.stdout.strip() == ""
