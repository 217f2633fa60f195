# sshq job status file, job log layout and state decision.
#
# ONE definition, used on both sides of the wire (the model is Cylc's
# JobPollContext, read once on the job host and rebuilt by the client):
#
# - shipped to remote hosts inside the agent bundle (sshq.remote.protocol
#   puts it ahead of agent.py; installed agents have it beside them), where
#   the agent reads job status files into JobStatus objects and replies with
#   their named, typed fields;
# - imported by the client as sshq.shipped.sshq_jobstatus, which rebuilds the
#   same JobStatus from the reply (validating it again: a reply is untrusted
#   too) and decides the job's state.
#
# Python 3.6+, standard library only.
#
# The job status file (Cylc's job.status, seed 001) is KEY=VALUE lines that
# the agent and the job wrapper append; the last value of a key wins.  Every
# value comes from a file the job itself can write, so every value is
# bounded and validated here, and a bad value is a problem of that one job
# (JobStatus.problems), never an exception.

import os
import re
import stat
from datetime import datetime, timedelta, timezone

TYPE_CHECKING = False  # typing is not imported at run time: 4 ms of every agent call
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Tuple, Union  # noqa: F401  (type comments)

# ---------------------------------------------------------------- layout

#: The job log directory of a job: <run_dir>/log/job/<name>/<NN>/ (Cylc's
#: layout), NN the submit number, "NN" a symlink to the latest.
LOG_JOB_DIR = "log/job"
WORK_DIR = "work"
NN_LINK = "NN"
STATUS_FILE = "job.status"
JOB_FILE = "job"
#: cat-log names -> file in the job log directory.
LOG_FILES = {"out": "job.out", "err": "job.err", "status": STATUS_FILE, "job": JOB_FILE}
ENV_FILE = "job.env"
USER_SCRIPT_FILE = "job.user"


def job_log_dir(run_dir, name, submit_num):
    # type: (str, str, int) -> str
    """<run_dir>/log/job/<name>/<NN> (str, str, int) -> str."""
    return "%s/%s/%s/%02d" % (run_dir, LOG_JOB_DIR, name, submit_num)


def element_log_dir(log_dir, index):
    # type: (str, int) -> str
    """The log directory of array element ``index`` under its job's ``log_dir``."""
    return "%s/%d" % (log_dir, index)


def default_work_dir(run_dir, name):
    # type: (str, str) -> str
    """<run_dir>/work/<name>."""
    return "%s/%s/%s" % (run_dir, WORK_DIR, name)


def array_element_id(template, job_id, index):
    # type: (str, str, int) -> str
    """A job runner's id for one array element: ``template`` with {id} and {index}.

    Args:
        template: the handler's ``array_element_id`` (e.g. ``{id}_{index}``).
        job_id: the array job's id; index: the element's index (int).
    """
    return template.replace("{id}", job_id).replace("{index}", str(index))


# ---------------------------------------------------------------- keys

RUNNER_NAME = "SSHQ_JOB_RUNNER_NAME"  # agent: slurm, background, ...
JOB_ID = "SSHQ_JOB_ID"  # agent: the job runner's job id
JOB_ID_PREFIX = "SSHQ_JOB_ID_"  # agent: more of the id (e.g. SSHQ_JOB_ID_CLUSTER)
RUNNER_SUBMIT_TIME = "SSHQ_JOB_RUNNER_SUBMIT_TIME"  # agent: ISO 8601 UTC
RUNNER_SUBMIT_FAILED = "SSHQ_JOB_RUNNER_SUBMIT_FAILED"  # agent: the runner refused it
PID = "SSHQ_JOB_PID"  # wrapper: its pid
HOST = "SSHQ_JOB_HOST"  # wrapper: the execution host
INIT_TIME = "SSHQ_JOB_INIT_TIME"  # wrapper: start time
EXIT_STATUS = "SSHQ_JOB_EXIT_STATUS"  # wrapper: the user script's exit status
EXIT_SIGNAL = "SSHQ_JOB_EXIT_SIGNAL"  # wrapper: the signal that ended it (TERM ...)
EXIT_TIME = "SSHQ_JOB_EXIT_TIME"  # wrapper: end time
CONTAINER_PREFIX = "SSHQ_JOB_CONTAINER_"  # wrapper: RUNTIME, COMMAND, IMAGE, NAME
CONTAINER_KEYS = ("RUNTIME", "COMMAND", "IMAGE", "NAME")
EXIT_KEYS = (EXIT_STATUS, EXIT_SIGNAL)

