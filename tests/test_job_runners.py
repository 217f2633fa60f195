"""Job runner handlers: directives, refusals, job id regexes, and parsing of
poll output captured from the real test bed (tests/fixtures/*.json)."""

# JobSpec coerces "1:00:00", 600, "2G" and lists (its docstring); its annotations
# say timedelta/int/tuple only, so mypy is told to allow the documented forms here.
# mypy: disable-error-code="arg-type, no-untyped-call"

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import expand_ids

from sshq.exceptions import ConfigError, InvalidInputError, JobRunnerError
from sshq.job_runners import HANDLERS, get_handler
from sshq.job_runners.background import HANDLER as BG
from sshq.job_runners.base import IDS, RunnerJobState
from sshq.job_runners.slurm import HANDLER as SLURM
from sshq.model.job_spec import JobSpec
from sshq.shipped import agent

FIXTURES = Path(__file__).parent / "fixtures"
LOG = "/home/u/sshq-run/log/job/my-job/01"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["source"].startswith("captured from")
    return data


def job_id_from(handler: Any, stdout: str) -> str | None:
    """The job id as the agent finds it (re.search, MULTILINE)."""
    m = re.search(handler.job_id_regex, stdout, re.MULTILINE)
    return m.group("id") if m else None


def sbatch_reads(line: str) -> str:
    """The argument of one ``#SBATCH`` line as sbatch reads it.

    A model of sbatch's directive parser (``_get_argument``, src/sbatch/opt.c):
    blanks end the argument, ``"`` or ``'`` opens quoting that only the same
    character closes (both are removed), a backslash makes the next character
    literal (also in quotes; a blank still ends the argument), an unquoted
    ``#`` starts a comment.  Checked against real sbatch by
    :func:`test_sbatch_model_matches_real_sbatch`.
    """
    assert line.startswith("#SBATCH ")
    out: list[str] = []
    q_char = ""
    escaped = False
    for c in line[len("#SBATCH "):].lstrip():
        if not q_char and c.isspace():
            break
        if escaped:
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif q_char:
            if c == q_char:
                q_char = ""
            else:
                out.append(c)
        elif c in "\"'":
            q_char = c
        elif c == "#":
            break
        else:
            out.append(c)
    return "".join(out)


def test_sbatch_model_matches_real_sbatch() -> None:
    checked = 0
    for name in ("sbatch_directive_parsing", "sbatch_directive_quotes"):
        for case in fixture(name)["cases"]:
            if "stored" not in case:
                continue  # refused by Slurm: nothing stored to compare
            for line in case["directives"]:
                opt = line.split("=", 1)[0][len("#SBATCH "):]
                assert sbatch_reads(line) == f"{opt}={case['stored'][opt]}", line
                checked += 1
    assert checked >= 14
    # the captures cover what matters: '#', backslash, blanks, quotes
    text = json.dumps([fixture(n)["cases"] for n in ("sbatch_directive_parsing",
                                                      "sbatch_directive_quotes")])
    for needle in ("#", "\\\\", " ", '\\"', "'"):
        assert needle in text


def test_handlers_registry() -> None:
    assert {"slurm", "background"} <= set(HANDLERS)
    assert get_handler("slurm") is SLURM
    assert get_handler("background") is BG
    with pytest.raises(ConfigError, match="unknown job runner 'nqs'"):
        get_handler("nqs")


# ---------------------------------------------------------------- directives


def test_slurm_directives_full_spec() -> None:
    spec = JobSpec(
        command="true",
        name="my-job",
        walltime=timedelta(days=1, hours=2, minutes=3, seconds=4.5),
        nodes=2,
        tasks=8,
        cpus=4,
        memory="1.5G",
        queue="debug",
        account="proj1",
        mail_user="me@example.org",
        mail_events=("begin", "END", "fail"),
        directives=("--constraint=gpu", "--exclusive"),
    ).normalized()
    assert SLURM.directives(spec, LOG) == [
        "#SBATCH --job-name=my-job",
        f"#SBATCH --output={LOG}/job.out",
        f"#SBATCH --error={LOG}/job.err",
        "#SBATCH --time=26:03:05",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks=8",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=1536M",
        "#SBATCH --partition=debug",
        "#SBATCH --account=proj1",
        "#SBATCH --mail-user=me@example.org",
        "#SBATCH --mail-type=BEGIN,END,FAIL",
        "#SBATCH --constraint=gpu",
        "#SBATCH --exclusive",
    ]


