"""sshq.store: schema versions and migrations, and what update_job accepts."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sshq.exceptions import ConfigError
from sshq.model import JobState
from sshq.store import MIGRATIONS, SCHEMA_VERSION, Store


def test_new_database_has_the_current_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    store.close()
    assert (tmp_path / "sshq.db").stat().st_mode & 0o777 == 0o600


def test_database_from_before_versioning_is_migrated_and_keeps_its_jobs(
        tmp_path: Path) -> None:
    # what sshq 0.1 wrote: step 1's tables, user_version 0, and a job
    db = sqlite3.connect(tmp_path / "sshq.db")
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO jobs (platform, host, name, job_runner, submit_num, state)"
               " VALUES ('p', 'h', 'n', 'slurm', 1, 'running')")
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    store = Store(tmp_path)
    assert store.schema_version == SCHEMA_VERSION
    (job,) = store.get([1])
    assert job.state is JobState.RUNNING and job.name == "n"
    store.close()
    Store(tmp_path).close()  # opening again migrates nothing


def test_database_from_a_newer_sshq_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "sshq.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="newer than this sshq"):
        Store(tmp_path)


def test_update_job_takes_only_known_columns(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ((sid, _nn),) = store.reserve_jobs("p", "h", "slurm", ["n"], [{}])
    now = datetime(2026, 12, 2, 5, 0, 0, tzinfo=UTC)
    store.update_job(sid, state=JobState.FAILED, exit_status=3, exit_time=now, message="m")
    (job,) = store.get([sid])
    assert (job.state, job.exit_status, job.exit_time, job.message) == (
        JobState.FAILED, 3, now, "m")
    for bad in ({"nonsense": 1}, {"id": 7}, {"state = 'x', message": "y"}):
        with pytest.raises(ValueError, match="not job columns"):
            store.update_job(sid, **bad)
    (job,) = store.get([sid])
    assert job.id == sid and job.state is JobState.FAILED
    store.close()
