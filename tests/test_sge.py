"""Grid Engine: the ``sge`` handler on real captured output, and end to end.

Unit tests parse output captured from the test bed's Son of Grid Engine 8.1.9
(``tests/fixtures/sge_*.json``; each file's ``source`` says where and when).

End-to-end tests talk to the real sshd (127.0.0.1:2222) as the test bed's SGE
user ``sshqsge``, whose login shell is **tcsh**: every remote command sshq
sends must survive a csh-family shell.  Jobs go to the real single-node Grid
Engine made by ``.ci/setup-sge.sh`` (scheduler every 2 s, accounting written
at once).  Waits for Grid Engine to forget a job ask ``qstat`` locally (as
root), never bare sleeps.  Skipped without ``SSHQ_TEST_SGE=1`` in testbed.env,
unless ``SSHQ_REQUIRE_TESTBED=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml
from helpers import (
    check_forgotten,
    expand_ids,
    forgotten_specs,
    record_agent_calls,
    status_of,
    wait_for_state,
)
from testbed import require_part

from sshq import AsyncClient, HostUnreachableError, InvalidInputError, Job, JobSpec, JobState
from sshq.exceptions import JobRunnerError
from sshq.job_runners import get_handler
from sshq.jobscript import render_job_script

FIXTURES = Path(__file__).parent / "fixtures"
SGE = get_handler("sge")
LOG = "/home/u/sshq-run/log/job/sim/01"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["source"].startswith("captured from Son of Grid Engine 8.1.9")
    return data


def parse(name: str) -> dict[str, tuple[bool, str]]:
    f = fixture(name)
    known = SGE.parse_poll(f["exit"], f["stdout"], f["stderr"])
    assert all(k == s.job_id for k, s in known.items())
    return {k: (s.running, s.raw) for k, s in known.items()}


def directives(**fields: Any) -> list[str]:
    return SGE.directives(JobSpec(command="true", name="sim", **fields).normalized(), LOG)


# ================================================================ unit: submit


def test_qsub_output_gives_the_job_id() -> None:
    f = fixture("sge_qsub")
    assert f["stdout"] == 'Your job 18 ("longrun") has been submitted\n'
    m = re.search(SGE.job_id_regex, f["stdout"], re.MULTILINE)
    assert m and m.group("id") == "18"
    # An array job (a raw -t directive) is still found, so it can be polled
    # and killed rather than left running behind a "submit-failed".
    a = fixture("sge_qsub_array")
    m = re.search(SGE.job_id_regex, a["stdout"], re.MULTILINE)
    assert m and m.group("id") == "19"
    assert not re.search(SGE.job_id_regex, "Unable to run job: denied\nExiting.\n", re.MULTILINE)


def test_submit_argv_is_a_fixed_program_with_the_paths_as_arguments() -> None:
    argv = SGE.submit_argv(f"{LOG}/job", LOG)
    assert argv[:2] == ["sh", "-c"]
    assert LOG not in argv[2]
    assert 'qsub -C "" -@ "$2/job.qsub" "$1"' in argv[2]
    assert argv[3:] == ["sshq-sge-submit", f"{LOG}/job", LOG]
    assert not SGE.submit_stdin and not SGE.wrapper_walltime


def test_qsub_scans_every_line_for_directives_so_sshq_turns_that_off() -> None:
    """Captured: plain qsub of sshq's job file obeys '#$' lines in the data."""
    f = fixture("sge_submit_directive_injection")
    plain, ours = f["cases"]["plain-qsub"], f["cases"]["sshq-submit-argv"]
    assert "job_name:                   injected" in plain["stored"]
    assert "stdout_path_list:           NONE:NONE:/tmp/injected.out" in plain["stored"]
    assert ours["argv"] == SGE.submit_argv(ours["argv"][4], ours["argv"][5])
    assert ours["exit"] == 0 and ours["stderr"] == ""
    assert "job_name:                   inject" in ours["stored"]
    log = ours["argv"][5]
    assert f"stdout_path_list:           NONE:NONE:{log}/job.out" in ours["stored"]
    header = SGE.directives(JobSpec(command="x", name="inject").normalized(), log)
    assert f["job_qsub"] == "".join(line[3:] + "\n" for line in header)
    late = fixture("sge_directive_parsing")["cases"]["late-directive"]
    assert "job_name:                   quoted" in late["stored"]


