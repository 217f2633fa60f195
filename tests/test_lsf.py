"""The LSF job runner: parsers on documented output, and end-to-end runs on a FAKE LSF.

LSF cannot be installed here.  Two kinds of tests:

- Parser and directive tests on output from IBM's documentation or captured on
  real LSF systems by others (``tests/fixtures/lsf``, each file names its
  source; the README lists them).
- End-to-end tests against a FAKE LSF (``tests/fakes/lsf``: bsub, bjobs and
  bkill as small state-keeping Python scripts that replay the documented
  formats), driven exactly like a real cluster: through the test bed's sshd
  as user ``sshqtest``, the fake's directory first on PATH (``path_prepend``).
  Every such test says ``fake`` in its name.  They prove the handler and the
  agent work together (bsub reading the job on stdin, one bjobs for many ids,
  bkill, jobs LSF has forgotten); they prove nothing about real LSF beyond
  the formats the fake replays.
"""

# JobSpec coerces "2G"-style strings and lists (its docstring); mypy is told so.
# mypy: disable-error-code="arg-type, no-untyped-call"

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import platform_toml
from helpers import (
    check_forgotten,
    copy_fake,
    expand_ids,
    forgotten_specs,
    status_of,
    wait_for_state,
)
from testbed import TESTBED_DIR

from sshq import AsyncClient, JobSpec, JobState
from sshq.exceptions import InvalidInputError, JobRunnerError
from sshq.job_runners import get_handler
from sshq.job_runners.lsf import HANDLER as LSF
from sshq.job_runners.lsf import format_run_limit, parse_bjobs_json
from sshq.jobscript import render_job_script
from sshq.shipped import agent

FIXTURES = Path(__file__).parent / "fixtures" / "lsf"
FAKES = Path(__file__).parent / "fakes" / "lsf"
LOG = "/home/u/sshq-run/log/job/sim/01"
TEST_USER = "sshqtest"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["source"] and data["kind"], f"{name}: every fixture names its source"
    return data


def poll_fixture(name: str) -> dict[str, tuple[bool, str]]:
    f = fixture(name)
    known = LSF.parse_poll(f["exit"], f["stdout"], f["stderr"])
    return {k: (v.running, v.raw) for k, v in known.items()}


def job_id_from(stdout: str) -> str | None:
    """The job id as the agent finds it (re.search, MULTILINE)."""
    import re

    m = re.search(LSF.job_id_regex, stdout, re.MULTILINE)
    return m.group("id") if m else None


def directives(**fields: Any) -> list[str]:
    return LSF.directives(JobSpec(command="true", name="sim", **fields).normalized(), LOG)


# ---------------------------------------------------------------- fixtures: sources


def test_every_fixture_names_its_source_and_is_listed_in_the_readme() -> None:
    readme = (FIXTURES / "README.md").read_text()
    files = sorted(FIXTURES.glob("*.json"))
    assert len(files) >= 12
    for f in files:
        data = fixture(f.stem)
        assert data["kind"].split()[0] in {"verbatim", "documented", "composed"}, f.name
        assert f"`{f.name}`" in readme, f"{f.name} missing from README.md"


# ---------------------------------------------------------------- handler basics


def test_handler_is_registered_and_submits_on_stdin() -> None:
    assert get_handler("lsf") is LSF
    assert LSF.submit_stdin is True
    assert LSF.submit_argv(f"{LOG}/job", LOG) == ["bsub"]
    assert LSF.directive_prefix == "#BSUB"
    assert not LSF.wrapper_walltime  # LSF enforces -W itself


def test_one_bjobs_for_many_ids_with_the_format_as_one_word() -> None:
    argv = expand_ids(LSF.poll_command, ["11", "12", "13"], LSF.ids_sep)
    assert argv == ["bjobs", "-o", "jobid stat exit_code", "-json", "-a", "11", "12", "13"]
    # The agent's own expansion (chunks for huge id lists) gives the same argv.
    assert agent.expand(list(LSF.poll_command), ["11", "12", "13"], LSF.ids_sep) == [argv]
    assert expand_ids(LSF.kill_command, ["11", "12"], LSF.ids_sep) == ["bkill", "11", "12"]


