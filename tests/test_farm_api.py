"""The farm through the Python API: AsyncClient.farm / Client.farm (same names as the CLI)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from sshq import AsyncClient, Client
from sshq.config import Config, Platform
from sshq.farm.backend import FarmBackend
from sshq.farm.engine import FarmOptions
from sshq.farm.output import TaskResult
from sshq.farm.run import FarmRequest, attach_run, pause_run, run_farm
from sshq.model import Job, JobSpec
from sshq.transport import Transport


async def test_async_farm_streams_results_to_a_callback(client: AsyncClient,
                                                        tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("".join(f"echo {i}; exit {i % 2}\n" for i in range(1, 21)))
    got: list[TaskResult] = []
    names: list[str] = []
    name, stats = await client.farm(batch, hosts=["bg", "local"], out=got.append,
                                    on_name=names.append)
    assert names == [name]
    assert sorted(r.seq for r in got) == list(range(1, 21))
    for r in got:
        assert r.stdout == f"{r.seq}\n".encode()
        assert r.exit_status == r.seq % 2
    assert (stats.done, stats.failed) == (10, 10)


def test_sync_client_farm_writes_jsonl_and_resume_has_nothing_left(
        config_file: Path, state_dir: Path, tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("echo a\necho b\n")
    out = io.BytesIO()
    with Client(config_file, state_dir=state_dir) as c:
        name, stats = c.farm(batch, hosts=["local"], out=out, run="api-run")
        assert name == "api-run" and stats.done == 2
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert sorted(x["stdout"] for x in lines) == ["a\n", "b\n"]
        again = io.BytesIO()
        _, stats2 = c.farm(resume="api-run", out=again)
        assert again.getvalue() == b"" and stats2.total == 0


class OnlyTheBackend:
    """Exactly the members of :class:`sshq.farm.backend.FarmBackend`, taken
    from a real client: a farm given this can use nothing else of it."""

    __slots__ = ("_client",)

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @property
    def config(self) -> Config:
        return self._client.config

    @property
    def state_dir(self) -> Path:
        return self._client.state_dir

    def transport(self, platform: Platform, host: str) -> Transport:
        return self._client.transport(platform, host)

    async def submit(self, specs: Sequence[JobSpec], *, platform: str) -> list[Job]:
        return await self._client.submit(specs, platform=platform)

    async def poll(self, ids: Sequence[int]) -> list[Job]:
        return await self._client.poll(ids)


async def test_the_farm_needs_only_its_backend(client: AsyncClient, tmp_path: Path) -> None:
    backend: FarmBackend = OnlyTheBackend(client)
    batch = tmp_path / "b.txt"
    batch.write_text("".join(f"echo {i}\n" for i in range(1, 7)))
    got: list[TaskResult] = []
    _, stats = await run_farm(backend, FarmRequest(batch=batch, hosts=["bg", "local"],
                                                   options=FarmOptions()), got.append)
    assert sorted(r.seq for r in got) == list(range(1, 7)) and stats.done == 6
    # detached: spools, pause, attach
    detached: list[TaskResult] = []
    name, _ = await run_farm(backend, FarmRequest(batch=batch, hosts=["local"], detach=True,
                                                  options=FarmOptions()), detached.append)
    await pause_run(backend, name, False)
    await attach_run(backend, name, detached.append)
    assert sorted(r.stdout for r in detached) == [f"{i}\n".encode() for i in range(1, 7)]
