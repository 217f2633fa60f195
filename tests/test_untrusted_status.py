"""Issue 10, section 1: a job status file is data the job itself can write.

Whatever a job writes into its own ``job.status`` (huge or negative numbers,
other scripts' digits, markup, control characters, option-like ids, 2000-
character values, impossible times, duplicate keys, 300 MB of it), the value
is dropped, the job's message names it, and nothing raises: not the parser
(:class:`sshq.shipped.sshq_jobstatus.JobStatus`), not the state decision, not
the client rebuilding the agent's reply (``JobStatus.from_wire``).

The second half runs it end to end on the real test bed: a job that writes
``SSHQ_JOB_EXIT_STATUS=99999999999999999999`` (or ``SSHQ_JOB_EXIT_SIGNAL=[/bold]``)
and kills its wrapper with SIGKILL, on the background job runner (local
transport and the real sshd) and on the real Slurm; ``sshq poll --all``,
``sshq wait``, ``sshq kill``, ``sshq jobs`` (CLI subprocesses) and the API all
complete, that one job fails with a message naming the value, and the other
jobs of the same calls are unaffected.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import random
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sshq import AsyncClient, Job, JobSpec, JobState
from sshq.job_runners.base import RunnerJobState
from sshq.remote.protocol import FrameParser, agent_argv, encode_request
from sshq.remote.status import decide
from sshq.shipped import sshq_jobstatus as js

# ---------------------------------------------------------------- a valid file

INIT = "2026-01-02T03:04:05Z"
EXIT = "2026-01-02T04:05:06Z"
T_INIT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SUBMITTED = ("SSHQ_JOB_RUNNER_NAME=slurm\nSSHQ_JOB_ID=42\nSSHQ_JOB_ID_CLUSTER=main\n"
             f"SSHQ_JOB_RUNNER_SUBMIT_TIME={INIT}\n")
STARTED = SUBMITTED + f"SSHQ_JOB_PID=123\nSSHQ_JOB_HOST=node1\nSSHQ_JOB_INIT_TIME={INIT}\n"
CONTAINER = ("SSHQ_JOB_CONTAINER_RUNTIME=podman\nSSHQ_JOB_CONTAINER_COMMAND=/usr/bin/podman\n"
             "SSHQ_JOB_CONTAINER_IMAGE=docker.io/library/debian:12\n"
             "SSHQ_JOB_CONTAINER_NAME=sshq-42\n")
EXITED_0 = STARTED + CONTAINER + f"SSHQ_JOB_EXIT_STATUS=0\nSSHQ_JOB_EXIT_TIME={EXIT}\n"

HUGE = "99999999999999999999"

# ---------------------------------------------------------------- hostile values

HOSTILE = [
    HUGE, "-1", "-5", "256", "²", "٣", "１２", "1e3", "0x10", "1 2",
    "é", "日本語", "[/bold]", "[red]x[/red]", "[link=file:///etc/passwd]x",
    "\x1b[31mred", "\x1b]0;title\x07", "\x9b31m", "a\x00b", "tab\there", "\x7f", "x\u202ey",
    "-oProxyCommand=touch /tmp/x", "--help", "$(id)", "`id`", "../../etc/passwd",
    "x" * 2000, "2026-13-40T99:99:99Z", "0000-01-01T00:00:00Z", "２０２６-01-02T03:04:05Z",
    "9999-12-31T23:59:59-23:59", "2026-06-30T23:59:60Z", "",
]

#: Of HOSTILE, the values that are legitimate for a key (all others must be dropped).
PLAIN_WORDS = {HUGE, "256", "1e3", "0x10"}
TIME_LIKE = {"2026-13-40T99:99:99Z", "0000-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
             "2026-06-30T23:59:60Z"}  # a job id may hold ':'
PRINTABLE = {v for v in HOSTILE if v and v.isprintable() and len(v) <= 1024}
ACCEPTED: dict[str, set[str]] = {
    js.JOB_ID: PLAIN_WORDS | TIME_LIKE,
    js.JOB_ID_PREFIX + "CLUSTER": PLAIN_WORDS,
    js.HOST: PLAIN_WORDS,
    js.PID: {"256"},
    js.CONTAINER_PREFIX + "COMMAND": PRINTABLE,
    js.CONTAINER_PREFIX + "IMAGE": PRINTABLE,
    js.CONTAINER_PREFIX + "NAME": PLAIN_WORDS,
}

#: Every key whose value sshq reads -> how a JobStatus shows that value.
FIELD: dict[str, Callable[[js.JobStatus], object]] = {
    js.RUNNER_NAME: lambda st: st.runner_name,
    js.JOB_ID: lambda st: st.job_id,
    js.JOB_ID_PREFIX + "CLUSTER": lambda st: st.job_id_groups.get("cluster"),
    js.RUNNER_SUBMIT_TIME: lambda st: st.submit_time,
    js.PID: lambda st: st.pid,
    js.HOST: lambda st: st.host,
    js.INIT_TIME: lambda st: st.init_time,
    js.EXIT_STATUS: lambda st: st.exit_status,
    js.EXIT_SIGNAL: lambda st: st.exit_signal,
    js.EXIT_TIME: lambda st: st.exit_time,
    **{js.CONTAINER_PREFIX + part: (lambda st, p=part.lower(): st.container.get(p))
       for part in js.CONTAINER_KEYS},
}


def test_every_key_of_the_module_is_covered() -> None:
    # a key added to the module without a hostile-value test fails here
    keys = {v for k, v in vars(js).items() if k.isupper() and isinstance(v, str)
            and v.startswith("SSHQ_JOB_") and not v.endswith("_")}
    assert keys - set(FIELD) == {js.RUNNER_SUBMIT_FAILED}  # a flag: its value is unused


def assert_sane(st: js.JobStatus) -> None:
    """Every field of ``st`` is None/empty or a valid value of its type."""
    assert isinstance(st, js.JobStatus)
    for flag in ("present", "submit_failed", "started", "exited"):
        assert type(getattr(st, flag)) is bool, flag
    assert st.runner_name is None or (st.runner_name.isascii() and st.runner_name.isidentifier())
    assert st.job_id is None or js.valid_job_id(st.job_id)
    assert st.host is None or (st.host.isascii() and st.host.isprintable()
                               and not st.host.startswith("-") and " " not in st.host)
    assert st.pid is None or (type(st.pid) is int and 1 <= st.pid <= 2**31 - 1)
    assert st.exit_status is None or (type(st.exit_status) is int and 0 <= st.exit_status <= 255)
    assert st.exit_signal is None or st.exit_signal in js.SIGNALS
    for t in (st.submit_time, st.init_time, st.exit_time):
        assert t is None or (isinstance(t, datetime) and t.utcoffset() is not None)
    assert st.started is (st.init_time is not None)
    assert isinstance(st.job_id_groups, dict) and len(st.job_id_groups) <= 8
    for g, v in st.job_id_groups.items():
        assert isinstance(g, str) and isinstance(v, str) and js.valid_job_id(v)
    assert isinstance(st.container, dict)
    assert set(st.container) <= {p.lower() for p in js.CONTAINER_KEYS}
    assert all(isinstance(v, str) and v.isprintable() for v in st.container.values())
    assert isinstance(st.problems, list) and len(st.problems) <= js.MAX_PROBLEMS
    for p in st.problems:
        assert isinstance(p, str) and len(p) <= 400, p


def with_value(key: str, value: str, base: str = EXITED_0) -> str:
    """``base`` with ``key=value`` appended: the last value of a key wins."""
    return f"{base}{key}={value}\n"


def names_key(problems: list[str] | str, key: str) -> bool:
    text = problems if isinstance(problems, str) else " ".join(problems)
    return key in text


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("key", sorted(FIELD))
def test_hostile_value_of_every_key_is_dropped_and_named(key: str) -> None:
    wrong = []
    for value in HOSTILE:
        st = js.JobStatus.parse(with_value(key, value).encode("utf-8"))
        assert_sane(st)
        shown = FIELD[key](st)
        if value in ACCEPTED.get(key, ()):
            expect: object = int(value) if key == js.PID else value
            if shown != expect or st.problems:
                wrong.append((value, "accepted value not kept", shown, st.problems))
            continue
        if shown is not None:
            wrong.append((value, "kept", shown))
        if not names_key(st.problems, key):
            wrong.append((value, "no problem names the key", st.problems))
        elif len(value) <= 40 and not any(repr(value) in p for p in st.problems):
            wrong.append((value, "no problem shows the value", st.problems))
        if not all(p.isprintable() for p in st.problems):
            wrong.append((value, "a problem is not printable", st.problems))
    assert not wrong, wrong


@pytest.mark.parametrize("key", sorted(FIELD))
def test_hostile_value_in_the_decision(key: str) -> None:
    """The state decision (the client's, from the file's text): never raises,
    and a bad value is that job's message; a bad exit is a failure."""
    for value in HOSTILE:
        if value in ACCEPTED.get(key, ()):
            continue
        d = decide(with_value(key, value), job_id="42", queried=True, runner_ok=True,
                   known={}, runner_name="slurm")
        ctx = (key, value, d)
        assert d.state is not None, ctx
        assert names_key(d.fields.get("message") or "", key), ctx
        assert d.fields.get("exit_status") in (None, 0), ctx
        assert d.fields.get("signal") in (None, *js.SIGNALS), ctx
        for t in ("start_time", "exit_time"):
            assert d.fields.get(t) is None or isinstance(d.fields[t], datetime), ctx
        if key in js.EXIT_KEYS:
            assert d.state is JobState.FAILED, ctx
            assert d.fields["exit_status"] is None and d.fields["signal"] is None, ctx
        else:  # the exit recorded (0) still decides
            assert d.state is JobState.SUCCEEDED, ctx
            assert d.fields["exit_status"] == 0, ctx