#: At most this much of a job status file is read (bytes).  A longer file
#: (a job can write anything into its own status file) is read as its first
#: and last halves of this size, and the job carries a problem saying so.
MAX_STATUS_BYTES = 64 * 1024
MAX_VALUE_CHARS = 1024
MAX_PROBLEMS = 8

#: Signal names the wrapper may record (POSIX, Linux, BSD).
SIGNALS = frozenset(
    "HUP INT QUIT ILL TRAP ABRT IOT BUS EMT FPE KILL USR1 SEGV USR2 PIPE ALRM TERM"
    " STKFLT CHLD CLD CONT STOP TSTP TTIN TTOU URG XCPU XFSZ VTALRM PROF WINCH IO"
    " POLL PWR INFO LOST SYS UNUSED".split())
CONTAINER_RUNTIMES = frozenset(["apptainer", "singularity", "podman"])

_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+:\[\]-]{0,127}\Z")
_GROUP_RE = re.compile(r"[A-Za-z0-9_]{1,32}\Z")
_GROUP_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_RUNNER_RE = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")
_CONTAINER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_TIME_RE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d\d:?\d\d)?\Z", re.ASCII)  # ASCII: \d takes any script's digits
_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
_INT_RE = re.compile(r"[0-9]{1,12}\Z")
MAX_EXIT_STATUS = 255
MAX_PID = 2 ** 31 - 1


def parse_time(value):
    # type: (object) -> Optional[datetime]
    """An ISO 8601 time (``2026-11-22T19:31:59Z``, offsets too) -> aware UTC datetime.

    Returns None for anything else (never raises); a time without offset is UTC.
    """
    if not isinstance(value, str):
        return None
    m = _TIME_RE.match(value.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    try:
        t = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s),
                     int((frac or "0")[:6].ljust(6, "0")), tzinfo=timezone.utc)
    except ValueError:  # month 13, second 61, ...
        return None
    if off and off != "Z":
        sign = 1 if off[0] == "+" else -1
        digits = off[1:].replace(":", "")
        delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        if delta > timedelta(hours=24):
            return None
        try:
            t = t - sign * delta
        except OverflowError:
            return None
    return t


def format_time(t):
    # type: (Optional[datetime]) -> Optional[str]
    """An aware datetime -> ``YYYY-MM-DDTHH:MM:SSZ`` (None -> None)."""
    if t is None:
        return None
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def valid_job_id(value):
    # type: (object) -> bool
    """True for a job runner id sshq accepts from a remote host (never an option)."""
    return isinstance(value, str) and bool(_JOB_ID_RE.match(value))