@pytest.mark.parametrize(("name", "job_id"), [
    ("bsub_submitted_queue", "473713"),
    ("bsub_submitted_default_queue", "39605914"),
    ("bsub_please_wait", "473714"),
    ("bsub_rejected", None),
])
def test_job_id_from_bsub_output(name: str, job_id: str | None) -> None:
    assert job_id_from(fixture(name)["stdout"]) == job_id


def test_job_id_regex_ignores_look_alikes() -> None:
    assert job_id_from("Job <abc> is submitted to queue <q>.\n") is None
    assert job_id_from("Job <12> is being terminated\n") is None
    assert job_id_from("Job <12> is submitted to queue <short>.\n") == "12"


# ---------------------------------------------------------------- poll parsing


def test_poll_running_record_from_summit() -> None:
    assert poll_fixture("bjobs_json_running") == {"806290": (True, "RUN")}


def test_poll_all_states_exited_jobs_are_left_to_the_status_file() -> None:
    # EXIT jobs are not reported as known: the job status file then decides
    # their final state at once.  DONE jobs stay known (running) until the
    # status file shows their exit (see the handler's module docstring).
    assert poll_fixture("bjobs_json_all_states") == {
        "1": (False, "PEND"), "2": (False, "PEND"), "3": (False, "PSUSP"),
        "4": (True, "RUN"), "5": (True, "RUN"), "6": (True, "RUN"), "7": (True, "DONE"),
    }


@pytest.mark.parametrize(("stat", "state"), [
    ("DONE", JobState.RUNNING),  # its exit is on the way (shared file system lag)
    ("EXIT", JobState.FAILED),  # started, no exit recorded: killed hard
    ("RUN", JobState.RUNNING),
])
def test_poll_decisions_for_a_started_job_without_recorded_exit(stat: str,
                                                                 state: JobState) -> None:
    from sshq.remote.status import decide

    out = json.dumps({"RECORDS": [{"JOBID": "7", "STAT": stat, "EXIT_CODE": ""}]})
    known = LSF.parse_poll(0, out, "")
    status = "SSHQ_JOB_ID=7\nSSHQ_JOB_INIT_TIME=2026-01-01T00:00:00Z\n"
    d = decide(status, job_id="7", queried=True, runner_ok=True, known=known,
               runner_name="lsf")
    assert d.state is state
    done = status + "SSHQ_JOB_EXIT_STATUS=0\nSSHQ_JOB_EXIT_TIME=2026-01-01T00:01:00Z\n"
    d = decide(done, job_id="7", queried=True, runner_ok=True, known=known, runner_name="lsf")
    assert d.state is JobState.SUCCEEDED


def test_poll_done_record_with_escaped_slashes_and_spaces() -> None:
    f = fixture("bjobs_json_done")
    rec = parse_bjobs_json(f["stdout"])["22005"]
    assert (rec.stat, rec.exit_code, rec.error) == ("DONE", None, "")
    assert poll_fixture("bjobs_json_done") == {"22005": (True, "DONE")}


def test_poll_record_without_jobid_is_parsed_but_not_attributed() -> None:
    f = fixture("bjobs_json_psusp")
    (rec,) = parse_bjobs_json(f["stdout"]).values()
    assert (rec.job_id, rec.stat, rec.exit_code) == ("", "PSUSP", None)
    assert poll_fixture("bjobs_json_psusp") == {}


def test_poll_unknown_ids_mean_not_known() -> None:
    assert poll_fixture("bjobs_json_not_found") == {}  # exit 255: all ids unknown
    assert poll_fixture("bjobs_plain_not_found") == {}  # stderr form, exit 255
    rec = parse_bjobs_json(fixture("bjobs_json_not_found")["stdout"])["123"]
    assert rec.not_found and rec.stat == ""


def test_poll_mixed_known_finished_and_unknown() -> None:
    assert poll_fixture("bjobs_json_mixed") == {"111": (True, "RUN"), "112": (False, "PEND")}
    for stat in ("EXIT", "POST_DONE", "POST_ERR"):
        out = json.dumps({"RECORDS": [{"JOBID": "7", "STAT": stat, "EXIT_CODE": "1"}]})
        assert LSF.parse_poll(0, out, "") == {}
    recs = parse_bjobs_json(fixture("bjobs_json_mixed")["stdout"])
    assert recs["113"].exit_code == 3 and recs["114"].exit_code is None


