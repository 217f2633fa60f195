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
filename patterns) and a backslash is refused.  (Slurm before 19.05 also
blanked the word ``packjob`` anywhere in a ``#SBATCH`` line; 22.05 does not.)

Submit output (``sbatch(1)``, OUTPUT): ``Submitted batch job 123`` or, on a
multi-cluster site, ``Submitted batch job 123 on cluster c1``: sshq's job id
is then ``123@c1`` and its poll and kill commands carry ``--clusters=c1``.  Poll:
``squeue -h -r -o '%i^^^%T' -j 1,2,3`` (a rare field separator, after AiiDA);
squeue exits 1 with ``Invalid job id specified`` when none of the ids is
known any more.
"""

from __future__ import annotations

from ..exceptions import JobRunnerError
from ..model.job_spec import JobSpec
from ..model.resources import format_hms, format_memory_mib, parse_array
from ..quoting import DirectiveSyntax
from .base import GROUP, IDS, JobRunnerHandler, RunnerJobState

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
# squeue(1) JOB STATE CODES that mean the job is executing or finishing.
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}


class SlurmHandler(JobRunnerHandler):
    """Slurm job runner handler."""

    name = "slurm"
    directive_prefix = "#SBATCH"
    job_id_regex = r"^\s*Submitted batch job (?P<id>\d+)(?: on cluster (?P<cluster>\S+))?"
    # -r: one line per array element (pending elements too), as 123_7;
    # {group}: --clusters=NAME for a job of another cluster (seed 001's caveat)
    poll_command = ("squeue", GROUP, "-h", "-r", "-o", f"%i{_SEP}%T", "-j", IDS)
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
                f"squeue failed (exit {exit_status}): {stderr.strip()}",
                stderr=stderr,
                transient=True,
            )
        known: dict[str, RunnerJobState] = {}
        for line in stdout.splitlines():
            if _SEP not in line:
                continue
            job_id, _, state = line.strip().partition(_SEP)
            state = state.split()[0] if state.split() else ""
            known[job_id] = RunnerJobState(job_id, state in _RUNNING, state)
        return known


HANDLER = SlurmHandler()
