"""The HTCondor job runner: parsers on documented output, and end to end on a FAKE.

HTCondor cannot be installed on the test bed.  So:

- the handler's parsers are tested on output from the HTCondor manual, from
  HTCondor's source and captured on real systems (``fixtures/htcondor/``, each
  file names its source);
- the submit program (a fixed ``sh -c`` program) runs for real, against a stub
  ``condor_submit`` that replays a fixture;
- ``fakes/htcondor/`` is a small state-keeping FAKE of condor_submit, condor_q,
  condor_history and condor_rm that replays those formats.  The tests whose
  name says ``fake`` check the fake against the fixtures, then drive sshq
  through the real sshd of the test bed (user sshqtest) with the fake first on
  the remote PATH (platform option ``path_prepend``): submit, poll, kill, and
  jobs that leave the queue.  They show that sshq works with HTCondor's
  *documented* behaviour, not that it works with HTCondor.
"""

# JobSpec coerces "1:00:00", 600, "2G" and lists (its docstring); its annotations
# say timedelta/int/tuple only, so mypy is told to allow the documented forms here.
# mypy: disable-error-code="arg-type, no-untyped-call"

from __future__ import annotations

import base64
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml
from helpers import expand_ids, wait_for_state

from sshq import AsyncClient, InvalidInputError, JobSpec, JobState
from sshq.config import Platform
from sshq.exceptions import JobRunnerError
from sshq.job_runners import get_handler
from sshq.job_runners.htcondor import HANDLER, SUBMIT_FILE, submit_value
from sshq.jobscript import render_job_script
from sshq.remote.status import parse_status
from sshq.shipped import agent

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "htcondor"
FAKES = HERE / "fakes" / "htcondor"
FAKE_COMMANDS = ("condor_submit", "condor_q", "condor_history", "condor_rm")
KINDS = {"manual", "captured", "quoted", "source", "manual-format"}
LOG = "/home/u/sshq-run/log/job/sim/01"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["kind"] in KINDS and data["source"], name
    return data


def job_id_from(stdout: str) -> str | None:
    """The job id as the agent finds it (re.search, MULTILINE)."""
    m = re.search(HANDLER.job_id_regex, stdout, re.MULTILINE)
    return m.group("id") if m else None


def directives(**fields: Any) -> list[str]:
    spec = JobSpec(command="true", name="sim", **fields).normalized()
    return HANDLER.directives(spec, LOG)


def body(lines: list[str]) -> list[str]:
    """The submit commands of directive lines (the prefix removed)."""
    return [line.removeprefix("#CONDOR ") for line in lines]


# ---------------------------------------------------------------- fixtures


def test_every_fixture_names_its_source() -> None:
    names = sorted(p.stem for p in FIXTURES.glob("*.json"))
    assert len(names) >= 10
    readme = (FIXTURES / "README.md").read_text()
    for name in names:
        data = fixture(name)
        assert set(data) == {"source", "kind", "argv", "note", "exit", "stdout", "stderr"}
        assert data["argv"][0] in FAKE_COMMANDS
        assert f"`{name}.json`" in readme, f"{name} is not listed in the README"


# ---------------------------------------------------------------- directives


def test_registered_and_picked_up_by_name() -> None:
    assert get_handler("htcondor") is HANDLER
    assert HANDLER.directive_prefix == "#CONDOR"


def test_directives_minimal_spec() -> None:
    assert body(directives()) == [
        "universe = vanilla",
        "batch_name = sim",
        f"output = {LOG}/job.out",
        f"error = {LOG}/job.err",
        f"log = {LOG}/job.condor.log",
        "should_transfer_files = NO",
    ]


def test_directives_full_spec() -> None:
    lines = body(directives(
        cpus=4, memory="2G", walltime="1:00:00", account="group_physics.alice",
        mail_user="me@example.org", mail_events=("end", "fail"),
        directives=("request_gpus = 1", '+ProjectName = "sim"', "requirements = (Memory > 0)"),
    ))
    assert lines[6:] == [
        "request_cpus = 4",
        "request_memory = 2048",
        "periodic_remove = (JobStatus == 2) && (time() - JobCurrentStartDate > 3600)",
        "accounting_group = group_physics.alice",
        "notify_user = me@example.org",
        "notification = Complete",
        "request_gpus = 1",
        '+ProjectName = "sim"',
        "requirements = (Memory > 0)",
    ]