@pytest.mark.parametrize("known", [True, False])
def test_hostile_value_of_a_running_job(known: bool) -> None:
    text = with_value(js.PID, HUGE, STARTED)
    d = decide(text, job_id="42", queried=True, runner_ok=True,
               known={"42": RunnerJobState("42", True, "R")} if known else {},
               runner_name="slurm")
    assert d.state is (JobState.RUNNING if known else JobState.FAILED)
    assert f"SSHQ_JOB_PID {HUGE!r}" in d.fields["message"]


def test_the_issue_case_exact_message() -> None:
    d = decide(STARTED + f"SSHQ_JOB_EXIT_STATUS={HUGE}\n", job_id="42", queried=True,
               runner_ok=True, known={}, runner_name="slurm")
    assert d.state is JobState.FAILED
    assert d.fields["exit_status"] is None
    assert d.fields["message"] == (
        f"job status file: SSHQ_JOB_EXIT_STATUS '{HUGE}' is not an integer in 0..255")


@pytest.mark.parametrize(("lines", "state", "rc"), [
    (["SSHQ_JOB_EXIT_STATUS=0", f"SSHQ_JOB_EXIT_STATUS={HUGE}"], JobState.FAILED, None),
    ([f"SSHQ_JOB_EXIT_STATUS={HUGE}", "SSHQ_JOB_EXIT_STATUS=0"], JobState.SUCCEEDED, 0),
    (["SSHQ_JOB_EXIT_STATUS=3", "SSHQ_JOB_EXIT_STATUS=-1"], JobState.FAILED, None),
    (["SSHQ_JOB_EXIT_SIGNAL=TERM", "SSHQ_JOB_EXIT_SIGNAL=[/bold]"], JobState.FAILED, None),
])
def test_duplicate_keys_the_last_value_wins_and_is_validated(
        lines: list[str], state: JobState, rc: int | None) -> None:
    d = decide(STARTED + "\n".join(lines) + "\n", job_id="42", queried=True, runner_ok=True,
               known={}, runner_name="slurm")
    assert d.state is state
    assert d.fields["exit_status"] == rc and d.fields["signal"] is None
    assert bool(d.fields["message"]) is (rc is None)


