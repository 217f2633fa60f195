"""Plain data: job specs, jobs and their states. No I/O."""

from .job import Job
from .job_spec import JobSpec
from .job_state import JobState

__all__ = ["Job", "JobSpec", "JobState"]