@pytest.mark.parametrize(("memory", "mib"), [(1, "1"), ("1500K", "2"), ("1.5G", "1536")])
def test_memory_rounded_up_to_mib(memory: object, mib: str) -> None:
    assert f"request_memory = {mib}" in body(directives(memory=memory))


def test_walltime_seconds_rounded_up() -> None:
    (line,) = [x for x in body(directives(walltime=timedelta(seconds=90.2)))
               if x.startswith("periodic_remove")]
    assert line.endswith("> 91)")


@pytest.mark.parametrize(("events", "value"), [
    (("end",), "Complete"), (("fail",), "Error"), (("end", "fail"), "Complete"),
])
def test_mail_events(events: tuple[str, ...], value: str) -> None:
    lines = body(directives(mail_user="me@example.org", mail_events=events))
    assert f"notification = {value}" in lines


@pytest.mark.parametrize("events", [("begin",), ("all",), ("begin", "end")])
def test_mail_events_htcondor_cannot_send_are_refused(events: tuple[str, ...]) -> None:
    with pytest.raises(InvalidInputError, match="mail-events"):
        directives(mail_user="me@example.org", mail_events=events)


@pytest.mark.parametrize(("field", "value"), [
    ("nodes", 2), ("nodes", 1), ("tasks", 4), ("queue", "long"),
])
def test_fields_htcondor_cannot_express_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError, match=field):
        directives(**{field: value})


@pytest.mark.parametrize("raw", [
    "--exclusive", "request_gpus", "queue 5", "name @=END", "= 1",
])
def test_raw_directive_must_be_one_submit_command(raw: str) -> None:
    with pytest.raises(InvalidInputError, match="not an HTCondor submit command"):
        directives(directives=(raw,))


@pytest.mark.parametrize("raw", [
    "executable = /bin/evil", "Output = /tmp/x", "error=/tmp/y", "log = /tmp/z", "queue = 3",
])
def test_raw_directive_for_what_sshq_sets_is_refused(raw: str) -> None:
    with pytest.raises(InvalidInputError, match="sshq sets"):
        directives(directives=(raw,))


def test_raw_directive_continuation_refused() -> None:
    with pytest.raises(InvalidInputError, match="backslash"):
        directives(directives=("requirements = (Memory > 0) \\",))


@pytest.mark.parametrize("value", [
    "$(Cluster)", "a$b", "$ENV(HOME)", " lead", "trail ", "ends\\", "tab\tin", "",
])
def test_submit_values_condor_submit_would_reinterpret_are_refused(value: str) -> None:
    with pytest.raises(InvalidInputError):
        submit_value("account", value)


@pytest.mark.parametrize("field", ["account", "mail_user"])
def test_account_and_mail_user_with_a_macro_are_refused(field: str) -> None:
    with pytest.raises(InvalidInputError, match="macro"):
        directives(**{field: "x$(Cluster)"})


def test_log_dir_with_a_dollar_is_refused() -> None:
    spec = JobSpec(command="true", name="sim").normalized()
    with pytest.raises(InvalidInputError, match="job log directory"):
        HANDLER.directives(spec, "/home/u/$(Cluster)/log/job/sim/01")


def test_log_dir_with_blanks_and_hash_is_kept_whole() -> None:
    log = "/home/u/my runs #2/log/job/sim/01"
    lines = body(HANDLER.directives(JobSpec(command="true", name="sim").normalized(), log))
    assert f"output = {log}/job.out" in lines


# ---------------------------------------------------------------- submit program


def write_stub(bin_dir: Path, name: str, cap: dict[str, Any]) -> None:
    """A stand-in ``name`` that replays one fixture (and copies its argument)."""
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / name
    stub.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        f"shutil.copy(sys.argv[1], {str(bin_dir / 'seen.sub')!r})\n"
        f"sys.stdout.write({cap['stdout']!r})\n"
        f"sys.stderr.write({cap['stderr']!r})\n"
        f"sys.exit({cap['exit']!r})\n"
    )
    stub.chmod(0o755)


