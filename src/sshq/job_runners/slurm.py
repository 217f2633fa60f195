"""Slurm: ``sbatch``, ``squeue``, ``scancel`` (Slurm 20.11+ man pages).

Submit: ``sbatch --ignore-pbs JOB``.  sbatch reads ``#SBATCH`` lines only
before the first command, but ``#PBS`` and ``#BSUB`` lines anywhere in the
job file (observed on 22.05: a ``#BSUB -J`` line inside a quoted string after
the first command renamed the job); sshq's job file embeds the user's script
and environment values, so ``--ignore-pbs`` turns that reading off.

Directive values: sbatch's ``#SBATCH`` reader is shell-like (``_get_argument``
in ``src/sbatch/opt.c``; ``tests/fixtures/sbatch_directive_quotes.json``):
unescaped, ``--partition=de'b'ug`` runs in ``debug``.  Every value is written
with ``\\ ' " #`` backslash-escaped and blanks double-quoted, so it reaches
Slurm byte-exact; in ``--output``/``--error`` paths ``%`` is doubled (sbatch's
filename patterns) and a backslash is refused.  (sbatch of the ``packjob``
era, before het jobs were called so, also blanked the word ``packjob``
anywhere in a ``#SBATCH`` line; 22.05 reads ``hetjob`` only as a word of its
own, checked with ``--comment=xhetjoby``.)

Submit output (``sbatch(1)``, OUTPUT): ``Submitted batch job 123`` or, on a
multi-cluster site, ``Submitted batch job 123 on cluster c1``: sshq's job id
is then ``123@c1`` and its poll and kill commands carry ``--clusters=c1``.

Poll: ``squeue -h -r -o '%i^^^%T' -j 1,2,3`` (a rare field separator, after
AiiDA), run by a fixed ``sh`` program that first unsets the ``SQUEUE_*``
variables of a login environment that filter jobs (``SQUEUE_PARTITION`` or
``SQUEUE_USERS`` of another value made squeue print nothing, and a waiting job
was taken for forgotten).  squeue exits 1 with ``Invalid job id specified``
when none of the ids is known any more.  What the parser reads:

- states in either form of squeue(1)'s JOB STATE CODES (``R`` or
  ``RUNNING``); an ended state (``COMPLETED``, ``FAILED``, ``CANCELLED``,
  ``TIMEOUT``... listed when ``-t`` or ``SQUEUE_STATES`` asks for them, e.g.
  through a site's squeue wrapper) means the runner no longer holds the job,
  and its job status file decides;
- a heterogeneous job's components ``93+0``, ``93+1`` (sbatch printed ``93``):
  the job is known while a component is, and running when one runs;
- any line that is not ``JOBID^^^STATE`` (other than squeue -M's
  ``CLUSTER: name``) makes the poll fail (transient) rather than be read as
  "no job known", which would fail every job.
"""

from __future__ import annotations

import re

from ..exceptions import JobRunnerError
from ..model.job_spec import JobSpec
from ..model.resources import format_hms, format_memory_mib, parse_array
from ..quoting import DirectiveSyntax
from .base import GROUP, IDS, JobRunnerHandler, RunnerJobState, one_line

__all__ = ["SlurmHandler", "HANDLER"]

_SEP = "^^^"
# sbatch's #SBATCH reader (_get_argument in src/sbatch/opt.c; checked against
# real sbatch 22.05, tests/fixtures/sbatch_directive_quotes.json): blanks end a
# word unless quoted, ' and " quote (and are removed), a backslash makes the
# next character literal (also inside quotes, but not a blank), an unquoted #
# starts a comment.  So every value is carried byte-exact: \ ' " # escaped,
# blanks double-quoted.
_VALUE = DirectiveSyntax(escape="\\'\"#")
# --output/--error are also filename patterns (sbatch(1), "filename pattern"):
# %% is a literal %, and a backslash is dropped and turns all %-patterns off
# (so the array's %a would not be expanded): refused.
_PATH = DirectiveSyntax(escape="\\'\"#", doubled="%", refuse={
    "\\": "sbatch drops a backslash from an output file name (and then expands no"
          " %-pattern in it)"})
