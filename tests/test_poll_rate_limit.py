"""Polling respects the scheduler: job status files are read on every poll, the
job runner's status command at most once per host per ``min_poll_interval``
seconds, however many processes poll (they share the state database)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import sshq._client.core as client_mod  # where agent calls are made
from sshq import AsyncClient, JobSpec, JobState
from sshq.store import Store


def test_claim_is_shared_across_store_connections(tmp_path: Path) -> None:
    a, b = Store(tmp_path), Store(tmp_path)  # two processes' connections
    try:
        assert a.claim_runner_query("p", "h", 10.0)
        assert not b.claim_runner_query("p", "h", 10.0)
        assert not a.claim_runner_query("p", "h", 10.0)
        assert b.claim_runner_query("p", "other-host", 10.0)
        assert b.claim_runner_query("q", "h", 10.0)
        assert a.claim_runner_query("p", "h", 0.0)
    finally:
        a.close()
        b.close()


async def test_runner_queried_once_per_interval_but_end_seen_from_status_file(
        testbed: dict[str, str], config_file: Path, state_dir: Path,
        monkeypatch: object) -> None:
    queries: list[float] = []
    real = client_mod.call_agent

    async def counting(t, python, op, payload, **kw):  # type: ignore[no-untyped-def]
        if op == "poll" and not payload.get("skip_runner"):
            queries.append(time.monotonic())
        return await real(t, python, op, payload, **kw)

    monkeypatch.setattr(client_mod, "call_agent", counting)  # type: ignore[attr-defined]
    async with AsyncClient(config_file, state_dir=state_dir) as c, \
            AsyncClient(config_file, state_dir=state_dir) as c2:
        (job,) = await c.submit(JobSpec(command="sleep 3; exit 4", name="rl"), platform="bg")
        t0 = time.monotonic()
        # two "processes" polling hard, as many callers of `sshq wait` would
        fast = {"timeout": 60, "interval": 0.2, "max_interval": 0.3}
        results = await asyncio.gather(c.wait([job.id], **fast), c2.wait([job.id], **fast))
        seen = time.monotonic() - t0
        for (j,) in results:
            assert j.state is JobState.FAILED and j.exit_status == 4
        assert seen < 3 + 2.5, f"job end seen {seen:.1f} s after submit"  # from job.status
        assert len(queries) == 1, queries  # 10 s default: one status RPC in the whole wait
