"""cat_log and follow_log refuse unknown log file names before any SSH."""

from __future__ import annotations

from pathlib import Path

import pytest

from sshq import AsyncClient, InvalidInputError


@pytest.mark.parametrize("method", ["cat_log", "follow_log"])
async def test_unknown_log_file_is_an_input_error(tmp_path: Path, method: str) -> None:
    async with AsyncClient(state_dir=tmp_path) as c:
        with pytest.raises(InvalidInputError, match="unknown log file 'journal'"):
            if method == "cat_log":
                await c.cat_log(1, "journal")  # type: ignore[arg-type]
            else:
                async for _ in c.follow_log(1, ("out", "journal")):  # type: ignore[arg-type]
                    pass