_MAIL = {"begin": "BEGIN", "end": "END", "fail": "FAIL", "all": "ALL"}
# squeue(1) JOB STATE CODES: compact form (squeue -o %t) -> extended (%T).
_CODES = {
    "BF": "BOOT_FAIL", "CA": "CANCELLED", "CD": "COMPLETED", "CF": "CONFIGURING",
    "CG": "COMPLETING", "DL": "DEADLINE", "F": "FAILED", "NF": "NODE_FAIL",
    "OOM": "OUT_OF_MEMORY", "PD": "PENDING", "PR": "PREEMPTED", "R": "RUNNING",
    "RD": "RESV_DEL_HOLD", "RF": "REQUEUE_FED", "RH": "REQUEUE_HOLD", "RQ": "REQUEUED",
    "RS": "RESIZING", "RV": "REVOKED", "SI": "SIGNALING", "SE": "SPECIAL_EXIT",
    "SO": "STAGE_OUT", "ST": "STOPPED", "S": "SUSPENDED", "TO": "TIMEOUT",
}
# States that mean the job is executing or finishing (it has its allocation).
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED",
            "RESIZING"}
# States of a job that has ended ("Job terminated ...", squeue(1)): squeue lists
# them only when asked (-t, or SQUEUE_STATES in the login environment), for
# MinJobAge; the job status file decides how such a job ended.  Not ended:
# SPECIAL_EXIT and the REQUEUE states (held again), REVOKED (a federation runs
# the job on a sibling cluster).
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
          "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}
# squeue(1) ENVIRONMENT VARIABLES that a login profile may set and that would
# hide sshq's jobs from `squeue -j` (observed on 22.05: SQUEUE_PARTITION or
# SQUEUE_USERS of another value print nothing, and a waiting job was taken for
# forgotten) or list ended ones (SQUEUE_STATES).  The poll command is a fixed
# sh program that unsets them; its arguments are squeue's (ids included),
# never part of the program text.
_SQUEUE_FILTERS = ("SQUEUE_ACCOUNT", "SQUEUE_LICENSES", "SQUEUE_NAMES", "SQUEUE_PARTITION",
                   "SQUEUE_QOS", "SQUEUE_STATES", "SQUEUE_USERS")
_POLL = f'unset {" ".join(_SQUEUE_FILTERS)}; exec squeue "$@"'
# squeue -M / --clusters prints "CLUSTER: name" before each cluster's jobs.
_CLUSTER_BANNER = re.compile(r"CLUSTER: \S+\Z")