def agent_submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: JobSpec,
                 cap: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Submit through the real agent code, with a stub condor_submit on PATH."""
    write_stub(tmp_path / "bin", "condor_submit", cap)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    log = tmp_path / "run" / "log" / "job" / spec.job_name / "01"
    work = tmp_path / "run" / "work" / spec.job_name
    script = render_job_script(spec.normalized(), HANDLER, job_log_dir=str(log),
                               work_dir=str(work))
    res = agent.submit_one({
        "key": "1", "log_dir": str(log), "work_dir": str(work),
        "job_b64": base64.b64encode(script).decode(),
        "submit_argv": HANDLER.submit_argv(f"{log}/job", str(log)),
        "id_regex": HANDLER.job_id_regex, "stdin_job_file": HANDLER.submit_stdin,
        "runner": HANDLER.name, "timeout": 60,
    })
    return res, log


def test_job_id_from_the_manuals_condor_submit_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = fixture("condor_submit_quickstart")
    res, log = agent_submit(tmp_path, monkeypatch, JobSpec(command="true", name="sim"), cap)
    assert res["ok"], res
    assert res["job_id"] == "6.0"
    # condor_submit's own output is passed through unchanged, the id line follows.
    assert res["stdout"] == cap["stdout"] + "sshq: HTCondor job id 6.0\n"
    assert res["stderr"] == ""
    st = parse_status((log / "job.status").read_text())
    assert st["SSHQ_JOB_ID"] == "6.0"


def test_refused_submission_is_submit_failed_with_condor_submit_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = fixture("condor_submit_no_schedd")
    res, log = agent_submit(tmp_path, monkeypatch, JobSpec(command="true", name="sim"), cap)
    assert not res["ok"]
    assert res["exit"] == 1
    assert res["stderr"] == cap["stderr"]
    assert job_id_from(res["stdout"]) is None
    assert "SSHQ_JOB_RUNNER_SUBMIT_FAILED" in (log / "job.status").read_text()


def test_job_id_regex_never_reads_condor_submits_own_lines() -> None:
    for name in ("condor_submit_quickstart", "condor_q_af_j_dirac", "condor_rm_job"):
        assert job_id_from(fixture(name)["stdout"]) is None


def test_submit_description_is_the_script_head_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's script (and an environment value) with #CONDOR lines of its own:
    # they come after the head, so they never reach condor_submit.
    script = (b"#!/bin/bash\n#CONDOR queue 100\n#CONDOR executable = /bin/evil\n"
              b"echo hi\n#CONDOR request_cpus = 64\n")
    spec = JobSpec(script=script, name="sim", cpus=2,
                   environment={"V": "x\n#CONDOR queue 7\n"})
    res, log = agent_submit(tmp_path, monkeypatch, spec, fixture("condor_submit_quickstart"))
    assert res["ok"], res
    sub = (log / SUBMIT_FILE).read_text()
    assert sub == (tmp_path / "bin" / "seen.sub").read_text()
    expected = [f"executable = {log}/job",
                *body(HANDLER.directives(spec.normalized(), str(log))), "queue"]
    assert sub.splitlines() == expected
    for injected in ("evil", "queue 100", "request_cpus = 64", "queue 7"):
        assert injected not in sub


def test_submit_argv_is_a_fixed_program_with_data_as_parameters() -> None:
    a = HANDLER.submit_argv("/x/it's `b`; c/job", "/x/it's `b`; c")
    b = HANDLER.submit_argv("/y/job", "/y")
    assert a[:4] == b[:4] == ["/bin/sh", "-c", a[2], "sshq-htcondor"]
    assert a[4:] == ["/x/it's `b`; c/job", f"/x/it's `b`; c/{SUBMIT_FILE}"]
    with pytest.raises(InvalidInputError, match="job file"):
        HANDLER.submit_argv("/x/$(Cluster)/job", "/x/$(Cluster)")


def test_submit_with_a_path_holding_shell_syntax(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    odd = tmp_path / "it's `touch CANARY` ; x & y | z"
    odd.mkdir()
    res, log = agent_submit(odd, monkeypatch, JobSpec(command="true", name="sim"),
                            fixture("condor_submit_quickstart"))
    assert res["ok"], res
    assert res["job_id"] == "6.0"
    assert (log / SUBMIT_FILE).read_text().startswith(f"executable = {log}/job\n")
    assert not list(tmp_path.rglob("CANARY"))


# ---------------------------------------------------------------- poll / kill


def parse(name: str) -> dict[str, Any]:
    cap = fixture(name)
    return HANDLER.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])


def test_poll_and_kill_commands() -> None:
    ids = ["7.0", "8.0"]
    assert expand_ids(HANDLER.poll_command, ids, HANDLER.ids_sep) == [
        "condor_q", "7.0", "8.0", "-af:jr", "JobStatus", "ExitCode"]
    assert expand_ids(HANDLER.kill_command, ids, HANDLER.ids_sep) == [
        "condor_rm", "7.0", "8.0"]
    cap = fixture("condor_q_af_jr_mixed")
    assert cap["argv"] == expand_ids(HANDLER.poll_command, cap["argv"][1:9], None)


def test_parse_poll_every_job_status() -> None:
    known = parse("condor_q_af_jr_mixed")
    assert {k: (v.running, v.raw) for k, v in known.items()} == {
        "7.0": (True, "RUNNING"),
        "8.0": (False, "IDLE"),
        "9.0": (False, "HELD"),
        "11.0": (False, "REMOVED"),
        "12.0": (True, "TRANSFERRING_OUTPUT"),
        "13.0": (True, "SUSPENDED"),
    }
    # 10.0 is Completed: its process has ended, the job status file decides.
    # 99.0 is not in the queue: no line.
    assert "10.0" not in known and "99.0" not in known


def test_parse_poll_quoted_real_line() -> None:
    (state,) = parse("condor_q_af_j_dirac").values()
    assert (state.job_id, state.running, state.raw) == ("1245.75", False, "REMOVED")


def test_parse_poll_no_job_in_queue() -> None:
    assert parse("condor_q_af_jr_none") == {}


def test_parse_poll_keeps_exit_code_in_raw() -> None:
    known = HANDLER.parse_poll(0, "5.0 3 undefined\n6.0 2 137\n", "")
    assert known["5.0"].raw == "REMOVED" and known["6.0"].raw == "RUNNING ExitCode=137"


@pytest.mark.parametrize("name", [
    "condor_q_failed_to_fetch", "condor_q_failed_to_fetch_stdout", "condor_q_no_schedd",
])
def test_schedd_trouble_is_transient(name: str) -> None:
    with pytest.raises(JobRunnerError) as info:
        parse(name)
    assert info.value.transient
    assert "condor_q failed (exit 1)" in str(info.value)


def test_schedd_trouble_with_exit_0_is_still_transient() -> None:
    cap = fixture("condor_q_failed_to_fetch")
    with pytest.raises(JobRunnerError) as info:
        HANDLER.parse_poll(0, "7.0 2 undefined\n", cap["stderr"])
    assert info.value.transient


def test_kill_output_read_as_poll_output_says_nothing() -> None:
    # condor_rm's lines are not job lines: read as a poll, they are refused
    # (transient), never taken for "no job left"
    for name in ("condor_rm_job", "condor_rm_cluster", "condor_rm_manual_old",
                 "condor_rm_not_found"):
        with pytest.raises(JobRunnerError):
            parse(name)


# ================================================================ the FAKE


@dataclass
class LocalFake:
    """A copy of the fake in a private directory, run as this user."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "htcondor"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def run(self, *argv: str, input: str | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / argv[0]), *argv[1:]], input=input,
                              capture_output=True, text=True, timeout=60,
                              cwd=cwd or self.root)


