"""The event-loop lag probe of ``sshq serve`` (bench/serve_bench.py's): off
unless ``SSHQ_SERVE_LAG_PROBE`` is set, and then a token reads its samples
from ``/api/v1/debug/loop-lag``.  A real server on loopback.
"""
# ruff: noqa: F401, F811  (the fixtures imported from serve_helpers)

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from serve_helpers import Server, make_token, serve_env, server

from sshq.server.lagprobe import ENV, LagProbe, from_env

LAG = "/api/v1/debug/loop-lag"


def test_off_by_default(server: Server, serve_env: dict[str, str]) -> None:
    token, _ = make_token(serve_env, "nolag")
    with server.client(token) as c:
        assert c.get(LAG).status_code == 404
        assert LAG not in c.get("/openapi.json").text


def test_on_with_the_variable(serve_env: dict[str, str], tmp_path: Path) -> None:
    token, _ = make_token(serve_env, "lag")
    s = Server(dict(serve_env, **{ENV: "0.01"}), tmp_path / "serve.log").start()
    try:
        with s.client(None) as anon:
            assert anon.get(LAG).status_code == 401
        with s.client(token) as c:
            deadline = time.monotonic() + 60
            while (got := c.get(LAG).json())["samples"] < 200:  # 2 s of samples
                assert time.monotonic() < deadline, got
                time.sleep(0.2)
            assert got["period_s"] == 0.01
            assert 0 <= got["p50_ms"] <= got["p99_ms"] <= got["max_ms"], got
            assert LAG not in c.get("/openapi.json").text
            before = c.get(LAG, params={"reset": "true"}).json()["samples"]
            assert before >= got["samples"]
            assert c.get(LAG).json()["samples"] < before  # emptied, then refilling
    finally:
        s.stop()


async def test_the_probe_sees_a_blocked_loop() -> None:
    probe = LagProbe(0.005)
    probe.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # the loop is blocked: the probe wakes late
        await asyncio.sleep(0.05)
    finally:
        await probe.stop()
    stats = probe.stats(reset=True)
    assert stats["max_ms"] >= 250, stats
    assert probe.stats() == {"period_s": 0.005, "samples": 0, "p50_ms": None, "p99_ms": None,
                             "max_ms": None}


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, period in (("", None), ("no", None), ("0", None), ("-1", None),
                          ("0.02", 0.02)):
        monkeypatch.setenv(ENV, value)
        probe = from_env()
        assert (probe.period if probe else None) == period, value
    monkeypatch.delenv(ENV)
    assert from_env() is None