class SlurmHandler(JobRunnerHandler):
    """Slurm job runner handler."""

    name = "slurm"
    directive_prefix = "#SBATCH"
    # "sbatch: " before it: sbatch(1)'s own example (older sbatch printed it so)
    job_id_regex = (r"^\s*(?:sbatch: )?Submitted batch job (?P<id>\d+)"
                    r"(?: on cluster (?P<cluster>\S+))?")
    # -r: one line per array element (pending elements too), as 123_7;
    # {group}: --clusters=NAME for a job of another cluster (seed 001's caveat)
    poll_command = ("sh", "-c", _POLL, "sshq-slurm-poll",
                    GROUP, "-h", "-r", "-o", f"%i{_SEP}%T", "-j", IDS)
    kill_command = ("scancel", GROUP, IDS)
    ids_sep = ","
    array_index_var = "SLURM_ARRAY_TASK_ID"
    array_element_id = "{id}_{index}"
    directive_syntax = _VALUE

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        p = self.directive_prefix
        # An array's elements each log into <NN>/<index>/ (%a: sbatch(1) filename pattern).
        logs = "/%a" if spec.array is not None else ""
        lines = [
            f"{p} --job-name={self.word('name', spec.job_name)}",
            f"{p} --output={self.word('run-dir', job_log_dir, _PATH, tail=logs + '/job.out')}",
            f"{p} --error={self.word('run-dir', job_log_dir, _PATH, tail=logs + '/job.err')}",
        ]
        if spec.array is not None:
            array = self.word("array", spec.array)
            parse_array(spec.array)  # sbatch(1)'s --array syntax, nothing else
            lines.append(f"{p} --array={array}")
        if spec.walltime is not None:
            lines.append(f"{p} --time={format_hms(spec.walltime)}")
        if spec.nodes is not None:
            lines.append(f"{p} --nodes={spec.nodes}")
        if spec.tasks is not None:
            lines.append(f"{p} --ntasks={spec.tasks}")
        if spec.cpus is not None:
            lines.append(f"{p} --cpus-per-task={spec.cpus}")
        if spec.memory is not None:
            lines.append(f"{p} --mem={format_memory_mib(spec.memory)}M")
        if spec.queue:
            lines.append(f"{p} --partition={self.word('queue', spec.queue)}")
        if spec.account:
            lines.append(f"{p} --account={self.word('account', spec.account)}")
        if spec.mail_user:
            lines.append(f"{p} --mail-user={self.word('mail-user', spec.mail_user)}")
        if spec.mail_events:
            lines.append(f"{p} --mail-type={','.join(_MAIL[e] for e in spec.mail_events)}")
        lines.extend(f"{p} {self.raw(d)}" for d in spec.directives)
        return lines

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        # --ignore-pbs: sbatch also reads "#PBS" and "#BSUB" lines anywhere in
        # the job file (the user's script and environment values are data there)
        return ["sbatch", "--ignore-pbs", job_file]

    # Multi-cluster sites (sbatch --clusters): a job of cluster c2 is "123@c2";
    # its poll and kill commands name the cluster, or Slurm would not know it.
    def job_id_from_submit(self, groups: dict[str, str]) -> str:
        cluster = groups.get("cluster")
        return f"{groups['id']}@{cluster}" if cluster else groups["id"]

    def job_id_parts(self, job_id: str) -> tuple[tuple[str, ...], str]:
        bare, sep, cluster = job_id.partition("@")
        return ((f"--clusters={cluster}",), bare) if sep else ((), job_id)

    def job_id_join(self, group: tuple[str, ...], bare: str) -> str:
        for word in group:
            if word.startswith("--clusters="):
                return f"{bare}@{word.split('=', 1)[1]}"
        return bare

    def attach_argv(self, job_id: str, inner: list[str], *, tty: bool) -> list[str]:
        # A step in the job's allocation and cgroup; --overlap (Slurm 20.11+)
        # shares the job's resources instead of waiting for free ones.
        pty = ["--pty"] if tty else []
        group, bare = self.job_id_parts(job_id)
        return ["srun", *group, f"--jobid={bare}", "--overlap", *pty, "--quiet", *inner]

    def attach_error(self, exit_status: int, stderr: str) -> str | None:
        if "overlap" in stderr and ("unrecognized" in stderr or "invalid option" in stderr):
            return ("this Slurm refuses `srun --overlap` (it needs Slurm 20.11 or later), so"
                    " sshq cannot step into the job's allocation")
        return None

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        if exit_status != 0:
            if "Invalid job id specified" in stderr:
                return {}
            raise JobRunnerError(
                f"squeue failed (exit {exit_status}): {one_line(stderr)}",
                stderr=stderr,
                transient=True,
            )
        known: dict[str, RunnerJobState] = {}
        for line in stdout.splitlines():
            line = line.strip()
            if not line or _CLUSTER_BANNER.match(line):
                continue
            job_id, sep, rest = line.partition(_SEP)
            words = rest.partition(_SEP)[0].split()  # more fields may follow the state
            raw = words[0] if words else ""
            job_id = job_id.strip().partition("+")[0]  # het job component "93+1"
            if not sep or not job_id or not raw or any(c.isspace() for c in job_id):
                # not what sshq's command prints: say nothing rather than
                # take every job for gone
                raise JobRunnerError(
                    f"squeue printed a line that is not 'JOBID{_SEP}STATE': {one_line(line)}",
                    stderr=stderr, transient=True)
            state = _CODES.get(raw, raw)
            if state in _ENDED:
                continue  # no longer held (SQUEUE_STATES=all): the status file decides
            running = state in _RUNNING
            prev = known.get(job_id)  # a het job: known while a part is, running if one runs
            if prev is None or (running and not prev.running):
                known[job_id] = RunnerJobState(job_id, running, raw)
        return known


HANDLER = SlurmHandler()
