"""The PBS job runner (PBS Pro / OpenPBS / Torque): parsers on documented output,
and end to end on a FAKE.

PBS cannot be installed on the test bed.  So:

- the handler's parsers are tested on output from the vendors' manuals and
  captured on real systems (``fixtures/pbs/``; each file names its source,
  and every test below says which fixture, hence which source, it reads);
- the poll program (a fixed ``sh -c`` program choosing JSON or text by
  ``qstat --version``) runs for real against a stub ``qstat`` replaying the
  documented version strings;
- ``fakes/pbs/`` is a small state-keeping FAKE of qsub, qstat and qdel that
  replays those formats.  The tests whose name says ``fake`` check the fake
  against the fixtures, then drive sshq through the real sshd of the test bed
  (user sshqtest) with the fake first on the remote PATH (platform option
  ``path_prepend``): submit, poll, kill, jobs PBS forgets, a server that is
  down.  They show that sshq works with PBS's *documented* behaviour, not that
  it works with PBS.
"""

# JobSpec coerces "1:00:00", 600, "2G" and lists (its docstring); its annotations
# say timedelta/int/tuple only, so mypy is told to allow the documented forms here.
# mypy: disable-error-code="arg-type, no-untyped-call"

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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

from sshq import AsyncClient, InvalidInputError, JobSpec, JobState
from sshq.exceptions import JobRunnerError
from sshq.job_runners import get_handler
from sshq.job_runners.base import RunnerJobState
from sshq.job_runners.pbs import HANDLER, POLL_MARK, POLL_PROGRAM
from sshq.jobscript import render_job_script

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "pbs"
LOG = "/home/u/sshq-run/log/job/sim/01"
TEST_USER = "sshqtest"
KINDS = ("documentation", "captured")


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["source"] and data["kind"].startswith(KINDS), name
    return data


def asked(*ids: str) -> str:
    """The first line the poll program prints before qstat's output."""
    return f"{POLL_MARK} json {' '.join(ids)}\n"


def job_id_from(stdout: str) -> str | None:
    """The job id as the agent finds it (re.search, MULTILINE)."""
    m = re.search(HANDLER.job_id_regex, stdout, re.MULTILINE)
    return m.group("id") if m else None


def directives(**fields: Any) -> list[str]:
    spec = JobSpec(command="true", **{"name": "sim", **fields}).normalized()
    return HANDLER.directives(spec, LOG)


# ---------------------------------------------------------------- fixtures


def test_every_fixture_names_its_source_and_is_listed() -> None:
    readme = (FIXTURES / "README.md").read_text()
    names = sorted(p.stem for p in FIXTURES.glob("*.json"))
    assert len(names) >= 15
    for name in names:
        data = fixture(name)
        assert "cases" in data or {"argv", "exit", "stdout", "stderr"} <= set(data), name
        if data.get("exit") is None and "cases" not in data:
            assert data["exit_note"], name
        if "stdout_as_published" in data:
            assert data["edits"], name
        assert f"`{name}.json`" in readme, f"{name} is not listed in the README"


# ---------------------------------------------------------------- submit


def test_registered_and_picked_up_by_name() -> None:
    assert get_handler("pbs") is HANDLER
    assert HANDLER.directive_prefix == "#PBS"


@pytest.mark.parametrize("name", ["qsub_pbspro_metis", "qsub_torque_lsg"])
def test_job_id_from_documented_qsub_output(name: str) -> None:
    """Seed 000 (PBS Pro, '18734.cm') and the SURF LSG course (Torque)."""
    data = fixture(name)
    assert job_id_from(data["stdout"]) == data["stdout"].strip()


@pytest.mark.parametrize(("stdout", "job_id"), [
    ("123\n", "123"),  # server suffix hidden
    ("123.srv@other.example.org\n", "123.srv@other.example.org"),  # qstat(1B) operand form
    ("  42.pbs01  \n", "42.pbs01"),
])
def test_job_id_forms_of_qstat_1b(stdout: str, job_id: str) -> None:
    """qstat(1B) OPERANDS: <sequence number>[.<server>][@<server>]."""
    assert job_id_from(stdout) == job_id


@pytest.mark.parametrize("stdout", ["123[].srv\n", "qsub: Unknown queue\n", "", "abc.srv\n"])
def test_no_job_id_in_other_output(stdout: str) -> None:
    """Array ids (qsub(1B): sequence_number[].servername) are not sshq's, and the
    idaholab/moose refusal 'qsub: Unknown queue' carries none."""
    assert job_id_from(stdout) is None


def test_submit_argv_is_qsub_on_the_job_file() -> None:
    assert HANDLER.submit_argv(f"{LOG}/job", LOG) == ["qsub", f"{LOG}/job"]
    assert not HANDLER.submit_stdin and not HANDLER.wrapper_walltime


# ---------------------------------------------------------------- directives


