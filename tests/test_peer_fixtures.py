"""sshq's parsers over scheduler output other projects captured from real systems.

``tests/fixtures/peer/`` holds output that other projects' test suites and
documentation captured from real Slurm, PBS Pro, Torque, Grid Engine, LSF and
HTCondor systems (its README names each file's source).  Every file is run
through sshq: the submit outputs through the job id regular expressions (as
the agent applies them), the poll outputs through the poll parsers, with the
exact job ids and states each file shows.

Some files hold another format than the one sshq's poll command asks for
(another separator, a table with a header): the parser must refuse those
(transient: such a poll says nothing about the jobs), never read them as "no
job known", which would fail every job.  Their ids and states are then also
checked in sshq's own format, so that what they show (het job components,
compact and ended state codes) is tested too.

The last part runs what these files showed on the real Slurm of the test bed:
a heterogeneous job, and a login environment that sets ``SQUEUE_STATES``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml

from sshq import AsyncClient, JobSpec, JobState
from sshq.exceptions import JobRunnerError
from sshq.job_runners import HANDLERS
from sshq.job_runners.base import JobRunnerHandler, RunnerJobState
from sshq.job_runners.pbs import POLL_MARK

FIXTURES = Path(__file__).parent / "fixtures"
PEER = FIXTURES / "peer"


def peer(name: str) -> str:
    return (PEER / name).read_text()


def every_peer_file() -> list[str]:
    return sorted(p.relative_to(PEER).as_posix() for p in PEER.rglob("*")
                  if p.is_file() and p.name != "README.md")


def submitted_id(handler: JobRunnerHandler, stdout: str) -> str | None:
    """The job id as the agent and client find it in a submit command's stdout."""
    m = re.search(handler.job_id_regex, stdout, re.MULTILINE)
    if not m:
        return None
    return handler.job_id_from_submit({k: v for k, v in m.groupdict().items() if v is not None})


def verdicts(known: dict[str, RunnerJobState]) -> dict[str, tuple[bool, str]]:
    return {k: (s.running, s.raw) for k, s in known.items()}


# ---------------------------------------------------------------- submit outputs

SUBMIT = {
    "slurm/firecrest_sbatch.txt": ("slurm", "1"),
    "slurm/nextflow_sbatch_cluster.txt": ("slurm", "630114@mpp2"),
    "slurm/slurm_man_sbatch_hetjob.txt": ("slurm", "34987"),
    "slurm/slurm_man_sbatch_stdin.txt": ("slurm", "65541"),  # "sbatch: Submitted batch job"
    "slurm/submitit_sbatch.txt": ("slurm", "5610208"),
    "pbs/cylc_qsub_foo_bar_baz.txt": ("pbs", "12345.foo.bar.baz"),
    "pbs/dask_qsub_admin01.txt": ("pbs", "654321.admin01"),
    "pbs/firecrest_qsub.txt": ("pbs", "1.pbs"),
    "pbs/nextflow_qsub_biocluster.txt": ("pbs", "1584288.biocluster.igb.illinois.edu"),
    "pbs/nextflow_qsub_localhost.txt": ("pbs", "10.localhost"),
    "pbs/pysqa_qsub.txt": ("pbs", "80005196.somehost"),
    "sge/nextflow_qsub_1258076.txt": ("sge", "1258076"),
    "sge/nextflow_qsub_341683.txt": ("sge", "341683"),
    "lsf/aiida_bsub.txt": ("lsf", "764254593"),
    "lsf/nextflow_bsub.txt": ("lsf", "2329803"),
}


@pytest.mark.parametrize("name", sorted(SUBMIT))
def test_submit_output_gives_the_job_id(name: str) -> None:
    runner, job_id = SUBMIT[name]
    assert submitted_id(HANDLERS[runner], peer(name)) == job_id


# ---------------------------------------------------------------- poll outputs in sshq's format

