"""The conventions CI enforces: ruff and mypy --strict clean (STYLE.md, 4)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("SSHQ_REQUIRE_TESTBED") == "1":
            pytest.fail(f"{module} is required (pip install '.[test]')")
        pytest.skip(f"{module} not installed")


def test_ruff_clean() -> None:
    _tool("ruff")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "bench"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_clean() -> None:
    _tool("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "src"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
