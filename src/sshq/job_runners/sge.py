"""Grid Engine (Son of Grid Engine 8.1.9, and its kin): ``qsub``, ``qstat``, ``qdel``.

Submit: qsub prints ``Your job 123 ("name") has been submitted`` (an array
job, made by a raw ``-t`` directive: ``Your job-array 123.1-3:1 ...``).

qsub reads a ``#$`` directive from *every* line of a job script that starts
with ``#$``, not only from the header (observed on 8.1.9: a ``#$ -N`` inside
a quoted string, after the first command, renames the job).  sshq's job file
embeds the user's script and the job's environment values, so such a line
could be data: a user script's own ``#$ -o ...`` or ``#$ -clear``, or an
environment value holding a newline and ``#$``.  So qsub must not scan the
job file: the submit command is a fixed ``sh`` program (job file and log
directory as positional parameters, never in the program text) that copies
the header's directive lines (raw directives included), without their
``#$ ``, into ``job.qsub`` in the job log directory, and runs
``qsub -C "" -@ job.qsub JOB``: ``-C ""`` turns directive scanning off,
``-@`` reads the options from that file with the same word rules as
directives (double quotes group blanks).  The ``#$`` header stays in the
job file for people to read.

Poll: ``qstat -u USER -xml`` lists the user's jobs that Grid Engine still
knows (pending, running, suspended), each as::

    <job_list state="running">            (under <queue_info>; "pending" under <job_info>)
      <JB_job_number>2</JB_job_number>
      <state>r</state>                    (r t Rr s S T dr ...; qw hqw Eqw hRwq ...)
      ...

qstat cannot select jobs by id in this form, so the poll command is a fixed
``sh`` program that lists the user's jobs; the ids arrive as positional
parameters (never inside the program text) only because every poll template
carries them.  qstat failing (qmaster down or unreachable: ``error: commlib
error: got select error (Connection refused)``, exit 1) is a transient
:class:`~sshq.exceptions.JobRunnerError`.

No ``qacct``: once qstat has forgotten a job, the only question left is
whether it ever ran, and the job status file answers it (the wrapper writes
its start time when it starts, its exit when it ends; see
:mod:`sshq.remote.status`).  qacct could add nothing the poll contract can
carry (a :class:`~sshq.job_runners.base.RunnerJobState` is "still known,
running or not"), it reads the whole accounting file on every call, and
accounting may be off or unreadable at a site (on the test bed, with
accounting flushed at once, ``qacct`` has a job's record about 0.8 s after
its last command, by the time qstat forgets it).  A job deleted before its
wrapper started (``qdel`` of a pending job) is reported ``submit-failed``,
which is what it is to the user.  A job in an error state (``Eqw``, e.g. its
output file cannot be opened) stays known to Grid Engine until deleted, so
sshq shows it ``submitted`` meanwhile.

Kill: ``qdel ID...``.  For a running job Grid Engine sends SIGKILL to the job
(queue ``terminate_method`` NONE, the default; observed on 8.1.9: no SIGTERM
first, ``qacct`` records ``exit_status 137``), so the wrapper cannot record
it: the job status file shows a start and no exit, and the first poll after
qstat has forgotten the job says ``failed`` ("no longer knows the job ...").
The same holds for the ``h_rt`` walltime (SIGKILL too).

Directives (``#$``), from a normalized :class:`~sshq.model.JobSpec`.  Every
value reaches qsub byte-exact or is refused (:meth:`SgeHandler.word`).  How
qsub reads the option file (observed on 8.1.9, ``tests/fixtures/
sge_option_file_quotes.json``): double quotes group blanks; every quote
character, ``'`` or ``"``, is removed, even inside the other kind (``-A
x'y'z`` charges ``xyz``); a backslash is literal; ``#`` ends the line, even
inside double quotes.  So values with blanks are double-quoted and values
holding a quote character or ``#`` are refused.

- ``-N name``: Grid Engine refuses names that start with a digit, so such a
  name is refused here (pass another ``name``).
- ``-o``/``-e`` the job log directory's ``job.out``/``job.err``.  qsub reads
  these paths as ``[[host]:]path[,...]`` and expands ``$USER``, ``$HOME``,
  ``$JOB_ID``... in them, so a job log directory holding ``:``, ``,`` or ``$``
  is refused.
- ``-S /bin/bash``: without it the job file runs under the queue's shell
  (``/bin/sh`` in ``posix_compliant`` mode), and the wrapper needs bash.
- walltime: ``-l h_rt=HH:MM:SS`` (hard limit; Grid Engine sends SIGKILL).
- cpus: ``-pe smp N`` (``N`` slots on one host); the site must have a
  parallel environment named ``smp`` with ``allocation_rule $pe_slots``, the
  common convention.
- memory: ``-l h_vmem=<M>M``.  ``h_vmem`` is *per slot* (Grid Engine sets the
  job's address-space limit to ``h_vmem`` times the slots on the host) while
  sshq's ``memory`` is per node, so ``M`` is the memory divided by ``cpus``
  (rounded up, in MiB; ``M`` = 1024 * 1024 bytes in Grid Engine).  Note that
  h_vmem limits virtual memory, which some programs reserve generously.
- queue: ``-q``; account: ``-A`` (qmaster refuses an account holding
  blanks or ``:``, so those are refused here, with a clear message).
- mail: ``-M addr``; ``-m`` letters from the events: ``begin`` ``b``,
  ``end`` ``e``, ``fail`` ``a`` (aborted), ``all`` ``bea``.
- nodes, tasks: refused.  Grid Engine has no node count, and tasks spread
  over hosts need a parallel environment whose name and allocation rule are
  site-specific (``-pe mpi 16``): pass it as a raw directive instead.
- raw directives are passed through as ``#$ <directive>``.

``sshq ssh-to-job`` reaches the job on its execution host
(:attr:`~sshq.job_runners.base.JobRunnerHandler.attach_via_exec_host`): the
login node runs ``ssh`` to the host the job wrapper recorded as
the execution host in ``job.status`` (on a single-host Grid Engine, that is the
login node itself, and the shell opens right there), with the job's
environment and work directory.  It runs beside the job: sshq uses no
``qrsh -inherit``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from ..exceptions import InvalidInputError, JobRunnerError
from ..model.job_spec import JobSpec
from ..model.resources import format_hms, format_memory_mib
from ..quoting import DirectiveSyntax
from .base import IDS, JobRunnerHandler, RunnerJobState, one_line

__all__ = ["SgeHandler", "HANDLER"]

# A fixed sh program: the header's directives ("#$ " lines right after the
# "#!" line) become qsub's option file; the rest of the job file is never
# scanned for directives.  $1: job file, $2: job log directory.
_SUBMIT = (
    "awk 'NR == 1 {next} /^#\\$ / {print substr($0, 4); next} {exit}' \"$1\" >\"$2/job.qsub\""
    ' && exec qsub -C "" -@ "$2/job.qsub" "$1"'
)
# A fixed sh program: the user's own jobs only.  The job ids are its
# positional parameters, unused: `qstat -xml` cannot select by id.
_POLL = 'exec qstat -u "$(id -un)" -xml'
_MAIL = {"begin": "b", "end": "e", "fail": "a", "all": "bea"}
# How qsub reads a value of its option file (job.qsub), observed on 8.1.9
# (tests/fixtures/sge_option_file_quotes.json, sge_directive_parsing.json):
# double quotes group blanks; every quote character, ' or ", is removed, even
# inside the other kind; a backslash is literal (no escape character); '#'
# ends the line, even inside quotes.  So quotes and '#' cannot be carried.
_CANNOT = {
    "#": "qsub ends a directive at '#', even inside double quotes",
    "'": "qsub removes every quote character (' or \") from an option value",
    '"': "qsub removes every quote character (' or \") from an option value",
}
_VALUE = DirectiveSyntax(refuse=_CANNOT)
_PATH = DirectiveSyntax(refuse={
    **_CANNOT,
    ":": "qsub reads an output path as [host:]path",
    ",": "qsub reads an output path as a comma-separated list",
    "$": "sge_execd expands $USER, $HOME, $JOB_ID... in an output path",
})
_ACCOUNT = DirectiveSyntax(refuse={
    **_CANNOT,
    ":": "qsub refuses ':' in an account",
    " ": "qmaster refuses an account with blanks",
})
# Letters of a qstat state code that mean the job holds a queue slot:
# r(unning), t(ransferring), s/S/T (suspended while running).
_RUNNING_LETTERS = frozenset("rtsST")


class SgeHandler(JobRunnerHandler):
    """Grid Engine job runner handler."""

    name = "sge"
    attach_via_exec_host = True
    directive_prefix = "#$"
    job_id_regex = r"^Your job(?:-array)? (?P<id>\d+)\b"
    poll_command = ("sh", "-c", _POLL, "sshq-sge-poll", IDS)
    kill_command = ("qdel", IDS)
    ids_sep = None
    directive_syntax = _VALUE

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        self.refuse(spec, "nodes", "tasks")
        if spec.job_name[0].isdigit():
            raise InvalidInputError(
                f"job runner {self.name!r} cannot express name {spec.job_name!r}: Grid Engine"
                " job names cannot start with a digit; choose another name"
            )
        p = self.directive_prefix
        lines = [
            f"{p} -N {self.word('name', spec.job_name)}",
            f"{p} -o {self.word('run-dir', job_log_dir + '/job.out', _PATH)}",
            f"{p} -e {self.word('run-dir', job_log_dir + '/job.err', _PATH)}",
            f"{p} -S /bin/bash",
        ]
        if spec.walltime is not None:
            lines.append(f"{p} -l h_rt={format_hms(spec.walltime)}")
        if spec.cpus is not None:
            lines.append(f"{p} -pe smp {spec.cpus}")
        if spec.memory is not None:
            per_slot = math.ceil(format_memory_mib(spec.memory) / (spec.cpus or 1))
            lines.append(f"{p} -l h_vmem={per_slot}M")
        if spec.queue:
            lines.append(f"{p} -q {self.word('queue', spec.queue)}")
        if spec.account:
            lines.append(f"{p} -A {self.word('account', spec.account, _ACCOUNT)}")
        if spec.mail_user:
            lines.append(f"{p} -M {self.word('mail-user', spec.mail_user)}")
        if spec.mail_events:
            letters = "".join(_MAIL[e] for e in spec.mail_events)
            lines.append(f"{p} -m {''.join(c for c in 'bea' if c in letters)}")
        lines.extend(f"{p} {self.raw(d)}" for d in spec.directives)
        return lines

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        return ["sh", "-c", _SUBMIT, "sshq-sge-submit", job_file, job_log_dir]

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        if exit_status != 0:
            raise JobRunnerError(
                f"qstat failed (exit {exit_status}): {one_line(stderr)}",
                stderr=stderr,
                transient=True,
            )
        if not stdout.strip():
            return {}
        try:
            root = ET.fromstring(stdout)
        except ET.ParseError as exc:
            raise JobRunnerError(
                f"qstat -xml printed something that is not XML ({exc}): {stdout[:200]!r}",
                stderr=stderr,
                transient=True,
            ) from None
        known: dict[str, RunnerJobState] = {}
        for job in root.iter("job_list"):
            job_id = (job.findtext("JB_job_number") or "").strip()
            if not job_id.isdigit():
                continue
            code = (job.findtext("state") or "").strip()
            running = job.get("state") == "running" or bool(_RUNNING_LETTERS & set(code))
            prev = known.get(job_id)  # array jobs: one entry per task
            if prev is None or (running and not prev.running):
                known[job_id] = RunnerJobState(job_id, running, code)
        return known


HANDLER = SgeHandler()
