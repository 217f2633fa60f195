"""IBM Spectrum LSF: ``bsub < job``, ``bjobs -o ... -json``, ``bkill`` (LSF 10.1).

Needs LSF 10.1 Fix Pack 2 or later: ``bjobs -json`` and units on ``-M``
(``2048MB``) came with it (release notes, "Command output formatting").

Sources (IBM Spectrum LSF 10.1.0 command and configuration reference; the
test fixtures in ``tests/fixtures/lsf`` say which page each output comes from):

Submit
    ``bsub`` reads the job script on standard input (``submit_stdin``) and
    takes its options from the script's ``#BSUB`` lines.  It prints
    ``Job <123> is submitted to queue <normal>.``, or ``... to default queue
    <normal>.`` when no queue was asked for; other lines may come first
    (``Cannot connect to LSF. Please wait ...``).

Poll
    ONE ``bjobs -o "jobid stat exit_code" -json -a ID...`` for many ids.  The
    ``-o`` format is one argument word.  ``-a`` also lists jobs that finished
    within ``CLEAN_PERIOD`` (``lsb.params``, default one hour).  The output is
    ``{"COMMAND":"bjobs","JOBS":n,"RECORDS":[{"JOBID":..,"STAT":..,
    "EXIT_CODE":..}, ...]}``; an id LSF does not know any more is a record
    ``{"JOBID":"9","ERROR":"Job <9> is not found"}`` (without ``-json`` the
    same text goes to stderr).  bjobs exits 255 when it is given an unknown id
    (all of them unknown, or any with ``LSB_BJOBS_CONSISTENT_EXIT_CODE=Y``).
    When mbatchd cannot be reached it writes ``batch system daemon not
    responding ... still trying`` to stderr: such a poll says nothing about
    the jobs (:class:`JobRunnerError`, transient).

    Job states (``bjobs`` description): ``PEND``, ``PROV``, ``PSUSP`` and
    ``WAIT`` have not started; ``RUN``, ``USUSP``, ``SSUSP``, ``UNKWN``
    (mbatchd lost contact with the host) and ``ZOMBI`` were dispatched.
    ``EXIT`` (and the post-processing states ``POST_DONE``, ``POST_ERR``) is
    reported as no longer known, so that the job status file decides at once
    (its exit status or signal; ``failed`` when it started and recorded no
    exit, e.g. SIGKILL after ``bkill``; ``submit-failed`` when killed while
    pending) instead of waiting up to ``CLEAN_PERIOD`` for LSF to forget it.
    ``DONE`` stays *known and running*: the job wrapper exited 0, so it wrote
    its exit to the status file before; if a poll cannot see that yet (a
    shared file system lagging behind the execution host), the job must not
    be declared failed.  The status file's exit ends it on the same or a
    later poll.

Kill
    ``bkill ID...``: SIGINT, SIGTERM, then SIGKILL, ``JOB_TERMINATE_INTERVAL``
    (default 10 s) apart; the job wrapper records the first it traps (INT or
    TERM).

Directives (``#BSUB``, before any command of the script):

- ``-J`` job name; ``-o``/``-e`` ``job.out``/``job.err`` in the job log
  directory.  LSF expands ``%J`` and ``%I`` in these paths, so a job log
  directory containing ``%`` is refused.  Without ``LSB_STDOUT_DIRECT=Y``
  LSF copies the output to these files only when the job ends, and without
  ``-N`` it appends its job report to ``job.out``.
- ``-W H:MM`` run limit, rounded up to whole minutes (``[hour:]minute``).
- CPUs: ``-n`` is the number of LSF slots, ``tasks * cpus`` (1 when unset);
  with ``nodes`` and no tasks/cpus, one slot per node.  Placement:
  ``nodes=1`` or a single task with ``cpus>1``: ``span[hosts=1]``;
  ``nodes=N>1``: ``span[ptile=slots/N]`` (refused unless the slots divide
  evenly into whole tasks per node); several tasks with ``cpus>1`` and no
  ``nodes``: ``span[block=cpus]`` (each task's CPUs on one host).
- ``-M <MiB>MB`` memory limit with an explicit unit (LSF 10.1.0.2 and later
  accept units; a bare number would mean ``LSF_UNIT_FOR_LIMITS``, KB by
  default).  This is the limit LSF enforces, not a reservation: reserve with
  a raw ``-R "rusage[mem=...]"`` directive if the site needs it.
- ``-q`` queue, ``-P`` project (the spec's account), ``-u`` mail user.
- Mail events: ``begin`` -> ``-B``; ``end`` -> ``-N`` (report mailed when the
  job finishes, in any state); ``fail`` -> ``-Ne`` (mailed only when it
  exits in EXIT state), implied by ``-N`` when both are asked for;
  ``all`` -> ``-B -N``.
- Raw directives: ``#BSUB <text>`` as written.
- Values: blanks are double-quoted (LSF's documented way); sshq has no LSF
  to observe how bsub treats quote characters, backslashes or ``#`` in a
  directive line, so a value holding one of them is refused
  (:data:`~sshq.quoting.UNVERIFIED_SYNTAX`) rather than possibly changed.

``sshq ssh-to-job`` reaches the job on its execution host
(:attr:`~sshq.job_runners.base.JobRunnerHandler.attach_via_exec_host`): the
login node runs ``ssh`` to the host the job wrapper recorded as
the execution host in ``job.status``, with the job's environment and work
directory (beside the job: sshq does not use ``blaunch``).

Because the documentation does not say that bsub stops reading ``#BSUB``
lines at the first command, a job whose environment values, arguments or
script hold a line starting with ``#BSUB`` is refused (naming the field):
such a line would reach bsub's input and might be taken for an option.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..exceptions import InvalidInputError, JobRunnerError
from ..model.job_spec import JobSpec
from ..model.resources import format_memory_mib
from .base import IDS, JobRunnerHandler, RunnerJobState, one_line

__all__ = ["LsfHandler", "LsfRecord", "HANDLER", "parse_bjobs_json", "format_run_limit"]

#: The bjobs output fields sshq asks for: ONE argument word of ``-o``.
BJOBS_FORMAT = "jobid stat exit_code"

# bjobs(1) job states, by what they mean for sshq (PEND, PROV, PSUSP, WAIT: not
# started; DONE: see the module docstring).
_DISPATCHED = frozenset({"RUN", "USUSP", "SSUSP", "UNKWN", "ZOMBI", "DONE"})
_FINISHED = frozenset({"EXIT", "POST_DONE", "POST_ERR"})

_NOT_FOUND_RE = re.compile(r"^\s*Job <(?P<id>[^>]*)> is not found\s*$")
_BSUB_LINE_RE = re.compile(r"^\s*#BSUB", re.MULTILINE)
# bjobs when none of the jobs it looked for is there (to stderr, or stdout).
_NO_JOB_RE = re.compile(r"^\s*No (?:unfinished |matching )?job found\s*$")


@dataclass(frozen=True, slots=True)
class LsfRecord:
    """One job of ``bjobs -o "jobid stat exit_code" -json`` output.

    Attributes:
        job_id: ``JOBID``.
        stat: ``STAT`` (``RUN``, ``DONE``, ...); ``""`` when not found.
        exit_code: ``EXIT_CODE`` as an int, None when empty or absent.
        error: ``ERROR`` text (``Job <9> is not found``), ``""`` if none.
    """

    job_id: str
    stat: str
    exit_code: int | None
    error: str = ""

    @property
    def not_found(self) -> bool:
        """True when LSF does not know the job (any more)."""
        return bool(_NOT_FOUND_RE.match(self.error))


def _json_object(stdout: str) -> dict[str, Any] | None:
    """The JSON object in bjobs' stdout (other lines may surround it)."""
    start, end = stdout.find("{"), stdout.rfind("}")
    if start == -1 or end < start:
        return None
    try:
        data = json.loads(stdout[start:end + 1])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parse_bjobs_json(stdout: str) -> dict[str, LsfRecord]:
    """Parse ``bjobs -o "jobid stat exit_code" -json`` output into records by job id.

    Raises:
        ValueError: there is no ``RECORDS`` list of objects in the output.
    """
    data = _json_object(stdout)
    if data is None or not isinstance(data.get("RECORDS"), list):
        raise ValueError("no bjobs JSON (an object with a RECORDS list) in the output")
    out: dict[str, LsfRecord] = {}
    for rec in data["RECORDS"]:
        if not isinstance(rec, dict):
            raise ValueError(f"bjobs record is not an object: {rec!r}")
        error = str(rec.get("ERROR") or "")
        job_id = str(rec.get("JOBID") or "")
        if not job_id:
            m = _NOT_FOUND_RE.match(error)
            job_id = m.group("id") if m else ""
        code = str(rec.get("EXIT_CODE") or "").strip()
        out[job_id] = LsfRecord(
            job_id=job_id,
            stat=str(rec.get("STAT") or "").strip(),
            exit_code=int(code) if code.lstrip("-").isdigit() else None,
            error=error,
        )
    return out