def raw_values(data):
    # type: (Union[str, bytes]) -> Dict[str, str]
    """The file's ``KEY=VALUE`` lines as {key: value} (the last value of a key
    wins; lines without ``=`` are skipped).  ``data``: bytes or str."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    values = {}
    for line in data.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key:
            values[key] = value.strip()
    return values


def _show(value):
    """A short, printable rendering of a bad value for a problem message."""
    v = value if len(value) <= 40 else value[:40] + "..."
    return repr(v)


def _name(key):
    """A key as a problem message shows it: as written if it is a plain name,
    else short and printable (a key is as untrusted as a value)."""
    return key if _KEY_RE.match(key) else _show(key)


class JobStatus(object):
    """One job status file, parsed, bounded and validated.

    Attributes (None when the file does not say, or says nonsense):
        present: bool, the file exists.
        runner_name: str.  job_id: str, the job runner's id.
        job_id_groups: {lower-case group: str}, from ``SSHQ_JOB_ID_<GROUP>``.
        submit_time, init_time, exit_time: aware UTC datetimes.
        submit_failed: bool, the job runner refused the job.
        pid: int.  host: str, the execution host.
        started: bool, the wrapper recorded a valid start time.
        exited: bool, the wrapper recorded an exit (even with a bad value).
        exit_status: int in 0..255.  exit_signal: a name from SIGNALS.
        container: {"runtime"|"command"|"image"|"name": str}.
        problems: [str], what was wrong with the file, for the job's message.
    """

    FIELDS = ("present", "runner_name", "job_id", "job_id_groups", "submit_time",
              "submit_failed", "pid", "host", "init_time", "started", "exited",
              "exit_status", "exit_signal", "exit_time", "container", "problems")

    def __init__(self):
        self.present = False
        self.runner_name = None
        self.job_id = None
        self.job_id_groups = {}
        self.submit_time = None
        self.submit_failed = False
        self.pid = None
        self.host = None
        self.init_time = None
        self.started = False
        self.exited = False
        self.exit_status = None
        self.exit_signal = None
        self.exit_time = None
        self.container = {}
        self.problems = []

    def __repr__(self):
        return "JobStatus(%s)" % ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.FIELDS
            if getattr(self, k) not in (None, False, {}, []))

    def __eq__(self, other):
        return isinstance(other, JobStatus) and self.to_wire() == other.to_wire()

    def problem(self, text):
        if len(self.problems) < MAX_PROBLEMS and text not in self.problems:
            self.problems.append(text)

    # ------------------------------------------------------------ from the file

    @classmethod
    def parse(cls, data, truncated_from=None):
        # type: (Union[str, bytes], Optional[int]) -> JobStatus
        """Parse the file's bytes (or text).

        Args:
            data: bytes or str, at most about MAX_STATUS_BYTES (callers read
                with :func:`read_status_file`).
            truncated_from: the file's real size in bytes when only part of
                it was read.

        Returns:
            A JobStatus (``present`` True).  Never raises.
        """
        st = cls()
        st.present = True
        if truncated_from is not None:
            st.problem("job status file is %d bytes; only its first and last %d KiB were"
                       " read" % (truncated_from, MAX_STATUS_BYTES // 2048))
        st._apply(raw_values(data))
        return st

    def _apply(self, values):
        for key, value in values.items():
            if len(value) > MAX_VALUE_CHARS:
                self.problem("job status file: %s is longer than %d characters"
                             % (_name(key), MAX_VALUE_CHARS))
                values[key] = value = ""
        v = values.get(RUNNER_NAME)
        if v is not None:
            if _RUNNER_RE.match(v):
                self.runner_name = v
            else:
                self.problem("job status file: %s %s is not a job runner name"
                             % (RUNNER_NAME, _show(v)))
        v = values.get(JOB_ID)
        if v is not None:
            if valid_job_id(v):
                self.job_id = v
            else:
                self.problem("job status file: %s %s is not a job id" % (JOB_ID, _show(v)))
        for key, v in sorted(values.items()):
            if key.startswith(JOB_ID_PREFIX):
                group = key[len(JOB_ID_PREFIX):]
                if (_GROUP_RE.match(group) and _GROUP_VALUE_RE.match(v)
                        and len(self.job_id_groups) < 8):
                    self.job_id_groups[group.lower()] = v
                else:
                    self.problem("job status file: %s %s is not valid" % (_name(key), _show(v)))
        self.submit_time = self._time(values, RUNNER_SUBMIT_TIME)
        self.submit_failed = RUNNER_SUBMIT_FAILED in values
        v = values.get(PID)
        if v is not None:
            self.pid = self._int(PID, v, 1, MAX_PID)
        v = values.get(HOST)
        if v is not None:
            if _HOST_RE.match(v):
                self.host = v
            else:
                self.problem("job status file: %s %s is not a host name" % (HOST, _show(v)))
        self.init_time = self._time(values, INIT_TIME)
        self.started = self.init_time is not None
        self.exited = EXIT_STATUS in values or EXIT_SIGNAL in values
        if EXIT_SIGNAL in values:
            v = values[EXIT_SIGNAL]
            name = v[3:] if v.startswith("SIG") else v
            if name in SIGNALS:
                self.exit_signal = name
            else:
                self.problem("job status file: %s %s is not a signal name"
                             % (EXIT_SIGNAL, _show(v)))
        elif EXIT_STATUS in values:
            self.exit_status = self._int(EXIT_STATUS, values[EXIT_STATUS], 0, MAX_EXIT_STATUS)
        self.exit_time = self._time(values, EXIT_TIME)
        for part in CONTAINER_KEYS:
            v = values.get(CONTAINER_PREFIX + part)
            if v is None:
                continue
            ok = {"RUNTIME": v in CONTAINER_RUNTIMES,
                  "NAME": bool(_CONTAINER_NAME_RE.match(v))}.get(part, bool(v))
            if ok and v.isprintable():  # no C0/C1 controls, no bidi overrides
                self.container[part.lower()] = v
            else:
                self.problem("job status file: %s%s %s is not valid"
                             % (CONTAINER_PREFIX, part, _show(v)))

    def _int(self, key, value, low, high):
        v = value.strip()
        if _INT_RE.match(v) and low <= int(v) <= high:
            return int(v)
        self.problem("job status file: %s %s is not an integer in %d..%d"
                     % (key, _show(value), low, high))
        return None

    def _time(self, values, key):
        v = values.get(key)
        if v is None:
            return None
        t = parse_time(v)
        if t is None:
            self.problem("job status file: %s %s is not an ISO 8601 time" % (key, _show(v)))
        return t

    # ------------------------------------------------------------ on the wire

    def to_wire(self):
        # type: () -> Dict[str, Any]
        """The JSON-ready dict the agent replies with (times as ISO strings)."""
        out = {}
        for k in self.FIELDS:
            v = getattr(self, k)
            if isinstance(v, datetime):
                v = format_time(v)
            out[k] = v
        return out

    @classmethod
    def from_wire(cls, obj):
        # type: (object) -> JobStatus
        """Rebuild a JobStatus from an agent reply, validating every field again.

        A field that is missing or invalid is dropped with a problem; never raises.
        """
        st = cls()
        if obj is None:
            return st
        if not isinstance(obj, dict):
            st.problem("agent reply: the job status is not an object")
            return st
        st.present = obj.get("present") is True
        values = {}

        def text(name, key):
            v = obj.get(name)
            if v is None:
                return
            if isinstance(v, str):
                values[key] = v
            else:
                st.problem("agent reply: %s is not text" % name)

        text("runner_name", RUNNER_NAME)
        text("job_id", JOB_ID)
        text("submit_time", RUNNER_SUBMIT_TIME)
        text("host", HOST)
        text("init_time", INIT_TIME)
        text("exit_signal", EXIT_SIGNAL)
        text("exit_time", EXIT_TIME)
        for name, key in (("pid", PID), ("exit_status", EXIT_STATUS)):
            v = obj.get(name)
            if v is not None:  # (str() of a huge int raises: bound it first)
                values[key] = str(v) if type(v) is int and abs(v) < 10 ** 100 else "?"
        groups = obj.get("job_id_groups") or {}
        if isinstance(groups, dict):
            for g, v in list(groups.items())[:8]:
                if isinstance(g, str) and isinstance(v, str):
                    values[JOB_ID_PREFIX + g.upper()] = v
        container = obj.get("container") or {}
        if isinstance(container, dict):
            for part in CONTAINER_KEYS:
                v = container.get(part.lower())
                if isinstance(v, str):
                    values[CONTAINER_PREFIX + part] = v
        if obj.get("submit_failed") is True:
            values[RUNNER_SUBMIT_FAILED] = ""
        st._apply(values)
        # a recorded exit with a value that was dropped stays recorded
        st.exited = st.exited or obj.get("exited") is True
        problems = obj.get("problems")
        for p in problems if isinstance(problems, list) else []:
            if isinstance(p, str):
                st.problem(p[:300])
        return st


def read_status_file(log_dir):
    # type: (str) -> JobStatus
    """Read and parse ``<log_dir>/job.status``, at most MAX_STATUS_BYTES of it.

    Returns:
        A JobStatus; ``present`` False when the file cannot be read; with a
        problem (and nothing else) when it is no regular file (a FIFO, a device).
    """
    path = os.path.join(log_dir, STATUS_FILE)
    try:
        # O_NONBLOCK: a job that made its status file a FIFO cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                st = JobStatus.parse(b"")
                st.problem("job status file: not a regular file")
                return st
            size = info.st_size
            if size <= MAX_STATUS_BYTES:
                return JobStatus.parse(fh.read(MAX_STATUS_BYTES + 1))
            half = MAX_STATUS_BYTES // 2
            head = fh.read(half)
            fh.seek(size - half)
            tail = fh.read(half)
    except (IOError, OSError):
        return JobStatus()
    # drop the partial lines at the cuts
    head = head[:head.rfind(b"\n") + 1]
    tail = tail[tail.find(b"\n") + 1:]
    return JobStatus.parse(head + tail, truncated_from=size)


# ---------------------------------------------------------------- the state decision
#
# Cylc's poll semantics.  Once a job has started, its job status file is the
# authority; the job runner is asked only about jobs whose file records no exit:
# - exit recorded: succeeded (status 0) or failed (non-zero status, or a signal);
# - the runner still knows the job: running if it started (or the runner says
#   it runs), else submitted;
# - the runner forgot it: failed if it started (it recorded no exit: killed
#   hard, node lost), submit-failed if it never started;
# - the runner was not asked (rate limit) or could not be (SSH or runner
#   failure): running if the status file says the job started, else no change.

SUBMITTED = "submitted"
SUBMIT_FAILED = "submit-failed"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"


def decide(status, queried, runner_ok, known, runner_running, runner_name):
    # type: (JobStatus, bool, bool, bool, bool, str) -> Tuple[Optional[str], Dict[str, Any]]
    """Decide a job's state from its JobStatus and the job runner's answer.

    Args:
        status: the job's JobStatus (read after the runner query).
        queried: bool, the runner was asked about this job.
        runner_ok: bool, that query worked.
        known: bool, the runner still holds the job (queued or running).
        runner_running: bool, the runner says it runs.
        runner_name: str, for messages.

    Returns:
        ``(state, fields)``: state one of the names above, or None for "no
        change"; fields a dict of Job fields (start_time, exit_time,
        exit_status, signal, message) to record with it.
    """
    fields = {}
    if status.init_time is not None:
        fields["start_time"] = status.init_time
    problems = "; ".join(status.problems)
    if status.exited:
        fields["exit_time"] = status.exit_time
        if status.exit_signal is not None:
            fields.update(signal=status.exit_signal, exit_status=None, message=problems)
            return FAILED, fields
        rc = status.exit_status
        fields.update(exit_status=rc, signal=None, message=problems)
        return (SUCCEEDED if rc == 0 else FAILED), fields
    if problems:
        fields["message"] = problems
    if not queried or not runner_ok:
        # The status file alone: a job that started and recorded no exit runs.
        return (RUNNING if status.started else None), fields
    if known:
        return (RUNNING if status.started or runner_running else SUBMITTED), fields
    why = problems + "; " if problems else ""
    if status.started:
        fields["message"] = why + (
            "%s no longer knows the job and its status file records no exit"
            " (killed hard, out of memory, walltime, or node failure)" % runner_name)
        return FAILED, fields
    fields["message"] = why + "%s no longer knows the job and it never started" % runner_name
    return SUBMIT_FAILED, fields
