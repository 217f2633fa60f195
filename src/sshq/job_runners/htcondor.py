"""HTCondor: ``condor_submit``, ``condor_q``, ``condor_rm`` (HTCondor manual).

HTCondor reads no directives from the job script: ``condor_submit`` takes a
*submit description* (``command = value`` lines, then ``queue``).  This
handler therefore writes the submit description into the job script as
comment lines right after ``#!/bin/bash``, each prefixed ``#CONDOR ``::

    #!/bin/bash
    #CONDOR universe = vanilla
    #CONDOR batch_name = sim
    #CONDOR output = /home/u/sshq-run/log/job/sim/01/job.out
    #CONDOR error = /home/u/sshq-run/log/job/sim/01/job.err
    #CONDOR log = /home/u/sshq-run/log/job/sim/01/job.condor.log
    #CONDOR should_transfer_files = NO
    #CONDOR request_cpus = 4
    #
    # Job script written by sshq. ...

To bash they are comments.  The submit command is a fixed ``sh`` program
(:data:`_SUBMIT`, never built from data) that gets the job file and the path
of the description as positional parameters ``$1`` and ``$2``.  It writes
``executable = $1``, the ``#CONDOR`` lines of the script's *head* (from line 2
up to the first other line, so a ``#CONDOR`` line in the user's own script,
which comes later, is never read) and ``queue`` into ``job.sub`` in the job
log directory, and runs ``condor_submit job.sub``.  No shell ever parses a
value: the values reach condor_submit's own parser, which reads a value to the
end of its line, so the handler refuses what that parser would reinterpret
(``$`` starts a macro such as ``$(Cluster)``, a trailing backslash continues
the line, blanks at either end are stripped, a newline starts a new command).
``job.sub`` stays in the job log directory as the record of what was
submitted.

Job ids.  condor_submit prints (manual, Users' Quick Start Guide)::

    Submitting job(s).
    1 job(s) submitted to cluster 6.

The description queues exactly one job, so its id is ``6.0`` (process 0 of
cluster 6).  A regular expression can only cut text out of the output, so the
submit program, after condor_submit succeeds, derives one more line from the
output above with ``sed``: ``sshq: HTCondor job id 6.0``; the job id regex
reads that.  condor_submit's own output is passed through unchanged.

Poll: one command for many ids, ``condor_q ID... -af:jr JobStatus ExitCode``
(the ids come first: ``-af`` takes every following word that does not start
with ``-`` as an attribute).  Each line is ``<cluster>.<proc> <JobStatus>
<ExitCode>``, ``undefined`` for an unset ExitCode; a job not in the queue
prints no line.  JobStatus (manual, job ClassAd attributes): 1 Idle,
2 Running, 3 Removed, 4 Completed, 5 Held, 6 Transferring Output,
7 Suspended.  2, 6 and 7 mean started; 4 means the job's process has ended,
so a Completed job kept in the queue (``leave_in_queue``) counts as gone and
the job status file decides how it ended; 3 counts as known until the job
leaves the queue, because its process may still be handling the kill.  A job
put on hold (5) after it started stays ``running`` in sshq while HTCondor
keeps it in the queue: release it, or remove it with ``sshq kill``.  If the
schedd cannot be reached condor_q exits 1 with ``-- Failed to fetch ads
from: ...`` or ``Error: ... Extra Info: You probably saw this error because
the condor_schedd is not running ...``: a transient :class:`JobRunnerError`.

``condor_history`` is not asked.  sshq's job wrapper records the exit status
or signal in ``job.status``, which decides the state of every job whose exit
is recorded; for the others the handler only has to say whether the job is
still in the queue, and a job that has left the queue is gone whatever the
history says (condor_history only adds the same exit code, and it scans the
whole history file, which is slow on a busy access point).

Kill: ``condor_rm ID...``; it prints ``Job 6.0 marked for removal`` per job
and exits 1 if one of them is not found.  HTCondor sends the job its soft
kill signal, ``SIGTERM`` by default, so the wrapper records ``TERM``.

Job spec fields:

- ``cpus`` -> ``request_cpus``; ``memory`` -> ``request_memory`` in MiB
  (HTCondor's default unit, ``M``);
- ``walltime`` -> ``periodic_remove = (JobStatus == 2) && (time() -
  JobCurrentStartDate > SECONDS)``: the schedd removes the job (soft kill,
  ``TERM``) once it has run that long.  The schedd evaluates it every
  ``PERIODIC_EXPR_INTERVAL`` seconds (60 by default), so the limit is
  enforced to within about a minute.  (``periodic_remove`` and
  ``JobCurrentStartDate`` are in the manual's condor_submit page and job
  attribute list; ``allowed_execute_duration`` would *hold* the job, which
  then stays in the queue, and ``+MaxRuntime`` is a site convention, not
  HTCondor's);
- ``account`` -> ``accounting_group``;
- ``mail_user`` -> ``notify_user``; ``mail_events``: ``end`` ->
  ``notification = Complete`` (mail when the job terminates, also for
  ``end`` with ``fail``), ``fail`` alone -> ``notification = Error``;
  ``begin`` and ``all`` are refused (HTCondor sends no mail when a job
  starts);
- ``directives``: raw submit commands (``request_gpus = 1``,
  ``requirements = ...``), written as given after sshq's own, so they win;
  each must be one ``name = value`` command, and the commands sshq relies on
  (``executable``, ``output``, ``error``, ``log``, ``queue``) are refused;
- ``nodes``, ``tasks`` (vanilla universe jobs run on one machine) and
  ``queue`` (HTCondor has no queues or partitions) are refused.

``sshq ssh-to-job`` reaches the job on its execution host
(:attr:`~sshq.job_runners.base.JobRunnerHandler.attach_via_exec_host`): the
login node (the access point) runs ``ssh`` to the host the job wrapper
recorded as the execution host in ``job.status``, with the job's environment
and work directory; sshq does not use ``condor_ssh_to_job``.

The job runs in the vanilla universe with ``should_transfer_files = NO``: the
job writes its status file to the job log directory, so that directory must be
on a file system shared by the access point and the execute machines, and
HTCondor then only matches machines of the same ``FileSystemDomain``.  The
job gets HTCondor's job environment (no ``getenv``) plus what sshq's job
script exports.
"""