def test_poll_json_after_please_wait_lines() -> None:
    assert poll_fixture("bjobs_json_please_wait") == {"111": (True, "RUN")}


@pytest.mark.parametrize("stat", ["USUSP", "SSUSP", "UNKWN", "ZOMBI", "DONE"])
def test_poll_dispatched_states_count_as_running(stat: str) -> None:
    out = json.dumps({"COMMAND": "bjobs", "JOBS": 1,
                      "RECORDS": [{"JOBID": "7", "STAT": stat, "EXIT_CODE": ""}]})
    assert LSF.parse_poll(0, out, "")["7"].running


@pytest.mark.parametrize("stat", ["PROV", "WAIT", "SOMETHING_NEW"])
def test_poll_waiting_or_unknown_states_are_not_running(stat: str) -> None:
    out = json.dumps({"RECORDS": [{"JOBID": "7", "STAT": stat, "EXIT_CODE": ""}]})
    assert not LSF.parse_poll(0, out, "")["7"].running


def test_poll_mbatchd_down_is_transient() -> None:
    f = fixture("bjobs_mbatchd_down")
    with pytest.raises(JobRunnerError) as info:
        LSF.parse_poll(f["exit"], f["stdout"], f["stderr"])
    assert info.value.transient
    assert "still trying" in str(info.value)


@pytest.mark.parametrize(("exit_status", "stdout", "stderr"), [
    pytest.param(0, "not json at all\n", "", id="garbage"),
    pytest.param(0, '{"COMMAND":"bjobs"}', "", id="no-records"),
    pytest.param(0, '{"RECORDS":[{"JOBID":"5","ERROR":"mbatchd is busy"}]}', "",
                 id="other-error-record"),
    pytest.param(255, '{"RECORDS":[{"JOBID":"5","STAT":"RUN"}]}', "", id="failed-no-unknown"),
    pytest.param(255, '{"RECORDS":[{"JOBID":"5","ERROR":"Job <5> is not found"}]}',
                 "batch system daemon not responding ... still trying\n", id="not-found-and-down"),
    pytest.param(127, "", "bjobs: No such file or directory", id="no-bjobs"),
    pytest.param(124, "", "\n(timed out)", id="timeout"),
])
def test_poll_failures_say_nothing_about_the_jobs(exit_status: int, stdout: str,
                                                  stderr: str) -> None:
    with pytest.raises(JobRunnerError) as info:
        LSF.parse_poll(exit_status, stdout, stderr)
    assert info.value.transient


def test_bkill_output_given_to_the_poll_parser_raises_only_runner_errors() -> None:
    # client.kill hands the kill command's output to parse_poll too (and
    # ignores runner errors there): it must fail cleanly, never crash.
    for name in ("bkill_terminated", "bkill_already_finished"):
        f = fixture(name)
        with pytest.raises(JobRunnerError):
            LSF.parse_poll(f["exit"], f["stdout"], f["stderr"])


# ---------------------------------------------------------------- directives


def test_basic_directives_and_rendered_script() -> None:
    spec = JobSpec(command="true", name="sim").normalized()
    assert LSF.directives(spec, LOG) == [
        "#BSUB -J sim", f"#BSUB -o {LOG}/job.out", f"#BSUB -e {LOG}/job.err"]
    script = render_job_script(spec, LSF, job_log_dir=LOG, work_dir="/w").decode()
    assert script.startswith("#!/bin/bash\n#BSUB -J sim\n")


def test_log_dir_with_blanks_is_quoted() -> None:
    lines = LSF.directives(JobSpec(command="true", name="sim").normalized(), "/h/my runs/01")
    assert '#BSUB -o "/h/my runs/01/job.out"' in lines


def test_log_dir_with_percent_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="%J"):
        LSF.directives(JobSpec(command="true").normalized(), "/h/100%Job/01")


@pytest.mark.parametrize(("walltime", "limit"), [
    (timedelta(minutes=10), "0:10"),
    (timedelta(seconds=61), "0:02"),  # rounded up to whole minutes
    (timedelta(seconds=1), "0:01"),
    (timedelta(hours=3, minutes=30), "3:30"),
    (timedelta(days=2, seconds=1), "48:01"),
])
def test_walltime_is_a_run_limit_in_hours_and_minutes(walltime: timedelta, limit: str) -> None:
    assert format_run_limit(walltime.total_seconds()) == limit
    assert f"#BSUB -W {limit}" in directives(walltime=walltime)


