"""Every value that reaches a directive line: one line, byte-exact or refused.

A job runner reads its directive lines with its own parser (sbatch's
``#SBATCH`` reader, qsub's option file, ...).  A value either reaches the
runner exactly as the user gave it, or sshq refuses the job before anything
is submitted, with an error naming the field; it is never silently changed,
and it can never end its line and start another directive.
"""

# JobSpec coerces "1:00:00", 600, "2G" and lists (its docstring); its annotations
# say timedelta/int/tuple only, so mypy is told to allow the documented forms here.
# mypy: disable-error-code="arg-type"

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import platform_toml

from sshq import AsyncClient, JobState
from sshq.exceptions import InvalidInputError
from sshq.job_runners import HANDLERS
from sshq.job_runners.base import JobRunnerHandler
from sshq.job_runners.slurm import HANDLER as SLURM
from sshq.jobscript import render_job_script
from sshq.model.job_spec import JobSpec
from sshq.model.resources import parse_array

LOG = "/home/u/sshq-run/log/job/sim/01"

# ---------------------------------------------------------------- array ranges


@pytest.mark.parametrize("array", ["1,\n2", "1-3\n", "\n1", "1\r", "1-3%2\n#SBATCH --uid=0",
                                   "1\x00", "1-3\x1b[0m"])
def test_an_array_with_a_control_character_is_refused(array: str) -> None:
    # `--array $'1,\n2'` wrote a newline into the Slurm job script: sbatch
    # stopped reading directives there and dropped --partition, --time...
    with pytest.raises(InvalidInputError, match="array"):
        JobSpec(command="true", name="sim", array=array).normalized()


@pytest.mark.parametrize("array", ["1,\n2", "1-3\n#SBATCH --partition=other"])
def test_an_array_newline_never_reaches_the_job_script(array: str) -> None:
    # even from a spec that skipped normalized(): the handler's one validator
    spec = replace(JobSpec(command="true", name="sim", queue="debug").normalized(), array=array)
    with pytest.raises(InvalidInputError, match="array"):
        SLURM.directives(spec, LOG)
    with pytest.raises(InvalidInputError, match="array"):
        render_job_script(spec, SLURM, job_log_dir=LOG, work_dir="/w")


@pytest.mark.parametrize(("text", "indices"), [
    ("1-10%2", tuple(range(1, 11))),
    ("1,3,5", (1, 3, 5)),
    ("0-15:4", (0, 4, 8, 12)),
    ("1-9:2%3", (1, 3, 5, 7, 9)),
    ("0", (0,)),
    ("3,1,3", (1, 3)),
    ("1-2%0", (1, 2)),       # accepted by real sbatch 22.05
    ("01-02", (1, 2)),       # accepted by real sbatch 22.05 (leading zeros)
    ("4000000", (4000000,)),
])
def test_slurm_array_syntax_accepted(text: str, indices: tuple[int, ...]) -> None:
    assert parse_array(text) == indices
    spec = JobSpec(command="true", name="sim", array=text).normalized()
    assert f"#SBATCH --array={text}" in SLURM.directives(spec, LOG)


@pytest.mark.parametrize("text", [
    " 1-3", "1-3 ", "1 ,2", "1, 2", "1,\t2",     # blanks: sbatch would split the directive
    "1,,2", ",1", "1,", "1-", "-1", "1--3", "+1",
    "1-3%", "%2", "1-3%x", "1-3%2%3", "1-3%²",   # ² is str.isdigit(), not a digit for sbatch
    "1:2", "1-3:", "1-3:0", "1-3:2:1", "1.5", "0x10", "1e3",
    "٣", "1-٣",                                   # Unicode digits: re's \\d, not sbatch's
    "4000001",                                   # above Slurm's largest MaxArraySize - 1
    "3-1", "",
])
def test_slurm_array_syntax_refused_with_a_clear_error(text: str) -> None:
    with pytest.raises(InvalidInputError, match="array") as ei:
        JobSpec(command="true", name="sim", array=text).normalized()
    assert repr(text) in str(ei.value)