from __future__ import annotations

import math
import re

from ..exceptions import InvalidInputError, JobRunnerError
from ..model.job_spec import JobSpec
from ..model.resources import format_memory_mib
from ..quoting import DirectiveSyntax, directive_word
from .base import IDS, JobRunnerHandler, RunnerJobState, one_line

__all__ = ["HTCondorHandler", "HANDLER", "SUBMIT_FILE", "JOB_STATUS"]

#: The submit description the submit program writes in the job log directory.
SUBMIT_FILE = "job.sub"

#: JobStatus codes (HTCondor manual, job ClassAd attributes).
JOB_STATUS = {
    "1": "IDLE",
    "2": "RUNNING",
    "3": "REMOVED",
    "4": "COMPLETED",
    "5": "HELD",
    "6": "TRANSFERRING_OUTPUT",
    "7": "SUSPENDED",
}
_STARTED = {"2", "6", "7"}
_GONE = {"4"}  # the job's process has ended: the job status file decides

_PREFIX = "#CONDOR"

# A fixed sh program; the job file ($1) and the description path ($2) are
# positional parameters, never part of the program text.  awk reads the head
# of the job file: line 2 up to the first line that is not a #CONDOR line.
_SUBMIT = (
    "{ printf 'executable = %s\\n' \"$1\""
    " && awk 'NR == 1 { next } /^#CONDOR / { print substr($0, 9); next } { exit }' \"$1\""
    " && printf 'queue\\n'; } >\"$2\" || exit 1\n"
    'out=$(condor_submit "$2"); rc=$?\n'
    "printf '%s\\n' \"$out\"\n"
    '[ "$rc" -eq 0 ] || exit "$rc"\n'
    "printf '%s\\n' \"$out\""
    " | sed -n 's/^[0-9][0-9]* job(s) submitted to cluster \\([0-9][0-9]*\\)\\.$"
    "/sshq: HTCondor job id \\1.0/p'\n"
)

# condor_q -af:j: "<cluster>.<proc> <JobStatus> <ExitCode>".
_POLL_LINE = re.compile(r"^\s*(\d+\.\d+)\s+(\d+)(?:\s+(\S+))?")
# condor_q's messages when it cannot talk to the schedd.
_SCHEDD_TROUBLE = (
    "Failed to fetch ads",
    "condor_schedd is not running",
    "Can't find address",
    "Failed to connect",
)
# A raw directive: one "name = value" submit command (name: letters, digits,
# _ and ., optionally +-prefixed for a custom job attribute).
_COMMAND = re.compile(r"\s*(\+?[A-Za-z_][A-Za-z0-9_.]*)\s*=")
_RESERVED = {"executable", "output", "error", "log", "queue"}


# condor_submit reads a value to the end of its line (manual, condor_submit):
# blanks at either end are stripped, $ starts a macro, a trailing backslash
# continues the line; nothing is a quote or escape character.
_VALUE = DirectiveSyntax(
    blanks="keep", strips_edges=True,
    refuse={"$": "condor_submit expands '$' as a macro ($(Cluster), $ENV(...))"},
    refuse_last={"\\": "a backslash at the end continues the line for condor_submit"},
)


