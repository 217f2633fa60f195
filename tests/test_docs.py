"""The docs' job runner table is what the handlers really write."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- the newcomer's docs

ROOT = DOCS.parent
_PATH = re.compile(r"(?<![\w/.<-])((?:src|tests|docs|bench|\.ci)/[\w./-]*[\w/])")


@pytest.mark.parametrize("doc", ["docs/architecture.md", "CONTRIBUTING.md"])
def test_every_path_a_doc_names_exists(doc: str) -> None:
    text = (ROOT / doc).read_text()
    named = {m for m in _PATH.findall(text) if "NAME" not in m}  # NAME: a placeholder
    assert len(named) > 5, "the path pattern finds nothing: fix it"
    made = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    named -= made  # made by a run (.ci/venv), not in a checkout
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], f"{doc} names paths that do not exist: {missing}"


def test_architecture_walks_the_data_path_of_one_job() -> None:
    text = (DOCS / "architecture.md").read_text()
    walk = text.split("## One job, file by file", 1)[-1].split("\n## ", 1)[0]
    steps = ["src/sshq/cli/main.py", "src/sshq/client.py", "src/sshq/_client/jobs.py",
             "src/sshq/remote/protocol.py", "src/sshq/shipped/agent.py",
             "src/sshq/job_runners/slurm.py", "src/sshq/jobscript/render.py",
             "src/sshq/shipped/sshq_jobstatus.py", "src/sshq/remote/status.py",
             "src/sshq/store.py"]
    missing = [p for p in steps if f"`{p}`" not in walk]
    assert walk != text and missing == [], f"the walk through one job omits {missing}"


def test_agent_operations_are_all_documented() -> None:
    from sshq.remote import operations
    from sshq.shipped import agent

    listed = re.findall(r"^- ``(\w+)``:", operations.__doc__ or "", re.MULTILINE)
    assert len(listed) > 3, "the docstring's list of operations is not found: fix the pattern"
    where = "src/sshq/remote/operations.py's docstring"
    assert set(agent.OPS) - set(listed) == set(), f"{where} omits {set(agent.OPS) - set(listed)}"
    assert set(listed) - set(agent.OPS) == set(), f"{where} lists {set(listed) - set(agent.OPS)}"


def test_changelog_has_unreleased_and_the_current_version() -> None:
    import sshq

    heads = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert heads[0] == "Unreleased"
    assert sshq.__version__ in heads, f"CHANGELOG.md has no section for {sshq.__version__}"


def test_license_file_is_the_license_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "the sshq developers" in text