def test_directives_minimal_spec() -> None:
    assert directives() == [
        "#PBS -N sim",
        "#PBS -S /bin/bash",
        f"#PBS -o {LOG}/job.out",
        f"#PBS -e {LOG}/job.err",
        "#PBS -j n",
    ]


def test_directives_full_spec() -> None:
    lines = directives(
        walltime="26:00:01", nodes=2, tasks=8, cpus=4, memory="2G", queue="workq",
        account="proj1", mail_user="me@example.org", mail_events=("end", "fail", "begin"),
        directives=("-W group_list=grp", "-k oed"),
    )
    assert lines[5:] == [
        "#PBS -l walltime=26:00:01",
        "#PBS -l select=2:ncpus=16:mpiprocs=4:ompthreads=4:mem=2048mb",
        "#PBS -l place=scatter",
        "#PBS -q workq",
        "#PBS -A proj1",
        "#PBS -M me@example.org",
        "#PBS -m abe",
        "#PBS -W group_list=grp",
        "#PBS -k oed",
    ]


@pytest.mark.parametrize(("fields", "select"), [
    ({"cpus": 4}, "1:ncpus=4:ompthreads=4"),
    ({"tasks": 3}, "1:ncpus=3:mpiprocs=3"),
    ({"nodes": 3}, "3:ncpus=1"),
    ({"memory": "1500K"}, "1:ncpus=1:mem=2mb"),
    ({"nodes": 2, "tasks": 2}, "2:ncpus=1:mpiprocs=1"),
])
def test_select_chunks(fields: dict[str, Any], select: str) -> None:
    """qsub(1B): -l select=[N:]chunk, chunk = resource=value[:resource=value]."""
    assert f"#PBS -l select={select}" in directives(**fields)


@pytest.mark.parametrize(("events", "letters"), [
    (("begin",), "b"), (("end",), "e"), (("fail",), "a"), (("all",), "abe"),
    (("end", "begin"), "be"),
])
def test_mail_events_map_to_abe(events: tuple[str, ...], letters: str) -> None:
    """qsub(1B) -m: any combination of a (aborted), b (begins), e (terminates)."""
    assert f"#PBS -m {letters}" in directives(mail_user="me@example.org", mail_events=events)


def test_tasks_not_a_multiple_of_nodes_is_refused_naming_tasks() -> None:
    with pytest.raises(InvalidInputError, match="tasks=5 over nodes=2"):
        directives(nodes=2, tasks=5)


def test_job_name_must_start_with_letter_or_digit() -> None:
    """qsub(1B) -N: 'an alphabetic or numeric character followed by printable,
    non-white-space characters'."""
    with pytest.raises(InvalidInputError, match="job name '_x'"):
        directives(name="_x")
    assert directives(name="1x")[0] == "#PBS -N 1x"


def test_log_dir_with_colon_is_refused_and_with_space_is_quoted() -> None:
    """qsub(1B) -o/-e take [hostname:]path_name: a ':' would name a host."""
    spec = JobSpec(command="true", name="sim").normalized()
    with pytest.raises(InvalidInputError, match="must not contain ':'"):
        HANDLER.directives(spec, "/home/u/run:2/log/job/sim/01")
    lines = HANDLER.directives(spec, "/home/u/my runs/log/job/sim/01")
    assert '#PBS -o "/home/u/my runs/log/job/sim/01/job.out"' in lines


def test_rendered_script_has_directives_before_commands_and_no_v() -> None:
    """The job's environment is exported by the wrapper, so qsub -v is never used."""
    spec = JobSpec(command="echo $A", name="sim", environment={"A": "x, y=z"}).normalized()
    script = render_job_script(spec, HANDLER, job_log_dir=LOG, work_dir="/w").decode()
    assert "-v" not in "".join(line for line in script.splitlines() if line.startswith("#PBS"))
    assert "export A='x, y=z'" in script


# ---------------------------------------------------------------- poll: JSON


def test_poll_command_is_one_program_for_all_ids() -> None:
    argv = expand_ids(HANDLER.poll_command, ["1.s", "2.s"], HANDLER.ids_sep)
    assert argv == ["/bin/sh", "-c", POLL_PROGRAM, "sshq-pbs-poll", "1.s", "2.s"]
    assert expand_ids(HANDLER.kill_command, ["1.s", "2.s"], HANDLER.ids_sep) == \
        ["qdel", "1.s", "2.s"]


def test_json_manpage_queued_job() -> None:
    """OpenPBS qstat.1B -F json example (PBS 14.1): job 1.vbox in state Q."""
    data = fixture("qstat_json_manpage")
    for stdout in (data["stdout"], asked("1.vbox") + data["stdout"]):
        (state,) = HANDLER.parse_poll(0, stdout, "").values()
        assert (state.job_id, state.running, state.raw) == ("1.vbox", False, "Q")


