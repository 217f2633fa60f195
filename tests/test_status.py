"""sshq.remote.status: job status files and Cylc's poll semantics."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sshq.job_runners.base import RunnerJobState
from sshq.model import JobState
from sshq.remote.status import Decision, decide, parse_status

INIT = "2026-01-02T03:04:05Z"
EXIT = "2026-01-02T04:05:06Z"
T_INIT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T_EXIT = datetime(2026, 1, 2, 4, 5, 6, tzinfo=UTC)

SUBMITTED = "SSHQ_JOB_RUNNER_NAME=slurm\nSSHQ_JOB_ID=42\nSSHQ_JOB_RUNNER_SUBMIT_TIME=" + INIT + "\n"
STARTED = SUBMITTED + f"SSHQ_JOB_PID=123\nSSHQ_JOB_HOST=node1\nSSHQ_JOB_INIT_TIME={INIT}\n"


def exited(status: str | None = None, signal: str | None = None) -> str:
    text = STARTED
    if signal is not None:
        text += f"SSHQ_JOB_EXIT_SIGNAL={signal}\n"
    if status is not None:
        text += f"SSHQ_JOB_EXIT_STATUS={status}\n"
    return text + f"SSHQ_JOB_EXIT_TIME={EXIT}\n"


KNOWN_PENDING = {"42": RunnerJobState("42", False, "PENDING")}
KNOWN_RUNNING = {"42": RunnerJobState("42", True, "RUNNING")}
FORGOTTEN: dict[str, RunnerJobState] = {}
OTHER = {"43": RunnerJobState("43", True, "RUNNING")}


def run_decide(text: str, *, queried: bool = True, runner_ok: bool = True,
               known: dict[str, RunnerJobState] | None = None) -> Decision:
    return decide(text, job_id="42", queried=queried, runner_ok=runner_ok,
                  known=FORGOTTEN if known is None else known, runner_name="slurm")


def test_parse_status() -> None:
    st = parse_status("A=1\nB=x=y\n\nnot a pair\n=novalue\n C = 2 \nA=3\n")
    assert st == {"A": "3", "B": "x=y", "C": "2"}


# -------------------------------------------------------------- exit recorded


@pytest.mark.parametrize("known", [KNOWN_RUNNING, FORGOTTEN, KNOWN_PENDING])
@pytest.mark.parametrize(("queried", "runner_ok"), [(True, True), (False, True), (True, False)])
def test_exit_zero_succeeded_whatever_the_runner_says(
    known: dict[str, RunnerJobState], queried: bool, runner_ok: bool
) -> None:
    d = run_decide(exited("0"), known=known, queried=queried, runner_ok=runner_ok)
    assert d.state is JobState.SUCCEEDED
    assert d.fields["exit_status"] == 0
    assert d.fields["signal"] is None
    assert d.fields["start_time"] == T_INIT
    assert d.fields["exit_time"] == T_EXIT


@pytest.mark.parametrize("rc", [1, 3, 127, 255])
@pytest.mark.parametrize("known", [KNOWN_RUNNING, FORGOTTEN])
def test_exit_nonzero_failed(rc: int, known: dict[str, RunnerJobState]) -> None:
    d = run_decide(exited(str(rc)), known=known)
    assert d.state is JobState.FAILED
    assert d.fields["exit_status"] == rc
    assert d.fields["signal"] is None
    assert d.fields["exit_time"] == T_EXIT


def test_unparseable_exit_status_is_failure() -> None:
    # an exit is recorded, but its value is no exit status: failed, with no
    # invented number, and the message names the bad value
    d = run_decide(exited("garbage"))
    assert d.state is JobState.FAILED
    assert d.fields["exit_status"] is None
    assert "SSHQ_JOB_EXIT_STATUS 'garbage'" in d.fields["message"]


@pytest.mark.parametrize("sig", ["TERM", "XCPU", "INT", "HUP"])
@pytest.mark.parametrize("known", [KNOWN_RUNNING, FORGOTTEN])
def test_exit_signal_failed(sig: str, known: dict[str, RunnerJobState]) -> None:
    d = run_decide(exited(signal=sig), known=known)
    assert d.state is JobState.FAILED
    assert d.fields["signal"] == sig
    assert d.fields["exit_status"] is None
    assert d.fields["exit_time"] == T_EXIT


def test_signal_wins_over_status() -> None:
    # the wrapper records only one, but a status file appended twice must still
    # say the job was killed
    d = run_decide(exited(status="0", signal="TERM"))
    assert d.state is JobState.FAILED
    assert d.fields["signal"] == "TERM"


# ---------------------------------------------------------- runner knows job


@pytest.mark.parametrize("known", [KNOWN_PENDING, KNOWN_RUNNING])
def test_runner_knows_started_job_running(known: dict[str, RunnerJobState]) -> None:
    d = run_decide(STARTED, known=known)
    assert d.state is JobState.RUNNING
    assert d.fields["start_time"] == T_INIT


def test_runner_knows_not_started_job_submitted() -> None:
    d = run_decide(SUBMITTED, known=KNOWN_PENDING)
    assert d.state is JobState.SUBMITTED
    assert "start_time" not in d.fields


def test_runner_says_running_before_wrapper_started_running() -> None:
    d = run_decide(SUBMITTED, known=KNOWN_RUNNING)
    assert d.state is JobState.RUNNING


def test_empty_status_file_and_known_job_submitted() -> None:
    assert run_decide("", known=KNOWN_PENDING).state is JobState.SUBMITTED


# ---------------------------------------------------------- runner forgot job


@pytest.mark.parametrize("known", [FORGOTTEN, OTHER])
def test_runner_forgot_started_job_failed(known: dict[str, RunnerJobState]) -> None:
    d = run_decide(STARTED, known=known)
    assert d.state is JobState.FAILED
    assert "slurm" in d.fields["message"]
    assert "no exit" in d.fields["message"]
    assert d.fields["start_time"] == T_INIT


@pytest.mark.parametrize("text", [SUBMITTED, ""])
@pytest.mark.parametrize("known", [FORGOTTEN, OTHER])
def test_runner_forgot_never_started_job_submit_failed(
    text: str, known: dict[str, RunnerJobState]
) -> None:
    d = run_decide(text, known=known)
    assert d.state is JobState.SUBMIT_FAILED
    assert "never started" in d.fields["message"]
    assert "slurm" in d.fields["message"]


# ------------------------------------------------------------------ no change


@pytest.mark.parametrize("text", [SUBMITTED, STARTED, ""])
@pytest.mark.parametrize(("queried", "runner_ok"), [(True, False), (False, True), (False, False)])
def test_runner_query_failed_or_not_asked_no_change(
    text: str, queried: bool, runner_ok: bool
) -> None:
    # Without the runner's word only the status file speaks: a job that
    # started (and recorded no exit) is running; otherwise nothing changes.
    d = run_decide(text, queried=queried, runner_ok=runner_ok, known=FORGOTTEN)
    assert d.state is (JobState.RUNNING if text == STARTED else None)
    assert "message" not in d.fields
    if text == STARTED:
        assert d.fields["start_time"] == T_INIT  # still learnt from the status file


# ---------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-01-02T03:04:05Z", T_INIT),
        ("2026-01-02T03:04:05+00:00", T_INIT),
        ("2026-01-02T04:04:05+01:00", T_INIT),
        ("2026-01-02T03:04:05", T_INIT),  # naive: taken as UTC
    ],
)
def test_init_time_forms(value: str, expected: datetime) -> None:
    d = run_decide(SUBMITTED + f"SSHQ_JOB_INIT_TIME={value}\n", known=KNOWN_PENDING)
    assert d.fields["start_time"] == expected
    assert d.fields["start_time"].utcoffset() is not None
    assert d.state is JobState.RUNNING


def test_bad_init_time_means_not_started() -> None:
    d = run_decide(SUBMITTED + "SSHQ_JOB_INIT_TIME=yesterday\n", known=FORGOTTEN)
    assert "start_time" not in d.fields
    assert d.state is JobState.SUBMIT_FAILED


def test_missing_exit_time() -> None:
    d = run_decide(STARTED + "SSHQ_JOB_EXIT_STATUS=0\n")
    assert d.state is JobState.SUCCEEDED
    assert d.fields["exit_time"] is None


# ------------------------------------------------------- one home for the keys


def test_job_status_keys_are_written_in_one_module_only() -> None:
    import re
    from pathlib import Path

    import sshq
    from sshq.shipped import sshq_jobstatus as js

    keys = [js.RUNNER_NAME, js.JOB_ID, js.RUNNER_SUBMIT_TIME, js.RUNNER_SUBMIT_FAILED, js.PID,
            js.HOST, js.INIT_TIME, js.EXIT_STATUS, js.EXIT_SIGNAL, js.EXIT_TIME,
            js.CONTAINER_PREFIX]
    pattern = re.compile("|".join(re.escape(k) for k in keys))
    src = Path(sshq.__file__).parent
    found = {str(p.relative_to(src)) for p in src.rglob("*.py") if pattern.search(p.read_text())}
    assert found == {"shipped/sshq_jobstatus.py"}


def test_the_wrapper_records_the_module_s_keys() -> None:
    import re

    from sshq.job_runners import get_handler
    from sshq.jobscript import render_job_script
    from sshq.model import JobSpec
    from sshq.shipped import sshq_jobstatus as js

    script = render_job_script(JobSpec(command="true").normalized(), get_handler("slurm"),
                               job_log_dir="/r/log/job/x/01", work_dir="/r/work/x").decode()
    assert not re.search(r"@[A-Z_]+@", script)  # every placeholder filled
    for key in (js.PID, js.HOST, js.INIT_TIME, js.EXIT_STATUS, js.EXIT_SIGNAL, js.EXIT_TIME):
        assert key in script
    assert f'"$SSHQ_JOB_LOG_DIR/{js.STATUS_FILE}"' in script
