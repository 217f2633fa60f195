"""Helpers shared by the integration tests (not fixtures: plain functions)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from sshq import AsyncClient, Job, JobState
from sshq.shipped import agent


async def wait_for_state(client: AsyncClient, sid: int, state: JobState,
                         timeout: float = 60.0, interval: float = 0.25) -> Job:
    """Poll until job ``sid`` reaches ``state``; fail on another final state or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        (job,) = await client.poll([sid])
        if job.state is state:
            return job
        if job.state.is_final:
            pytest.fail(f"job {sid} became {job.state.value} ({job.message}) waiting for"
                        f" {state.value}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {sid} still {job.state.value} after {timeout} s")
        await asyncio.sleep(interval)


def expand_ids(template: Sequence[str], ids: Sequence[str], sep: str | None) -> list[str]:
    """The command the remote agent builds for ``ids`` (one chunk; [] for no ids:
    the agent then runs nothing)."""
    plain = [w for w in template if w != agent.GROUP]  # jobs with no group words
    chunks: list[list[str]] = agent.expand(plain, list(ids), sep)
    return chunks[0] if chunks else []