def test_every_key_bad_at_once_bounded_problems() -> None:
    text = "".join(f"{k}={'[/bold]' * 300}\n" for k in FIELD)
    st = js.JobStatus.parse(text)
    assert_sane(st)
    assert st.exited and st.exit_status is None and st.exit_signal is None
    assert len(st.problems) == js.MAX_PROBLEMS


@pytest.mark.parametrize("key", [
    "SSHQ_JOB_ID_\x1b]0;title\x07", "SSHQ_JOB_ID_" + "G" * 3000, "SSHQ_JOB_ID_[/bold]",
    "SSHQ_JOB_ID_\x9b2J", "\x1b[2J" * 500, "SSHQ_JOB_ID_é",
])
def test_hostile_keys_are_named_printably_and_briefly(key: str) -> None:
    for value in ("1", "x" * 2000):
        st = js.JobStatus.parse(f"{key}={value}\n".encode("utf-8", "surrogateescape"))
        assert_sane(st)
        assert st.job_id_groups == {}
        assert all(p.isprintable() and len(p) <= 200 for p in st.problems), st.problems


def test_undecodable_bytes_and_odd_lines() -> None:
    data = (STARTED.encode() + b"SSHQ_JOB_EXIT_STATUS=\xff\xfe\n\x00\x00\n=\n==\n\n"
            b"SSHQ_JOB_EXIT_TIME\n" + b"\r\n" * 100)
    st = js.JobStatus.parse(data)
    assert_sane(st)
    assert st.exited and st.exit_status is None
    assert names_key(st.problems, "SSHQ_JOB_EXIT_STATUS")
    assert st.init_time == T_INIT and st.job_id == "42"