@pytest.mark.parametrize(("memory", "line"), [
    ("2G", "#BSUB -M 2048MB"),
    ("1.5G", "#BSUB -M 1536MB"),
    (100, "#BSUB -M 1MB"),
    ("512M", "#BSUB -M 512MB"),
])
def test_memory_limit_has_an_explicit_unit(memory: Any, line: str) -> None:
    assert line in directives(memory=memory)


@pytest.mark.parametrize(("fields", "lines"), [
    ({"tasks": 2}, ["#BSUB -n 2"]),
    ({"cpus": 4}, ["#BSUB -n 4", '#BSUB -R "span[hosts=1]"']),
    ({"nodes": 1}, ["#BSUB -n 1", '#BSUB -R "span[hosts=1]"']),
    ({"nodes": 1, "tasks": 2, "cpus": 4}, ["#BSUB -n 8", '#BSUB -R "span[hosts=1]"']),
    ({"tasks": 3, "cpus": 4}, ["#BSUB -n 12", '#BSUB -R "span[block=4]"']),
    ({"nodes": 3}, ["#BSUB -n 3", '#BSUB -R "span[ptile=1]"']),
    ({"nodes": 2, "tasks": 8}, ["#BSUB -n 8", '#BSUB -R "span[ptile=4]"']),
    ({"nodes": 2, "tasks": 2, "cpus": 3}, ["#BSUB -n 6", '#BSUB -R "span[ptile=3]"']),
])
def test_slots_and_placement(fields: dict[str, int], lines: list[str]) -> None:
    got = [ln for ln in directives(**fields) if ln.startswith(("#BSUB -n", "#BSUB -R"))]
    assert got == lines


@pytest.mark.parametrize("fields", [
    {"nodes": 2, "tasks": 3},  # 3 tasks cannot be spread evenly on 2 nodes
    {"nodes": 4, "tasks": 2},  # fewer tasks than nodes
    {"nodes": 2, "cpus": 4},  # one 4-CPU task cannot be split over 2 nodes
])
def test_placement_lsf_cannot_express_is_refused_naming_nodes(fields: dict[str, int]) -> None:
    with pytest.raises(InvalidInputError, match="nodes"):
        directives(**fields)


@pytest.mark.parametrize(("events", "lines"), [
    (("begin",), ["#BSUB -B"]),
    (("end",), ["#BSUB -N"]),
    (("fail",), ["#BSUB -Ne"]),
    (("end", "fail"), ["#BSUB -N"]),  # -N mails on any end; -Ne conflicts with -N
    (("begin", "fail"), ["#BSUB -B", "#BSUB -Ne"]),
    (("all",), ["#BSUB -B", "#BSUB -N"]),
])
def test_mail_events(events: tuple[str, ...], lines: list[str]) -> None:
    got = directives(mail_user="me@example.org", mail_events=events)
    assert "#BSUB -u me@example.org" in got
    assert [ln for ln in got if ln in ("#BSUB -B", "#BSUB -N", "#BSUB -Ne")] == lines


def test_queue_project_and_raw_directives() -> None:
    got = directives(queue="long q", account="proj1",
                     directives=('-R "select[mem>4000]"', "-x"))
    assert '#BSUB -q "long q"' in got
    assert "#BSUB -P proj1" in got
    assert got[-2:] == ['#BSUB -R "select[mem>4000]"', "#BSUB -x"]


def test_directive_values_lsf_cannot_carry_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        directives(queue='a"b')


@pytest.mark.parametrize(("fields", "field"), [
    ({"environment": {"X": "fine\n#BSUB -q evil"}}, "environment"),
    ({"arguments": ("ok", "  #BSUB -x")}, "arguments"),
    ({"command": "echo hi\n#BSUB -q other"}, "script"),
])
def test_bsub_lines_in_the_job_body_are_refused(fields: dict[str, Any], field: str) -> None:
    fields.setdefault("command", "true")
    spec = JobSpec(name="sim", **fields).normalized()
    with pytest.raises(InvalidInputError, match=field):
        LSF.directives(spec, LOG)