def test_json_finished_job_counts_as_ended() -> None:
    """ExaWorks/psij-python tutorial, PBS 2022.0.0: qstat -f -F json -x shows F and
    Exit_status 0.  Ended: the job status file decides, not qstat."""
    data = fixture("qstat_json_finished_psij")
    job_id = data["argv"][-1]
    assert HANDLER.parse_poll(0, data["stdout"], "") == {}
    assert HANDLER.parse_poll(0, asked(job_id) + data["stdout"], "") == {}


def test_json_as_published_with_a_trailing_comma_is_transient() -> None:
    """The psij tutorial's abridged text is not JSON: a poll that cannot be read
    changes nothing (as PBS Pro's invalid JSON before PP-1240 would not)."""
    data = fixture("qstat_json_finished_psij")
    with pytest.raises(JobRunnerError, match="invalid JSON") as info:
        HANDLER.parse_poll(0, asked("2154.edtb-01.mcp.alcf.anl.gov")
                           + data["stdout_as_published"], "")
    assert info.value.transient


def test_json_unknown_id_exit_153_means_forgotten() -> None:
    """payu-org/payu#865, PBS 2024.1.2 on Gadi: exit 153, header-only JSON,
    'qstat: Unknown Job Id xxx.gadi-pbs'."""
    data = fixture("qstat_json_unknown_payu")
    assert data["exit"] == 153
    assert HANDLER.parse_poll(153, data["stdout"], data["stderr"]) == {}
    assert HANDLER.parse_poll(153, asked("xxx.gadi-pbs") + data["stdout"], data["stderr"]) == {}


def test_json_known_and_unknown_ids_together() -> None:
    """Composed from two documented outputs: the qstat.1B JSON job (1.vbox, Q) and
    payu#865's unknown-id line and exit 153, as qstat prints them for two ids."""
    known = fixture("qstat_json_manpage")["stdout"]
    stderr = "qstat: Unknown Job Id 7.vbox\n"
    result = HANDLER.parse_poll(153, asked("1.vbox", "7.vbox") + known, stderr)
    assert list(result) == ["1.vbox"]


def test_json_first_job_only_is_transient_not_ended() -> None:
    """openpbs/openpbs#2672 (OpenPBS main): two running ids asked, JSON reports the
    first only and no error.  Job 11 must not be taken for ended."""
    data = fixture("qstat_json_first_only_openpbs2672")
    with pytest.raises(JobRunnerError, match=r"job\(s\) 11 ") as info:
        HANDLER.parse_poll(0, asked("10", "11") + data["stdout"], "")
    assert info.value.transient
    # Asked about job 10 alone, the same answer is fine (id matched by number).
    (state,) = HANDLER.parse_poll(0, asked("10") + data["stdout"], "").values()
    assert state.job_id == "10"


def test_silence_is_never_an_end() -> None:
    """qstat(1B) EXIT STATUS zero means every operand was processed: an empty
    answer about an asked id is a failed poll."""
    with pytest.raises(JobRunnerError) as info:
        HANDLER.parse_poll(0, asked("5.srv"), "")
    assert info.value.transient


# ---------------------------------------------------------------- poll: text


@pytest.mark.parametrize(("name", "running", "raw"), [
    ("qstat_text_torque_queued", False, "Q"),
    ("qstat_text_torque_running", True, "R"),
])
def test_torque_text_active_jobs(name: str, running: bool, raw: str) -> None:
    """biocore/oecophylla barnacle test data: qstat -f of Torque 4.2.8."""
    data = fixture(name)
    job_id = data["argv"][-1]
    for stdout in (data["stdout"], f"{POLL_MARK} text {job_id}\n" + data["stdout"]):
        assert HANDLER.parse_poll(0, stdout, "") == {job_id: RunnerJobState(job_id, running, raw)}


@pytest.mark.parametrize("name", ["qstat_text_torque_completed_ok",
                                  "qstat_text_torque_completed_fail"])
def test_torque_text_completed_jobs_count_as_ended(name: str) -> None:
    """biocore/oecophylla barnacle test data: Torque 4.2.8 state C (exit_status 0, -11)."""
    data = fixture(name)
    job_id = data["argv"][-1]
    assert HANDLER.parse_poll(0, f"{POLL_MARK} text {job_id}\n" + data["stdout"], "") == {}


def test_torque_text_several_jobs_with_continuation_lines() -> None:
    """All four barnacle captures in one answer: the tab-continued Variable_List
    and submit_args lines never start a job or a state."""
    names = ["qstat_text_torque_queued", "qstat_text_torque_running",
             "qstat_text_torque_completed_ok", "qstat_text_torque_completed_fail"]
    ids = [fixture(n)["argv"][-1] for n in names]
    body = "".join(fixture(n)["stdout"] for n in names)
    result = HANDLER.parse_poll(0, f"{POLL_MARK} text {' '.join(ids)}\n" + body, "")
    assert {k: v.raw for k, v in result.items()} == {ids[0]: "Q", ids[1]: "R"}