def copy_fake(root: Path) -> None:
    shutil.copytree(FAKES, root / "htcondor")
    os.chmod(root, 0o755)
    for p in (root / "htcondor").iterdir():
        p.chmod(0o755)
    (root / "htcondor").chmod(0o755)
    (root / "state").mkdir()


def stop_fake_jobs(state: Path) -> None:
    """SIGKILL the process groups of the fake's still-running jobs (by id)."""
    pgids = []
    for f in (state / "queue").glob("*.json"):
        try:
            pgid = json.loads(f.read_text()).get("_pgid")
        except (OSError, ValueError):
            continue
        if pgid:
            pgids.append(int(pgid))
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    for pgid in pgids:
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                break
            time.sleep(0.05)


@pytest.fixture
def local_fake(tmp_path: Path) -> Iterator[LocalFake]:
    fake = LocalFake(tmp_path / "fake")
    fake.root.mkdir()
    copy_fake(fake.root)
    (fake.state / "config.json").write_text(
        json.dumps({"start_delay": 0.2, "leave_queue_after": 0.5}))
    yield fake
    stop_fake_jobs(fake.state)


def wait_local(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def shape(text: str) -> str:
    """Text with every number replaced by N (to compare formats)."""
    return re.sub(r"\d+", "N", text)


def submit_sleeper(fake: LocalFake, tmp_path: Path, seconds: int = 300) -> str:
    exe = tmp_path / "sleeper.sh"
    exe.write_text(f"#!/bin/sh\necho started\nexec sleep {seconds}\n")
    exe.chmod(0o755)
    r = fake.run("condor_submit", input=f"executable = {exe}\noutput = {tmp_path}/s.out\nqueue\n")
    assert r.returncode == 0, r.stderr
    m = re.search(r"submitted to cluster (\d+)\.", r.stdout)
    assert m
    return f"{m.group(1)}.0"


def test_fake_condor_submit_replays_the_manuals_output(
        local_fake: LocalFake, tmp_path: Path) -> None:
    exe = tmp_path / "hello.sh"
    exe.write_text("#!/bin/sh\necho hello from the fake\n")
    exe.chmod(0o755)
    desc = tmp_path / "hello.sub"
    desc.write_text(f"# comment\nexecutable = {exe}\noutput = out.$(Cluster)\nqueue\n")
    r = local_fake.run("condor_submit", str(desc), cwd=tmp_path)
    cap = fixture("condor_submit_quickstart")
    assert (r.returncode, shape(r.stdout), r.stderr) == (0, shape(cap["stdout"]), "")
    assert r.stdout == "Submitting job(s).\n1 job(s) submitted to cluster 1.\n"
    wait_local(lambda: (tmp_path / "out.1").exists()
               and (tmp_path / "out.1").read_text() == "hello from the fake\n", "job output")


def test_fake_condor_q_and_history_replay_autoformat(
        local_fake: LocalFake, tmp_path: Path) -> None:
    job = submit_sleeper(local_fake, tmp_path, seconds=1)
    r = local_fake.run("condor_q", job, "42.0", "-af:jr", "JobStatus", "ExitCode")
    assert r.returncode == 0 and r.stdout in (f"{job} 1 undefined\n", f"{job} 2 undefined\n")
    known = HANDLER.parse_poll(r.returncode, r.stdout, r.stderr)
    assert list(known) == [job]
    wait_local(lambda: local_fake.run("condor_q", job, "-af:jr", "JobStatus", "ExitCode")
               .stdout == f"{job} 4 0\n", "Completed with ExitCode 0")
    # ... and leaves the queue for the history.
    wait_local(lambda: local_fake.run("condor_q", job, "-af:jr", "JobStatus").stdout == "",
               "the job to leave the queue")
    none = fixture("condor_q_af_jr_none")
    r = local_fake.run("condor_q", job, "-af:jr", "JobStatus", "ExitCode")
    assert (r.returncode, r.stdout, r.stderr) == (0, none["stdout"], none["stderr"])
    r = local_fake.run("condor_history", job, "-af:j", "JobStatus", "ExitCode")
    hist = fixture("condor_history_af_j")
    assert (r.returncode, shape(r.stdout)) == (0, shape(hist["stdout"]))
    assert r.stdout == f"{job} 4 0\n"


def test_fake_condor_rm_replays_the_sources_messages(
        local_fake: LocalFake, tmp_path: Path) -> None:
    job = submit_sleeper(local_fake, tmp_path)
    wait_local(lambda: (tmp_path / "s.out").exists()
               and (tmp_path / "s.out").read_text() == "started\n", "the job to start")
    r = local_fake.run("condor_rm", job, "999.0")
    cap = fixture("condor_rm_not_found")
    assert (r.returncode, shape(r.stdout), shape(r.stderr)) == (
        1, shape(cap["stdout"]), shape(cap["stderr"]))
    assert r.stdout == f"Job {job} marked for removal\n"
    wait_local(lambda: local_fake.run("condor_q", job, "-af:j", "JobStatus").stdout == "",
               "the removed job to leave the queue")
    r = local_fake.run("condor_history", job, "-af:j", "JobStatus", "ExitBySignal", "ExitSignal")
    assert r.stdout == f"{job} 3 true 15\n"  # SIGTERM
    job2 = submit_sleeper(local_fake, tmp_path)
    r = local_fake.run("condor_rm", job2.split(".")[0])
    assert (r.returncode, shape(r.stdout)) == (0, shape(fixture("condor_rm_cluster")["stdout"]))
    r = local_fake.run("condor_rm", job2.split(".")[0])
    assert r.returncode == 1 and "Couldn't find/remove all jobs in cluster" in r.stderr


def test_fake_schedd_down_replays_captured_failures(
        local_fake: LocalFake, tmp_path: Path) -> None:
    (local_fake.state / "schedd_down").touch()
    r = local_fake.run("condor_q", "1.0", "-af:jr", "JobStatus", "ExitCode")
    cap = fixture("condor_q_failed_to_fetch")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("\n-- Failed to fetch ads from: <")
    assert r.stderr.endswith(cap["stderr"].splitlines(keepends=True)[-1])
    with pytest.raises(JobRunnerError) as info:
        HANDLER.parse_poll(r.returncode, r.stdout, r.stderr)
    assert info.value.transient
    r = local_fake.run("condor_submit", input="executable = /bin/true\nqueue\n")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", fixture("condor_submit_no_schedd")
                                                  ["stderr"])