def test_bsub_text_not_at_line_start_is_fine() -> None:
    spec = JobSpec(command="echo '#BSUB is just text here'", name="sim",
                   environment={"X": "a #BSUB b"}).normalized()
    assert LSF.directives(spec, LOG)


# ---------------------------------------------------------------- the fake, locally


def load_fake_bsub() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("fake_lsf_bsub_test", str(FAKES / "bsub"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_fake_bsub_reads_the_rendered_directives() -> None:
    fake = load_fake_bsub()
    log = "/h/my runs/log/job/sim/01"
    spec = JobSpec(command="echo hi\n#not a directive", name="sim", queue="short",
                   walltime=600).normalized()
    opts = fake.parse_directives(render_job_script(spec, LSF, job_log_dir=log, work_dir="/w"))
    assert opts["-o"] == f"{log}/job.out" and opts["-e"] == f"{log}/job.err"
    assert opts["-J"] == "sim" and opts["-q"] == "short"
    assert opts["other"] == ["-W", "0:10"]


@dataclass
class LocalFake:
    root: Path

    def run(self, cmd: str, *args: str, stdin: bytes = b"", cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.root / "bin" / cmd), *args], input=stdin.decode(),
                              capture_output=True, text=True, timeout=30, cwd=cwd)


@pytest.fixture
def local_fake(tmp_path: Path) -> Iterator[LocalFake]:
    """The fake LSF run directly on this machine (no sshd), for format checks."""
    root = copy_fake("lsf", tmp_path)
    (root / "state" / "config.json").write_text(json.dumps({"pend_seconds": 0.2}))
    yield LocalFake(root)
    kill_fake_processes(root)


