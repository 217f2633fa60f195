"""A job as sshq knows it: the submitted spec's identity and its latest state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .job_state import JobState

__all__ = ["Job"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A submitted job.

    Attributes:
        id: the sshq id (local, unique in one state database).
        platform: the platform name.
        host: the login host the job was submitted through.
        name: the job name.
        job_runner: ``slurm``, ``background``, ...
        job_id: the job runner's id ('' when submission failed).
        submit_num: the submit number (``NN`` in the job log layout).
        state: the latest known state.
        exit_status: the exit status when the job exited, else None.
        signal: the signal name (``TERM``, ``XCPU``, ``KILL``...) when the job was
            killed by a signal, else None.
        job_log_dir: absolute remote job log directory
            ``<run_dir>/log/job/<name>/<NN>``.
        work_dir: absolute remote working directory.
        submit_time, start_time, exit_time: UTC times, when known.
        message: why the job is in its state, when there is something to say
            (the job runner's stderr on submit failure, for example).
    """

    id: int
    platform: str
    host: str
    name: str
    job_runner: str
    job_id: str
    submit_num: int
    state: JobState
    exit_status: int | None = None
    signal: str | None = None
    job_log_dir: str = ""
    work_dir: str = ""
    submit_time: datetime | None = None
    start_time: datetime | None = None
    exit_time: datetime | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: times as ISO 8601 strings, state as its value."""
        return {
            "id": self.id,
            "platform": self.platform,
            "host": self.host,
            "name": self.name,
            "job_runner": self.job_runner,
            "job_id": self.job_id,
            "submit_num": self.submit_num,
            "state": self.state.value,
            "exit_status": self.exit_status,
            "signal": self.signal,
            "job_log_dir": self.job_log_dir,
            "work_dir": self.work_dir,
            "submit_time": _iso(self.submit_time),
            "start_time": _iso(self.start_time),
            "exit_time": _iso(self.exit_time),
            "message": self.message,
        }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None