# ---------------------------------------------------------------- FAKE over sshd

TEST_HOME = "/home/sshqtest"
# These tests want the job runner asked on every poll (the default rate limit
# asks it at most every 10 s per host).
POLL_EVERY_TIME: dict[str, Any] = (
    {"min_poll_interval": 0} if "min_poll_interval" in Platform.__dataclass_fields__ else {})


@dataclass
class RemoteFake:
    """The fake installed for the test bed's ssh user, first on its PATH."""

    root: Path
    user: str
    config: Path

    @property
    def bin(self) -> Path:
        return self.root / "htcondor"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a fake command locally as the ssh user (root runs the tests)."""
        return subprocess.run(["runuser", "-u", self.user, "--", str(self.bin / argv[0]),
                               *argv[1:]], capture_output=True, text=True, timeout=60,
                              cwd="/")

    def set_config(self, **cfg: float) -> None:
        (self.state / "config.json").write_text(json.dumps(cfg))

    def in_history(self, job_id: str) -> bool:
        return (self.state / "history" / f"{job_id.split('.')[0]}.json").exists()


@pytest.fixture
def condor_fake(testbed: dict[str, str], tmp_path: Path, run_id: str) -> Iterator[RemoteFake]:
    """The fake, copied where the ssh user can run it, and a platform ``condor``."""
    if os.geteuid() != 0:
        pytest.skip("installing the fake for the ssh user needs root")
    user = testbed["SSHQ_TEST_USER"]
    pw = pwd.getpwnam(user)
    base = Path(testbed.get("SSHQ_TESTBED_DIR", os.path.dirname(
        os.environ.get("SSHQ_TESTBED_ENV", "/var/lib/sshq-testbed/testbed.env"))))
    root = base / f"fakes-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    try:
        copy_fake(root)
        os.chown(root / "state", pw.pw_uid, pw.pw_gid)
        cfg = tmp_path / "platforms.toml"
        cfg.write_text(platform_toml(
            testbed, "condor", job_runner="htcondor", transport="asyncssh",
            run_dir=f"~/sshq-test/{run_id}", path_prepend=[str(root / "htcondor")],
            **POLL_EVERY_TIME))
        fake = RemoteFake(root, user, cfg)
        fake.set_config(start_delay=1.0, leave_queue_after=3.0)
        yield fake
    finally:
        stop_fake_jobs(root / "state")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def cclient(condor_fake: RemoteFake, state_dir: Path) -> Any:
    c = AsyncClient(condor_fake.config, state_dir=state_dir)
    try:
        yield c
    finally:
        await c.close()




def marker() -> str:
    """A unique sleep duration: its command line marks one test's process."""
    return f"3{random.randrange(10**8):08d}"


