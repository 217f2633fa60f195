"""The farm through the Python API: AsyncClient.farm / Client.farm (same names as the CLI)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from sshq import AsyncClient, Client
from sshq.farm.output import TaskResult


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