R, Q = True, False  # running, not running
POLL: dict[str, tuple[str, dict[str, tuple[bool, str]]]] = {
    # %i^^^%t^^^...: sshq's separator, compact state codes, more fields after the state
    "slurm/aiida_squeue_2013.txt": ("slurm", {
        "862540": (Q, "PD"), "863100": (Q, "PD"), "863546": (Q, "PD"), "863313": (Q, "PD"),
        "862538": (R, "R"), "861352": (R, "R"), "863553": (R, "R"), "863554": (R, "R"),
    }),
    "pbs/aiida_pbspro_qstat_f_2013.txt": ("pbs", {
        "68350.mycluster": (Q, "Q"), "68351.mycluster": (Q, "Q"), "69301.mycluster": (R, "R"),
        "69302.mycluster": (Q, "H"), "74164.mycluster": (R, "R"), "74165.mycluster": (Q, "H"),
    }),
    "pbs/aiida_qstat-multiline-func.txt": ("pbs", {"171389798.mycluster": (Q, "Q")}),
    "pbs/aiida_qstat-queued.txt": ("pbs", {"171390152.mycluster": (Q, "Q")}),
    "pbs/aiida_qstat-running.txt": ("pbs", {"171390152.mycluster": (R, "R")}),
    # Torque: C (completed) is no longer held: 546437 and 543984 are left to the status file
    "pbs/aiida_torque_qstat_f_2015.txt": ("pbs", {
        "549159": (Q, "H"), "555716": (R, "R"), "556491": (R, "R"), "547637": (Q, "Q"),
        "547683": (Q, "Q"), "549004": (Q, "Q"), "549005": (Q, "Q"), "549008": (Q, "Q"),
    }),
    # -x: F (finished) jobs 1004 and 1005 are left to the status file
    "pbs/firecrest_qstat_F_json_x_allusers.json": ("pbs", {"1006.pbs": (R, "R")}),
    "pbs/firecrest_qstat_F_json_x_one.json": ("pbs", {"1.pbs": (R, "R")}),
    "pbs/nextflow_pbspro_qstat_f.txt": ("pbs", {
        "13.localhost": (R, "R"), "14.localhost": (Q, "Q"), "15.localhost": (R, "S"),
        "16.localhost": (R, "E"), "17.localhost": (Q, "H"),
    }),
    "pbs/nextflow_torque_qstat_f.txt": ("pbs", {
        "13.localhost": (R, "R"), "14.localhost": (Q, "Q"), "15.localhost": (R, "S"),
        "16.localhost": (R, "E"), "17.localhost": (Q, "H"),
    }),
    "pbs/pysqa_gadi_qstat_f.txt": ("pbs", {
        "80005196.gadi-pbs": (R, "R"), "80005197.gadi-pbs": (Q, "Q"),
        "80005198.gadi-pbs": (Q, "Q"),
    }),
    "sge/aiida_qstat_xml_2013.xml": ("sge", {
        "1212299": (R, "r"), "1212263": (Q, "qw"), "1212322": (Q, "hqw"),
    }),
    "sge/pysqa_qstat.xml": ("sge", {
        "2836045": (R, "r"), "2836046": (Q, "qw"), "2967274": (Q, "Eqw"),
    }),
    # -af:jr JobStatus (no ExitCode column)
    "htcondor/parsl_condor_q_af_jr.txt": ("htcondor", {
        "34524642.0": (R, "RUNNING"), "34524643.0": (Q, "IDLE"),
    }),
}


@pytest.mark.parametrize("name", sorted(POLL))
def test_poll_output_gives_the_exact_jobs_and_states(name: str) -> None:
    runner, expected = POLL[name]
    assert verdicts(HANDLERS[runner].parse_poll(0, peer(name), "")) == expected


PBS_IDS = re.compile(r'^Job Id: (\S+)|^\s*"(\d+\.[^"]+)":\{', re.MULTILINE)


@pytest.mark.parametrize("name", sorted(n for n in POLL if n.startswith("pbs/")))
def test_pbs_poll_output_as_sshqs_poll_program_prints_it(name: str) -> None:
    """sshq's PBS poll program prints its mark and the ids it asked about first."""
    text = peer(name)
    asked = [a or b for a, b in PBS_IDS.findall(text)]
    assert asked
    flavour = "json" if text.lstrip().startswith("{") else "text"
    out = f"{POLL_MARK} {flavour} {' '.join(asked)}\n{text}"
    assert verdicts(HANDLERS["pbs"].parse_poll(0, out, "")) == POLL[name][1]


# ---------------------------------------------------------------- poll outputs in other formats


