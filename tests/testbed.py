"""The test bed's facts, and what a test does when a part of it is missing.

One home for what the tests (``tests/conftest.py``), the network-namespace
hosts (``tests/netns.py``) and the benchmarks (``bench/benchlib.py``) know
about the test bed.  ``.ci/setup-testbed.sh`` writes its facts to
``/var/lib/sshq-testbed/testbed.env`` (``KEY=VALUE`` lines; ``SSHQ_TESTBED_ENV``
points elsewhere).  A test that needs a missing part is skipped, unless
``SSHQ_REQUIRE_TESTBED=1`` (as CI sets it), where it fails: a broken test bed
cannot pass for a green run.

Stdlib only at import (the benchmarks import it outside pytest).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

#: ``testbed.env`` written by ``.ci/setup-testbed.sh``.
TESTBED_ENV = os.environ.get("SSHQ_TESTBED_ENV", "/var/lib/sshq-testbed/testbed.env")
#: The test bed's directory (keys, sshd config; fakes the tests copy there).
TESTBED_DIR = Path(TESTBED_ENV).parent
#: What to run when the test bed is missing.
SETUP_HINT = "run .ci/setup-testbed.sh as root"


def load_testbed(path: str | Path = TESTBED_ENV) -> dict[str, str] | None:
    """The test bed's facts from ``path``, or None if there is none.

    Args:
        path: a ``testbed.env`` file (``KEY=VALUE`` lines; others ignored).

    Returns:
        ``{KEY: VALUE}``, keys and values stripped; None if the file cannot be read.
    """
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    env = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            env[k.strip()] = v.strip()
    return env


def required() -> bool:
    """Whether a missing part of the test bed fails the test (``SSHQ_REQUIRE_TESTBED=1``)."""
    return os.environ.get("SSHQ_REQUIRE_TESTBED") == "1"


def skip_or_fail(skip: str, fail: str) -> NoReturn:
    """``pytest.fail(fail)`` when the test bed is :func:`required`, else ``pytest.skip(skip)``."""
    import pytest  # here: the benchmarks import this module without pytest

    if required():
        pytest.fail(fail)
    pytest.skip(skip)


def require_part(testbed: dict[str, str], key: str, what: str) -> None:
    """Skip (or fail, when :func:`required`) unless ``testbed[key] == "1"``.

    Args:
        testbed: the test bed's facts (:func:`load_testbed`).
        key: the ``testbed.env`` key that says the part works, e.g. ``SSHQ_TEST_SGE``.
        what: the part, for the message, e.g. ``"Grid Engine"``.
    """
    if testbed.get(key) != "1":
        skip_or_fail(f"no {what} in the test bed ({key} is not 1 in {TESTBED_ENV};"
                     f" {SETUP_HINT})",
                     f"{what} test bed required ({key} is not 1 in {TESTBED_ENV})")