def test_array_of_a_runner_without_arrays_is_refused_naming_the_runner() -> None:
    spec = JobSpec(command="true", name="sim", array="1-3").normalized()
    for name in ("sge", "pbs", "lsf", "htcondor", "background"):
        with pytest.raises(InvalidInputError, match=f"'{name}' cannot express array"):
            HANDLERS[name].check_array(spec)


# ---------------------------------------------------------------- one line each


class _LeakyHandler(JobRunnerHandler):
    """A handler that forgets to validate a value (what render must still catch)."""

    name = "leaky"
    directive_prefix = "#LEAKY"

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        return [f"#LEAKY -q {spec.queue}"]


def test_render_refuses_a_directive_line_that_is_not_one_line() -> None:
    spec = replace(JobSpec(command="true", name="sim").normalized(),
                   queue="debug\n#LEAKY -x")
    with pytest.raises(InvalidInputError, match="newline"):
        render_job_script(spec, _LeakyHandler(), job_log_dir=LOG, work_dir="/w")


# ---------------------------------------------------------------- parser models
#
# Each model reads a directive line the way the job runner's own parser does.
# The Slurm and Grid Engine models are checked against those parsers' real
# behaviour on the test bed (captures below, and live tests at the end); PBS
# and LSF cannot be installed here, so the property for them is stricter:
# what their parsers might read as syntax is refused.


def slurm_file_name(pattern: str) -> str:
    """The file name sbatch makes of an --output pattern (sbatch(1), filename
    pattern; checked by test_slurm_file_name_model_matches_real_sbatch): with a
    backslash anywhere, backslashes are dropped and no %-pattern is expanded;
    otherwise ``%%`` is ``%`` and another ``%x`` is replaced (shown as <%x>)."""
    if "\\" in pattern:
        return pattern.replace("\\", "")
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            out.append("%" if pattern[i + 1] == "%" else f"<%{pattern[i + 1]}>")
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def sge_reads(line: str) -> list[str]:
    """The words qsub reads from one line of its option file (``-@``), as
    observed on 8.1.9 (tests/fixtures/sge_option_file_quotes.json): ``#`` ends
    the line even in quotes; ' and " are removed wherever they are and group
    blanks; a backslash is literal."""
    assert line.startswith("#$ ")
    words: list[str] = []
    cur: list[str] | None = None
    quoted = False
    for c in line[3:].split("#", 1)[0]:
        if c in "'\"":
            quoted = not quoted
            cur = cur if cur is not None else []
        elif c.isspace() and not quoted:
            if cur is not None:
                words.append("".join(cur))
            cur = None
        else:
            cur = (cur if cur is not None else []) + [c]
    if cur is not None:
        words.append("".join(cur))
    return words


def test_slurm_file_name_model_matches_real_sbatch() -> None:
    from test_job_runners import fixture, sbatch_reads

    cap = fixture("sbatch_directive_quotes")["output_files"]
    made = []
    for line in cap["directives"]:
        opt, _, pattern = sbatch_reads(line).partition("=")
        if opt in ("--output", "--error"):
            made.append(slurm_file_name(pattern).rsplit("/", 1)[1])
    assert sorted(made) == cap["files"]


def test_sge_model_matches_real_qsub() -> None:
    from test_job_runners import fixture

    checked = 0
    for name, case in fixture("sge_option_file_quotes")["cases"].items():
        assert case["exit"] == 0, name
        for option in case["options"]:
            opt, value = sge_reads(f"#$ {option}")
            if opt == "-M" and "@" not in value:
                value += "@NONE"  # qsub completes an address without a host
            assert case["stored"][opt] == value, (name, option)
            checked += 1
    assert checked >= 15


def test_real_sbatch_and_qsub_remove_quote_characters() -> None:
    """Why values must be escaped or refused: unescaped, both parsers change them."""
    from test_job_runners import fixture

    slurm = fixture("sbatch_directive_quotes")["cases"][0]
    assert "#SBATCH --partition=de'b'ug" in slurm["directives"]
    assert slurm["stored"]["--partition"] == "debug"
    assert slurm["stored"]["--account"] == "xyz"
    sge = fixture("sge_option_file_quotes")["cases"]["single-quotes"]
    assert "-A x'y'z" in sge["options"]
    assert sge["stored"]["-A"] == "xyz"