def format_run_limit(seconds: float) -> str:
    """A walltime as LSF's ``[hour:]minute`` run limit, rounded up to whole minutes."""
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d}"


def _bsub_lines(what: str, values: Iterable[str]) -> None:
    for v in values:
        if _BSUB_LINE_RE.search(v):
            raise InvalidInputError(
                f"{what}: value {v!r} has a line starting with #BSUB, which bsub could take"
                " for an option; use the job spec's directives for LSF options"
            )


class LsfHandler(JobRunnerHandler):
    """IBM Spectrum LSF job runner handler."""

    name = "lsf"
    attach_via_exec_host = True
    directive_prefix = "#BSUB"
    job_id_regex = r"^\s*Job <(?P<id>\d+)> is submitted to (?:default )?queue <"
    poll_command = ("bjobs", "-o", BJOBS_FORMAT, "-json", "-a", IDS)
    kill_command = ("bkill", IDS)
    ids_sep = None
    submit_stdin = True

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        if "%" in job_log_dir:
            raise InvalidInputError(
                f"job log directory {job_log_dir!r} contains '%', which LSF replaces in"
                " -o/-e paths (%J, %I); choose a run directory without '%'"
            )
        self._refuse_bsub_lines(spec)
        p = self.directive_prefix
        lines = [
            f"{p} -J {self.word('name', spec.job_name)}",
            f"{p} -o {self.word('run-dir', job_log_dir + '/job.out')}",
            f"{p} -e {self.word('run-dir', job_log_dir + '/job.err')}",
        ]
        if spec.walltime is not None:
            lines.append(f"{p} -W {format_run_limit(spec.walltime.total_seconds())}")
        lines.extend(self._slots(spec))
        if spec.memory is not None:
            lines.append(f"{p} -M {format_memory_mib(spec.memory)}MB")
        if spec.queue:
            lines.append(f"{p} -q {self.word('queue', spec.queue)}")
        if spec.account:
            lines.append(f"{p} -P {self.word('account', spec.account)}")
        if spec.mail_user:
            lines.append(f"{p} -u {self.word('mail-user', spec.mail_user)}")
        events = set(spec.mail_events)
        if events & {"begin", "all"}:
            lines.append(f"{p} -B")
        if events & {"end", "all"}:
            lines.append(f"{p} -N")
        elif "fail" in events:
            lines.append(f"{p} -Ne")
        lines.extend(f"{p} {self.raw(d)}" for d in spec.directives)
        return lines

    def _slots(self, spec: JobSpec) -> list[str]:
        """``-n`` and the ``span[]`` placement for nodes, tasks and cpus."""
        p = self.directive_prefix
        if spec.nodes is None and spec.tasks is None and spec.cpus is None:
            return []
        tasks, cpus = spec.tasks or 1, spec.cpus or 1
        if spec.nodes is not None and spec.tasks is None and spec.cpus is None:
            tasks = spec.nodes  # one slot per node
        slots = tasks * cpus
        span = None
        if spec.nodes == 1 or (spec.nodes is None and tasks == 1 and cpus > 1):
            span = "span[hosts=1]"
        elif spec.nodes is not None:
            per_node, rest = divmod(slots, spec.nodes)
            if rest or per_node % cpus or per_node == 0:
                raise InvalidInputError(
                    f"job runner 'lsf' cannot express nodes={spec.nodes} with tasks={tasks}"
                    f" and cpus={cpus}: LSF places slots ({slots}) with span[ptile=...],"
                    " which needs the same whole number of tasks on every node"
                )
            span = f"span[ptile={per_node}]"
        elif cpus > 1:
            span = f"span[block={cpus}]"
        lines = [f"{p} -n {slots}"]
        if span:
            lines.append(f'{p} -R "{span}"')
        return lines

    @staticmethod
    def _refuse_bsub_lines(spec: JobSpec) -> None:
        _bsub_lines("environment", spec.environment.values())
        _bsub_lines("arguments", spec.arguments)
        _bsub_lines("script", [spec.user_script().decode("utf-8", "surrogateescape")])

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        # The agent feeds job_file on stdin (submit_stdin): ``bsub < job``.
        return ["bsub"]

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        unknown_said = any(_NOT_FOUND_RE.match(ln) or _NO_JOB_RE.match(ln) for ln in lines)
        noise = [ln for ln in lines if not (_NOT_FOUND_RE.match(ln) or _NO_JOB_RE.match(ln))]
        if not stdout.strip() or _NO_JOB_RE.match(stdout.strip()):
            # No JSON: fine when bjobs said nothing at all, or only that it
            # knows none of the ids (exit 255).
            if (exit_status == 0 and not noise) or (unknown_said and not noise):
                return {}
            raise self._failed(exit_status, stderr or stdout)
        try:
            records = parse_bjobs_json(stdout)
        except ValueError as exc:
            raise self._failed(exit_status, f"{exc}: {stdout} {stderr}") from None
        known: dict[str, RunnerJobState] = {}
        for rec in records.values():
            if rec.error:
                if not rec.not_found:
                    raise self._failed(exit_status, f"bjobs: {rec.error}")
                unknown_said = True
            elif rec.job_id and rec.stat not in _FINISHED:  # finished: status file decides
                # Any other state (PEND..., or one this code does not know):
                # known, and running only once the status file says it started.
                known[rec.job_id] = RunnerJobState(rec.job_id, rec.stat in _DISPATCHED, rec.stat)
        # bjobs exits 255 when an id is unknown; any other failure is not about the jobs.
        if exit_status != 0 and (noise or not unknown_said):
            raise self._failed(exit_status, stderr or "bjobs failed and named no unknown job")
        return known

    @staticmethod
    def _failed(exit_status: int, text: str) -> JobRunnerError:
        return JobRunnerError(
            f"bjobs failed (exit {exit_status}): {one_line(text)}", stderr=text, transient=True)


HANDLER = LsfHandler()