def test_slurm_directives_minimal_spec() -> None:
    spec = JobSpec(command="true").normalized()
    assert SLURM.directives(spec, LOG) == [
        "#SBATCH --job-name=job",
        f"#SBATCH --output={LOG}/job.out",
        f"#SBATCH --error={LOG}/job.err",
    ]


@pytest.mark.parametrize(
    ("memory", "line"),
    [(1, "--mem=1M"), (1024**2 + 1, "--mem=2M"), ("2G", "--mem=2048M"), ("512M", "--mem=512M")],
)
def test_slurm_memory_rounded_up_to_mib(memory: object, line: str) -> None:
    spec = JobSpec(command="true", memory=memory).normalized()
    assert f"#SBATCH {line}" in SLURM.directives(spec, LOG)


def test_slurm_mail_all() -> None:
    spec = JobSpec(command="true", mail_user="u@h", mail_events=("all",)).normalized()
    assert "#SBATCH --mail-type=ALL" in SLURM.directives(spec, LOG)


def test_slurm_log_dir_with_space_is_refused_by_real_sbatch() -> None:
    cap = fixture("sbatch_log_dir_with_space")
    assert cap["exit"] != 0
    assert "Invalid directive found in batch script" in cap["stderr"]
    assert " " in cap["job_log_dir"]


def test_slurm_directives_keep_log_dir_with_space_one_word() -> None:
    # unquoted, sbatch splits the directive at the space and refuses the script
    # (fixtures/sbatch_log_dir_with_space.json); double-quoted it is accepted
    log = fixture("sbatch_log_dir_with_space")["job_log_dir"]
    lines = SLURM.directives(JobSpec(command="true", name="j").normalized(), log)
    for opt, path in (("--output", f"{log}/job.out"), ("--error", f"{log}/job.err")):
        line = next(x for x in lines if x.startswith(f"#SBATCH {opt}="))
        assert sbatch_reads(line) == f"{opt}={path}"
    assert lines[1:3] != fixture("sbatch_log_dir_with_space")["directives"][1:3]


@pytest.mark.parametrize("odd", ["#", "# #", " #"])
def test_slurm_directive_values_survive_sbatch_parsing(odd: str) -> None:
    log = f"/home/u/run{odd}x/log/job/j/01"
    spec = JobSpec(command="true", name="j", account=f"proj{odd}1").normalized()
    lines = SLURM.directives(spec, log)
    wanted = {"--output": f"{log}/job.out", "--error": f"{log}/job.err",
              "--account": f"proj{odd}1"}
    for opt, value in wanted.items():
        line = next(x for x in lines if x.startswith(f"#SBATCH {opt}="))
        assert sbatch_reads(line) == f"{opt}={value}", line


@pytest.mark.parametrize("odd", ["\\", "# \\", '"', "'", "x'y'z", 'a"b c\'d'])
def test_slurm_directive_values_with_quotes_and_backslashes_are_escaped(odd: str) -> None:
    # sbatch removes quotes and backslashes unless escaped
    # (fixtures/sbatch_directive_quotes.json): escaped, they reach Slurm byte-exact
    spec = JobSpec(command="true", name="j", account=f"proj{odd}1").normalized()
    line = next(x for x in SLURM.directives(spec, "/home/u/run/log/job/j/01")
                if x.startswith("#SBATCH --account="))
    assert sbatch_reads(line) == f"--account=proj{odd}1"


@pytest.mark.parametrize("odd", ["\\", "# \\"])
def test_slurm_log_dir_with_a_backslash_is_refused(odd: str) -> None:
    # sbatch drops a backslash from an output file name and then expands no
    # %-pattern in it (fixtures/sbatch_directive_quotes.json)
    with pytest.raises(InvalidInputError, match="run-dir"):
        SLURM.directives(JobSpec(command="true", name="j").normalized(), f"/home/u/r{odd}/01")


@pytest.mark.parametrize("value", ["plain", "a b", "it's", "x  y z", "/p/my runs/job.out",
                                   "de'b'ug", 'q"u"o', "b\\s", "#x", "a # b", "'"])
def test_slurm_word_read_back_by_sbatch_model(value: str) -> None:
    assert sbatch_reads(f"#SBATCH --comment={SLURM.word('comment', value)}") == \
        f"--comment={value}"


@pytest.mark.parametrize(("field", "opt"), [("queue", "--partition"), ("account", "--account"),
                                            ("mail_user", "--mail-user")])