def test_random_files_never_raise() -> None:
    rng = random.Random(20261202)
    keys = [*FIELD, js.RUNNER_SUBMIT_FAILED, "SSHQ_JOB_ID_X", "", "=", "SSHQ_JOB_"]
    alphabet = "09AZaz-_.:[]/= \t\x00\x1b\x7f\x85\u2028²٣é日\U0001F680"
    for _ in range(3000):
        lines = []
        for _ in range(rng.randrange(12)):
            value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
            if rng.random() < 0.3:
                value = rng.choice(HOSTILE)
            lines.append(f"{rng.choice(keys)}={value}")
        raw = "\n".join(lines).encode("utf-8")
        if rng.random() < 0.2:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        st = js.JobStatus.parse(raw)
        assert_sane(st)
        back = js.JobStatus.from_wire(json.loads(json.dumps(st.to_wire())))
        assert back == st, (raw, st, back)


# ---------------------------------------------------------------- on the wire


@pytest.mark.parametrize("text", [
    "", SUBMITTED, STARTED, EXITED_0, STARTED + "SSHQ_JOB_EXIT_SIGNAL=SIGXCPU\n",
    SUBMITTED + "SSHQ_JOB_RUNNER_SUBMIT_FAILED=2026-01-02T03:04:05Z\n",
    STARTED + "SSHQ_JOB_INIT_TIME=2026-01-02T03:04:05.123456+02:00\n",
    with_value(js.EXIT_STATUS, HUGE), with_value(js.EXIT_SIGNAL, "[/bold]"),
    with_value(js.HOST, "-oProxyCommand=x"), with_value(js.INIT_TIME, "2026-13-40T99:99:99Z"),
])
def test_from_wire_of_to_wire_is_the_same_status(text: str) -> None:
    st = js.JobStatus.parse(text)
    back = js.JobStatus.from_wire(json.loads(json.dumps(st.to_wire())))
    assert back == st
    assert back.to_wire() == st.to_wire()
    assert back.problems == st.problems and back.exited is st.exited