def test_fake_lsf_output_parses_like_the_documented_fixtures(local_fake: LocalFake,
                                                              tmp_path: Path) -> None:
    def submit(command: str, pend_seconds: float) -> str:
        (local_fake.root / "state" / "config.json").write_text(
            json.dumps({"pend_seconds": pend_seconds}))
        script = f"#!/bin/bash\n#BSUB -o {tmp_path}/o\n#BSUB -e {tmp_path}/e\n{command}\n"
        r = local_fake.run("bsub", stdin=script.encode(), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        job_id = job_id_from(r.stdout)
        assert job_id and r.stdout == f"Job <{job_id}> is submitted to default queue <normal>.\n"
        return job_id

    # A job that pends for an hour (it never starts here; not one that pends
    # for a moment: a busy machine may have run it before bjobs asks) ...
    pending = submit("exit 0", 3600)
    argv = expand_ids(LSF.poll_command, [pending, "999"], LSF.ids_sep)
    r = local_fake.run(*argv)
    assert r.returncode == 0, r.stderr  # one id is known: exit 0
    assert list(json.loads(r.stdout)) == ["COMMAND", "JOBS", "RECORDS"]
    assert LSF.parse_poll(r.returncode, r.stdout, r.stderr)[pending].raw == "PEND"
    # ... and one that starts at once and exits 3.
    job_id = submit("exit 3", 0)
    argv = expand_ids(LSF.poll_command, [job_id, "999"], LSF.ids_sep)
    deadline = time.monotonic() + 20
    while parse_bjobs_json(local_fake.run(*argv).stdout)[job_id].stat != "EXIT":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    recs = parse_bjobs_json(local_fake.run(*argv).stdout)
    assert recs[job_id].exit_code == 3 and recs["999"].not_found
    r = local_fake.run("bkill", job_id)
    assert (r.returncode, r.stderr) == (255, f"Job <{job_id}>: Job has already finished\n")
    r = local_fake.run(*expand_ids(LSF.poll_command, ["999"], None))
    assert r.returncode == 255 and LSF.parse_poll(r.returncode, r.stdout, r.stderr) == {}


# ---------------------------------------------------------------- end to end on the fake


sshd = pytest.mark.sshd


def kill_fake_processes(root: Path) -> None:
    """End what the fake started (supervisors, signal senders, jobs), by pid.

    Only pids recorded in the fake's state whose command line names the fake's
    directory are signalled: jobs run the spooled ``state/jobs/N/script``.
    """
    for d in (root / "state" / "jobs").glob("*"):
        for name in ("pid", "supervisor.pid", "bkill.pid"):
            try:
                pids = [int(p) for p in (d / name).read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if str(root).encode() not in cmdline:
                    continue
                try:
                    if name == "pid":
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@dataclass
class FakeLsf:
    """A fresh FAKE LSF in a directory the ssh test user can use."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def configure(self, **cfg: Any) -> None:
        path = self.root / "state" / "config.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(cfg)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        tmp.chmod(0o644)
        tmp.rename(path)

    def bjobs(self, ids: list[str]) -> dict[str, Any]:
        """Ask the fake's bjobs directly (as root, on this machine)."""
        argv = expand_ids(LSF.poll_command, ids, LSF.ids_sep)
        r = subprocess.run([str(self.bin / argv[0]), *argv[1:]], capture_output=True,
                           text=True, timeout=30)
        return parse_bjobs_json(r.stdout)

    def calls(self, cmd: str, since: float = 0.0) -> list[list[str]]:
        """The command lines the ssh test user ran (the fake logs each one)."""
        out = []
        for line in (self.root / "state" / "calls.log").read_text().splitlines():
            c = json.loads(line)
            if c["cmd"] == cmd and c["uid"] != 0 and c["time"] >= since:
                out.append(c["argv"])
        return out

    def meta(self, job_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.root / "state" / "jobs" / job_id / "meta.json").read_text())
        return data


@pytest.fixture
def fake_lsf(testbed: dict[str, str]) -> Iterator[FakeLsf]:
    """tests/fakes/lsf copied to /var/lib/sshq-testbed/fakes-<random>/bin, state next to it."""
    user = testbed.get("SSHQ_TEST_USER", TEST_USER)
    root = copy_fake("lsf", TESTBED_DIR, owner=user)
    try:
        calls = root / "state" / "calls.log"
        calls.touch(mode=0o644)
        pw = pwd.getpwnam(user)
        os.chown(calls, pw.pw_uid, pw.pw_gid)
        fake = FakeLsf(root)
        fake.configure(pend_seconds=0.5, clean_period=30, terminate_interval=1)
        yield fake
    finally:
        kill_fake_processes(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def config_file(tmp_path: Path, testbed: dict[str, str], fake_lsf: FakeLsf,
                run_id: str) -> Iterator[Path]:
    """Platforms ``lsf`` (asyncssh) and ``lsf-openssh``, the fake first on PATH
    (conftest's ``client`` and ``sshq`` use it)."""
    rd = f"~/sshq-test/{run_id}"
    p = tmp_path / "platforms.toml"
    p.write_text("".join(
        platform_toml(testbed, name, job_runner="lsf", transport=transport, run_dir=rd,
                      path_prepend=[str(fake_lsf.bin)])
        for name, transport in (("lsf", "asyncssh"), ("lsf-openssh", "openssh"))))
    yield p
    home = pwd.getpwnam(testbed.get("SSHQ_TEST_USER", TEST_USER)).pw_dir
    shutil.rmtree(Path(home) / "sshq-test" / run_id, ignore_errors=True)


async def wait_until(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


@sshd
@pytest.mark.parametrize("platform", ["lsf", "lsf-openssh"])
async def test_fake_lsf_submit_running_succeeded(fake_lsf: FakeLsf, client: AsyncClient,
                                                 platform: str, run_id: str) -> None:
    spec = JobSpec(command='echo "hello from $SSHQ_JOB_NAME"; echo "to err" >&2; sleep 2',
                   name="fakeok", walltime=600, memory="1G")
    (job,) = await client.submit(spec, platform=platform)
    assert job.state is JobState.SUBMITTED, job.message
    assert job.job_runner == "lsf" and job.job_id.isdigit()
    # bsub read the job on stdin and took -o/-e/-J from its #BSUB lines.
    meta = fake_lsf.meta(job.job_id)
    assert meta["name"] == "fakeok"
    assert meta["out"] == f"{job.job_log_dir}/job.out"
    assert meta["err"] == f"{job.job_log_dir}/job.err"
    assert meta["other_options"] == ["-W", "0:10", "-M", "1024MB"]
    assert meta["cwd"] == job.work_dir

    job = await wait_for_state(client, job.id, JobState.RUNNING)
    assert fake_lsf.bjobs([job.job_id])[job.job_id].stat == "RUN"
    (job,) = await client.wait([job.id], timeout=60, interval=0.3)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.exit_status == 0 and job.signal is None
    assert job.start_time is not None and job.exit_time is not None
    assert await client.cat_log(job.id, "out") == b"hello from fakeok\n"
    assert await client.cat_log(job.id, "err") == b"to err\n"
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_RUNNER_NAME"] == "lsf" and st["SSHQ_JOB_ID"] == job.job_id
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    script = (await client.cat_log(job.id, "job")).decode()
    assert script.startswith("#!/bin/bash\n#BSUB -J fakeok\n")
    assert fake_lsf.bjobs([job.job_id])[job.job_id].stat == "DONE"


@sshd
async def test_fake_lsf_exit_3_is_failed(fake_lsf: FakeLsf, client: AsyncClient) -> None:
    (job,) = await client.submit(JobSpec(command="echo before; exit 3", name="three"),
                                 platform="lsf")
    assert job.state is JobState.SUBMITTED, job.message
    (job,) = await client.wait([job.id], timeout=60, interval=0.3)
    assert job.state is JobState.FAILED
    assert job.exit_status == 3 and job.signal is None
    assert await client.cat_log(job.id) == b"before\n"
    rec = fake_lsf.bjobs([job.job_id])[job.job_id]
    assert (rec.stat, rec.exit_code) == ("EXIT", 3)


def fake_job_pids(fake: FakeLsf, job_id: str) -> list[int]:
    """The pids of the fake job's process group (its wrapper leads it)."""
    try:
        pgid = int((fake.root / "state" / "jobs" / job_id / "pid").read_text())
    except (OSError, ValueError):
        return []
    r = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, timeout=30)
    return [int(p) for p in r.stdout.split()]


@sshd
async def test_fake_lsf_kill_records_int_or_term(fake_lsf: FakeLsf,
                                                 client: AsyncClient) -> None:
    (job,) = await client.submit(JobSpec(command="echo started; sleep 300", name="victim"),
                                 platform="lsf")
    assert job.state is JobState.SUBMITTED, job.message
    job = await wait_for_state(client, job.id, JobState.RUNNING)
    # The user's script runs (so the wrapper's traps are set) once it printed.
    await wait_until(lambda: (Path(job.job_log_dir) / "job.out").exists()
                     and b"started" in (Path(job.job_log_dir) / "job.out").read_bytes(),
                     "the job to start its sleep")
    assert len(fake_job_pids(fake_lsf, job.job_id)) >= 3  # wrapper, job.user, sleep
    (killed,) = await client.kill([job.id])
    (job,) = await client.wait([job.id], timeout=60, interval=0.3)
    assert job.state is JobState.FAILED, job.message
    # bkill sends SIGINT, then SIGTERM: the wrapper records the first it traps.
    assert job.signal in ("INT", "TERM")
    assert job.exit_status is None
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_EXIT_SIGNAL"] == job.signal and "SSHQ_JOB_EXIT_TIME" in st
    rec = fake_lsf.bjobs([job.job_id])[job.job_id]
    assert rec.stat == "EXIT" and rec.exit_code in (130, 143)
    await wait_until(lambda: not fake_job_pids(fake_lsf, job.job_id), "the job's processes")
    # A second kill of a final job changes nothing.
    (again,) = await client.kill([job.id])
    assert again.state is JobState.FAILED and again.signal == job.signal


@sshd
async def test_fake_lsf_kill_pending_job_never_starts(fake_lsf: FakeLsf,
                                                      client: AsyncClient) -> None:
    fake_lsf.configure(pend_seconds=60)
    (job,) = await client.submit(JobSpec(command="echo never", name="pending"),
                                 platform="lsf")
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMITTED, job.message
    assert fake_lsf.bjobs([job.job_id])[job.job_id].stat == "PEND"
    await client.kill([job.id], settle=0)
    assert fake_lsf.calls("bkill") == [[job.job_id]]
    (job,) = await client.wait([job.id], timeout=60, interval=0.3)
    # LSF says EXIT and the status file records no start: by sshq's poll
    # semantics (remote/status.py) a job that never started and is gone is
    # submit-failed.
    assert job.state is JobState.SUBMIT_FAILED
    assert "never started" in job.message
    assert fake_lsf.bjobs([job.job_id])[job.job_id].stat == "EXIT"
    assert "SSHQ_JOB_INIT_TIME" not in await status_of(client, job.id)


@sshd
async def test_fake_lsf_forgotten_before_the_first_poll(fake_lsf: FakeLsf,
                                                        client: AsyncClient) -> None:
    """Jobs never polled while the fake knew them: the status file decides."""
    fake_lsf.configure(clean_period=1)
    jobs = await client.submit(forgotten_specs(), platform="lsf")
    assert [j.state for j in jobs] == [JobState.SUBMITTED] * 3, [j.message for j in jobs]
    ids = [j.job_id for j in jobs]

    def forgotten() -> bool:
        return all(r.not_found for r in fake_lsf.bjobs(ids).values())

    await wait_until(forgotten, "the fake to forget the three jobs", timeout=60)
    assert len(fake_lsf.calls("bsub")) == 3 and fake_lsf.calls("bjobs") == []

    ok, five, killed = await check_forgotten(client, jobs)
    # bjobs is asked only about the job whose status file records no exit.
    assert fake_lsf.calls("bjobs") == [["-o", "jobid stat exit_code", "-json", "-a",
                                        killed.job_id]]
    assert ok.start_time is not None and five.signal is None
    st = await status_of(client, killed.id)
    assert "SSHQ_JOB_INIT_TIME" in st
    assert "SSHQ_JOB_EXIT_STATUS" not in st and "SSHQ_JOB_EXIT_SIGNAL" not in st


@sshd
async def test_fake_lsf_one_bjobs_and_one_bkill_for_many_jobs(
        fake_lsf: FakeLsf, client: AsyncClient) -> None:
    jobs = await client.submit(
        [JobSpec(command="sleep 300", name=f"many{i}") for i in range(4)], platform="lsf")
    assert [j.state for j in jobs] == [JobState.SUBMITTED] * 4, [j.message for j in jobs]
    ids = {j.job_id for j in jobs}
    assert len(ids) == 4 and len(fake_lsf.calls("bsub")) == 4
    polled = await client.poll([j.id for j in jobs])
    assert all(j.state in (JobState.SUBMITTED, JobState.RUNNING) for j in polled)
    (call,) = fake_lsf.calls("bjobs")
    assert call[:4] == ["-o", "jobid stat exit_code", "-json", "-a"] and set(call[4:]) == ids
    await client.kill([j.id for j in jobs])
    (call,) = fake_lsf.calls("bkill")
    assert set(call) == ids
    done = await client.wait([j.id for j in jobs], timeout=60, interval=0.3)
    assert all(j.state in (JobState.FAILED, JobState.SUBMIT_FAILED) for j in done)


@sshd
async def test_fake_lsf_mbatchd_down_changes_no_state(fake_lsf: FakeLsf,
                                                      client: AsyncClient) -> None:
    fake_lsf.configure(pend_seconds=60)
    (job,) = await client.submit(JobSpec(command="echo late", name="outage"),
                                 platform="lsf")
    assert job.state is JobState.SUBMITTED, job.message
    fake_lsf.configure(mbatchd_down=True)
    t0 = time.time()
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMITTED  # transient: nothing changed
    assert fake_lsf.calls("bjobs", since=t0)  # bjobs was asked, and failed
    fake_lsf.configure(mbatchd_down=False)
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMITTED  # the fake knows it again: still pending


@sshd
def test_fake_lsf_cli_submit_wait(
        fake_lsf: FakeLsf, sshq: Callable[..., subprocess.CompletedProcess[bytes]]) -> None:
    r = sshq("submit", "-p", "lsf", "--wait", "--json", "--name", "clijob",
             "--command", "echo from-cli")
    assert r.returncode == 0, r.stderr
    (job,) = json.loads(r.stdout)
    assert job["state"] == "succeeded" and job["job_runner"] == "lsf"
    assert job["job_id"].isdigit() and job["exit_status"] == 0
    r = sshq("cat-log", str(job["id"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"from-cli\n"
    r = sshq("submit", "-p", "lsf", "--wait", "--command", "exit 4")
    assert r.returncode == 1