def test_slurm_directive_values_with_blanks_stay_one_word(field: str, opt: str) -> None:
    spec = JobSpec(command="true", **{field: "a b  c"}).normalized()
    line = next(x for x in SLURM.directives(spec, LOG) if x.startswith(f"#SBATCH {opt}="))
    assert sbatch_reads(line) == f"{opt}=a b  c"


def test_slurm_submit_argv() -> None:
    assert SLURM.submit_argv("/r/log/job/x/01/job", "/r/log/job/x/01") == [
        "sbatch", "--ignore-pbs", "/r/log/job/x/01/job"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("nodes", 2),
        ("tasks", 4),
        ("cpus", 2),
        ("memory", "1G"),
        ("queue", "debug"),
        ("account", "proj"),
        ("mail_user", "me@example.org"),
        ("mail_events", ("end",)),
        ("directives", ("--exclusive",)),
    ],
)
def test_background_refuses_batch_fields(field: str, value: object) -> None:
    spec = JobSpec(command="true", **{field: value})
    with pytest.raises(InvalidInputError) as ei:
        BG.directives(spec, LOG)
    msg = str(ei.value)
    assert field.replace("_", "-") in msg
    assert "background" in msg


def test_background_accepts_walltime_and_work_dir() -> None:
    spec = JobSpec(command="true", walltime="00:10", work_dir="/tmp/w", name="n",
                   environment={"A": "b"}, arguments=("x",)).normalized()
    assert BG.directives(spec, LOG) == []
    assert BG.wrapper_walltime is True
    assert SLURM.wrapper_walltime is False


# ------------------------------------------------------------ job id regexes


def test_slurm_job_id_from_real_sbatch_output() -> None:
    for name in ("sbatch_submit", "sbatch_submit_held"):
        cap = fixture(name)
        assert cap["exit"] == 0
        got = job_id_from(SLURM, cap["stdout"])
        assert got is not None and got.isdigit()
        assert cap["stdout"] == f"Submitted batch job {got}\n"


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("Submitted batch job 123\n", "123"),
        ("Submitted batch job 123", "123"),
        ("Submitted batch job 123 on cluster c1\n", "123"),  # sbatch(1), multi-cluster
        ("sbatch: warning: something\nSubmitted batch job 42\n", "42"),
        ("  Submitted batch job 7\n", "7"),
        ("Submitted batch job 9876543210\n", "9876543210"),
    ],
)
def test_slurm_job_id_regex(stdout: str, expected: str) -> None:
    assert job_id_from(SLURM, stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    ["", "Submitted batch job\n", "Submitted batch job abc\n",
     "sbatch: error: Batch job submission failed: Invalid account\n",
     "Not Submitted batch job 5\n"],
)
def test_slurm_job_id_regex_no_match(stdout: str) -> None:
    assert job_id_from(SLURM, stdout) is None


def test_slurm_refused_submission_has_no_id() -> None:
    cap = fixture("sbatch_invalid_partition")
    assert cap["exit"] != 0
    assert job_id_from(SLURM, cap["stdout"]) is None
    assert job_id_from(SLURM, cap["stderr"]) is None


def test_background_job_id_from_captured_launcher_output() -> None:
    cap = fixture("background_launch")
    assert cap["exit"] == 0
    assert cap["argv"][:4] == BG.submit_argv("/j", "/l")[:4]  # same launcher program
    got = job_id_from(BG, cap["stdout"])
    assert got is not None
    assert cap["stdout"] == f"{got}\n"


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [("12345\n", "12345"), ("12345", "12345"), ("7 \n", "7"), ("noise\n4242\n", "4242")],
)
def test_background_job_id_regex(stdout: str, expected: str) -> None:
    assert job_id_from(BG, stdout) == expected


@pytest.mark.parametrize("stdout", ["", "\n", "abc\n", "12a\n", "-5\n"])
def test_background_job_id_regex_no_match(stdout: str) -> None:
    assert job_id_from(BG, stdout) is None


