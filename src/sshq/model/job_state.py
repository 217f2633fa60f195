"""Job states, after Cylc's job states (seed 001) and PSI/J's final-aware enum."""

from __future__ import annotations

import enum

__all__ = ["JobState"]


class JobState(enum.StrEnum):
    """Where a job is in its life.

    ``submitted`` -> ``running`` -> ``succeeded`` | ``failed``; a job the job
    runner refused, or that vanished before it started, is ``submit-failed``.
    """

    SUBMITTED = "submitted"
    SUBMIT_FAILED = "submit-failed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """True for states a job never leaves."""
        return self in (JobState.SUBMIT_FAILED, JobState.SUCCEEDED, JobState.FAILED)