@dataclass(frozen=True)
class Columns:
    """Where a file in another format keeps each job's id and state."""

    sep: str | None  # None: blanks
    id_col: int
    state_col: int
    data: str = r"^\s*\d"  # what a job's line starts with (headers, banners: not)

    def rows(self, text: str) -> list[tuple[str, str]]:
        rows = []
        for line in text.splitlines():
            if re.match(self.data, line):
                f = line.strip().split(self.sep)
                rows.append((f[self.id_col].strip(), f[self.state_col].strip()))
        return rows


# condor_q's ST letters and the JobStatus codes they stand for (HTCondor
# manual, condor_q); 'E' in the Nextflow file has no JobStatus code today.
CONDOR_LETTERS = {"I": "1", "R": "2", "X": "3", "C": "4", "H": "5", ">": "6", "S": "7"}


def in_sshq_format(runner: str, rows: list[tuple[str, str]]) -> str:
    """The same jobs as sshq's own poll command prints them."""
    if runner == "slurm":
        return "".join(f"{i}^^^{s}\n" for i, s in rows)
    if runner == "lsf":
        records = [{"JOBID": i, "STAT": s, "EXIT_CODE": ""} for i, s in rows]
        return json.dumps({"COMMAND": "bjobs", "JOBS": len(records), "RECORDS": records})
    if runner == "htcondor":
        return "".join(f"{i} {CONDOR_LETTERS[s]} undefined\n" for i, s in rows
                       if s in CONDOR_LETTERS)
    raise AssertionError(runner)