def test_submit_program_gives_qsub_only_the_header(tmp_path: Path) -> None:
    """The submit program, run locally against a stand-in qsub that reports its input."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qsub"
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@"; echo ---; cat "$4"; echo ---\n'
                    'echo \'Your job 42 ("x") has been submitted\'\n')
    fake.chmod(0o755)
    log = tmp_path / "my runs" / "log" / "job" / "sim" / "01"
    log.mkdir(parents=True)
    spec = JobSpec(script=b"#!/bin/bash\n#$ -N user-header\necho hi\n", name="sim", cpus=2,
                   environment={"EVIL": "x\n#$ -N injected\n#$ -clear\n"},
                   arguments=("\n#$ -o /tmp/x",), directives=("-l gpu=1",)).normalized()
    (log / "job").write_bytes(render_job_script(spec, SGE, job_log_dir=str(log), work_dir="/w"))
    argv = SGE.submit_argv(str(log / "job"), str(log))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"))
    assert r.returncode == 0, r.stderr
    args, options, rest = r.stdout.split("---\n")
    assert args.splitlines() == ["-C", "", "-@", f"{log}/job.qsub", f"{log}/job"]
    assert options == (f"-N sim\n-o \"{log}/job.out\"\n-e \"{log}/job.err\"\n-S /bin/bash\n"
                       "-pe smp 2\n-l gpu=1\n")
    assert rest == 'Your job 42 ("x") has been submitted\n'


def test_submit_program_stops_when_the_job_file_is_unreadable(tmp_path: Path) -> None:
    argv = SGE.submit_argv(str(tmp_path / "missing"), str(tmp_path))
    env = dict(os.environ, PATH=f"{tmp_path}/nothing:/usr/bin:/bin")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode != 0
    assert "Your job" not in r.stdout


# ================================================================ unit: poll


def test_poll_is_one_fixed_program_with_the_ids_as_arguments() -> None:
    argv = expand_ids(SGE.poll_command, ["7", "8", "9"], SGE.ids_sep)
    assert argv[:2] == ["sh", "-c"]
    assert argv[2] == 'exec qstat -u "$(id -un)" -xml'
    assert argv[3:] == ["sshq-sge-poll", "7", "8", "9"]
    assert expand_ids(SGE.kill_command, ["7", "8"], SGE.ids_sep) == ["qdel", "7", "8"]


def test_poll_running_pending_held_and_array_jobs() -> None:
    # 18 running; 19 an array whose task 1 runs and tasks 2,3 wait; 20 held;
    # 21 and 22 waiting for a slot; 999999 never existed (so it is absent).
    assert parse("sge_qstat_mixed") == {
        "18": (True, "r"),
        "19": (True, "r"),
        "20": (False, "hqw"),
        "21": (False, "qw"),
        "22": (False, "qw"),
    }


def test_poll_deleting_running_jobs_still_run() -> None:
    known = parse("sge_qstat_deleting")
    assert known["18"] == (True, "dr") and known["19"] == (True, "dr")
    assert known["20"] == (False, "hqw")


def test_poll_error_state_is_known_and_not_running() -> None:
    # Eqw: the job cannot start (here: its output file); Grid Engine keeps it
    # until someone deletes it, so it stays "submitted".
    assert parse("sge_qstat_eqw") == {"21": (False, "Eqw"), "20": (False, "hqw")}


def test_poll_no_jobs_left() -> None:
    assert parse("sge_qstat_empty") == {}
    assert SGE.parse_poll(0, "", "") == {}


def test_poll_with_qmaster_down_is_transient() -> None:
    f = fixture("sge_qstat_qmaster_down")
    assert f["exit"] == 1 and "Connection refused" in f["stderr"]
    with pytest.raises(JobRunnerError) as info:
        SGE.parse_poll(f["exit"], f["stdout"], f["stderr"])
    assert info.value.transient
    assert "qstat failed (exit 1)" in str(info.value)
    assert "unable to send message to qmaster" in str(info.value)


def test_qdel_output_is_never_taken_for_a_poll() -> None:
    """qdel exits 1 when any id is unknown, even though it deleted the others.

    The client hands kill replies to ``parse_poll`` too; qdel's text must not
    pass for a job list.
    """
    f = fixture("sge_qdel")
    assert f["exit"] == 1
    assert "has deleted job" in f["stdout"] and "does not exist" in f["stdout"]  # stdout!
    with pytest.raises(JobRunnerError) as info:
        SGE.parse_poll(f["exit"], f["stdout"], f["stderr"])
    assert info.value.transient
    with pytest.raises(JobRunnerError):
        SGE.parse_poll(0, "sshqsge has registered the job 2 for deletion\n", "")


@pytest.mark.parametrize("junk", ["<job_info><queue_info>", "Your job 1 has been submitted\n"])
def test_poll_output_that_is_not_xml_is_transient(junk: str) -> None:
    with pytest.raises(JobRunnerError) as info:
        SGE.parse_poll(0, junk, "")
    assert info.value.transient


def test_poll_runs_for_real_without_a_shell_in_the_data() -> None:
    """The poll program run locally (as root): the ids are inert arguments."""
    if shutil.which("qstat") is None:
        pytest.skip("no qstat on this machine")
    canary = f"/tmp/sshq-canary-{uuid.uuid4().hex}"
    argv = expand_ids(SGE.poll_command, ["1", f"$(touch {canary})", f";touch {canary}"],
                      SGE.ids_sep)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"qstat does not work here: {r.stderr.strip()}")
    assert isinstance(SGE.parse_poll(r.returncode, r.stdout, r.stderr), dict)
    assert not os.path.exists(canary)


# ================================================================ unit: directives


def test_directives_for_every_field() -> None:
    lines = directives(walltime=timedelta(hours=1, minutes=2, seconds=3), cpus=4, memory="2G",
                       queue="all.q", account="proj1", mail_user="me@example.org",
                       mail_events=("begin", "end", "fail"), directives=("-l gpu=1",))
    assert lines == [
        "#$ -N sim",
        f"#$ -o {LOG}/job.out",
        f"#$ -e {LOG}/job.err",
        "#$ -S /bin/bash",
        "#$ -l h_rt=01:02:03",
        "#$ -pe smp 4",
        "#$ -l h_vmem=512M",   # per slot: 2 GiB over 4 slots
        "#$ -q all.q",
        "#$ -A proj1",
        "#$ -M me@example.org",
        "#$ -m bea",
        "#$ -l gpu=1",
    ]


def test_plain_job_runs_under_bash() -> None:
    assert directives() == ["#$ -N sim", f"#$ -o {LOG}/job.out", f"#$ -e {LOG}/job.err",
                            "#$ -S /bin/bash"]


@pytest.mark.parametrize(("memory", "cpus", "want"), [
    ("1G", None, "1024M"),
    ("1G", 1, "1024M"),
    ("1000M", 3, "334M"),   # rounded up: 3 x 334M covers the 1000M asked
    ("100K", None, "1M"),
    ("3G", 2, "1536M"),
])
def test_memory_is_per_node_split_over_slots(memory: str, cpus: int | None, want: str) -> None:
    assert f"#$ -l h_vmem={want}" in directives(memory=memory, cpus=cpus)


@pytest.mark.parametrize(("events", "letters"), [
    (("begin",), "b"), (("end",), "e"), (("fail",), "a"), (("all",), "bea"),
    (("fail", "begin"), "ba"), (("all", "end"), "bea"),
])
def test_mail_events(events: tuple[str, ...], letters: str) -> None:
    lines = directives(mail_user="me@example.org", mail_events=events)
    assert lines[-2:] == ["#$ -M me@example.org", f"#$ -m {letters}"]


def test_mail_user_alone() -> None:
    assert directives(mail_user="me@example.org")[-1] == "#$ -M me@example.org"


@pytest.mark.parametrize("field", ["nodes", "tasks"])
def test_nodes_and_tasks_are_refused(field: str) -> None:
    with pytest.raises(InvalidInputError, match=f"cannot express {field}"):
        directives(**{field: 1})


def test_a_name_starting_with_a_digit_is_refused() -> None:
    # qsub: 'denied: "9lives" is not a valid object name (cannot start with a digit)'
    case = fixture("sge_directive_parsing")["cases"]["digit-name"]
    assert case["exit"] == 1 and "cannot start with a digit" in case["stderr"]
    with pytest.raises(InvalidInputError, match="cannot express name '9lives'"):
        SGE.directives(JobSpec(command="true", name="9lives").normalized(), LOG)
    assert directives()[0] == "#$ -N sim"
    assert SGE.directives(JobSpec(command="true", name="a+b.c-d_9").normalized(),
                          LOG)[0] == "#$ -N a+b.c-d_9"


def test_a_log_path_with_blanks_is_double_quoted() -> None:
    # qsub strips the double quotes and keeps the blank (captured).
    case = fixture("sge_directive_parsing")["cases"]["space-in-quotes"]
    assert "stdout_path_list:           NONE:NONE:/tmp/my runs/job.out" in case["stored"]
    log = "/home/u/my runs/log/job/sim/01"
    lines = SGE.directives(JobSpec(command="true", name="sim").normalized(), log)
    assert lines[1] == f'#$ -o "{log}/job.out"'
    assert lines[2] == f'#$ -e "{log}/job.err"'


@pytest.mark.parametrize(("case", "bad"), [
    ("hash-in-quotes", "#"), ("colon", ":"), ("comma", ","), ("dollar", "$"),
])
def test_log_paths_qsub_would_misread_are_refused(case: str, bad: str) -> None:
    c = fixture("sge_directive_parsing")["cases"][case]
    wanted = c["script"].split("-o ", 1)[1].split("\n", 1)[0].strip('"')
    stored = [s.split("NONE:NONE:", 1)[1] for s in c.get("stored", [])
              if s.startswith("stdout_path_list")]
    # What the capture shows: refused, cut short, or expanded later by execd.
    assert c["exit"] != 0 or stored != [wanted] or bad == "$"
    log = f"/home/u/odd{bad}dir/log/job/sim/01"
    with pytest.raises(InvalidInputError, match=re.escape(f"cannot express run-dir '{log}")):
        SGE.directives(JobSpec(command="true", name="sim").normalized(), log)


@pytest.mark.parametrize("field", ["queue", "account", "mail_user"])
def test_hash_in_a_value_is_refused(field: str) -> None:
    with pytest.raises(InvalidInputError, match=field.replace("_", "-")):
        directives(**{field: "a#b"})


@pytest.mark.parametrize(("case", "account"), [
    ("account-blank", "my project"), ("account-colon", "proj:x"),
])
def test_accounts_qmaster_refuses_are_refused_with_a_clear_message(case: str,
                                                                   account: str) -> None:
    c = fixture("sge_directive_parsing")["cases"][case]
    assert c["exit"] == 1 and "Unable to run job" in c["stderr"]  # unhelpful, for blanks
    with pytest.raises(InvalidInputError, match="cannot express account"):
        directives(account=account)


def test_value_with_a_blank_is_quoted() -> None:
    assert '#$ -M "Jo Doe <jo@example.org>"' in directives(mail_user="Jo Doe <jo@example.org>")


def test_job_script_starts_with_the_directives() -> None:
    spec = JobSpec(command="echo hi", name="sim", cpus=2).normalized()
    script = render_job_script(spec, SGE, job_log_dir=LOG, work_dir="/w").decode()
    head = script.splitlines()[:6]
    assert head == ["#!/bin/bash", "#$ -N sim", f"#$ -o {LOG}/job.out",
                    f"#$ -e {LOG}/job.err", "#$ -S /bin/bash", "#$ -pe smp 2"]


# ================================================================ end to end: helpers

SGE_PLATFORMS = ["sge", "sge-openssh"]


@pytest.fixture
def sge_testbed(testbed: dict[str, str]) -> dict[str, str]:
    """The test bed, with Grid Engine and its tcsh user."""
    require_part(testbed, "SSHQ_TEST_SGE", "Grid Engine")
    user = testbed["SSHQ_TEST_SGE_USER"]
    shell = subprocess.run(["getent", "passwd", user], capture_output=True, text=True,
                           timeout=30).stdout.strip().split(":")[-1]
    assert shell.endswith("/tcsh"), f"{user}'s login shell is {shell!r}, not tcsh"
    return testbed


@pytest.fixture
def sge_user(sge_testbed: dict[str, str]) -> str:
    return sge_testbed["SSHQ_TEST_SGE_USER"]


@pytest.fixture
def sge_home(sge_user: str) -> str:
    return subprocess.run(["getent", "passwd", sge_user], capture_output=True, text=True,
                          timeout=30).stdout.split(":")[5]


@pytest.fixture
def config_file(sge_testbed: dict[str, str], tmp_path: Path, run_id: str) -> Path:
    """Platforms ``sge`` (asyncssh) and ``sge-openssh`` for the tcsh user; Grid Engine
    is asked on every poll (conftest's ``client`` and ``sshq`` use it)."""
    rd = f"~/sshq-test/{run_id}"
    p = tmp_path / "sge-platforms.toml"
    p.write_text("".join(
        platform_toml(sge_testbed, name, job_runner="sge", transport=transport, run_dir=rd,
                      user=sge_testbed["SSHQ_TEST_SGE_USER"], min_poll_interval=0)
        for name, transport in (("sge", "asyncssh"), ("sge-openssh", "openssh"))))
    return p


@pytest.fixture
def qdel_at_end(sge_testbed: dict[str, str]) -> Iterator[list[str]]:
    """Grid Engine job ids to delete (as root) when the test ends."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["qdel", *ids], capture_output=True, timeout=60)


def qstat_known(user: str) -> dict[str, tuple[bool, str]]:
    """The user's jobs Grid Engine still knows (asked locally, as root)."""
    r = subprocess.run(["qstat", "-u", user, "-xml"], capture_output=True, text=True,
                       timeout=60)
    return {k: (s.running, s.raw)
            for k, s in SGE.parse_poll(r.returncode, r.stdout, r.stderr).items()}


async def wait_forgotten(user: str, job_ids: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = set(job_ids) & set(qstat_known(user))
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"qstat still lists {sorted(left)} after {timeout} s")
        await asyncio.sleep(0.3)


def qacct(job_id: str) -> dict[str, str]:
    """``qacct -j ID`` as a dict of its first words ({} while it has no record)."""
    r = subprocess.run(["qacct", "-j", job_id], capture_output=True, text=True, timeout=60)
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key and value.strip():
            out[key] = value.strip()
    return out


async def wait_qacct(job_id: str, timeout: float = 60.0) -> dict[str, str]:
    """``qacct -j ID`` once it has the record (it lags the job status file:
    the wrapper writes its exit before the job's processes have ended)."""
    deadline = time.monotonic() + timeout
    while True:
        acct = qacct(job_id)
        if "exit_status" in acct:
            return acct
        if time.monotonic() > deadline:
            pytest.fail(f"qacct has no record of job {job_id} after {timeout} s")
        await asyncio.sleep(0.2)


def pgrep(user: str, pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-u", user, "-f", pattern], capture_output=True, text=True,
                       timeout=30)
    return r.stdout.split()




# ================================================================ end to end: life


@pytest.mark.sshd
@pytest.mark.parametrize("platform", SGE_PLATFORMS)
async def test_submit_wait_succeeded(client: AsyncClient, platform: str, run_id: str,
                                     sge_home: str, qdel_at_end: list[str]) -> None:
    spec = JobSpec(command='echo "hello from $SSHQ_JOB_NAME"; echo "to err" >&2;'
                           ' echo "bash $BASH_VERSION" >&2', name="basic")
    (job,) = await client.submit(spec, platform=platform)
    assert job.state is JobState.SUBMITTED, job.message
    qdel_at_end.append(job.job_id)
    assert job.job_id.isdigit() and job.job_runner == "sge"
    assert job.job_log_dir == f"{sge_home}/sshq-test/{run_id}/log/job/basic/01"

    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.exit_status == 0 and job.signal is None
    assert job.start_time is not None and job.exit_time is not None
    assert await client.cat_log(job.id, "out") == b"hello from basic\n"
    err = (await client.cat_log(job.id, "err")).decode()
    assert err.startswith("to err\nbash 5.")  # -S /bin/bash: the wrapper runs under bash
    st = await status_of(client, job.id)
    assert st["SSHQ_JOB_ID"] == job.job_id
    assert st["SSHQ_JOB_RUNNER_NAME"] == "sge"
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    script = (await client.cat_log(job.id, "job")).decode()
    assert script.startswith("#!/bin/bash\n#$ -N basic\n")
    assert f"#$ -o {job.job_log_dir}/job.out\n" in script
    assert "#$ -S /bin/bash\n" in script
    assert (await wait_qacct(job.job_id))["exit_status"] == "0"


@pytest.mark.sshd
async def test_exit_3_is_failed(client: AsyncClient, qdel_at_end: list[str]) -> None:
    (job,) = await client.submit(JobSpec(command="echo before; exit 3", name="three"),
                                 platform="sge")
    qdel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.FAILED
    assert job.exit_status == 3 and job.signal is None
    assert (await status_of(client, job.id))["SSHQ_JOB_EXIT_STATUS"] == "3"
    assert await client.cat_log(job.id) == b"before\n"


@pytest.mark.sshd
async def test_kill_running_job(client: AsyncClient, sge_user: str,
                                qdel_at_end: list[str]) -> None:
    """qdel sends SIGKILL (no SIGTERM first): the wrapper cannot record it.

    The status file keeps the start and no exit; once qstat has forgotten the
    job, the poll says failed, no exit status, no signal, and why.
    """
    m = f"3{uuid.uuid4().int % 10**8:08d}"  # a unique sleep marks this job's process
    (job,) = await client.submit(JobSpec(command=f"echo started; sleep {m}", name="victim"),
                                 platform="sge")
    qdel_at_end.append(job.job_id)
    deadline = time.monotonic() + 90
    while not pgrep(sge_user, f"sleep {m}"):
        assert time.monotonic() < deadline, "the job's sleep never started"
        await asyncio.sleep(0.2)
    job = await wait_for_state(client, job.id, JobState.RUNNING)
    assert "SSHQ_JOB_INIT_TIME" in await status_of(client, job.id)

    (job,) = await client.kill([job.id], settle=2)
    assert job.state is JobState.RUNNING  # nothing recorded: Grid Engine still ends it
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.FAILED, job.message
    assert job.exit_status is None and job.signal is None
    assert "sge no longer knows the job" in job.message
    st = await status_of(client, job.id)
    assert "SSHQ_JOB_INIT_TIME" in st
    assert "SSHQ_JOB_EXIT_STATUS" not in st and "SSHQ_JOB_EXIT_SIGNAL" not in st
    assert pgrep(sge_user, f"sleep {m}") == []
    acct = await wait_qacct(job.job_id)
    assert acct["exit_status"].split()[0] == "137", acct  # 128 + SIGKILL
    assert acct["failed"].startswith("100"), acct  # "assumedly after job"
    # A second kill of a final job changes nothing.
    (again,) = await client.kill([job.id])
    assert again.state is JobState.FAILED and again.message == job.message


@pytest.mark.sshd
async def test_kill_pending_job_is_submit_failed(client: AsyncClient, sge_user: str,
                                                 qdel_at_end: list[str]) -> None:
    (job,) = await client.submit(
        JobSpec(command="echo never", name="held", directives=("-h",)), platform="sge")
    qdel_at_end.append(job.job_id)
    assert qstat_known(sge_user)[job.job_id] == (False, "hqw")
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMITTED
    await client.kill([job.id], settle=0)
    await wait_forgotten(sge_user, [job.job_id])
    (job,) = await client.poll([job.id])
    assert job.state is JobState.SUBMIT_FAILED
    assert "never started" in job.message


@pytest.mark.sshd
async def test_first_poll_after_sge_forgot_the_jobs(client: AsyncClient, sge_user: str,
                                                    qdel_at_end: list[str]) -> None:
    """Jobs never polled while Grid Engine knew them: job.status decides."""
    jobs = await client.submit(forgotten_specs(), platform="sge")
    qdel_at_end.extend(j.job_id for j in jobs)
    assert [j.state for j in jobs] == [JobState.SUBMITTED] * 3, [j.message for j in jobs]
    await wait_forgotten(sge_user, [j.job_id for j in jobs])
    _ok, _five, killed = await check_forgotten(client, jobs)
    assert killed.start_time is not None
    # Accounting is written as the job ends: qacct knows them all by now.
    assert [qacct(j.job_id).get("exit_status", "").split()[:1]
            for j in jobs] == [["0"], ["5"], ["137"]]


@pytest.mark.sshd
async def test_cpus_become_a_parallel_environment(client: AsyncClient,
                                                  qdel_at_end: list[str]) -> None:
    spec = JobSpec(command='echo "slots=$NSLOTS pe=$PE vmem=$(ulimit -v)"', name="smp2",
                   cpus=2, memory=1024**3, walltime=timedelta(minutes=5))
    (job,) = await client.submit(spec, platform="sge")
    qdel_at_end.append(job.job_id)
    script = (await client.cat_log(job.id, "job")).decode()
    assert "#$ -pe smp 2\n" in script
    assert "#$ -l h_vmem=512M\n" in script
    assert "#$ -l h_rt=00:05:00\n" in script
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.message
    # h_vmem is per slot: the job's address-space limit is 2 x 512M = the 1G asked.
    assert await client.cat_log(job.id) == b"slots=2 pe=smp vmem=1048576\n"
    acct = await wait_qacct(job.job_id)
    assert acct["granted_pe"] == "smp" and acct["slots"] == "2"


@pytest.mark.sshd
async def test_walltime_is_enforced_by_sge(client: AsyncClient, qdel_at_end: list[str]) -> None:
    (job,) = await client.submit(JobSpec(command="echo go; sleep 120", name="late",
                                         walltime=timedelta(seconds=3)), platform="sge")
    qdel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=110)
    assert job.state is JobState.FAILED, job.message
    assert "no longer knows" in job.message  # h_rt: SIGKILL, nothing recorded
    assert await client.cat_log(job.id) == b"go\n"