def pgrep(user: str, pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-u", user, "-f", pattern], capture_output=True,
                       text=True, timeout=30)
    return r.stdout.split()


@pytest.mark.sshd
async def test_fake_condor_submit_running_succeeded(
        condor_fake: RemoteFake, cclient: AsyncClient, run_id: str) -> None:
    spec = JobSpec(command='echo "hello $SSHQ_JOB_NAME"; sleep 2; echo bye >&2',
                   name="hello", cpus=2, memory="1G")
    (job,) = await cclient.submit(spec, platform="condor")
    assert job.state is JobState.SUBMITTED, job.message
    assert re.fullmatch(r"\d+\.0", job.job_id), job.job_id
    assert job.job_runner == "htcondor"
    assert job.job_log_dir == f"{TEST_HOME}/sshq-test/{run_id}/log/job/hello/01"

    # (running may come from condor_q before the wrapper has recorded its start)
    job = await wait_for_state(cclient, job.id, JobState.RUNNING)
    (job,) = await cclient.wait([job.id], timeout=60, interval=0.3)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.exit_status == 0 and job.signal is None
    assert job.start_time is not None and job.exit_time is not None
    assert job.start_time <= job.exit_time
    assert await cclient.cat_log(job.id, "out") == b"hello hello\n"
    assert await cclient.cat_log(job.id, "err") == b"bye\n"
    st = parse_status((await cclient.cat_log(job.id, "status")).decode())
    assert st["SSHQ_JOB_ID"] == job.job_id and st["SSHQ_JOB_EXIT_STATUS"] == "0"
    sub = Path(job.job_log_dir, SUBMIT_FILE).read_text()
    assert sub.startswith(f"executable = {job.job_log_dir}/job\n")
    assert "request_cpus = 2\nrequest_memory = 1024\n" in sub and sub.endswith("queue\n")
    wait_local(lambda: condor_fake.run("condor_q", job.job_id).returncode == 0
               and condor_fake.in_history(job.job_id), "the job to leave the queue")
    r = condor_fake.run("condor_history", job.job_id, "-af:j", "Owner", "RequestCpus",
                        "JobBatchName")
    assert r.stdout == f"{job.job_id} {condor_fake.user} 2 hello\n"


