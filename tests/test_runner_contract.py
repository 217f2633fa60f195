"""The contract every registered job runner handler keeps (pure: no I/O).

Runs over :data:`sshq.job_runners.HANDLERS`, so a new job runner is covered
the moment it is registered.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from sshq.exceptions import InvalidInputError, JobRunnerError
from sshq.job_runners import HANDLERS, JOB_RUNNERS, get_handler
from sshq.job_runners.base import IDS, JobRunnerHandler, RunnerJobState
from sshq.jobscript import render_job_script
from sshq.model import JobSpec

RUNNERS = sorted(HANDLERS)
LOG = "/home/u/sshq-run/log/job/sim/01"

FIELDS = {
    "walltime": timedelta(minutes=10),
    "nodes": 1,
    "tasks": 2,
    "cpus": 4,
    "memory": 2 * 1024**3,
    "queue": "debug",
    "account": "proj1",
    "mail_user": "me@example.org",
    "mail_events": ("begin", "end", "fail"),
}


@pytest.fixture(params=RUNNERS)
def handler(request: pytest.FixtureRequest) -> JobRunnerHandler:
    return HANDLERS[request.param]


def test_registry_lists_every_module_in_the_package() -> None:
    assert set(RUNNERS) <= set(JOB_RUNNERS)
    assert {"slurm", "background"} <= set(RUNNERS)


def test_handler_identity(handler: JobRunnerHandler) -> None:
    assert get_handler(handler.name) is handler
    assert handler.name in JOB_RUNNERS


def test_job_id_regex_has_an_id_group(handler: JobRunnerHandler) -> None:
    assert "id" in re.compile(handler.job_id_regex).groupindex


def test_poll_and_kill_templates_take_ids(handler: JobRunnerHandler) -> None:
    assert handler.poll_command.count(IDS) == 1
    assert handler.kill_command.count(IDS) == 1
    assert all(isinstance(w, str) and w for w in handler.poll_command + handler.kill_command)


def test_submit_argv_names_the_job_file(handler: JobRunnerHandler) -> None:
    argv = handler.submit_argv(f"{LOG}/job", LOG)
    assert argv and all(isinstance(w, str) for w in argv)
    assert f"{LOG}/job" in argv or handler.submit_stdin


def test_empty_poll_output_means_no_job_known(handler: JobRunnerHandler) -> None:
    assert handler.parse_poll(0, "", "") == {}


def test_failed_poll_command_raises_transient(handler: JobRunnerHandler) -> None:
    with pytest.raises(JobRunnerError) as info:
        handler.parse_poll(2, "", "fatal: cannot contact the server (connection refused)")
    assert info.value.transient


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_each_field_is_expressed_or_refused_never_dropped(
        handler: JobRunnerHandler, field: str) -> None:
    base = {"mail_user": "me@example.org"} if field == "mail_events" else {}
    spec = JobSpec(command="true", name="sim", **base, **{field: FIELDS[field]}).normalized()
    try:
        plain = handler.directives(JobSpec(command="true", name="sim", **base).normalized(), LOG)
    except InvalidInputError:
        plain = None  # the runner refuses the base already (e.g. no mail at all)
    try:
        lines = handler.directives(spec, LOG)
    except InvalidInputError as exc:
        assert any(f.replace("_", "-") in str(exc) for f in (field, *base)), exc
        return
    if handler.wrapper_walltime and field == "walltime":
        script = render_job_script(spec, handler, job_log_dir=LOG, work_dir="/w")
        assert b"XCPU" in script  # enforced by the wrapper instead
        return
    assert lines != plain, f"{handler.name} silently dropped {field}"
    assert all(line.startswith(handler.directive_prefix) for line in lines)


def test_directives_come_before_any_command(handler: JobRunnerHandler) -> None:
    spec = JobSpec(command="true", name="sim").normalized()
    script = render_job_script(spec, handler, job_log_dir=LOG, work_dir="/w").decode()
    lines = script.splitlines()
    assert lines[0].startswith("#!")
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    if handler.directive_prefix:
        last_directive = max(i for i, line in enumerate(lines)
                             if line.startswith(handler.directive_prefix))
        assert last_directive < first_cmd


def test_raw_directives_are_passed_or_refused(handler: JobRunnerHandler) -> None:
    spec = JobSpec(command="true", name="sim", directives=("--exclusive",)).normalized()
    try:
        lines = handler.directives(spec, LOG)
    except InvalidInputError:
        return
    assert any("--exclusive" in line for line in lines)


def test_runner_job_state_is_plain_data() -> None:
    s = RunnerJobState("1", True, "R")
    assert (s.job_id, s.running, s.raw) == ("1", True, "R")


def test_array_is_expressed_or_refused(handler: JobRunnerHandler) -> None:
    spec = JobSpec(command="true", name="sim", array="1-4").normalized()
    if handler.array_index_var is None:
        with pytest.raises(InvalidInputError, match="array"):
            handler.check_array(spec)
        return
    handler.check_array(spec)
    plain = handler.directives(JobSpec(command="true", name="sim").normalized(), LOG)
    assert handler.directives(spec, LOG) != plain
    assert "{id}" in handler.array_element_id and "{index}" in handler.array_element_id
    script = render_job_script(spec, handler, job_log_dir=LOG, work_dir="/w").decode()
    assert f"${{{handler.array_index_var}}}" in script  # each element logs on its own
