"""Farm runs of ``sshq serve`` expire: a run that ended (finished, failed or
stopped) is deleted with its results and run directory once it ended more
than ``--farm-retention`` days ago (here a few seconds, as a fraction of a
day); a running run is never deleted; an expired run is 404, saying so.
A real server on loopback, its farm on the test bed's sshd.
"""
# ruff: noqa: F401, F811  (the fixtures imported from serve_helpers)

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import Server, make_token, serve_env
from test_serve_farm import FARM, jsonl, post_farm, wait_status

from sshq import AsyncClient
from sshq.farm.journal import RunDir
from sshq.server.farm import FarmRuns, FarmTable
from sshq.server.gateway import Gateway
from sshq.store import Store

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(240)]

#: The retention of the server under test (given in days): long enough for
#: the test to see the run finished before it goes.
RETENTION_S = 6.0


def _wait_gone(c: httpx.Client, name: str, timeout: float = 90) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"{FARM}/{name}")
        if r.status_code == 404:
            return r
        assert r.status_code == 200, r.text
        assert time.monotonic() < deadline, f"{name} not deleted: {r.json()}"
        time.sleep(0.3)


def _rows(state_dir: Path, name: str) -> tuple[int, int]:
    db = sqlite3.connect(Store(state_dir).path)
    try:
        runs = db.execute("SELECT COUNT(*) FROM api_farms WHERE name=?", (name,)).fetchone()
        results = db.execute("SELECT COUNT(*) FROM api_farm_results WHERE farm=?",
                             (name,)).fetchone()
        return int(runs[0]), int(results[0])
    finally:
        db.close()


def test_ended_runs_expire_running_runs_stay(serve_env: dict[str, str], state_dir: Path,
                                            tmp_path: Path) -> None:
    server = Server(serve_env, tmp_path / "serve.log", "--farm-retention",
                    repr(RETENTION_S / 86400)).start()
    try:
        token, _ = make_token(serve_env, "ret")
        with server.client(token) as c:
            # the older run goes on running past the retention
            post_farm(c, commands=["sleep 120"], hosts=["bg"], name="long")
            st = post_farm(c, commands=["echo one", "echo two"], hosts=["bg"], name="short")
            done = wait_status(c, "short", lambda s: s["finished"])
            assert done["state"] == "finished" and done["expires"] is not None, done
            assert len(jsonl(c, "short")) == 2
            assert st["expires"] is None  # (a running run has no end, so no expiry)
            assert RunDir(state_dir, "short").exists()
            assert _rows(state_dir, "short") == (1, 2)

            r = _wait_gone(c, "short")
            detail = r.json()["detail"]
            assert "'short'" in detail and "expired" in detail, detail
            assert "--farm-retention" in detail and "6 s" in detail, detail
            for path in ("/results", "/output/1/stdout"):
                assert c.get(f"{FARM}/short{path}").status_code == 404
            assert c.delete(f"{FARM}/short").status_code == 404
            assert _rows(state_dir, "short") == (0, 0)
            assert not RunDir(state_dir, "short").path.exists()

            # created before "short" ended, and still running: kept
            long = c.get(f"{FARM}/long").json()
            assert long["state"] == "running" and long["expires"] is None, long
            assert [s["name"] for s in c.get(FARM).json()] == ["long"]
            assert RunDir(state_dir, "long").exists()

            # stopped, it ends: it expires in turn
            stopped = c.delete(f"{FARM}/long").json()
            assert stopped["state"] == "stopped" and stopped["expires"], stopped
            _wait_gone(c, "long")
            assert c.get(FARM).json() == []
            assert _rows(state_dir, "long") == (0, 0)
            assert not RunDir(state_dir, "long").path.exists()
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()


def test_the_retention_option_is_checked(serve_env: dict[str, str], tmp_path: Path) -> None:
    import subprocess

    from helpers import SSHQ

    for bad in ("0", "-1", "soon"):
        r = subprocess.run([*SSHQ, "serve", "--listen", "127.0.0.1:0", "--farm-retention", bad],
                           env=serve_env, capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and b"--farm-retention" in r.stderr, r.stderr


async def test_expire_keeps_running_and_locked_runs(state_dir: Path, tmp_path: Path) -> None:
    """FarmRuns.expire on the table itself: only runs that ended before
    now - retention go; a running one (however old) and one whose run
    directory another process holds locked stay."""
    store = Store(state_dir)
    store.close()
    t = FarmTable(store.path)
    config = tmp_path / "platforms.toml"
    config.write_text("")
    async with AsyncClient(config, state_dir=state_dir) as client:
        gw = Gateway(client)
        farms = FarmRuns(gw, retention=100.0)
        try:
            now = time.time()
            for name in ("old", "recent", "running", "locked", "nodir"):
                t.insert(name, "tok", ["bg"], {}, 1)
                t.add_result(name, 1, True, "{}")
                if name != "nodir":
                    RunDir(state_dir, name).path.mkdir(parents=True)
            for name in ("old", "locked", "nodir"):
                t.end(name, "finished")
            t.end("recent", "failed", "why")
            t._db.execute("UPDATE api_farms SET created=?, ended=? WHERE name != 'recent'",
                          (now - 1000, now - 500))
            t._db.execute("UPDATE api_farms SET ended=NULL WHERE name='running'")
            other = RunDir(state_dir, "locked")
            other.lock()  # (flock: another open file description, as another process)
            try:
                assert sorted(await farms.expire(now)) == ["nodir", "old"]
            finally:
                other.close()
            assert sorted(r.name for r in t.runs()) == ["locked", "recent", "running"]
            assert not RunDir(state_dir, "old").path.exists()
            assert t.counts("old") == (0, 0) and t.counts("running") == (1, 0)
            # the lock released: a later check deletes it; "recent" in its turn
            assert await farms.expire(now) == ["locked"]
            assert await farms.expire(now + 200) == ["recent"]
            assert [r.name for r in t.runs()] == ["running"]
        finally:
            farms.close()
            gw.close()
            t.close()