def test_background_launcher_for_real(tmp_path: Path) -> None:
    """Run submit_argv as the agent does (no shell): the printed id is the job's pid,
    the job runs in its own session, and its output lands in the log dir."""
    log = tmp_path / "log dir; $(touch canary)"
    log.mkdir()
    job = log / "job"
    job.write_text(
        "#!/bin/sh\n"
        'printf "%s %s\\n" "$$" "$(ps -o sid= -p $$ | tr -d " ")" >"$(dirname "$0")/pid"\n'
        "echo out; echo err >&2\n"
    )
    job.chmod(0o755)
    res = subprocess.run(BG.submit_argv(str(job), str(log)), capture_output=True,
                         cwd=tmp_path, timeout=10)
    assert res.returncode == 0, res.stderr
    job_id = job_id_from(BG, res.stdout.decode())
    assert job_id is not None
    deadline = time.time() + 10
    while not (log / "pid").exists() or not (log / "pid").read_text().endswith("\n"):
        assert time.time() < deadline, "background job did not run"
        time.sleep(0.02)
    pid, sid = (log / "pid").read_text().split()
    assert pid == job_id  # the id that poll/kill use is the job's own pid
    assert sid == pid  # setsid: its own session, outlives the SSH channel
    deadline = time.time() + 10
    while (log / "job.err").read_bytes() != b"err\n":
        assert time.time() < deadline
        time.sleep(0.02)
    assert (log / "job.out").read_bytes() == b"out\n"
    assert not (tmp_path / "canary").exists()


# ------------------------------------------------------------- poll parsing


def squeue_argv(argv: list[str]) -> list[str]:
    """The squeue command the Slurm poll program runs: ``sh -c PROGRAM NAME ARGS``
    unsets the SQUEUE_* filters of a login environment, then runs squeue ARGS."""
    assert argv[:2] == ["sh", "-c"] and argv[2].endswith('exec squeue "$@"')
    assert argv[3] == "sshq-slurm-poll"
    return ["squeue", *argv[4:]]


def test_slurm_poll_command_is_what_was_captured() -> None:
    cap = fixture("squeue_mixed")
    ids = cap["argv"][-1].split(",")
    # Captured before -r (one line per array element) joined the command; -r
    # changes nothing for plain jobs (squeue(1)), so the capture still holds.
    argv = squeue_argv(expand_ids(SLURM.poll_command, ids, SLURM.ids_sep))
    assert [w for w in argv if w != "-r"] == cap["argv"]


def test_slurm_poll_program_unsets_the_squeue_filters_of_a_login_environment(
        tmp_path: Path) -> None:
    # SQUEUE_PARTITION/SQUEUE_USERS of another value hide sshq's jobs from
    # squeue -j (seen on 22.05); SQUEUE_STATES=all lists ended ones
    fake = tmp_path / "squeue"
    fake.write_text('#!/bin/sh\nenv | grep ^SQUEUE_ | sort\nprintf "<%s>" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SQUEUE_STATES="all",
               SQUEUE_PARTITION="p", SQUEUE_USERS="root", SQUEUE_ACCOUNT="a",
               SQUEUE_QOS="q", SQUEUE_NAMES="n", SQUEUE_LICENSES="l", SQUEUE_SORT="i")
    argv = expand_ids(SLURM.poll_command, ["1", "2 x"], SLURM.ids_sep)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30).stdout
    assert out == "SQUEUE_SORT=i\n<-h><-r><-o><%i^^^%T><-j><1,2 x>"


def test_slurm_parse_poll_real_mixed() -> None:
    cap = fixture("squeue_mixed")
    running = job_id_from(SLURM, fixture("sbatch_submit")["stdout"])
    pending = job_id_from(SLURM, fixture("sbatch_submit_held")["stdout"])
    assert running and pending
    queried = cap["argv"][-1].split(",")
    unknown = [i for i in queried if i not in (running, pending)]
    assert unknown
    got = SLURM.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])
    assert set(got) == {running, pending}
    assert got[running] == RunnerJobState(running, True, "RUNNING")
    assert got[pending] == RunnerJobState(pending, False, "PENDING")
    for i in unknown:
        assert i not in got


@pytest.mark.parametrize("name", ["squeue_one_unknown", "squeue_all_unknown"])
def test_slurm_parse_poll_real_all_forgotten(name: str) -> None:
    cap = fixture(name)
    assert SLURM.parse_poll(cap["exit"], cap["stdout"], cap["stderr"]) == {}


def test_slurm_parse_poll_real_controller_down_is_transient_error() -> None:
    cap = fixture("squeue_controller_down")
    with pytest.raises(JobRunnerError) as ei:
        SLURM.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])
    assert ei.value.transient is True
    assert ei.value.stderr == cap["stderr"]
    assert "Unable to contact slurm controller" in str(ei.value)


