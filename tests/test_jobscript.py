"""sshq.jobscript: render job scripts and run them for real with bash."""

# JobSpec coerces "1:00:00", 600, "2G" and lists (its docstring); its annotations
# say timedelta/int/tuple only, so mypy is told to allow the documented forms here.
# mypy: disable-error-code="arg-type"

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sshq.job_runners.background import HANDLER as BG
from sshq.job_runners.slurm import HANDLER as SLURM
from sshq.jobscript import STATUS_FILE, render_job_script
from sshq.jobscript import render as render_mod
from sshq.model.job_spec import JobSpec
from sshq.remote.status import parse_status

HOSTILE_WORDS = [
    "plain",
    "",
    "two words",
    "it's",
    '"dq"',
    "back\\slash",
    "$HOME",
    "${IFS}",
    "a;b|c&d",
    "*",
    "line1\nline2",
    "trailing\n",
    "tab\there",
    "héllo 日本語 \U0001F600",
    "-n",
    "--",
    "%s%%",
]

#: undecodable bytes 0xff 0xfe, as Python decodes them from argv (surrogateescape)
UNDECODABLE = "\udcff\udcfe"

ISO_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")


class Job:
    """One rendered job file in a tmp job log directory."""

    def __init__(self, base: Path, spec: JobSpec, handler: Any = BG,
                 extra_env: dict[str, str] | None = None, work_dir: Path | None = None) -> None:
        self.base = base
        # hostile characters in the directories themselves
        self.log_dir = base / "run 'x' $(y)" / "log" / "job" / spec.job_name / "01"
        self.log_dir.mkdir(parents=True)
        self.work_dir = work_dir or base / "work dir `z`" / spec.job_name
        self.spec = spec.normalized()
        self.data = render_job_script(self.spec, handler, job_log_dir=str(self.log_dir),
                                      work_dir=str(self.work_dir), extra_env=extra_env)
        self.path = self.log_dir / "job"
        self.path.write_bytes(self.data)
        self.path.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        # as the background launcher does: own session, stdin /dev/null, logs in log dir
        with open(self.log_dir / "job.out", "wb") as out, \
                open(self.log_dir / "job.err", "wb") as err:
            self.proc = subprocess.Popen([str(self.path)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, cwd=self.base,
                                         start_new_session=True)
        return self.proc

    def run(self, timeout: float = 20) -> int:
        proc = self.start()
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    @property
    def status(self) -> dict[str, str]:
        return parse_status(self.status_text)

    @property
    def status_text(self) -> str:
        try:
            return (self.log_dir / STATUS_FILE).read_text()
        except FileNotFoundError:
            return ""

    def out(self) -> bytes:
        return (self.log_dir / "job.out").read_bytes()

    def err(self) -> bytes:
        return (self.log_dir / "job.err").read_bytes()


def wait_for(cond: Any, timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until_blocked_in_wait(pid: int) -> None:
    """Wait until the wrapper blocks in its ``wait`` for the user's script.

    Signalling earlier can hit a known race (see
    test_signal_right_after_fork_still_kills_user_processes); the tests of the
    normal signal path should not.
    """
    wchan = Path(f"/proc/{pid}/wchan")
    try:
        wchan.read_text()
    except OSError:
        time.sleep(0.3)
        return
    wait_for(lambda: wchan.read_text() == "do_wait", 10, "the wrapper to wait")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def nul_list(words: list[str]) -> bytes:
    return b"".join(os.fsencode(w) + b"\0" for w in words)


# ------------------------------------------------------------------- exits


def test_exit_zero_records_life(tmp_path: Path) -> None:
    body = b"#!/bin/bash\necho hello\n"
    job = Job(tmp_path, JobSpec(script=body, name="ok"))
    before = datetime.now(UTC).replace(microsecond=0)
    assert job.run() == 0
    after = datetime.now(UTC)
    st = job.status
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    assert "SSHQ_JOB_EXIT_SIGNAL" not in st
    assert job.proc is not None and st["SSHQ_JOB_PID"] == str(job.proc.pid)
    assert st["SSHQ_JOB_HOST"] == socket.gethostname()
    for key in ("SSHQ_JOB_INIT_TIME", "SSHQ_JOB_EXIT_TIME"):
        assert ISO_RE.match(st[key]), st[key]
        t = datetime.fromisoformat(st[key].replace("Z", "+00:00"))
        assert before <= t <= after
    assert st["SSHQ_JOB_INIT_TIME"] <= st["SSHQ_JOB_EXIT_TIME"]
    # each key written once, in order of the job's life
    keys = [line.split("=", 1)[0] for line in job.status_text.splitlines()]
    assert keys == ["SSHQ_JOB_PID", "SSHQ_JOB_HOST", "SSHQ_JOB_INIT_TIME",
                    "SSHQ_JOB_EXIT_STATUS", "SSHQ_JOB_EXIT_TIME"]
    assert (job.log_dir / "job.user").read_bytes() == body
    assert job.out() == b"hello\n"


@pytest.mark.parametrize("rc", [1, 3, 255])
def test_exit_nonzero_recorded(tmp_path: Path, rc: int) -> None:
    job = Job(tmp_path, JobSpec(script=f"#!/bin/bash\nexit {rc}\n".encode()))
    assert job.run() == rc
    st = job.status
    assert st["SSHQ_JOB_EXIT_STATUS"] == str(rc)
    assert "SSHQ_JOB_EXIT_SIGNAL" not in st
    assert "SSHQ_JOB_EXIT_TIME" in st


def test_failing_command_in_script_does_not_stop_script(tmp_path: Path) -> None:
    # the wrapper's ERR trap must not leak into the user's script
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\nfalse\necho after\nexit 0\n"))
    assert job.run() == 0
    assert job.out() == b"after\n"
    assert job.status["SSHQ_JOB_EXIT_STATUS"] == "0"


def test_user_script_killed_by_signal_recorded_as_status(tmp_path: Path) -> None:
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\nkill -KILL $$\n"))
    assert job.run() == 128 + 9
    assert job.status["SSHQ_JOB_EXIT_STATUS"] == str(128 + 9)


def test_unusable_work_dir_fails_before_user_script(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\ntouch ran\n"),
              work_dir=blocker / "sub")
    rc = job.run()
    assert rc != 0
    st = job.status
    assert st["SSHQ_JOB_EXIT_STATUS"] == str(rc)
    assert "SSHQ_JOB_INIT_TIME" in st
    assert not list(tmp_path.rglob("ran"))


# ----------------------------------------------- byte-exact args and environment


def test_arguments_and_environment_byte_exact(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    words = HOSTILE_WORDS + [f"$(touch {canary})", f"`touch {canary}`", f"'; touch {canary}; '"]
    env = {f"V{i}": w for i, w in enumerate([*words, UNDECODABLE])}
    body = (
        "#!/bin/bash\n"
        "printf '%s\\0' \"$@\" >args.bin\n"
        + "printf '%s\\0' " + " ".join(f'"${k}"' for k in env) + " >env.bin\n"
    ).encode()
    job = Job(tmp_path, JobSpec(script=body, arguments=words, environment=env))
    assert job.run() == 0, job.err()
    assert (job.work_dir / "args.bin").read_bytes() == nul_list(words)
    assert (job.work_dir / "env.bin").read_bytes() == nul_list(list(env.values()))
    assert not canary.exists()
    assert job.status["SSHQ_JOB_EXIT_STATUS"] == "0"


def test_undecodable_argument_byte_exact(tmp_path: Path) -> None:
    body = b"#!/bin/bash\nprintf '%s\\0' \"$@\" >args.bin\n"
    job = Job(tmp_path, JobSpec(script=body, arguments=[UNDECODABLE, "x"]))
    assert job.run() == 0, job.err()
    assert (job.work_dir / "args.bin").read_bytes() == b"\xff\xfe\0x\0"


def test_command_spec_gets_arguments(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    words = HOSTILE_WORDS + [f"$(touch {canary})"]
    job = Job(tmp_path, JobSpec(command="printf '%s\\0' \"$@\" >args.bin", arguments=words))
    assert job.run() == 0, job.err()
    assert (job.work_dir / "args.bin").read_bytes() == nul_list(words)
    assert not canary.exists()


def test_environment_reaches_non_bash_interpreter(tmp_path: Path) -> None:
    value = "héllo $(x) `y` 'z'\n\"q\""
    body = (b"#!/usr/bin/env python3\nimport os, sys\n"
            b"open('py.bin', 'wb').write(os.environb[b'MYVAR'] + b'\\0' + "
            b"b'\\0'.join(os.fsencode(a) for a in sys.argv[1:]))\n")
    job = Job(tmp_path, JobSpec(script=body, environment={"MYVAR": value},
                                arguments=["a b", "$(c)"]))
    assert job.run() == 0, job.err()
    assert (job.work_dir / "py.bin").read_bytes() == (
        value.encode() + b"\0" + b"a b\0$(c)")


def test_sshq_variables_and_work_dir(tmp_path: Path) -> None:
    body = (b"#!/bin/bash\n"
            b"printf '%s\\0' \"$PWD\" \"$SSHQ_JOB_NAME\" \"$SSHQ_JOB_LOG_DIR\" "
            b"\"$SSHQ_WORK_DIR\" \"$SSHQ_ID\" >vars.bin\n")
    job = Job(tmp_path, JobSpec(script=body, name="vars-job"), extra_env={"SSHQ_ID": "7 $(x)"})
    assert not job.work_dir.exists()
    assert job.run() == 0, job.err()
    assert (job.work_dir / "vars.bin").read_bytes() == nul_list(
        [str(job.work_dir), "vars-job", str(job.log_dir), str(job.work_dir), "7 $(x)"])


def test_user_path_does_not_break_wrapper(tmp_path: Path) -> None:
    # the job's PATH applies to the job, not to the wrapper's date/ps/pkill
    body = b"#!/bin/bash\nprintf '%s' \"$PATH\" >path.txt\n"
    job = Job(tmp_path, JobSpec(script=body, environment={"PATH": "/nonexistent"},
                                walltime=60))
    assert job.run() == 0, job.err()
    assert (job.work_dir / "path.txt").read_bytes() == b"/nonexistent"
    st = job.status
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    assert ISO_RE.match(st["SSHQ_JOB_EXIT_TIME"])
    assert job.proc is not None
    pgid = job.proc.pid
    wait_for(lambda: not group_members(pgid), 5, "the watchdog to go")


def test_wrapper_internals_not_exported(tmp_path: Path) -> None:
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\nenv >env.txt\n"))
    assert job.run() == 0
    names = {line.split("=", 1)[0]
             for line in (job.work_dir / "env.txt").read_text().splitlines()}
    assert not {n for n in names if n.startswith("sshq__")}


# ------------------------------------------------------------ script bodies


@pytest.mark.parametrize(
    "body",
    [
        b"#!/bin/bash\nprintf done >marker",
        b"printf done >marker",  # no #! line and no newline
        b"#!/bin/sh\nprintf done >marker\n# a last comment, no newline",
    ],
)
def test_script_without_trailing_newline_or_shebang(tmp_path: Path, body: bytes) -> None:
    job = Job(tmp_path, JobSpec(script=body))
    assert job.run() == 0, job.err()
    assert (job.work_dir / "marker").read_bytes() == b"done"
    user = (job.log_dir / "job.user").read_bytes()
    assert user == body or user == body + b"\n"


def test_heredoc_delimiter_lookalikes(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    body = (
        b"#!/bin/bash\n"
        b": <<'EOF'\nSSHQ_USER_SCRIPT_0000000000000000_0\nEOF\n"
        b"x='SSHQ_USER_SCRIPT_'\n"
        b"echo 'SSHQ_USER_SCRIPT_ffffffffffffffff_1' >/dev/null\n"
        b"# $(touch " + bytes(canary) + b") `touch " + bytes(canary) + b"`\n"
        b"cat <<EOF >/dev/null\n$(true) \\x\nEOF\n"
        b"printf 'end\\n' >marker\n"
    )
    job = Job(tmp_path, JobSpec(script=body))
    assert job.run() == 0, job.err()
    assert (job.log_dir / "job.user").read_bytes() == body
    assert (job.work_dir / "marker").read_bytes() == b"end\n"
    assert not canary.exists()


def test_heredoc_delimiter_collision_avoided(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # force the digest so that the body contains the first candidate delimiters
    fake = SimpleNamespace(sha256=lambda data: SimpleNamespace(hexdigest=lambda: "a" * 64))
    monkeypatch.setattr(render_mod, "hashlib", fake)
    body = (b"#!/bin/bash\n"
            b"SSHQ_USER_SCRIPT_aaaaaaaaaaaaaaaa_0\n"
            b"SSHQ_USER_SCRIPT_aaaaaaaaaaaaaaaa_1\n"
            b"printf 'end\\n' >marker\n")
    body = body.replace(b"SSHQ", b": SSHQ")  # make them harmless commands...
    body += b"SSHQ_USER_SCRIPT_aaaaaaaaaaaaaaaa_0\n"  # ...and one a bare line
    job = Job(tmp_path, JobSpec(script=body))
    assert b"<<'SSHQ_USER_SCRIPT_aaaaaaaaaaaaaaaa_2'" in job.data
    job.run()
    assert (job.log_dir / "job.user").read_bytes() == body
    assert (job.work_dir / "marker").read_bytes() == b"end\n"


def test_binary_and_non_utf8_script_bytes_exact(tmp_path: Path) -> None:
    body = b"#!/bin/bash\n# \xff\xfe\x80 \xc3\x28\nprintf '\\xff\\n' >marker\n"
    job = Job(tmp_path, JobSpec(script=body))
    assert job.run() == 0, job.err()
    assert (job.log_dir / "job.user").read_bytes() == body
    assert (job.work_dir / "marker").read_bytes() == b"\xff\n"


def test_user_output_goes_where_redirected(tmp_path: Path) -> None:
    body = b"#!/bin/bash\necho 'to stdout'\necho 'to stderr' >&2\nprintf 'no newline'\n"
    job = Job(tmp_path, JobSpec(script=body))
    assert job.run() == 0
    assert job.out() == b"to stdout\nno newline"
    assert job.err() == b"to stderr\n"


def test_stdin_is_not_the_script(tmp_path: Path) -> None:
    # a user script reading stdin must not eat the wrapper's own text
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\ncat >stdin.txt\necho after\n"))
    assert job.run() == 0
    assert (job.work_dir / "stdin.txt").read_bytes() == b""
    assert job.status["SSHQ_JOB_EXIT_STATUS"] == "0"


# ---------------------------------------------------------------- signals


SLEEPER = (b"#!/bin/bash\n"
           b"sleep 300 &\n"
           b"echo $! >sleep.pid\n"
           b"wait\n"
           b"echo not-reached >after\n")


@pytest.mark.parametrize(
    ("target", "sig"),
    [
        ("wrapper", signal.SIGTERM),  # what the background kill command does
        ("group", signal.SIGTERM),  # what a batch system's cancel does
        ("wrapper", signal.SIGXCPU),
        ("wrapper", signal.SIGINT),
        ("wrapper", signal.SIGHUP),
        ("group", signal.SIGINT),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_signal_recorded_and_children_killed(tmp_path: Path, target: str,
                                             sig: signal.Signals) -> None:
    job = Job(tmp_path, JobSpec(script=SLEEPER))
    proc = job.start()
    try:
        pid_file = job.work_dir / "sleep.pid"
        wait_for(lambda: "SSHQ_JOB_INIT_TIME" in job.status and pid_file.exists()
                 and pid_file.read_text().endswith("\n"), what="job start")
        sleep_pid = int(pid_file.read_text())
        assert alive(sleep_pid)
        wait_until_blocked_in_wait(proc.pid)
        if target == "wrapper":
            os.kill(proc.pid, sig)
        else:
            os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 128 + sig.value
    st = job.status
    assert st["SSHQ_JOB_EXIT_SIGNAL"] == sig.name.removeprefix("SIG")
    assert "SSHQ_JOB_EXIT_STATUS" not in st
    assert ISO_RE.match(st["SSHQ_JOB_EXIT_TIME"])
    wait_for(lambda: not alive(sleep_pid), 5, "the user's sleep to die")
    wait_for(lambda: not group_members(proc.pid), 5, "the job's process group to empty")
    assert not (job.work_dir / "after").exists()


def test_signal_right_after_fork_still_kills_user_processes(tmp_path: Path) -> None:
    """Deterministic repro of a race seen about once in 200 runs under load.

    BASH_ENV puts a DEBUG trap into the wrapper that, just before the wrapper runs
    ``sshq__child=$!``, waits until the user's script is running and then sends
    the wrapper TERM: the timing of a ``kill`` that lands in that window.
    """
    bash_env = tmp_path / "bash_env"
    bash_env.write_text(
        "trap '[[ $BASH_COMMAND == \"sshq__child=\\$!\" ]] && "
        "{ while [ ! -s \"$SSHQ_WORK_DIR/sleep.pid\" ]; do sleep 0.01; done; kill -TERM $$; }'"
        " DEBUG\n"
    )
    job = Job(tmp_path, JobSpec(script=SLEEPER))
    with open(job.log_dir / "job.out", "wb") as out:
        proc = subprocess.Popen([str(job.path)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=True,
                                env={**os.environ, "BASH_ENV": str(bash_env)})
    try:
        rc = proc.wait(timeout=10)
        st = job.status
        assert st.get("SSHQ_JOB_EXIT_SIGNAL") == "TERM", job.status_text
        assert rc == 128 + 15
        sleep_pid = int((job.work_dir / "sleep.pid").read_text())
        deadline = time.monotonic() + 3
        while alive(sleep_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(sleep_pid), "the user's sleep outlived a job recorded as killed"
        assert not group_members(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the leaked user processes
        except ProcessLookupError:
            pass


def test_signal_while_the_exit_is_recorded(tmp_path: Path) -> None:
    """Deterministic repro of a race seen in CI on Slurm (about 1 cancel in 20).

    A cancel signals every process of the job: the user's died of TERM, the
    wrapper's wait returned 143 and its EXIT trap was recording that when
    the wrapper's own TERM came; the signal trap then exited the shell
    before the write, leaving job.status with no end at all.  Here the user's
    script kills itself with TERM, and the ``date`` the wrapper runs for the
    exit time (first on PATH: a script) sends the wrapper TERM first.
    """
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\necho up\nkill -TERM $$\n"))
    status = job.log_dir / "job.status"
    mark = tmp_path / "sent"
    q = lambda p: shlex.quote(str(p))  # noqa: E731  (the test's paths are hostile)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "date").write_text(
        "#!/bin/sh\n"
        f"if grep -q INIT_TIME {q(status)} && [ ! -e {q(mark)} ]; then\n"
        f"    : > {q(mark)}\n"
        f"    kill -TERM $(sed -n 's/^SSHQ_JOB_PID=//p' {q(status)})\n"
        "    sleep 0.2\n"
        "fi\n"
        "exec /bin/date \"$@\"\n")
    (bin_dir / "date").chmod(0o755)
    with open(job.log_dir / "job.out", "wb") as out:
        proc = subprocess.Popen([str(job.path)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=True,
                                env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mark.exists(), "the signal was not sent while the exit was recorded"
    st = job.status
    assert st.get("SSHQ_JOB_EXIT_SIGNAL") == "TERM", job.status_text
    assert "SSHQ_JOB_EXIT_STATUS" not in st
    assert ISO_RE.match(st["SSHQ_JOB_EXIT_TIME"])
    assert rc == 128 + 15


def test_walltime_background_records_xcpu(tmp_path: Path) -> None:
    job = Job(tmp_path, JobSpec(script=SLEEPER, walltime=1))
    t0 = time.monotonic()
    rc = job.run(timeout=20)
    elapsed = time.monotonic() - t0
    assert rc == 128 + 24
    assert 0.9 <= elapsed < 10
    st = job.status
    assert st["SSHQ_JOB_EXIT_SIGNAL"] == "XCPU"
    assert "SSHQ_JOB_EXIT_STATUS" not in st
    sleep_pid = int((job.work_dir / "sleep.pid").read_text())
    wait_for(lambda: not alive(sleep_pid), 5, "the user's sleep to die")
    assert not (job.work_dir / "after").exists()


def test_walltime_watchdog_does_not_outlive_job(tmp_path: Path) -> None:
    job = Job(tmp_path, JobSpec(script=b"#!/bin/bash\nexit 0\n", walltime=30))
    t0 = time.monotonic()
    assert job.run() == 0
    assert time.monotonic() - t0 < 10  # did not wait for the watchdog
    assert job.proc is not None
    pgid = job.proc.pid
    # the watchdog subshell and its sleep are gone as soon as the job is
    wait_for(lambda: not group_members(pgid), 1, "the watchdog to go")
    st = job.status
    assert st["SSHQ_JOB_EXIT_STATUS"] == "0"
    assert "SSHQ_JOB_EXIT_SIGNAL" not in st


def test_walltime_only_with_wrapper_walltime_handlers() -> None:
    spec = JobSpec(command="true", walltime=timedelta(seconds=61.5)).normalized()
    bg = render_job_script(spec, BG, job_log_dir="/l", work_dir="/w")
    sl = render_job_script(spec, SLURM, job_log_dir="/l", work_dir="/w")
    assert b"sleep 62 && kill -s XCPU" in bg
    assert b"kill -s XCPU $$" not in sl
    assert b"#SBATCH --time=00:01:02\n" in sl


# ------------------------------------------------------------------- Slurm


def test_slurm_script_starts_with_directives() -> None:
    spec = JobSpec(
        script=b"#!/bin/bash\n#SBATCH --uid=0\necho hi\n",
        name="sl", walltime="10", queue="debug", memory="1G", cpus=2,
        environment={"A": "x\ny"}, arguments=("#SBATCH --fake",),
    ).normalized()
    log = "/home/u/run/log/job/sl/01"
    data = render_job_script(spec, SLURM, job_log_dir=log, work_dir="/home/u/work")
    lines = data.decode().split("\n")
    assert lines[0] == "#!/bin/bash"
    directives = SLURM.directives(spec, log)
    assert lines[1:1 + len(directives)] == directives
    # sbatch reads #SBATCH lines only until the first command line
    first_cmd = next(i for i, line in enumerate(lines[1:], 1)
                     if line.strip() and not line.startswith("#"))
    seen = [line for line in lines[:first_cmd] if line.startswith("#SBATCH")]
    assert seen == directives
    # the user's own #SBATCH lines come after a command: sbatch ignores them
    assert data.index(b"#SBATCH --uid=0") > data.index(lines[first_cmd].encode())


def test_slurm_script_is_valid_bash() -> None:
    spec = JobSpec(script=b"echo hi", name="sl", walltime="10",
                   environment={"A": "$(x)'\n"}).normalized()
    data = render_job_script(spec, SLURM, job_log_dir="/l", work_dir="/w")
    res = subprocess.run(["bash", "-n"], input=data, capture_output=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("sig", ["USR1", "USR2"])
def test_user_signals_are_recorded_not_taken_for_success(tmp_path: Path, sig: str) -> None:
    # LSF sends USR2 at a job's run limit: the job must end failed with USR2,
    # never "exit 0" (the EXIT trap would otherwise see $? = 0).
    import signal as _signal
    import subprocess as _sp
    import time as _time

    from sshq.job_runners import HANDLERS
    from sshq.jobscript import render_job_script
    from sshq.model import JobSpec

    log, work = tmp_path / "log", tmp_path / "work"
    log.mkdir()
    script = render_job_script(JobSpec(command="sleep 30", name="u").normalized(),
                               HANDLERS["background"], job_log_dir=str(log),
                               work_dir=str(work))
    (log / "job").write_bytes(script)
    proc = _sp.Popen(["/bin/bash", str(log / "job")], start_new_session=True,
                     stdout=_sp.DEVNULL, stderr=_sp.DEVNULL)
    status = log / "job.status"
    for _ in range(100):
        if status.exists() and "SSHQ_JOB_INIT_TIME" in status.read_text():
            break
        _time.sleep(0.05)
    proc.send_signal(getattr(_signal, f"SIG{sig}"))
    proc.wait(timeout=20)
    text = status.read_text()
    assert f"SSHQ_JOB_EXIT_SIGNAL={sig}" in text
    assert "SSHQ_JOB_EXIT_STATUS" not in text