@pytest.mark.sshd
async def test_fake_condor_exit_3_is_failed_3(
        condor_fake: RemoteFake, cclient: AsyncClient) -> None:
    (job,) = await cclient.submit(JobSpec(command="echo three; exit 3", name="three"),
                                  platform="condor")
    assert job.state is JobState.SUBMITTED, job.message
    (job,) = await cclient.wait([job.id], timeout=60, interval=0.3)
    assert job.state is JobState.FAILED, job.message
    assert job.exit_status == 3 and job.signal is None
    assert await cclient.cat_log(job.id, "out") == b"three\n"


@pytest.mark.sshd
async def test_fake_condor_kill_is_failed_by_signal_term(
        condor_fake: RemoteFake, cclient: AsyncClient) -> None:
    m = marker()
    (job,) = await cclient.submit(JobSpec(command=f"echo up; sleep {m}", name="victim"),
                                  platform="condor")
    assert job.state is JobState.SUBMITTED, job.message
    await wait_for_state(cclient, job.id, JobState.RUNNING)
    wait_local(lambda: bool(pgrep(condor_fake.user, f"sleep {m}")), "the job's sleep")
    (job,) = await cclient.kill([job.id])
    assert job.state is JobState.FAILED, job.message
    assert job.signal == "TERM" and job.exit_status is None
    wait_local(lambda: not pgrep(condor_fake.user, f"sleep {m}"), "the job's sleep to end")
    wait_local(lambda: condor_fake.in_history(job.job_id), "the removed job to leave the queue")
    r = condor_fake.run("condor_history", job.job_id, "-af:j", "JobStatus")
    assert r.stdout == f"{job.job_id} 3\n"
    (again,) = await cclient.poll([job.id])
    assert again.state is JobState.FAILED and again.signal == "TERM"