def submit_value(field: str, value: str) -> str:
    """A value as condor_submit's parser will read it back unchanged.

    Args:
        field: the job spec field or thing named in the message.
        value: the value (a path, an account, an address).

    Returns:
        ``value``.

    Raises:
        InvalidInputError: the value holds a ``$`` (a submit macro), a
            control character, blanks at either end, or ends in a backslash
            (line continuation); or it is empty.
    """
    return directive_word(value, field=field, runner="htcondor", syntax=_VALUE)


class HTCondorHandler(JobRunnerHandler):
    """HTCondor job runner handler (vanilla universe, shared file system)."""

    name = "htcondor"
    attach_via_exec_host = True
    directive_prefix = _PREFIX
    job_id_regex = r"^sshq: HTCondor job id (?P<id>\d+\.\d+)\s*$"
    poll_command = ("condor_q", IDS, "-af:jr", "JobStatus", "ExitCode")
    kill_command = ("condor_rm", IDS)
    ids_sep = None
    directive_syntax = _VALUE

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        self.refuse(spec, "nodes", "tasks", "queue")
        log = submit_value("job log directory", job_log_dir)
        p = self.directive_prefix
        lines = [
            f"{p} universe = vanilla",
            f"{p} batch_name = {self.word('name', spec.job_name)}",
            f"{p} output = {log}/job.out",
            f"{p} error = {log}/job.err",
            f"{p} log = {log}/job.condor.log",
            f"{p} should_transfer_files = NO",
        ]
        if spec.cpus is not None:
            lines.append(f"{p} request_cpus = {spec.cpus}")
        if spec.memory is not None:
            lines.append(f"{p} request_memory = {format_memory_mib(spec.memory)}")
        if spec.walltime is not None:
            seconds = math.ceil(spec.walltime.total_seconds())
            lines.append(
                f"{p} periodic_remove = (JobStatus == 2)"
                f" && (time() - JobCurrentStartDate > {seconds})"
            )
        if spec.account:
            lines.append(f"{p} accounting_group = {submit_value('account', spec.account)}")
        if spec.mail_user:
            lines.append(f"{p} notify_user = {submit_value('mail-user', spec.mail_user)}")
        if spec.mail_events:
            lines.append(f"{p} notification = {self._notification(spec.mail_events)}")
        for d in spec.directives:
            lines.append(f"{p} {self._raw_directive(self.raw(d))}")
        return lines

    @staticmethod
    def _notification(events: tuple[str, ...]) -> str:
        refused = sorted({"begin", "all"} & set(events))
        if refused:
            raise InvalidInputError(
                f"job runner 'htcondor' cannot express mail-events {', '.join(refused)}"
                " (HTCondor mails when a job ends or fails, never when it starts);"
                " use end and/or fail"
            )
        return "Complete" if "end" in events else "Error"

    @staticmethod
    def _raw_directive(d: str) -> str:
        m = _COMMAND.match(d)
        if not m:
            raise InvalidInputError(
                f"directive {d!r} is not an HTCondor submit command: write one"
                " 'name = value' command per directive (e.g. 'request_gpus = 1')"
            )
        if m.group(1).lower() in _RESERVED:
            raise InvalidInputError(
                f"directive {d!r}: sshq sets {m.group(1).lower()} itself"
                f" ({', '.join(sorted(_RESERVED))} cannot be given as directives)"
            )
        if d.rstrip().endswith("\\"):
            raise InvalidInputError(
                f"directive {d!r} ends with a backslash, which continues the line"
                " for condor_submit"
            )
        return d.strip()

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        submit_value("job file", job_file)
        return [
            "/bin/sh", "-c", _SUBMIT, "sshq-htcondor",
            job_file, f"{job_log_dir}/{SUBMIT_FILE}",
        ]

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        trouble = any(t in stdout or t in stderr for t in _SCHEDD_TROUBLE)
        if exit_status != 0 or trouble:
            raise JobRunnerError(
                f"condor_q failed (exit {exit_status}): {one_line(stderr or stdout)}",
                stderr=stderr,
                transient=True,
            )
        known: dict[str, RunnerJobState] = {}
        for line in stdout.splitlines():
            m = _POLL_LINE.match(line)
            if not m:
                if line.strip():  # not what sshq's command prints: say nothing
                    raise JobRunnerError(  # rather than take every job for gone
                        "condor_q printed a line that is not 'CLUSTER.PROC JobStatus"
                        f" ExitCode': {one_line(line)}", stderr=stderr, transient=True)
                continue
            job_id, status, exit_code = m.groups()
            if status in _GONE:
                continue
            raw = JOB_STATUS.get(status, f"JobStatus={status}")
            if exit_code and exit_code != "undefined":
                raw += f" ExitCode={exit_code}"
            known[job_id] = RunnerJobState(job_id, status in _STARTED, raw)
        return known


HANDLER = HTCondorHandler()