@pytest.mark.parametrize("exit_status", [153, 1])
def test_torque_unknown_id_error_names_another_server(exit_status: int) -> None:
    """SURF LSG course (Torque): qsub printed 6401.gb-ce-kun.els.sara.nl, qstat said
    'Unknown Job Id Error 6401.gb-ui-kun.els.sara.nl': same job number."""
    data = fixture("qstat_torque_unknown_lsg")
    stdout = f"{POLL_MARK} text 6401.gb-ce-kun.els.sara.nl\n"
    assert HANDLER.parse_poll(exit_status, stdout, data["stderr"]) == {}


@pytest.mark.parametrize("exit_status", [35, 1])
def test_history_job_without_x_means_ended(exit_status: int) -> None:
    """Palmetto lesson (PBS Pro): 'qstat: 1453338.pbs02 Job has finished, use -x or
    -H to obtain historical job information' (PBSE_HISTJOBID, exit 35)."""
    data = fixture("qstat_pbspro_history_without_x")
    stdout = f"{POLL_MARK} text 1453338.pbs02\n"
    assert HANDLER.parse_poll(exit_status, stdout, data["stderr"]) == {}


# ---------------------------------------------------------------- poll: failures


@pytest.mark.parametrize("exit_status", [1, 2, 170, 255])
@pytest.mark.parametrize("case", range(4))
def test_pbspro_server_down_is_transient(case: int, exit_status: int) -> None:
    """cylc/cylc-flow#6531: PBS 2022.1.7 and 18.2.6 'cannot connect to server'."""
    stderr = fixture("qstat_server_down_pbspro")["cases"][case]["stderr"]
    with pytest.raises(JobRunnerError, match="cannot connect to server") as info:
        HANDLER.parse_poll(exit_status, asked("1.srv"), stderr)
    assert info.value.transient


@pytest.mark.parametrize("exit_status", [1, 111])
def test_torque_server_down_is_transient(exit_status: int) -> None:
    """cBio/cbio-cluster#178 (Torque): 'Unable to communicate with ...'."""
    data = fixture("qstat_server_down_torque")
    with pytest.raises(JobRunnerError, match="cannot connect") as info:
        HANDLER.parse_poll(exit_status, f"{POLL_MARK} text 1.srv\n", data["stderr"])
    assert info.value.transient


def test_unknown_id_next_to_a_server_error_is_transient() -> None:
    """Composed from payu#865 and cylc#6531: one id unknown, and a connection error
    (another server): nothing can be concluded."""
    stderr = ("qstat: Unknown Job Id 1.srv\nConnection refused\n"
              "qstat: cannot connect to server other (errno=15010)\n")
    with pytest.raises(JobRunnerError):
        HANDLER.parse_poll(153, asked("1.srv", "2.srv@other"), stderr)


def test_qstat_not_installed_is_transient() -> None:
    with pytest.raises(JobRunnerError) as info:
        HANDLER.parse_poll(127, f"{POLL_MARK} text 1.srv\n", "sh: 1: exec: qstat: not found\n")
    assert info.value.transient


def test_qdel_output_parses_to_nothing() -> None:
    """The client reads the kill command's output with parse_poll too.  qdel errors
    are printed like qstat's (OpenPBS err_handling.c prt_job_err: '%s: %s %s')."""
    assert HANDLER.parse_poll(0, "", "") == {}
    assert HANDLER.parse_poll(153, "", "qdel: Unknown Job Id 9.srv\n") == {}


# ---------------------------------------------------------------- the poll program


@pytest.mark.parametrize("case", fixture("qstat_version")["cases"],
                         ids=lambda c: c["stdout"].strip() or c["stderr"].split("\n")[0])
