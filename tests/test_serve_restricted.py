"""``sshq serve`` over a restricted platform (``agent = "installed"``, a key
whose forced command is the restricted agent; issue 12's test bed set-up,
tests/test_restricted.py's ``bed``): what the agent refuses is 403 with its
reason, in the native API and in the FirecREST routes (FirecREST's error
shape), never 502; and what it allows goes through the server as usual.

The refusals used stay refusals whatever the agent learns to allow: a work
directory outside the run directory, a job runner that runs jobs on the
login node without ``--allow-background``, and a direct farm run.
"""
# ruff: noqa: F401, F811  (the fixture imported from test_restricted)

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import Server, make_token, wait_job
from test_restricted import Bed, audit_lines, bed

from sshq import RemoteError, RestrictedError

pytestmark = [pytest.mark.slurm, pytest.mark.sshd, pytest.mark.timeout(300)]

REFUSED = "refused by the restricted sshq agent: restricted"
FIRECREST_ERROR_KEYS = {"errorType", "message", "causedBy", "data", "user"}


@pytest.fixture
def rserver(bed: Bed, state_dir: Path, tmp_path: Path) -> Any:
    """A server over the restricted platforms, and a token for it."""
    env = dict(os.environ, SSHQ_CONFIG=str(bed.config), SSHQ_STATE_DIR=str(state_dir),
               PYTHONUNBUFFERED="1")
    token, _ = make_token(env, "restricted")
    s = Server(env, tmp_path / "serve.log").start()
    try:
        yield s, token
    finally:
        s.stop()


def _firecrest_403(r: httpx.Response) -> str:
    assert r.status_code == 403, (r.status_code, r.text)
    body = r.json()
    assert set(body) == FIRECREST_ERROR_KEYS and body["errorType"] == "error", body
    message: str = body["message"]
    return message


def test_the_refusal_is_a_restricted_error() -> None:
    assert issubclass(RestrictedError, RemoteError)  # a caller catching RemoteError still does


def test_native_api_refusals_are_403_with_the_reason(rserver: tuple[Server, str],
                                                     bed: Bed) -> None:
    server, token = rserver
    before = len(audit_lines())
    with server.client(token) as c:
        r = c.post("/api/v1/jobs", json={"platform": "rs", "jobs": [
            {"command": "true", "name": "outside", "work_dir": "/tmp/sq-serve-outside"}]})
        assert r.status_code == 403, r.text
        detail = r.json()["detail"]
        assert REFUSED in detail and "work directory /tmp/sq-serve-outside" in detail, detail
        assert "outside the run directory" in detail, detail
        # nothing was submitted, so nothing was kept: no job row for the poller
        # to fail later, and a retry is refused again rather than answered
        assert c.get("/api/v1/jobs", params={"platform": "rs"}).json() == []

        # what the client refuses for the key, before connecting, is 403 too
        r = c.post("/api/v1/jobs", json={"platform": "rs", "jobs": [
            {"command": "true", "work_dir": "/tmp/sq-serve/../elsewhere"}]})
        assert r.status_code == 403, r.text
        assert "is restricted" in r.json()["detail"] and "'..'" in r.json()["detail"], r.text

        r = c.post("/api/v1/jobs", json={"platform": "rs-bg", "jobs": [{"command": "true"}]})
        assert r.status_code == 403, r.text
        assert REFUSED in r.json()["detail"] and "allow-background" in r.json()["detail"]

        # a direct farm run on a restricted platform: refused before anything is made
        r = c.post("/api/v1/farm", json={"commands": ["echo x"], "hosts": ["rs"]})
        assert r.status_code == 403, r.text
        assert "restricted" in r.json()["detail"], r.text
        assert c.get("/api/v1/farm").json() == []
    # the host's forced command said no, and logged it
    refused = [ln for ln in audit_lines()[before:] if "outcome=refused" in ln]
    assert any("op=submit" in ln and "sq-serve-outside" in ln for ln in refused), refused
    assert "Traceback" not in server.log_text()


def test_firecrest_refusals_are_403_in_firecrest_shape(rserver: tuple[Server, str],
                                                      bed: Bed) -> None:
    server, token = rserver
    with server.client(token) as c:
        r = c.post("/firecrest/compute/rs/jobs", json={"job": {
            "script": "#!/bin/bash\ntrue\n", "workingDirectory": "/tmp/sq-serve-outside"}})
        message = _firecrest_403(r)
        assert REFUSED in message and "/tmp/sq-serve-outside" in message, message

        # a filesystem op outside the run directory: 403 whoever refuses it
        # (the restricted agent, or the server's confinement to the run directory)
        message = _firecrest_403(c.get("/firecrest/filesystem/rs/ops/ls",
                                       params={"path": "/etc"}))
        assert "restricted" in message or "Permission denied" in message, message


def test_what_the_key_allows_goes_through_the_server(rserver: tuple[Server, str],
                                                     bed: Bed) -> None:
    server, token = rserver
    with server.client(token) as c:
        r = c.post("/api/v1/jobs", json={"platform": "rs", "jobs": [
            {"command": "echo through the gateway", "name": "rs-serve"}]})
        assert r.status_code == 201, r.text
        (job,) = r.json()
        assert job["job_id"], job
        done = wait_job(c, job["id"], {"succeeded", "failed", "submit-failed"})
        assert done["state"] == "succeeded", done
        assert done["last_poll"] is not None  # the poller polls through the key
        r = c.get(f"/api/v1/jobs/{job['id']}/log/out")
        assert r.status_code == 200 and r.content == b"through the gateway\n", r.text
        assert c.get("/firecrest/compute/rs/jobs/" + done["job_id"]).status_code == 200