def test_sshq_writes_what_real_sbatch_read_back_byte_exact() -> None:
    from test_job_runners import fixture

    case = fixture("sbatch_directive_quotes")["cases"][1]
    for line in case["directives"]:
        opt, _, raw = line[len("#SBATCH "):].partition("=")
        if opt in ("--job-name", "--mail-type"):
            continue
        value = case["stored"][opt]
        assert f"#SBATCH {opt}={SLURM.word(opt.strip('-'), value)}" == line
    refused = fixture("sbatch_directive_quotes")["cases"][2]
    word = SLURM.word("queue", "de'b'ug")
    assert f"#SBATCH --partition={word}" in refused["directives"]
    assert "invalid partition specified: de'b'ug" in refused["stderr"]  # byte-exact, refused


ODD_VALUES = [
    "debug", "de'b'ug", 'q"u"o', "x'y'z", "it's", "back\\slash", "a#b", "#lead", "a b",
    "a  b", " lead", "trail ", "100%", "%j", "%%", "$HOME", "$(Cluster)", "a:b", "a,b", "-x",
    "ends\\", "日本", "a;b&c|d", "*", "~", "`id`", "a=b", "x\\'y",
]

# (job spec field, label in messages) and, per runner, the directive's option
FIELDS = {"queue": "queue", "account": "account", "mail_user": "mail-user", "log": "run-dir"}
OPTIONS = {
    "slurm": {"queue": "#SBATCH --partition=", "account": "#SBATCH --account=",
              "mail_user": "#SBATCH --mail-user=", "log": "#SBATCH --output="},
    "sge": {"queue": "#$ -q ", "account": "#$ -A ", "mail_user": "#$ -M ", "log": "#$ -o "},
    "pbs": {"queue": "#PBS -q ", "account": "#PBS -A ", "mail_user": "#PBS -M ",
            "log": "#PBS -o "},
    "lsf": {"queue": "#BSUB -q ", "account": "#BSUB -P ", "mail_user": "#BSUB -u ",
            "log": "#BSUB -o "},
    "htcondor": {"account": "#CONDOR accounting_group = ",
                 "mail_user": "#CONDOR notify_user = ", "log": "#CONDOR output = "},
}


def read_back(runner: str, line: str) -> str:
    """The value the runner's parser reads from ``line`` (its models above)."""
    from test_job_runners import sbatch_reads

    if runner == "slurm":
        opt, _, value = sbatch_reads(line).partition("=")
        return slurm_file_name(value) if opt == "--output" else value
    if runner == "sge":
        words = sge_reads(line)
        assert len(words) == 2, words
        return words[1]
    if runner == "htcondor":
        value = line.split(" = ", 1)[1].strip()  # condor_submit strips the value
        assert "$" not in value and not value.endswith("\\")  # no macro, no continuation
        return value
    # PBS, LSF: no parser to observe; a shell-like reading of what sshq allows
    # (double-quoted blanks, nothing else special)
    assert not set(line.split(" ", 2)[2]) & set("'\\#"), line
    words = line.split(" ", 2)[2]
    return words[1:-1] if words.startswith('"') else words


@pytest.mark.parametrize("value", ODD_VALUES)
@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("runner", sorted(OPTIONS))
def test_a_value_reaches_the_runner_byte_exact_or_is_refused(
        runner: str, field: str, value: str) -> None:
    handler = HANDLERS[runner]
    if field == "log":
        log, spec = f"/home/u/{value}/log/job/sim/01", JobSpec(command="true", name="sim")
        wanted = f"{log}/job.out"
    else:
        log, spec = LOG, JobSpec(command="true", name="sim", **{field: value})
        wanted = value
    try:
        lines = handler.directives(spec.normalized(), log)
    except InvalidInputError as exc:
        label = FIELDS[field]
        assert label in str(exc) or (field == "log" and log in str(exc)) or \
            (field == "log" and "job log directory" in str(exc)), exc
        assert "\n" not in str(exc)
        return
    if field not in OPTIONS[runner]:
        pytest.fail(f"{runner} accepted {field}, which it cannot express")
    line = next(x for x in lines if x.startswith(OPTIONS[runner][field]))
    assert read_back(runner, line) == wanted, line