@pytest.mark.sshd
async def test_fake_condor_jobs_gone_from_queue_before_first_poll(
        condor_fake: RemoteFake, cclient: AsyncClient) -> None:
    condor_fake.set_config(start_delay=0.2, leave_queue_after=0.5)
    specs = [
        JobSpec(command="echo ok", name="gone-ok"),
        JobSpec(command="echo five; exit 5", name="gone-five"),
        # The user's script kills the job wrapper with SIGKILL: no trap runs, so
        # the status file records a start and no exit.
        JobSpec(command="echo dying; kill -9 $PPID; sleep 1", name="gone-sigkill"),
    ]
    jobs = await cclient.submit(specs, platform="condor")
    assert [j.state for j in jobs] == [JobState.SUBMITTED] * 3, [j.message for j in jobs]

    def all_gone() -> bool:
        condor_fake.run("condor_q", "-af:j", "JobStatus")  # lets the fake move them
        return all(condor_fake.in_history(j.job_id) for j in jobs)

    wait_local(all_gone, "all three jobs to leave the fake's queue", timeout=30)
    r = condor_fake.run("condor_q", *(j.job_id for j in jobs), "-af:jr", "JobStatus", "ExitCode")
    assert (r.returncode, r.stdout) == (0, "")
    stored = await cclient.jobs(ids=[j.id for j in jobs])
    assert [j.state for j in stored] == [JobState.SUBMITTED] * 3

    ok, five, killed = await cclient.poll([j.id for j in jobs])
    assert ok.state is JobState.SUCCEEDED, ok.message
    assert ok.exit_status == 0 and ok.start_time and ok.exit_time
    assert five.state is JobState.FAILED and five.exit_status == 5, five.message
    assert killed.state is JobState.FAILED
    assert killed.exit_status is None and killed.signal is None
    assert "no longer knows" in killed.message and killed.start_time is not None


@pytest.mark.sshd
async def test_fake_condor_schedd_down_poll_changes_nothing_then_recovers(
        condor_fake: RemoteFake, cclient: AsyncClient) -> None:
    m = marker()
    (job,) = await cclient.submit(JobSpec(command=f"sleep {m}", name="patient"),
                                  platform="condor")
    job = await wait_for_state(cclient, job.id, JobState.RUNNING)
    (condor_fake.state / "schedd_down").touch()
    (same,) = await cclient.poll([job.id])
    assert same.state is JobState.RUNNING and same.message == job.message
    # A submission while the schedd is down is refused with condor_submit's error.
    (refused,) = await cclient.submit(JobSpec(command="true", name="refused"),
                                      platform="condor")
    assert refused.state is JobState.SUBMIT_FAILED
    assert "Can't find address of local schedd" in refused.message
    (condor_fake.state / "schedd_down").unlink()
    (job,) = await cclient.kill([job.id])
    assert job.state is JobState.FAILED and job.signal == "TERM", job.message


@pytest.mark.sshd
async def test_fake_condor_run_dir_with_a_space(
        condor_fake: RemoteFake, testbed: dict[str, str], tmp_path: Path, state_dir: Path,
        run_id: str) -> None:
    cfg = tmp_path / "spaced.toml"
    cfg.write_text(platform_toml(
        testbed, "spaced", job_runner="htcondor", transport="asyncssh",
        run_dir=f"~/sshq-test/{run_id}/my runs #1", path_prepend=[str(condor_fake.bin)],
        **POLL_EVERY_TIME))
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        (job,) = await c.submit(JobSpec(command="echo spaced", name="sp"), platform="spaced")
        assert job.state is JobState.SUBMITTED, job.message
        (job,) = await c.wait([job.id], timeout=60, interval=0.3)
        assert job.state is JobState.SUCCEEDED, job.message
        assert await c.cat_log(job.id) == b"spaced\n"


@pytest.mark.sshd
def test_fake_condor_cli_submit_wait(condor_fake: RemoteFake, state_dir: Path) -> None:
    env = dict(os.environ, SSHQ_CONFIG=str(condor_fake.config), SSHQ_STATE_DIR=str(state_dir))
    r = subprocess.run(
        [sys.executable, "-m", "sshq", "submit", "-p", "condor", "--wait", "--json",
         "--name", "cli", "--command", "echo from the cli"],
        capture_output=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr.decode()
    (job,) = json.loads(r.stdout)
    assert job["state"] == "succeeded" and job["exit_status"] == 0
    assert re.fullmatch(r"\d+\.0", job["job_id"])
    r = subprocess.run([sys.executable, "-m", "sshq", "cat-log", str(job["id"])],
                       capture_output=True, timeout=120, env=env)
    assert (r.returncode, r.stdout) == (0, b"from the cli\n"), r.stderr.decode()
    # A refused spec is an error before anything is sent.
    r = subprocess.run(
        [sys.executable, "-m", "sshq", "submit", "-p", "condor", "--queue", "long",
         "--command", "true"], capture_output=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "cannot express queue" in r.stderr.decode()