def test_slurm_parse_poll_real_malformed_id_is_error() -> None:
    cap = fixture("squeue_bad_id")
    with pytest.raises(JobRunnerError):
        SLURM.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("1^^^COMPLETING\n", {"1": True}),
        ("1^^^SUSPENDED\n2^^^CONFIGURING\n", {"1": True, "2": False}),
        ("  3^^^RUNNING  \n\n", {"3": True}),
        ("4^^^PENDING\n5^^^COMPLETED\n6^^^CANCELLED\n7^^^TIMEOUT\n", {"4": False}),
        ("8+0^^^RUNNING\n8+1^^^PENDING\n9+0^^^PENDING\n9+1^^^FAILED\n",
         {"8": True, "9": False}),
    ],
)
def test_slurm_parse_poll_states(stdout: str, expected: dict[str, bool]) -> None:
    got = SLURM.parse_poll(0, stdout, "")
    assert {k: v.running for k, v in got.items()} == expected


@pytest.mark.parametrize("stdout", ["garbage line\n4^^^PENDING\n", "4 PENDING\n",
                                    "^^^RUNNING\n", "4^^^\n"])
def test_slurm_poll_line_sshq_did_not_ask_for_says_nothing(stdout: str) -> None:
    # read as "no job known", it would fail every job: the poll is transient
    with pytest.raises(JobRunnerError) as ei:
        SLURM.parse_poll(0, stdout, "")
    assert ei.value.transient


def test_background_parse_poll_real_mixed() -> None:
    cap = fixture("ps_mixed")
    running, zombie, missing = cap["argv"][-3:]
    got = BG.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])
    assert set(got) == {running}  # a zombie has exited; a missing pid is forgotten
    assert got[running].running is True
    assert got[running].job_id == running
    assert zombie not in got and missing not in got


def test_background_parse_poll_real_all_unknown() -> None:
    cap = fixture("ps_all_unknown")
    assert cap["exit"] == 1
    assert BG.parse_poll(cap["exit"], cap["stdout"], cap["stderr"]) == {}


def test_background_parse_poll_real_error() -> None:
    cap = fixture("ps_bad_option")
    with pytest.raises(JobRunnerError) as ei:
        BG.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])
    assert ei.value.transient is True