FOREIGN: dict[str, tuple[str, Columns, dict[str, tuple[bool, str]]]] = {
    # squeue -t all: CA (cancelled) and F (failed) have ended; S (suspended) runs
    "slurm/nextflow_squeue_t_all.txt": ("slurm", Columns(None, 0, 1), {
        "5": (Q, "PD"), "6": (Q, "PD"), "13": (R, "R"), "4": (R, "R"), "22": (R, "S"),
    }),
    "slurm/pysqa_gent_output.txt": ("slurm", Columns("|", 0, 2), {
        "5322019": (R, "R"), "5322016": (R, "R"), "5322017": (R, "R"), "5322018": (R, "R"),
        "5322013": (R, "R"),
    }),
    "slurm/pysqa_squeue_output.txt": ("slurm", Columns("|", 0, 2), {
        "5322019": (R, "R"), "5322016": (R, "R"), "5322017": (R, "R"), "5322018": (R, "R"),
        "5322013": (R, "R"),
    }),
    # a heterogeneous job: sbatch said "Submitted batch job 93"; squeue lists its parts
    "slurm/slurm_doc_hetjob_squeue.txt": ("slurm", Columns(None, 0, 4), {"93": (R, "R")}),
    # EXIT is left to the status file; DONE stays known (the wrapper wrote its exit first)
    "lsf/aiida_bjobs_cern.txt": ("lsf", Columns("|", 0, 1), {
        "764220165": (Q, "PEND"), "764220167": (Q, "PEND"), "764254593": (R, "RUN"),
        "764255172": (R, "RUN"), "764245175": (R, "RUN"), "764399747": (R, "DONE"),
    }),
    "lsf/nextflow_bjobs_please_wait.txt": ("lsf", Columns(None, 0, 2), {
        i: (R, "RUN") for i in ("5157393", "5157493", "5157552", "5157610", "5157674",
                                "5157710")
    }),
    "lsf/nextflow_bjobs_whitehead.txt": ("lsf", Columns(None, 0, 2), {
        "5085109": (R, "RUN"), "5085585": (R, "RUN"), "5085604": (Q, "PEND"),
        "5085611": (Q, "PSUSP"), "5085607": (R, "UNKWN"), "5085608": (R, "ZOMBI"),
        "5085609": (R, "RUN"), "5085702": (R, "RUN"), "5085606": (R, "DONE"),
        "5085034": (R, "RUN"), "5085612": (R, "RUN"), "5085703": (R, "RUN"),
        "5085704": (R, "RUN"),
    }),
    # the lines under each job ("40*batch_hosts") continue its EXEC_HOST
    "lsf/pysqa_bjobs_output.txt": ("lsf", Columns(None, 0, 2, data=r"^\d"), {
        "5136563": (R, "RUN"), "5136570": (R, "RUN"), "5136571": (R, "RUN"),
    }),
    "htcondor/nextflow_condor_q_nobatch.txt": ("htcondor", Columns(None, 0, 5), {
        "20.0": (R, "RUNNING"), "21.0": (Q, "IDLE"), "24.0": (Q, "HELD"),
    }),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_poll_output_in_another_format_is_refused_never_read_as_no_job(name: str) -> None:
    runner = FOREIGN[name][0]
    with pytest.raises(JobRunnerError) as info:
        HANDLERS[runner].parse_poll(0, peer(name), "")
    assert info.value.transient
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_jobs_of_another_format_read_in_sshqs_format(name: str) -> None:
    runner, columns, expected = FOREIGN[name]
    rows = columns.rows(peer(name))
    assert rows, name
    got = HANDLERS[runner].parse_poll(0, in_sshq_format(runner, rows), "")
    assert verdicts(got) == expected


def test_every_peer_file_is_run() -> None:
    assert set(every_peer_file()) == set(SUBMIT) | set(POLL) | set(FOREIGN)
    # each file names its source: the project or manual, then what it holds
    readme = (PEER / "README.md").read_text()
    for name in every_peer_file():
        assert name.rsplit("/", 1)[0] + "/" in readme


def test_the_copies_are_what_the_other_projects_left() -> None:
    shared = Path("/work/shared/peer-fixtures")
    if not shared.is_dir():
        pytest.skip("the shared peer fixtures are not on this machine (the copies are)")
    for name in every_peer_file():
        assert (PEER / name).read_bytes() == (shared / name).read_bytes(), name
    assert len(every_peer_file()) == sum(1 for p in shared.rglob("*") if p.is_file())


# ------------------------------------------------------- the same, captured on the test bed


def captured(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["source"].startswith("captured from")
    return data


def slurm_poll(exit_status: int, stdout: str, stderr: str) -> dict[str, tuple[bool, str]]:
    return verdicts(HANDLERS["slurm"].parse_poll(exit_status, stdout, stderr))


def test_ended_jobs_squeue_lists_with_squeue_states_all_are_left_to_the_status_file() -> None:
    """Real squeue output with SQUEUE_STATES=all (a login profile may set it):
    COMPLETED, FAILED, CANCELLED and TIMEOUT jobs are listed; sshq's verdict
    is the same as for squeue's default view, which lists only what the
    runner still holds."""
    cap = captured("squeue_states_all")
    assert cap["env"] == {"SQUEUE_STATES": "all"}
    seen = set()
    for c in cap["captures"]:
        plain = c["without_squeue_states"]
        got = slurm_poll(c["exit"], c["stdout"], c["stderr"])
        assert got == slurm_poll(plain["exit"], plain["stdout"], plain["stderr"]), c["t"]
        seen |= {line.split("^^^")[1] for line in c["stdout"].splitlines()}
    assert {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "COMPLETING"} <= seen
    ended = [line for c in cap["captures"] for line in c["stdout"].splitlines()
             if line.split("^^^")[1] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")]
    assert len(ended) >= 5
    assert slurm_poll(0, "\n".join(ended), "") == {}


def test_a_heterogeneous_job_is_known_by_its_own_id() -> None:
    """sbatch prints the het job's id; squeue lists its components as ID+0, ID+1."""
    cap = captured("squeue_states_all")
    het = cap["jobs"]["het"]
    first = cap["captures"][0]
    assert f"{het}+0^^^PENDING\n{het}+1^^^PENDING\n" in first["stdout"]
    assert verdicts(HANDLERS["slurm"].parse_poll(0, first["stdout"], ""))[het] == \
        (False, "PENDING")
    assert submitted_id(HANDLERS["slurm"], peer("slurm/slurm_man_sbatch_hetjob.txt"))



# ---------------------------------------------------------------- and on the real Slurm


def squeue_state(job_id: str) -> str:
    """The job's state as slurmctld has it, ended ones too ('' once forgotten)."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T", "-j", job_id],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else ""


@pytest.fixture
def scancel_at_end() -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


@pytest.fixture
def login_env_dir() -> Iterator[Path]:
    """A directory sshqtest can read, for wrappers that set a login environment."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sshq-env-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def squeue_env_client(slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path,
                            run_id: str, login_env_dir: Path) -> AsyncIterator[AsyncClient]:
    """Slurm through sshd, with what users' login profiles set for squeue:
    the agent's Python starts with SQUEUE_STATES=all and filters that hide
    sshq's jobs (SQUEUE_PARTITION, SQUEUE_USERS, SQUEUE_ACCOUNT), and a site
    ``squeue`` wrapper on path_prepend that lists ended jobs whatever sshq does."""
    py = login_env_dir / "python3"
    py.write_text("#!/bin/sh\nexport SQUEUE_STATES=all SQUEUE_PARTITION=nosuchpart"
                  " SQUEUE_USERS=root SQUEUE_ACCOUNT=nosuchacct\nexec python3 \"$@\"\n")
    bindir = login_env_dir / "bin"
    bindir.mkdir()
    sq = bindir / "squeue"
    sq.write_text("#!/bin/sh\nSQUEUE_STATES=all exec /usr/bin/squeue \"$@\"\n")
    for p in (py, sq, bindir):
        p.chmod(0o755)
    cfg = tmp_path / "squeue-env.toml"
    cfg.write_text(platform_toml(slurm_testbed, "slurm", job_runner="slurm",
                                 transport="asyncssh", run_dir=f"~/sshq-test/{run_id}",
                                 python=str(py), path_prepend=[str(bindir)],
                                 min_poll_interval=0))
    c = AsyncClient(cfg, state_dir=state_dir)
    try:
        yield c
    finally:
        await c.close()


async def poll_until(client: AsyncClient, sid: int, done: Any, timeout: float = 150) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        (job,) = await client.poll([sid])
        if done(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {sid}: {job.state.value} ({job.message}) after {timeout} s")
        await asyncio.sleep(0.5)


@pytest.mark.slurm
async def test_real_slurm_login_squeue_environment_changes_no_verdict(
        squeue_env_client: AsyncClient, scancel_at_end: list[str]) -> None:
    client = squeue_env_client
    (job,) = await client.submit(JobSpec(command="sleep 300", name="sq", memory="50M"),
                                 platform="slurm")
    assert job.state is JobState.SUBMITTED, job.message
    scancel_at_end.append(job.job_id)
    # the filters must not hide it (they made a waiting job submit-failed)
    job = await poll_until(client, job.id, lambda j: j.state is not JobState.SUBMITTED)
    assert job.state is JobState.RUNNING, job.message
    # its wrapper killed so hard that it records no exit (as the OOM killer
    # would): squeue (SQUEUE_STATES=all) then lists the job in an ended state,
    # which must not keep it running
    status = (await client.cat_log(job.id, "status")).decode()
    pid = int(re.findall(r"^SSHQ_JOB_PID=(\d+)$", status, re.M)[-1])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while squeue_state(job.job_id) in ("RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, "the job did not end after SIGKILL"
        await asyncio.sleep(0.2)
    ended = squeue_state(job.job_id)
    (job,) = await client.poll([job.id])
    assert ended in ("FAILED", "CANCELLED", "COMPLETED") and squeue_state(job.job_id) == ended, \
        "squeue forgot the job before the poll: nothing was tested"
    assert job.state is JobState.FAILED, (job.state, job.message)
    assert "no longer knows the job" in job.message


@pytest.mark.slurm
async def test_real_slurm_heterogeneous_job_is_not_submit_failed(
        slurm_testbed: dict[str, str], client: AsyncClient, scancel_at_end: list[str]) -> None:
    # two components on a one-node test bed: it stays pending, listed as ID+0, ID+1
    spec = JobSpec(command="sleep 60", name="het", memory="50M",
                   directives=("hetjob", "--mem=50M"))
    (job,) = await client.submit(spec, platform="slurm")
    assert job.state is JobState.SUBMITTED, job.message
    scancel_at_end.append(job.job_id)
    r = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", job.job_id],
                       capture_output=True, text=True, timeout=30)
    assert f"{job.job_id}+0" in r.stdout.split() and f"{job.job_id}+1" in r.stdout.split()
    (job,) = await client.poll([job.id])
    assert job.state in (JobState.SUBMITTED, JobState.RUNNING), job.message