@pytest.mark.parametrize("runner", ["slurm", "sge"])
def test_what_the_observed_parsers_can_carry_is_carried(runner: str) -> None:
    # not everything is refused: on the runners whose parser was observed,
    # blanks, '%', '-' and shell characters reach them byte-exact
    carried = {"slurm": ["de'b'ug", 'q"u"o', "back\\slash", "a#b", "a  b", "100%", "$HOME"],
               "sge": ["a  b", "100%", "-x", "back\\slash", "a;b&c|d", "$HOME"]}[runner]
    for value in carried:
        spec = JobSpec(command="true", name="sim", mail_user=value).normalized()
        line = next(x for x in HANDLERS[runner].directives(spec, LOG)
                    if x.startswith(OPTIONS[runner]["mail_user"]))
        assert read_back(runner, line) == value, line


# ---------------------------------------------------------------- no directives from data


def test_sbatch_reads_no_pbs_or_bsub_line_of_the_job_body() -> None:
    """sbatch reads #PBS and #BSUB lines anywhere in a job script (observed:
    inside a quoted string after the first command), so a user script ported
    from PBS, or an environment value, could set Slurm options; sshq submits
    with --ignore-pbs, which the capture shows turns that off."""
    from test_job_runners import fixture

    cap = fixture("sbatch_directive_quotes")["script_body_wrapper_directives"]
    assert cap["job_name"] == {"(none)": "bsub-name", "--ignore-pbs": "sbatch-name"}
    argv = SLURM.submit_argv(f"{LOG}/job", LOG)
    assert argv == ["sbatch", "--ignore-pbs", f"{LOG}/job"]


# ---------------------------------------------------------------- on the real runners


@pytest.fixture
def cancel_at_end() -> Iterator[list[list[str]]]:
    """Commands (scancel/qdel ID) run as root when the test ends."""
    cmds: list[list[str]] = []
    yield cmds
    for argv in cmds:
        subprocess.run(argv, capture_output=True, timeout=60)


# A run directory sbatch would misread unescaped: a quote, blanks, '#'.
ODD_DIR = "it's a #1"


@pytest.fixture
async def odd_slurm(slurm_testbed: dict[str, str], tmp_path: Path, state_dir: Path,
                    run_id: str) -> AsyncIterator[AsyncClient]:
    cfg = tmp_path / "odd.toml"
    cfg.write_text(platform_toml(slurm_testbed, "slurm", job_runner="slurm",
                                 transport="asyncssh",
                                 run_dir=f"~/sshq-test/{run_id}/{ODD_DIR}"))
    c = AsyncClient(cfg, state_dir=state_dir)
    try:
        yield c
    finally:
        await c.close()


def scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                          text=True, timeout=60).stdout


@pytest.mark.slurm
async def test_real_slurm_stores_each_value_byte_exact(
        odd_slurm: AsyncClient, run_id: str, cancel_at_end: list[list[str]]) -> None:
    account, mail = "x'y'z", 'a\'b c"d\\e#f@example.org'
    spec = JobSpec(command="true", name="odd", account=account, mail_user=mail,
                   mail_events=("end",), directives=("--hold",),
                   # read by sbatch as options without --ignore-pbs
                   environment={"X": "v\n#BSUB -J bsub-name\n#PBS -N pbs-name\n"})
    (job,) = await odd_slurm.submit(spec, platform="slurm")
    assert job.state is JobState.SUBMITTED, job.message
    cancel_at_end.append(["scancel", job.job_id])
    shown = scontrol(job.job_id)
    assert f" Account={account} " in shown
    assert f"MailUser={mail} " in shown
    assert "JobName=odd\n" in shown
    log = f"/home/sshqtest/sshq-test/{run_id}/{ODD_DIR}/log/job/odd/01"
    assert job.job_log_dir == log
    assert f"StdOut={log}/job.out\n" in shown
    assert f"StdErr={log}/job.err\n" in shown