HOSTILE_WIRE: list[object] = [
    None, [], "status", 5, True, 1.5, {}, {"present": "yes"},
    {"pid": "123"}, {"pid": 1.5}, {"pid": True}, {"pid": -1}, {"pid": 10**30},
    {"pid": 10**5000}, {"pid": [1]}, {"pid": {"a": 1}},
    {"exit_status": int(HUGE), "exited": True}, {"exit_status": 10**5000, "exited": True},
    {"exit_status": "0"}, {"exit_status": [0]}, {"exit_status": -1}, {"exit_status": False},
    {"exit_signal": 9}, {"exit_signal": ["TERM"]}, {"exit_signal": "[/bold]", "exited": True},
    {"exit_signal": "\x1b[31mTERM"}, {"job_id": "-1"}, {"job_id": {"a": [[[[]]]]}},
    {"job_id": "x" * 10**6}, {"host": "[/bold]"}, {"runner_name": "Slurm; rm -rf /"},
    {"init_time": 12345}, {"init_time": "2026-13-40T99:99:99Z"}, {"init_time": None},
    {"exit_time": ["2026-01-01T00:00:00Z"]}, {"submit_time": "０２０２６-01-02T03:04:05Z"},
    {"job_id_groups": [1, 2]}, {"job_id_groups": {"a": {"b": 1}}}, {"job_id_groups": "x"},
    {"job_id_groups": {str(i): "v" for i in range(100_000)}},
    {"job_id_groups": {"\x1b]0;x\x07": "1", "cluster": "-x"}},
    {"container": "podman"}, {"container": {"runtime": ["podman"]}},
    {"container": {"runtime": "docker", "name": "-x", "command": "\x1b[2J", "image": ""}},
    {"problems": 5}, {"problems": True}, {"problems": "abc"}, {"problems": {"a": 1}},
    {"problems": ["x" * 10**6]}, {"problems": list(range(10**5))},
    {"problems": [f"p{i}" for i in range(10**5)]}, {"problems": [[["deep"]]]},
    {"exited": "yes"}, {"submit_failed": 1}, {"started": True},
    {k: [] for k in js.JobStatus.FIELDS}, {k: {} for k in js.JobStatus.FIELDS},
    {k: HUGE for k in js.JobStatus.FIELDS}, {k: int(HUGE) for k in js.JobStatus.FIELDS},
]


def wire_id(obj: object) -> str:
    try:
        return repr(obj)[:40]
    except ValueError:  # repr of a 5000-digit int
        return "huge-int"


@pytest.mark.parametrize("obj", HOSTILE_WIRE, ids=wire_id)
def test_from_wire_of_hostile_replies_never_raises(obj: object) -> None:
    st = js.JobStatus.from_wire(obj)
    assert_sane(st)


def test_from_wire_names_what_it_dropped() -> None:
    st = js.JobStatus.from_wire({"present": True, "exited": True, "exit_status": int(HUGE)})
    assert st.exited and st.exit_status is None
    assert names_key(st.problems, "SSHQ_JOB_EXIT_STATUS")
    d = decide(st, job_id="42", queried=True, runner_ok=True, known={}, runner_name="slurm")
    assert d.state is JobState.FAILED and d.fields["exit_status"] is None
    assert HUGE in d.fields["message"]


def test_random_wire_junk_never_raises() -> None:
    rng = random.Random(10)

    def junk(depth: int = 0) -> object:
        makers: list[Callable[[], object]] = [
            lambda: None, lambda: True, lambda: rng.randrange(-10**25, 10**25), rng.random,
            lambda: rng.choice(HOSTILE), lambda: rng.choice(sorted(js.SIGNALS)),
            lambda: [junk(depth + 1) for _ in range(rng.randrange(4))],
            lambda: {rng.choice([*js.JobStatus.FIELDS, "x"]): junk(depth + 1)
                     for _ in range(rng.randrange(4))},
            lambda: {rng.choice(["cluster", "runtime", "name", "a"]): junk(depth + 1)},
        ]
        return rng.choice(makers if depth < 3 else makers[:6])()

    for _ in range(3000):
        obj = {f: junk() for f in js.JobStatus.FIELDS if rng.random() < 0.5}
        assert_sane(js.JobStatus.from_wire(obj))