def test_poll_program_picks_json_or_text_by_qstat_version(case: dict[str, str],
                                                          tmp_path: Path) -> None:
    """qstat --version strings (reframe#2936 PBS 19.2.8; atsim.pro_fit: PBSPro 11.1
    and Torque 2.4.16; Torque's qstat.c 'Version: ...' on stderr): JSON with -x for
    PBS Pro 14+ and OpenPBS, the text format otherwise."""
    (tmp_path / "v.out").write_text(case["stdout"])
    (tmp_path / "v.err").write_text(case["stderr"])
    stub = tmp_path / "qstat"
    stub.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then cat {tmp_path}/v.out; cat {tmp_path}/v.err >&2;'
        " exit 0; fi\n"
        'printf "ARGV:"; printf " [%s]" "$@"; echo\n')
    stub.chmod(0o755)
    ids = ["1.s", "2.s@o"]
    r = subprocess.run(expand_ids(HANDLER.poll_command, ids, None), capture_output=True,
                       text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 0, r.stderr
    flavour = case["flavour"]
    expected = "[-f] [-F] [json] [-x]" if flavour == "json" else "[-f]"
    assert r.stdout == f"{POLL_MARK} {flavour} 1.s 2.s@o\nARGV: {expected} [1.s] [2.s@o]\n"


# ---------------------------------------------------------------- ssh-to-job


def test_ssh_to_job_goes_through_the_execution_host() -> None:
    assert HANDLER.attach_via_exec_host


# ================================================================ the FAKE


@dataclass
class FakePbs:
    """One private copy of tests/fakes/pbs: <root>/bin (on the remote PATH) and
    <root>/state (owned by the test user)."""

    root: Path
    user: str | None = TEST_USER  # who runs its commands here (None: this process's user)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def configure(self, **settings: Any) -> None:
        self.settings.update(settings)
        path = self.state / "config.json"
        path.write_text(json.dumps(self.settings))
        path.chmod(0o644)

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one fake command on this machine, as :attr:`user`."""
        argv = [str(self.bin / command), *args]
        if self.user is not None:
            argv = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              cwd="/", env={"PATH": "/usr/bin:/bin"})

    def reported(self, ids: list[str]) -> set[str]:
        """The ids the fake's qstat -x still reports (finished ones included)."""
        r = self.run("qstat", "-f", "-F", "json", "-x", *ids)
        return set(json.loads(r.stdout).get("Jobs", {})) if r.stdout.strip() else set()

    def records(self) -> list[dict[str, Any]]:
        out = []
        for p in (self.state / "jobs").glob("*.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                pass
        return out

    def stop_everything(self) -> None:
        for rec in self.records():
            for pid, group in ((rec.get("job_pid"), True), (rec.get("launcher_pid"), False)):
                if pid:
                    try:
                        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
                    except OSError:
                        pass


@pytest.fixture
def local_fake(tmp_path: Path) -> Iterator[FakePbs]:
    """A fake for this machine's user (no sshd): checks of the fake itself."""
    fake = FakePbs(copy_fake("pbs", tmp_path), user=None)
    fake.configure(queue_delay=0.3, history_seconds=2.0, kill_delay=1.0)
    try:
        yield fake
    finally:
        fake.stop_everything()


@pytest.fixture
def fake_pbs(testbed: dict[str, str]) -> Iterator[FakePbs]:
    """A fake in a fresh directory the test user can read, removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the fake's state directory belongs to the test user")
    fake = FakePbs(copy_fake("pbs", TESTBED_DIR, owner=testbed["SSHQ_TEST_USER"]))
    fake.configure(queue_delay=0.5, history_seconds=3.0, kill_delay=2.0)
    try:
        yield fake
    finally:
        fake.stop_everything()
        shutil.rmtree(fake.root, ignore_errors=True)


# ---------------------------------------------------------------- the fake vs the fixtures


def test_fake_replays_the_documented_formats(local_fake: FakePbs, tmp_path: Path) -> None:
    """The fake's answers have the fixtures' shapes: the qstat.1B JSON header, the
    payu#865 unknown-id line and exit 153, the Palmetto 'Job has finished' line and
    exit 35, qsub's '<seq>.<server>' (seed 000), and the handler reads them."""
    fake = local_fake
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#PBS -N fmt\n#PBS -o {tmp_path}/o\n#PBS -e {tmp_path}/e\n"
                      "echo out; exit 4\n")
    r = fake.run("qsub", str(script))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id_from(r.stdout) == job_id and job_id.endswith(".fakeserver")

    r = fake.run("qstat", "-f", "-F", "json", "-x", job_id, "99.fakeserver")
    doc = json.loads(r.stdout)
    manpage = json.loads(fixture("qstat_json_manpage")["stdout"])
    assert set(doc) == set(manpage)
    assert set(doc["Jobs"][job_id]) >= set(manpage["Jobs"]["1.vbox"])
    assert r.returncode == 153
    assert r.stderr == "qstat: Unknown Job Id 99.fakeserver\n"
    assert r.stderr.replace("99.fakeserver", "xxx.gadi-pbs") == \
        fixture("qstat_json_unknown_payu")["stderr"]

    deadline = time.monotonic() + 30
    while doc["Jobs"].get(job_id, {}).get("job_state") != "F":
        assert time.monotonic() < deadline
        time.sleep(0.1)
        doc = json.loads(fake.run("qstat", "-f", "-F", "json", "-x", job_id).stdout)
    assert doc["Jobs"][job_id]["Exit_status"] == 4
    assert (tmp_path / "o").read_text() == "out\n"

    r = fake.run("qstat", "-f", job_id)
    assert r.returncode == 35
    palmetto = fixture("qstat_pbspro_history_without_x")["stderr"]
    assert r.stderr == palmetto.replace("1453338.pbs02", job_id)

    deadline = time.monotonic() + 30
    while fake.reported([job_id]):
        assert time.monotonic() < deadline, "the fake never forgot the finished job"
        time.sleep(0.2)
    r = fake.run("qstat", "-f", "-F", "json", "-x", job_id)
    assert r.returncode == 153 and "Jobs" not in json.loads(r.stdout)


def test_fake_torque_flavour_replays_torque(local_fake: FakePbs, tmp_path: Path) -> None:
    """Torque flavour: no -F (Torque's getopt string has none), text 'Job Id:' with
    job_state C and exit_status (barnacle captures), 'Unknown Job Id Error' (LSG)."""
    fake = local_fake
    fake.configure(flavour="torque", queues=["batch"])
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#PBS -o {tmp_path}/o\n#PBS -e {tmp_path}/e\nexit 0\n")
    job_id = fake.run("qsub", str(script)).stdout.strip()
    r = fake.run("qstat", "-f", "-F", "json", job_id)
    assert r.returncode == 2 and "invalid option -- 'F'" in r.stderr
    r = fake.run("qstat", "--version")
    assert r.stdout == "" and r.stderr.startswith("Version: ")
    deadline = time.monotonic() + 30
    while "job_state = C" not in (r := fake.run("qstat", "-f", job_id)).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.stdout.startswith(f"Job Id: {job_id}\n    Job_Name = job.sh\n")
    assert "    exit_status = 0\n" in r.stdout
    assert HANDLER.parse_poll(0, f"{POLL_MARK} text {job_id}\n" + r.stdout, "") == {}
    r = fake.run("qstat", "-f", "77")
    assert r.stderr == "qstat: Unknown Job Id Error 77.fakeserver\n" and r.returncode == 153


# ---------------------------------------------------------------- end to end on the fake


@pytest.fixture
def config_file(tmp_path: Path, testbed: dict[str, str], run_id: str,
                fake_pbs: FakePbs) -> Path:
    """Platforms ``pbs`` (asyncssh) and ``pbs-openssh`` with the fake first on PATH;
    the job runner is asked on every poll (no rate limit: the tests wait on it).

    conftest's ``client`` and ``sshq`` use it."""
    rd = f"~/sshq-test/{run_id}"
    text = "".join(
        platform_toml(testbed, name, job_runner="pbs", transport=transport, run_dir=rd,
                      path_prepend=[str(fake_pbs.bin)], min_poll_interval=0)
        for name, transport in (("pbs", "asyncssh"), ("pbs-openssh", "openssh")))
    p = tmp_path / "pbs-platforms.toml"
    p.write_text(text)
    return p


async def wait_started(client: AsyncClient, sid: int, timeout: float = 60.0) -> None:
    """Wait until the job wrapper recorded its start (its traps are set)."""
    deadline = time.monotonic() + timeout
    while "SSHQ_JOB_INIT_TIME" not in await status_of(client, sid):
        assert time.monotonic() < deadline, f"job {sid} never started"
        await asyncio.sleep(0.2)


async def wait_forgotten(fake: FakePbs, ids: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while fake.reported(ids):
        assert time.monotonic() < deadline, f"the fake still reports {ids}"
        await asyncio.sleep(0.3)


def pgrep_user(pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-u", TEST_USER, "-f", pattern], capture_output=True,
                       text=True, timeout=30)
    return r.stdout.split()


def marker() -> str:
    """A unique ``sleep`` duration: its command line marks one test's process."""
    return f"3{random.randrange(10**8):08d}"


@pytest.mark.parametrize("platform", ["pbs", "pbs-openssh"])
async def test_fake_pbs_submit_queued_running_succeeded(
        fake_pbs: FakePbs, client: AsyncClient, platform: str, run_id: str) -> None:
    fake_pbs.configure(queue_delay=3.0)
    spec = JobSpec(command='echo "hello from $SSHQ_JOB_NAME"; echo "to err" >&2; sleep 2',
                   name="basic")
    (job,) = await client.submit(spec, platform=platform)
    assert job.state is JobState.SUBMITTED, job.message
    assert job.job_runner == "pbs"
    assert re.fullmatch(r"\d+\.fakeserver", job.job_id), job.job_id  # the fake, not gridengine
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMITTED  # queued (Q) for queue_delay
    job = await wait_for_state(client, job.id, JobState.RUNNING)
    (job,) = await client.wait([job.id], timeout=60)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.exit_status == 0 and job.signal is None
    assert job.start_time is not None and job.exit_time is not None
    assert await client.cat_log(job.id, "out") == b"hello from basic\n"
    assert await client.cat_log(job.id, "err") == b"to err\n"
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_ID"] == job.job_id and st["SSHQ_JOB_RUNNER_NAME"] == "pbs"
    script = (await client.cat_log(job.id, "job")).decode()
    assert "#PBS -N basic\n#PBS -S /bin/bash\n" in script
    assert f"#PBS -o {job.job_log_dir}/job.out\n" in script


async def test_fake_pbs_exit_3_is_failed(fake_pbs: FakePbs, client: AsyncClient) -> None:
    (job,) = await client.submit(JobSpec(command="echo before; exit 3", name="three"),
                                 platform="pbs")
    (job,) = await client.wait([job.id], timeout=60)
    assert job.state is JobState.FAILED, job.message
    assert job.exit_status == 3 and job.signal is None
    assert await client.cat_log(job.id) == b"before\n"
    # The fake's PBS record agrees: F with Exit_status 3 (until it forgets the job).
    r = fake_pbs.run("qstat", "-f", "-F", "json", "-x", job.job_id)
    jobs = json.loads(r.stdout).get("Jobs", {})
    if job.job_id in jobs:
        assert jobs[job.job_id]["job_state"] == "F"
        assert jobs[job.job_id]["Exit_status"] == 3


async def test_fake_pbs_kill_running_job_records_term(fake_pbs: FakePbs,
                                                      client: AsyncClient) -> None:
    m = marker()
    (job,) = await client.submit(JobSpec(command=f"echo started; sleep {m}", name="victim"),
                                 platform="pbs")
    job = await wait_for_state(client, job.id, JobState.RUNNING)
    await wait_started(client, job.id)
    deadline = time.monotonic() + 30
    while not pgrep_user(f"sleep {m}"):
        assert time.monotonic() < deadline, "the job's sleep never started"
        await asyncio.sleep(0.2)
    (job,) = await client.kill([job.id])
    if not job.state.is_final:
        (job,) = await client.wait([job.id], timeout=60)
    assert job.state is JobState.FAILED, job.message
    assert job.signal == "TERM" and job.exit_status is None
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_EXIT_SIGNAL"] == "TERM" and "SSHQ_JOB_EXIT_TIME" in st
    deadline = time.monotonic() + 30
    while pgrep_user(f"sleep {m}"):
        assert time.monotonic() < deadline, "qdel left the job's processes running"
        await asyncio.sleep(0.2)
    # qdel of a finished job changes nothing; then PBS forgets it: still failed/TERM.
    (again,) = await client.kill([job.id])
    assert again.state is JobState.FAILED and again.signal == "TERM"
    await wait_forgotten(fake_pbs, [job.job_id])
    (again,) = await client.poll([job.id])
    assert again.state is JobState.FAILED and again.signal == "TERM"


async def test_fake_pbs_deleted_while_queued_never_started(fake_pbs: FakePbs,
                                                           client: AsyncClient) -> None:
    fake_pbs.configure(queue_delay=60.0)
    (job,) = await client.submit(JobSpec(command="echo never", name="early"), platform="pbs")
    (job,) = await client.kill([job.id], settle=0.5)
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMIT_FAILED, job.state
    assert "never started" in job.message
    assert "SSHQ_JOB_INIT_TIME" not in await status_of(client, job.id)


async def test_fake_pbs_jobs_forgotten_before_first_poll(fake_pbs: FakePbs,
                                                         client: AsyncClient) -> None:
    """Jobs never polled while the fake knew them: the job status file decides."""
    jobs = await client.submit(forgotten_specs(sleep_after_kill=1), platform="pbs")
    assert [j.state for j in jobs] == [JobState.SUBMITTED] * 3, [j.message for j in jobs]
    await wait_forgotten(fake_pbs, [j.job_id for j in jobs])
    _ok, _five, killed = await check_forgotten(client, jobs)
    st = await status_of(client, killed.id)
    assert "SSHQ_JOB_INIT_TIME" in st and "SSHQ_JOB_EXIT_STATUS" not in st


async def poll_errors(client: AsyncClient, ids: list[int]) -> list[str]:
    """Poll and return the job runner errors (AsyncClient.poll drops them)."""
    _, errors = await client.poll_report(ids)
    return errors


async def test_fake_pbs_server_down_changes_nothing(fake_pbs: FakePbs,
                                                    client: AsyncClient) -> None:
    (job,) = await client.submit(JobSpec(command=f"sleep {marker()}", name="steady"),
                                 platform="pbs")
    job = await wait_for_state(client, job.id, JobState.RUNNING)
    await wait_started(client, job.id)
    fake_pbs.configure(server_down=True)
    for _ in range(2):
        errors = await poll_errors(client, [job.id])
        assert any("cannot connect to server fakeserver" in e for e in errors), errors
        (job,) = await client.jobs(ids=[job.id])
        assert job.state is JobState.RUNNING, job.message
    fake_pbs.configure(server_down=False)
    (job,) = await client.kill([job.id])
    assert job.state is JobState.FAILED and job.signal == "TERM"


async def test_fake_pbs_json_first_job_only_changes_nothing(fake_pbs: FakePbs,
                                                            client: AsyncClient) -> None:
    """The fake replays openpbs/openpbs#2672 (JSON lists the first of several ids):
    the second running job stays running instead of being taken for ended."""
    jobs = await client.submit(
        [JobSpec(command=f"sleep {marker()}", name=n) for n in ("first", "second")],
        platform="pbs")
    for j in jobs:
        await wait_for_state(client, j.id, JobState.RUNNING)
        await wait_started(client, j.id)
    fake_pbs.configure(json_first_job_only=True)
    errors = await poll_errors(client, [j.id for j in jobs])
    assert any(f"said nothing about job(s) {jobs[1].job_id} " in e for e in errors), errors
    polled = await client.jobs(ids=[j.id for j in jobs])
    assert [j.state for j in polled] == [JobState.RUNNING] * 2, [j.message for j in polled]
    fake_pbs.configure(json_first_job_only=False)
    killed = await client.kill([j.id for j in jobs])
    assert [j.signal for j in killed] == ["TERM", "TERM"]


async def test_fake_pbs_resources_and_mail_reach_qsub(fake_pbs: FakePbs,
                                                      client: AsyncClient) -> None:
    spec = JobSpec(command="echo sized", name="sized", walltime="0:10:00", nodes=1, tasks=2,
                   cpus=2, memory="512M", queue="workq", account="proj1",
                   mail_user="me@example.org", mail_events=("end", "fail"))
    (job,) = await client.submit(spec, platform="pbs")
    assert job.state is JobState.SUBMITTED, job.message
    r = fake_pbs.run("qstat", "-f", "-F", "json", "-x", job.job_id)
    attrs = json.loads(r.stdout)["Jobs"][job.job_id]
    assert attrs["Resource_List"] == {
        "walltime": "00:10:00", "select": "1:ncpus=4:mpiprocs=2:ompthreads=2:mem=512mb",
        "place": "scatter"}
    assert attrs["Mail_Points"] == "ae" and attrs["Mail_Users"] == "me@example.org"
    assert attrs["Account_Name"] == "proj1" and attrs["Join_Path"] == "n"
    (job,) = await client.wait([job.id], timeout=60)
    assert job.state is JobState.SUCCEEDED, job.message


async def test_fake_pbs_qsub_refusal_is_submit_failed(fake_pbs: FakePbs,
                                                      client: AsyncClient) -> None:
    ok, bad = await client.submit([JobSpec(command="echo fine", name="fine"),
                                   JobSpec(command="echo never", name="noq", queue="nosuchq")],
                                  platform="pbs")
    assert bad.state is JobState.SUBMIT_FAILED and bad.job_id == ""
    assert "Unknown queue" in bad.message
    assert ok.state is JobState.SUBMITTED, ok.message
    (ok,) = await client.wait([ok.id], timeout=60)
    assert ok.state is JobState.SUCCEEDED


async def test_fake_pbs_ssh_to_job_reaches_the_execution_host(
        fake_pbs: FakePbs, client: AsyncClient) -> None:
    # The fake runs jobs on this host, so the login node is the execution host.
    (job,) = await client.submit(JobSpec(command=f"sleep {marker()}", name="inside",
                                         environment={"MYVAR": "x y"}), platform="pbs")
    await wait_for_state(client, job.id, JobState.RUNNING)
    await wait_started(client, job.id)
    r = await client.ssh_to_job(job.id, 'printf "%s|%s" "$MYVAR" "$PWD"', timeout=60)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode() == f"x y|{job.work_dir}"
    await client.kill([job.id])


async def test_fake_torque_flavour_polls_with_text_qstat(fake_pbs: FakePbs,
                                                         client: AsyncClient) -> None:
    """The same platform setting on a Torque-like fake: qstat --version says Torque,
    so the poll uses 'qstat -f' text (the fake refuses -F like Torque)."""
    fake_pbs.configure(flavour="torque", queues=["batch"])
    jobs = await client.submit([JobSpec(command="sleep 1; echo t", name="torque-ok"),
                                JobSpec(command="exit 6", name="torque-six"),
                                JobSpec(command="echo x", name="torque-select", cpus=2)],
                               platform="pbs")
    ok, six, select = jobs
    assert select.state is JobState.SUBMIT_FAILED and "select" in select.message
    ok = await wait_for_state(client, ok.id, JobState.RUNNING)
    ok, six = await client.wait([ok.id, six.id], timeout=60)
    assert ok.state is JobState.SUCCEEDED and await client.cat_log(ok.id) == b"t\n"
    assert six.state is JobState.FAILED and six.exit_status == 6


def test_fake_pbs_cli_submit_wait(
        fake_pbs: FakePbs, sshq: Callable[..., subprocess.CompletedProcess[bytes]]) -> None:
    r = sshq("submit", "-p", "pbs", "--wait", "--json", "--name", "cli",
             "--command", "echo from-cli")
    assert r.returncode == 0, r.stderr
    (obj,) = json.loads(r.stdout)
    assert obj["state"] == "succeeded" and obj["job_runner"] == "pbs"
    assert obj["job_id"].endswith(".fakeserver")
    r = sshq("cat-log", str(obj["id"]))
    assert r.stdout == b"from-cli\n", r.stderr
    r = sshq("submit", "-p", "pbs", "--wait", "--name", "cli-fail", "--command", "exit 4")
    assert r.returncode != 0
    assert b"Traceback" not in r.stderr