def test_background_poll_live_processes() -> None:
    """ps on this machine, for a live process and one that has gone."""
    proc = subprocess.Popen(["sleep", "30"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        argv = expand_ids(BG.poll_command, [str(proc.pid), str(gone.pid)], BG.ids_sep)
        res = subprocess.run(argv, capture_output=True, text=True)
        got = BG.parse_poll(res.returncode, res.stdout, res.stderr)
    finally:
        proc.kill()
        proc.wait()
    assert set(got) == {str(proc.pid)}


# ----------------------------------------------------------------- expand_ids


@pytest.mark.parametrize(
    ("template", "ids", "sep", "expected"),
    [
        (("squeue", "-j", IDS), ["1", "2", "3"], ",", ["squeue", "-j", "1,2,3"]),
        (("squeue", "-j", IDS), ["1"], ",", ["squeue", "-j", "1"]),
        (("ps", "-p", IDS), ["1", "2"], None, ["ps", "-p", "1", "2"]),
        (("kill", IDS, "--"), ["9"], None, ["kill", "9", "--"]),
        (("ps", "-p", IDS), [], None, []),  # no ids: no command at all
        (("x", "{ids}x", "ids"), ["1"], None, ["x", "{ids}x", "ids"]),  # whole word only
        ((IDS, IDS), ["1", "2"], " ", ["1 2", "1 2"]),
    ],
)
def test_expand_ids(template: tuple[str, ...], ids: list[str], sep: str | None,
                    expected: list[str]) -> None:
    assert expand_ids(template, ids, sep) == expected


@pytest.mark.parametrize("handler", [SLURM, BG], ids=lambda h: h.name)
@pytest.mark.parametrize("kind", ["poll_command", "kill_command"])
def test_agent_expands_like_expand_ids(handler: Any, kind: str) -> None:
    ids = ["101", "102", "103"]
    template = list(getattr(handler, kind))
    assert IDS in template
    plain = [w for w in template if w != agent.GROUP]  # no group words: as query_runners
    assert agent.expand(plain, ids, handler.ids_sep) == [
        expand_ids(template, ids, handler.ids_sep)]


def test_agent_expand_chunks_long_id_lists() -> None:
    ids = [str(10**9 + i) for i in range(20000)]
    chunks = agent.expand(list(SLURM.poll_command), ids, ",")
    assert len(chunks) > 1
    joined: list[str] = []
    for argv in chunks:
        assert argv[:-1] == list(SLURM.poll_command[:-1])
        assert len(argv[-1]) <= agent.MAX_ARGS_BYTES
        joined.extend(argv[-1].split(","))
    assert joined == ids
    sep_none = agent.expand(["ps", "-p", IDS], ids, None)
    assert [i for argv in sep_none for i in argv[2:]] == ids
    assert all(sum(len(a) + 1 for a in argv) <= agent.MAX_ARGS_BYTES + 10 for argv in sep_none)


def test_os_arg_max_is_larger_than_agent_chunk() -> None:
    assert os.sysconf("SC_ARG_MAX") > agent.MAX_ARGS_BYTES


def test_slurm_parse_poll_real_array_elements() -> None:
    cap = fixture("squeue_array_held")
    j = cap["array_job"]
    ids = cap["argv"][-1].split(",")
    assert squeue_argv(expand_ids(SLURM.poll_command, ids, SLURM.ids_sep)) == cap["argv"]
    got = SLURM.parse_poll(cap["exit"], cap["stdout"], cap["stderr"])
    assert set(got) == {f"{j}_1", f"{j}_2", f"{j}_3"}  # one entry per element
    assert not any(s.running for s in got.values())


# ---------------------------------------------------------------- Slurm multi-cluster


def test_slurm_multi_cluster_submit_output_gives_a_cluster_job_id() -> None:
    # sbatch(1), OUTPUT: "Submitted batch job 123 on cluster c1" with --clusters.
    m = re.search(SLURM.job_id_regex, "Submitted batch job 123 on cluster c1\n", re.MULTILINE)
    assert m
    groups = {k: v for k, v in m.groupdict().items() if v is not None}
    job_id = SLURM.job_id_from_submit(groups)
    assert job_id == "123@c1"
    assert SLURM.job_id_parts(job_id) == (("--clusters=c1",), "123")
    assert SLURM.job_id_join(("--clusters=c1",), "123") == job_id
    assert SLURM.job_id_parts("77_3") == ((), "77_3")
    assert "--clusters=c1" in SLURM.attach_argv(job_id, ["true"], tty=False)


def test_agent_queries_each_cluster_with_its_own_flag() -> None:
    req = {"runners": {"slurm": {"poll": list(SLURM.poll_command),
                                 "kill": list(SLURM.kill_command), "sep": SLURM.ids_sep}}}
    jobs = [{"runner": "slurm", "job_id": "1", "bare_id": "1", "group": []},
            {"runner": "slurm", "job_id": "2@c1", "bare_id": "2", "group": ["--clusters=c1"]},
            {"runner": "slurm", "job_id": "3@c1", "bare_id": "3", "group": ["--clusters=c1"]}]
    seen: list[list[str]] = []
    real_run = agent.run
    agent.run = lambda argv, **kw: (seen.append(argv)  # type: ignore[func-returns-value]
                                    or {"exit": 0, "stdout": "", "stderr": ""})
    try:
        out = agent.query_runners(req, jobs, "kill")
    finally:
        agent.run = real_run
    assert sorted(seen) == [["scancel", "--clusters=c1", "2,3"], ["scancel", "1"]]
    assert sorted(r["group"] for r in out["slurm"]) == [[], ["--clusters=c1"]]


def test_squeue_cluster_banner_lines_are_not_jobs() -> None:
    # squeue -M prints a "CLUSTER: name" line before each cluster's jobs (squeue(1)).
    got = SLURM.parse_poll(0, "CLUSTER: c1\n2^^^RUNNING\n3^^^PENDING\n", "")
    assert set(got) == {"2", "3"}


# ---------------------------------------------------------------- what the docs say of ssh-to-job


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_handler_docs_say_how_ssh_to_job_reaches_the_job(name: str) -> None:
    # pbs.py and sge.py said ssh-to-job was refused (or ran on the submit
    # host) while their handlers reach the job's execution host
    import inspect

    handler = HANDLERS[name]
    doc = " ".join((inspect.getmodule(handler).__doc__ or "").split())
    refused = re.search(r"ssh-to-job`*\s+(?:is\s+)?refused", doc)
    if handler.attach_via_exec_host:
        assert "ssh-to-job" in doc and "execution host" in doc, name
        assert not refused and "runs on the submit host" not in doc, name