@pytest.mark.sshd
async def test_name_starting_with_a_digit_is_refused_before_sending(
        client: AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_agent_calls(monkeypatch)
    with pytest.raises(InvalidInputError, match="name"):
        await client.submit(JobSpec(command="true", name="01_prep"), platform="sge")
    with pytest.raises(InvalidInputError, match="nodes"):
        await client.submit(JobSpec(command="true", name="n", nodes=2), platform="sge")
    assert [c["op"] for c in calls if c["op"] != "init"] == []


@pytest.mark.sshd
async def test_qmaster_unreachable_poll_changes_nothing(
        client: AsyncClient, sge_user: str, sge_home: str, qdel_at_end: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """qstat cannot reach the qmaster: transient, no state changes.

    The user's ~/.tcshrc (read by the tcsh that runs every remote command)
    points SGE at a port where nothing listens, as a dead qmaster looks to a
    client; the real qmaster stays up for everyone else.
    """
    calls = record_agent_calls(monkeypatch)
    (job,) = await client.submit(JobSpec(command="sleep 300", name="steady"), platform="sge")
    qdel_at_end.append(job.job_id)
    job = await wait_for_state(client, job.id, JobState.RUNNING)

    rc = Path(sge_home) / ".tcshrc"
    saved = rc.read_bytes() if rc.exists() else None
    try:
        with rc.open("a") as fh:
            fh.write("setenv SGE_QMASTER_PORT 1  # sshq test: qmaster unreachable\n")
        calls.clear()
        (after,) = await client.poll([job.id])
        assert after.state is JobState.RUNNING
        (poll_reply,) = [c["reply"] for c in calls if c["op"] == "poll"]
        (res,) = poll_reply["runners"]["sge"]
        assert res["exit"] == 1 and "Connection refused" in res["stderr"], res
    finally:
        if saved is None:
            rc.unlink()
        else:
            rc.write_bytes(saved)
    await client.kill([job.id], settle=0)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.FAILED


# ================================================================ hostile input, tcsh


def hostile_strings(canary: str) -> list[str]:
    return [
        "it's", 'say "hi"', f"$(touch {canary})", f"`touch {canary}`", f"x; touch {canary}",
        f"x | touch {canary}", f"x && touch {canary} &", "  leading and  double  spaces ",
        "héllo wörld ☃", "$HOME ${HOME} $((1+1)) $1 $@ $? $$", "back\\slash \\n \\0", "*",
        "-n", "", "tab\there", "~", "~root", "%s %d %%", "{a,b}", "line one\nline two\n",
        "'\"'\"'", "SSHQ_USER_SCRIPT_delim",
        # tcsh's own specials: history, modifiers, its variables
        "!! !$ !-1 \\!", "^old^new", "$shell $status ${?HOME} $#argv", "x:h:t:r",
        "#$ -N injected", "#!/bin/sh",
        # qsub would obey these lines if it scanned the whole job file
        "x\n#$ -N injected\n#$ -o /tmp/sshq-injected.out\n#$ -clear\n",
    ]


@pytest.mark.sshd
@pytest.mark.parametrize("platform", SGE_PLATFORMS)
async def test_hostile_env_and_arguments_reach_the_job_byte_exact(
        client: AsyncClient, platform: str, sge_home: str, qdel_at_end: list[str]) -> None:
    canary = f"/tmp/sshq-canary-{uuid.uuid4().hex}"
    values = hostile_strings(canary)
    env = {f"H{i}": v for i, v in enumerate(values)}
    refs = " ".join(f'"$H{i}"' for i in range(len(values)))
    script = ("#!/bin/bash\n#$ -N from-user-script\n#$ -o /tmp/sshq-user-script.out\n"
              "printf '%s\\0' \"$@\"\nprintf 'ENV\\0'\n"
              f"printf '%s\\0' {refs}\n").encode()
    spec = JobSpec(script=script, name="hostile", arguments=tuple(values), environment=env)
    (job,) = await client.submit(spec, platform=platform)
    qdel_at_end.append(job.job_id)
    (job,) = await client.wait([job.id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.message
    expected = (b"".join(v.encode() + b"\0" for v in values) + b"ENV\0"
                + b"".join(v.encode() + b"\0" for v in values))
    assert await client.cat_log(job.id, "out") == expected
    assert await client.cat_log(job.id, "err") == b""
    assert not os.path.exists(canary), "a hostile string was run by a shell"
    # No '#$' line of the data became a directive: name and output are sshq's.
    assert (await wait_qacct(job.job_id))["jobname"] == "hostile"
    qopts = (await client.cat_log(job.id, "job")).decode().split("\n#\n", 1)[0]
    assert "injected" not in qopts and "from-user-script" not in qopts


# ================================================================ the CLI


@pytest.mark.sshd
def test_cli_submit_wait_cat_log_with_a_hostile_env_value(
        sge_testbed: dict[str, str], sshq: Callable[..., subprocess.CompletedProcess[bytes]],
        qdel_at_end: list[str]) -> None:
    canary = f"/tmp/sshq-canary-{uuid.uuid4().hex}"
    value = f"a'b\"c $(touch {canary}) `touch {canary}` !! $shell\\n ~ {{x,y}} ☃\nend"
    r = sshq("submit", "-p", "sge", "--name", "cli", "--cpus", "2", "--json",
             "--env", f"HOSTILE={value}", "--command", 'printf "%s|%s" "$HOSTILE" "$NSLOTS"')
    assert r.returncode == 0, r.stderr
    (job,) = json.loads(r.stdout)
    qdel_at_end.append(job["job_id"])
    assert job["job_runner"] == "sge" and job["state"] == "submitted"
    r = sshq("wait", str(job["id"]), "--timeout", "120", "--json")
    assert r.returncode == 0, r.stderr
    (done,) = json.loads(r.stdout)
    assert done["state"] == "succeeded" and done["exit_status"] == 0
    r = sshq("cat-log", str(job["id"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{value}|2".encode()
    assert not os.path.exists(canary)

    r = sshq("submit", "-p", "sge-openssh", "--name", "cli3", "--wait", "--timeout", "120",
             "--json", "--command", "exit 3")
    assert r.returncode == 1, r.stderr
    (three,) = json.loads(r.stdout)
    qdel_at_end.append(three["job_id"])
    assert three["state"] == "failed" and three["exit_status"] == 3

    r = sshq("submit", "-p", "sge", "--nodes", "2", "--command", "true")
    assert r.returncode != 0
    assert "cannot express nodes" in r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()


# ---------------------------------------------------------------- ssh-to-job (execution host)


@pytest.fixture
def login_node_ssh(sge_testbed: dict[str, str], sge_user: str, sge_home: str,
                   tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """~sshqsge/.ssh set up so the login node can ssh to a "compute node" alias
    (the test bed's sshd again); yields (alias, a file the hop's LocalCommand touches)."""
    ssh_dir = Path(sge_home) / ".ssh"
    made = not ssh_dir.exists()
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    marker = Path(f"/tmp/sshq-hop-{uuid.uuid4().hex}")
    files = {
        "sshq-hop-key": Path(sge_testbed["SSHQ_TEST_KEY"]).read_bytes(),
        "sshq-hop-known": Path(sge_testbed["SSHQ_TEST_KNOWN_HOSTS"]).read_bytes(),
        "config": (f"Host sshq-node\n    HostName {sge_testbed['SSHQ_TEST_HOST']}\n"
                   f"    Port {sge_testbed['SSHQ_TEST_PORT']}\n    User {sge_user}\n"
                   f"    IdentityFile {ssh_dir}/sshq-hop-key\n"
                   f"    UserKnownHostsFile {ssh_dir}/sshq-hop-known\n"
                   f"    PermitLocalCommand yes\n    LocalCommand touch {marker}\n").encode(),
    }
    assert not (ssh_dir / "config").exists(), "refusing to overwrite a real ssh config"
    for name, data in files.items():
        (ssh_dir / name).write_bytes(data)
        os.chmod(ssh_dir / name, 0o600)
    subprocess.run(["chown", "-R", f"{sge_user}:", str(ssh_dir)], check=True, timeout=30)
    try:
        yield "sshq-node", marker
    finally:
        for name in files:
            (ssh_dir / name).unlink(missing_ok=True)
        if made:
            shutil.rmtree(ssh_dir, ignore_errors=True)
        marker.unlink(missing_ok=True)


async def _running_sge_job(client: AsyncClient) -> Job:
    (job,) = await client.submit(JobSpec(command="sleep 120", name="attach",
                                         environment={"MYVAR": "a b $(x)"}), platform="sge")
    job = await wait_for_state(client, job.id, JobState.RUNNING, timeout=90)
    for _ in range(100):  # the wrapper's environment snapshot
        if b"SSHQ_JOB_HOST" in await client.cat_log(job.id, "status"):
            break
        await asyncio.sleep(0.2)
    return job


def _set_exec_host(sge_home: str, job: Job, host: str) -> None:
    status = Path(job.job_log_dir) / "job.status"  # same machine: the file is right here
    with open(status, "a") as fh:
        fh.write(f"SSHQ_JOB_HOST={host}\n")


async def test_ssh_to_job_on_the_execution_host_directly(
        sge_testbed: dict[str, str], client: AsyncClient) -> None:
    job = await _running_sge_job(client)
    try:
        r = await client.ssh_to_job(job.id, 'printf "%s|%s|%s" "$MYVAR" "$PWD" "$JOB_ID"')
        assert r.exit_status == 0, r.stderr
        assert r.stdout.decode() == f"a b $(x)|{job.work_dir}|{job.job_id}"
    finally:
        await client.kill([job.id])


async def test_ssh_to_job_hops_from_the_login_node_to_the_execution_host(
        sge_testbed: dict[str, str], client: AsyncClient, sge_home: str,
        login_node_ssh: tuple[str, Path]) -> None:
    alias, marker = login_node_ssh
    job = await _running_sge_job(client)
    try:
        _set_exec_host(sge_home, job, alias)
        r = await client.ssh_to_job(job.id, 'printf "%s|%s" "$MYVAR" "$PWD"; exit 4')
        assert r.exit_status == 4, r.stderr
        assert r.stdout.decode() == f"a b $(x)|{job.work_dir}"
        assert marker.exists(), "the login node did not ssh to the execution host"
    finally:
        await client.kill([job.id])


async def test_execution_host_unreachable_from_the_login_node(
        sge_testbed: dict[str, str], client: AsyncClient, sge_home: str) -> None:
    job = await _running_sge_job(client)
    try:
        _set_exec_host(sge_home, job, "no-such-node.invalid")
        with pytest.raises(HostUnreachableError, match="unreachable from the login node"):
            await client.ssh_to_job(job.id, "true")
    finally:
        await client.kill([job.id])
