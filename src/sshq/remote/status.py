"""Reading job status files and deciding job states (Cylc's poll semantics).

Once a job has started, its job status file is the authority.  The job
runner is asked only about jobs whose status file records no exit:

- exit recorded: ``succeeded`` (status 0) or ``failed`` (non-zero status, or
  a signal);
- the runner still knows the job: ``running`` if it started (or the runner
  says it runs), else ``submitted``;
- the runner forgot it: ``failed`` if it started (it recorded no exit: killed
  hard, node lost), ``submit-failed`` if it never started;
- the runner was not asked (rate limit) or could not be (SSH or runner
  failure): ``running`` if the status file says the job started, else no
  change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..job_runners.base import RunnerJobState
from ..model import JobState

__all__ = ["parse_status", "Decision", "decide"]


def parse_status(text: str) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (the last value of a key wins)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Decision:
    """A job's new state and the fields that go with it (None: no change)."""

    state: JobState | None
    fields: dict[str, Any]


def decide(
    status_text: str,
    *,
    job_id: str,
    queried: bool,
    runner_ok: bool,
    known: dict[str, RunnerJobState],
    runner_name: str,
) -> Decision:
    """Decide a job's state from its status file and the runner's answer.

    Args:
        status_text: the job status file (read after the runner query).
        job_id: the job runner's id.
        queried: whether the runner was asked about this job.
        runner_ok: whether that query worked.
        known: the jobs the runner still knows, by job id.
        runner_name: for messages.

    Returns:
        The decision; ``state`` None means keep the current state.
    """
    st = parse_status(status_text)
    fields: dict[str, Any] = {}
    start = _time(st.get("SSHQ_JOB_INIT_TIME"))
    if start:
        fields["start_time"] = start
    if "SSHQ_JOB_EXIT_SIGNAL" in st or "SSHQ_JOB_EXIT_STATUS" in st:
        fields["exit_time"] = _time(st.get("SSHQ_JOB_EXIT_TIME"))
        if "SSHQ_JOB_EXIT_SIGNAL" in st:
            fields.update(signal=st["SSHQ_JOB_EXIT_SIGNAL"], exit_status=None, message="")
            return Decision(JobState.FAILED, fields)
        try:
            rc = int(st["SSHQ_JOB_EXIT_STATUS"])
        except ValueError:
            rc = 1
        fields.update(exit_status=rc, signal=None, message="")
        return Decision(JobState.SUCCEEDED if rc == 0 else JobState.FAILED, fields)
    if not queried or not runner_ok:
        # The status file alone: a job that started and recorded no exit runs.
        return Decision(JobState.RUNNING if start is not None else None, fields)
    if job_id in known:
        running = start is not None or known[job_id].running
        return Decision(JobState.RUNNING if running else JobState.SUBMITTED, fields)
    if start is not None:
        fields["message"] = (
            f"{runner_name} no longer knows the job and its status file records no exit"
            " (killed hard, out of memory, walltime, or node failure)"
        )
        return Decision(JobState.FAILED, fields)
    fields["message"] = f"{runner_name} no longer knows the job and it never started"
    return Decision(JobState.SUBMIT_FAILED, fields)
