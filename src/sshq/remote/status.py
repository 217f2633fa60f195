"""The client's view of job status files: the state decision as a :class:`JobState`.

The job status file itself (its keys, bounded parsing, the decision's rules)
is defined once, in the shipped module :mod:`sshq.shipped.sshq_jobstatus`,
which the agent uses on the remote side; the agent replies with its
:class:`~sshq.shipped.sshq_jobstatus.JobStatus` fields, and the client
rebuilds (and validates again) the same class with ``JobStatus.from_wire``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..job_runners.base import RunnerJobState
from ..model import JobState
from ..shipped import sshq_jobstatus as js
from ..shipped.sshq_jobstatus import JobStatus

__all__ = ["parse_status", "Decision", "decide", "JobStatus"]


def parse_status(text: str | bytes) -> dict[str, str]:
    """A job status file's raw ``KEY=VALUE`` lines as a dict (the last value wins).

    Unvalidated: for display and tests; decisions use :class:`JobStatus`.
    """
    values: dict[str, str] = js.raw_values(text)
    return values


@dataclass(frozen=True, slots=True)
class Decision:
    """A job's new state and the fields that go with it (None: no change)."""

    state: JobState | None
    fields: dict[str, Any]


def decide(
    status: JobStatus | str,
    *,
    job_id: str,
    queried: bool,
    runner_ok: bool,
    known: dict[str, RunnerJobState],
    runner_name: str,
) -> Decision:
    """Decide a job's state from its job status file and the runner's answer.

    Args:
        status: the job's JobStatus (read after the runner query), or the
            file's text.
        job_id: the job runner's id.
        queried: whether the runner was asked about this job.
        runner_ok: whether that query worked.
        known: the jobs the runner still holds (queued or running), by job id.
        runner_name: for messages.

    Returns:
        The decision; ``state`` None means keep the current state.  A bad
        value in the file fails nothing: the job's ``message`` names it.
    """
    if isinstance(status, str):
        status = JobStatus.parse(status)
    held = known.get(job_id)
    state, fields = js.decide(status, queried, runner_ok, held is not None,
                              bool(held and held.running), runner_name)
    return Decision(JobState(state) if state else None, fields)