@pytest.mark.slurm
async def test_real_slurm_refuses_an_escaped_partition_by_its_exact_name(
        odd_slurm: AsyncClient, cancel_at_end: list[list[str]]) -> None:
    # unescaped, `--queue "de'b'ug"` ran in partition debug
    (job,) = await odd_slurm.submit(JobSpec(command="true", name="q", queue="de'b'ug",
                                            directives=("--hold",)), platform="slurm")
    if job.job_id:
        cancel_at_end.append(["scancel", job.job_id])
    assert job.state is JobState.SUBMIT_FAILED
    assert "invalid partition specified: de'b'ug" in job.message


@pytest.mark.slurm
async def test_real_slurm_array_newline_is_refused_before_submission(
        odd_slurm: AsyncClient) -> None:
    with pytest.raises(InvalidInputError, match="array"):
        await odd_slurm.submit(JobSpec(command="true", name="arr", array="1,\n2",
                                       queue="debug"), platform="slurm")
    assert await odd_slurm.jobs() == []


@pytest.fixture
async def sge_client(testbed: dict[str, str], tmp_path: Path, state_dir: Path,
                     run_id: str) -> AsyncIterator[AsyncClient]:
    if testbed.get("SSHQ_TEST_SGE") != "1":
        if os.environ.get("SSHQ_REQUIRE_TESTBED") == "1":
            pytest.fail("Grid Engine test bed required")
        pytest.skip("no Grid Engine in the test bed")
    cfg = tmp_path / "sge.toml"
    cfg.write_text("\n".join([
        "[platforms.sge]",
        f'hosts = ["{testbed["SSHQ_TEST_HOST"]}"]',
        f"port = {testbed['SSHQ_TEST_PORT']}",
        f'user = "{testbed["SSHQ_TEST_SGE_USER"]}"',
        f'identity_file = "{testbed["SSHQ_TEST_KEY"]}"',
        f'known_hosts = "{testbed["SSHQ_TEST_KNOWN_HOSTS"]}"',
        'job_runner = "sge"',
        f'run_dir = "~/sshq-test/{run_id}/my  runs"',
    ]) + "\n")
    c = AsyncClient(cfg, state_dir=state_dir)
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.sshd
async def test_real_sge_stores_each_value_byte_exact_or_sshq_refuses_it(
        sge_client: AsyncClient, testbed: dict[str, str], run_id: str,
        cancel_at_end: list[list[str]]) -> None:
    mail = "Jo  Doe <jo+1%x@example.org>"
    (job,) = await sge_client.submit(JobSpec(command="true", name="odd", mail_user=mail,
                                             account="-a%b", directives=("-h",)),
                                     platform="sge")
    assert job.state is JobState.SUBMITTED, job.message
    cancel_at_end.append(["qdel", job.job_id])
    shown = subprocess.run(["qstat", "-j", job.job_id], capture_output=True, text=True,
                           timeout=60).stdout
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", shown, re.M))
    assert fields["mail_list"] == mail
    assert fields["account"] == "-a%b"
    home = subprocess.run(["getent", "passwd", testbed["SSHQ_TEST_SGE_USER"]],
                          capture_output=True, text=True, timeout=30).stdout.split(":")[5]
    assert fields["stdout_path_list"] == \
        f"NONE:NONE:{home}/sshq-test/{run_id}/my  runs/log/job/odd/01/job.out"
    # what qsub would change is refused before anything is submitted
    for field, value in (("account", "x'y'z"), ("queue", 'all"q'), ("mail_user", "a#b@x")):
        with pytest.raises(InvalidInputError, match=field.replace("_", "-")):
            await sge_client.submit(JobSpec(command="true", name="bad", **{field: value}),
                                    platform="sge")
    assert [j.name for j in await sge_client.jobs()] == ["odd"]
