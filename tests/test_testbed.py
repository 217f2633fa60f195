"""tests/testbed.py: the test bed's facts, and skip-or-fail when a part is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from testbed import load_testbed, require_part, skip_or_fail


def test_load_testbed_reads_key_value_lines(tmp_path: Path) -> None:
    env = tmp_path / "testbed.env"
    env.write_text("SSHQ_TEST_HOST=127.0.0.1\n# a comment\n\n SSHQ_TEST_PORT = 2222 \n"
                   "SSHQ_TEST_KEY=/k=v\n")
    assert load_testbed(env) == {"SSHQ_TEST_HOST": "127.0.0.1", "SSHQ_TEST_PORT": "2222",
                                 "SSHQ_TEST_KEY": "/k=v"}
    assert load_testbed(tmp_path / "missing.env") is None


def test_a_missing_part_skips_or_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSHQ_REQUIRE_TESTBED", raising=False)
    require_part({"SSHQ_TEST_SGE": "1"}, "SSHQ_TEST_SGE", "Grid Engine")  # there: nothing
    with pytest.raises(pytest.skip.Exception, match="no Grid Engine in the test bed"):
        require_part({"SSHQ_TEST_SGE": "0"}, "SSHQ_TEST_SGE", "Grid Engine")
    with pytest.raises(pytest.skip.Exception, match="skipped"):
        skip_or_fail("skipped", "failed")
    monkeypatch.setenv("SSHQ_REQUIRE_TESTBED", "1")
    with pytest.raises(pytest.fail.Exception, match="Grid Engine test bed required"):
        require_part({}, "SSHQ_TEST_SGE", "Grid Engine")
    with pytest.raises(pytest.fail.Exception, match="failed"):
        skip_or_fail("skipped", "failed")