# ---------------------------------------------------------------- the file on disk


def sparse_status(log_dir: Path, size: int, head: str, tail: str) -> Path:
    """A job.status of ``size`` bytes: ``head``, a hole, then ``tail`` at its end."""
    log_dir.mkdir(parents=True, exist_ok=True)
    p = log_dir / js.STATUS_FILE
    tail_b = ("\n" + tail).encode()
    with open(p, "wb") as fh:
        fh.write(head.encode())
        fh.truncate(size - len(tail_b))
        fh.seek(0, os.SEEK_END)
        fh.write(tail_b)
    assert p.stat().st_size == size
    assert p.stat().st_blocks * 512 < 1024 * 1024  # sparse: the test stays cheap
    return p


def test_300_mb_status_file_is_read_within_the_cap_and_its_end_seen(tmp_path: Path) -> None:
    size = 300 * 1024 * 1024
    sparse_status(tmp_path, size, STARTED,
                  f"SSHQ_JOB_EXIT_STATUS=0\nSSHQ_JOB_EXIT_TIME={EXIT}\n")
    tracemalloc.start()
    try:
        st = js.read_status_file(str(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * js.MAX_STATUS_BYTES, peak  # a few copies of 64 KiB, not 300 MB
    assert_sane(st)
    assert st.present and st.exited and st.exit_status == 0
    assert st.init_time == T_INIT and st.job_id == "42"  # the head is read too
    assert any(str(size) in p for p in st.problems), st.problems
    d = decide(st, job_id="42", queried=True, runner_ok=True, known={}, runner_name="slurm")
    assert d.state is JobState.SUCCEEDED
    assert str(size) in d.fields["message"]


def test_status_file_that_is_a_fifo_does_not_block_the_reader(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / js.STATUS_FILE)
    got: list[js.JobStatus] = []
    reader = threading.Thread(target=lambda: got.append(js.read_status_file(str(tmp_path))),
                              daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # unblock it, then fail
        with open(tmp_path / js.STATUS_FILE, "wb"):
            pass
        reader.join(5)
        pytest.fail("reading a FIFO job.status blocked (a job can hang every poll)")
    (st,) = got
    assert_sane(st)
    assert st.problems and not st.exited


def test_agent_replies_with_validated_fields_not_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    big = tmp_path / "big"
    bad.mkdir()
    (bad / js.STATUS_FILE).write_text(STARTED + f"SSHQ_JOB_EXIT_STATUS={HUGE}\n"
                                      "SSHQ_JOB_EXIT_SIGNAL=[/bold]\n")
    sparse_status(big, 300 * 1024 * 1024, STARTED, "SSHQ_JOB_EXIT_STATUS=3\n")
    jobs = [{"key": "1", "log_dir": str(bad), "job_id": "42", "runner": "slurm"},
            {"key": "2", "log_dir": str(big), "job_id": "43", "runner": "slurm"}]
    nonce, stdin = encode_request("poll", {"jobs": jobs, "skip_runner": True, "runners": {}})
    res = subprocess.run(agent_argv("python3"), input=stdin, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout) < 64 * 1024  # the agent sent fields, not 300 MB
    parser = FrameParser(nonce)
    (frame,) = list(parser.feed(res.stdout))
    wire = frame["status"]
    assert set(wire) == {"1", "2"}
    one, two = js.JobStatus.from_wire(wire["1"]), js.JobStatus.from_wire(wire["2"])
    assert wire["1"]["exit_status"] is None and wire["1"]["exit_signal"] is None
    assert one.exited and names_key(one.problems, "SSHQ_JOB_EXIT_SIGNAL")
    assert two.exited and two.exit_status == 3


# ================================================================ end to end
#
# On the real test bed: the background job runner on this machine (local
# transport) and over the real sshd, and the real Slurm.  Each hostile job
# writes one bad line into its own job.status, then SIGKILLs its wrapper (so
# no EXIT trap records a real exit after it).

E2E_PLATFORMS = [
    pytest.param("local", marks=pytest.mark.sshd),
    pytest.param("bg", marks=pytest.mark.sshd),
    pytest.param("slurm", marks=[pytest.mark.sshd, pytest.mark.slurm]),
]
VARIANTS = {"huge": (js.EXIT_STATUS, HUGE), "markup": (js.EXIT_SIGNAL, "[/bold]")}
SLOTS = ("api_poll", "api_wait", "api_kill", "cli_poll", "cli_wait", "cli_kill")
#: The job's own line, then SIGKILL to its wrapper (the user script's parent).
HOSTILE_JOB = ('printf "%s=%s\\n" "$BAD_KEY" "$BAD_VALUE" >>"$SSHQ_JOB_LOG_DIR/job.status"\n'
               "kill -9 $PPID\n")


def status_text(job: Job) -> str:
    """The job's status file, read directly (the remote run dirs are on this machine)."""
    try:
        return (Path(job.job_log_dir) / js.STATUS_FILE).read_text("utf-8", "replace")
    except OSError:
        return ""


async def until(cond: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


def assert_failed_by_value(job: Job, variant: str) -> None:
    key, value = VARIANTS[variant]
    assert job.state is JobState.FAILED, (job.name, job.state, job.message)
    assert job.exit_status is None and job.signal is None, job
    assert f"{key} {value!r}" in job.message, job.message


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def assert_row_failed_by_value(row: dict[str, Any], variant: str) -> None:
    key, value = VARIANTS[variant]
    assert row["state"] == "failed", row
    assert row["exit_status"] is None and row["signal"] is None, row
    assert f"{key} {value!r}" in row["message"], row


@pytest.mark.timeout(600)
@pytest.mark.parametrize("platform", E2E_PLATFORMS)
async def test_hostile_status_values_fail_one_job_only(
        testbed: dict[str, str], client: AsyncClient, platform: str,
        sshq: Callable[..., subprocess.CompletedProcess[bytes]],
        cli_env: dict[str, str]) -> None:
    if platform == "slurm" and testbed.get("SSHQ_TEST_SLURM") != "1":
        pytest.skip("no Slurm in the test bed")
    sleep = f"3{random.randrange(10**8):08d}"
    specs = [JobSpec(command=HOSTILE_JOB, name=f"{slot}-{variant}",
                     environment={"BAD_KEY": key, "BAD_VALUE": value})
             for slot in SLOTS for variant, (key, value) in VARIANTS.items()]
    specs += [JobSpec(command="echo fine", name="good-api"),
              JobSpec(command="echo fine", name="good-cli"),
              JobSpec(command=f"sleep {sleep}", name="long")]
    jobs = {j.name: j for j in await client.submit(specs, platform=platform)}
    try:
        assert all(j.state is JobState.SUBMITTED for j in jobs.values()), jobs
        bad = [j for n, j in jobs.items() if n.rsplit("-", 1)[-1] in VARIANTS]
        await until(lambda: all(f"={VARIANTS[j.name.rsplit('-', 1)[1]][1]}\n" in status_text(j)
                                for j in bad), "the hostile lines")
        await until(lambda: all("SSHQ_JOB_EXIT_STATUS=0" in status_text(jobs[n])
                                for n in ("good-api", "good-cli")), "the good jobs' exits")
        await until(lambda: "SSHQ_JOB_INIT_TIME" in status_text(jobs["long"]),
                    "the long job to start")

        # ---- the API: poll (with a good job in the same call), wait, kill
        polled = {j.name: j for j in await client.poll(
            [jobs[n].id for n in ("api_poll-huge", "api_poll-markup", "good-api")])}
        for variant in VARIANTS:
            assert_failed_by_value(polled[f"api_poll-{variant}"], variant)
        assert polled["good-api"].state is JobState.SUCCEEDED
        assert polled["good-api"].exit_status == 0 and not polled["good-api"].message
        waited = await client.wait([jobs[f"api_wait-{v}"].id for v in VARIANTS],
                                   timeout=120, interval=0.2)
        killed = await client.kill([jobs[f"api_kill-{v}"].id for v in VARIANTS], settle=0)
        for j in [*waited, *killed]:
            assert_failed_by_value(j, j.name.rsplit("-", 1)[1])

        # ---- the CLI, in subprocesses with their own state dir (cli_env's)
        def ids(*names: str) -> list[str]:
            return [str(jobs[n].id) for n in names]

        r = sshq("kill", "--json", *ids("cli_kill-huge", "cli_kill-markup", "long"))
        assert r.returncode == 0, r.stderr
        rows = by_name(json.loads(r.stdout))
        for variant in VARIANTS:
            assert_row_failed_by_value(rows[f"cli_kill-{variant}"], variant)
        # (Slurm may take longer than the settle time to deliver the TERM)
        assert rows["long"]["state"] in ("running", "failed"), rows["long"]
        assert rows["long"]["signal"] in (None, "TERM") and not rows["long"]["message"]

        r = sshq("wait", "--json", "--timeout", "120",
                 *ids("cli_wait-huge", "cli_wait-markup", "long"))
        assert r.returncode == 1, r.stderr  # 1: done, not all succeeded (124: timeout)
        rows = by_name(json.loads(r.stdout))
        for variant in VARIANTS:
            assert_row_failed_by_value(rows[f"cli_wait-{variant}"], variant)
        assert rows["long"]["state"] == "failed" and rows["long"]["signal"] == "TERM", rows
        assert not rows["long"]["message"]

        r = sshq("poll", "--all", "--json")
        assert r.returncode == 0, r.stderr
        rows = by_name(json.loads(r.stdout))
        assert set(rows) == {"cli_poll-huge", "cli_poll-markup", "good-cli"}, rows
        for variant in VARIANTS:
            assert_row_failed_by_value(rows[f"cli_poll-{variant}"], variant)
        assert rows["good-cli"]["state"] == "succeeded" and rows["good-cli"]["exit_status"] == 0
        assert not rows["good-cli"]["message"]

        # ---- what the state now holds, as JSON and as the terminal table
        r = sshq("jobs", "--json")
        assert r.returncode == 0, r.stderr
        rows = by_name(json.loads(r.stdout))
        assert set(rows) == set(jobs)
        for name, row in rows.items():
            variant = name.rsplit("-", 1)[-1]
            if variant in VARIANTS:
                assert_row_failed_by_value(row, variant)
        # on a terminal: a rich table (a signal like [/bold] once crashed it with MarkupError)
        rc, out, err = on_tty(["jobs"], cli_env)
        assert b"MarkupError" not in err and b"Traceback" not in err, err
        assert rc == 0, err
        text = out.decode("utf-8", "replace")
        assert all(name in text for name in jobs), text
        assert text.count("failed") == 2 * len(SLOTS) + 1, text  # the bad ones and long
    finally:
        stop_leftover(platform, jobs.get("long"), f"sleep {sleep}")


def on_tty(args: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run ``sshq ARGS`` with its stdout on a terminal (a pty, 300 columns)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 300, 0, 0))
    with subprocess.Popen([sys.executable, "-m", "sshq", *args], stdin=subprocess.DEVNULL,
                          stdout=slave, stderr=subprocess.PIPE,
                          env=dict(env, TERM="xterm", COLUMNS="300")) as p:
        os.close(slave)
        out = bytearray()
        try:
            while select.select([master], [], [], 120)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last writer is gone
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            os.close(master)
        assert p.stderr is not None
        err = p.stderr.read()
        return p.wait(timeout=120), bytes(out), err


def stop_leftover(platform: str, job: Job | None, pattern: str) -> None:
    """End the long job if the test failed before killing it: by its ids."""
    if job is not None and platform == "slurm" and job.job_id:
        subprocess.run(["scancel", job.job_id], capture_output=True, timeout=30)
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                          timeout=30).stdout.split()
    for pid in pids:
        subprocess.run(["kill", "-KILL", pid], capture_output=True, timeout=30)
