"""The docs' job runner table is what the handlers really write."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_job_runner_table_matches_the_handlers() -> None:
    spec = importlib.util.spec_from_file_location("job_runner_table",
                                                  DOCS / "job_runner_table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.table() in (DOCS / "job-runners.md").read_text(), (
        "docs/job-runners.md is stale: regenerate the table with"
        " `python docs/job_runner_table.py`")
