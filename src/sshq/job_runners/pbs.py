"""PBS Pro / OpenPBS / Torque: ``qsub``, ``qstat``, ``qdel`` (one handler, ``pbs``).

Formats (sources per fixture in ``tests/fixtures/pbs/README.md``):

- Submit: ``qsub <job file>`` prints the job id, ``<sequence>.<server>``
  (``18734.cm``; Torque prints the full server name,
  ``6401.gb-ce-kun.els.sara.nl``; a bare ``<sequence>`` where the server
  suffix is hidden).  ``qstat(1B)`` also names jobs at another server
  ``<sequence>.<server>@<server>``; :attr:`PbsHandler.job_id_regex` accepts
  that form too.  Array ids (``123[].server``) are not accepted: sshq submits
  no arrays.
- Poll: ONE command for all ids.  PBS Pro 14.1+ and OpenPBS get
  ``qstat -f -F json -x <ids>`` (``qstat(1B)``: a JSON object with
  ``timestamp``, ``pbs_version``, ``pbs_server`` and ``Jobs`` keyed by job
  id, each with ``job_state``; ``-x`` adds finished jobs, state ``F`` with
  ``Exit_status``).  Torque has no ``-F`` (and its ``-x`` means XML), older
  PBS Pro has no JSON: they get ``qstat -f <ids>`` and its text format
  (``Job Id: <id>`` then ``    job_state = R``; long values continue on
  lines starting with a tab).  A fixed sh program (:data:`POLL_PROGRAM`)
  picks the flavour from ``qstat --version`` (PBS Pro: ``pbs_version = 19.1.3``
  on stdout, before 14.x ``pbs_version = PBSPro_11.1.0.111761``; Torque:
  ``Version: 6.1.3`` on stderr), so one platform setting (``job_runner =
  "pbs"``) serves every flavour, and :meth:`PbsHandler.parse_poll` reads both
  formats.
- Kill: ``qdel <ids>``: the MoM sends SIGTERM, then SIGKILL after the queue's
  ``kill_delay``; sshq's job wrapper traps TERM and records it.

The poll never takes silence for an ended job.  A job counts as forgotten by
PBS only when qstat *says* so: ``qstat: Unknown Job Id <id>`` (Torque:
``Unknown Job Id Error <id>``; exit 153, PBSE_UNKJOBID 15001 & 0xff), ``qstat:
<id> Job has finished, use -x or -H ...`` (exit 35, PBSE_HISTJOBID 15139 &
0xff), or a finished state (``F``, ``X``, Torque's ``C``).  The poll program
prints the ids it asked about first, so a job that qstat neither reports nor
declares unknown makes the poll fail (transient, no state changes) instead
of failing the job: OpenPBS built from main answers ``qstat -f -F json A B``
with job A only (openpbs/openpbs#2672), and PBS Pro before PP-1240 printed
invalid JSON for two or more ids.  Every other qstat failure (server down:
``qstat: cannot connect to server ... (errno=15010)``) is transient too.

Environment: no ``qsub -v``.  sshq's job wrapper exports the job's
environment inside the job script itself, so values travel in the job file,
byte-exact; ``-v KEY=VALUE,...`` would split values at commas.

Directives (``#PBS``), one mapping for every flavour unless noted:

==================  ==========================================================
``-N name``         job name (qsub(1B): must start with a letter or digit)
``-S /bin/bash``    the job script is bash; PBS would run it with the user's
                    login shell otherwise
``-o``/``-e``       ``<job log dir>/job.out`` and ``job.err``
``-j n``            never merged, whatever the site's default_qsub_arguments
walltime            ``-l walltime=HH:MM:SS``
nodes, tasks,       PBS Pro/OpenPBS chunks: ``-l select=N:ncpus=C[:mpiprocs=T]
cpus, memory        [:ompthreads=c][:mem=Mmb]`` with N = nodes (default 1),
                    T = tasks / N per chunk (tasks must be a multiple of
                    nodes), c = cpus per task, C = T x c (1 each by default)
                    and M = memory per node in MiB; with nodes,
                    ``-l place=scatter`` (one chunk per host).  Torque knows
                    no ``select``: there, give ``-l nodes=N:ppn=P`` as a raw
                    directive instead of these fields.
queue, account      ``-q``, ``-A``
mail                ``-M user``, ``-m`` with b (begin), e (end), a (fail: PBS
                    mails when the batch system aborts the job), abe (all)
raw directives      ``#PBS <directive>`` as written
==================  ==========================================================

Values on directive lines: qsub(1B) says an argument with blanks is enclosed
in double quotes, but sshq has no PBS to observe how its directive parser
treats quote characters, backslashes or ``#``; a value holding one of them is
refused (:data:`~sshq.quoting.UNVERIFIED_SYNTAX`), so that no value is ever
silently changed.

PBS copies ``job.out``/``job.err`` to their paths when the job ends, unless
the site writes them directly: on PBS Pro/OpenPBS add the raw directive
``-k oed`` (direct write) to see output while the job runs.

``sshq ssh-to-job`` reaches the job on its execution host
(:attr:`~sshq.job_runners.base.JobRunnerHandler.attach_via_exec_host`): the
login node runs ``ssh`` to the host the job wrapper recorded as
the execution host in ``job.status`` (with the login node's own keys or
host-based authentication) and opens the shell there, with the job's
environment and work directory.  It runs beside the job, not inside its
cgroup: sshq uses no PBS step-into-job command.
"""

from __future__ import annotations

import json
import re

from ..exceptions import InvalidInputError, JobRunnerError
from ..model.job_spec import JobSpec
from ..model.resources import format_hms, format_memory_mib
from .base import IDS, JobRunnerHandler, RunnerJobState, one_line

__all__ = ["PbsHandler", "HANDLER", "POLL_PROGRAM", "POLL_MARK"]

#: First line the poll program prints: the mark, the flavour, the ids asked about.
POLL_MARK = "sshq-pbs-poll"

#: The poll command's fixed sh program; job ids arrive as positional parameters.
POLL_PROGRAM = (
    'case $(qstat --version 2>&1) in'
    ' *"pbs_version = PBSPro_"*) f=text ;;'
    ' *pbs_version*) f=json ;;'
    ' *) f=text ;;'
    ' esac;'
    f' printf "%s %s %s\\n" {POLL_MARK} "$f" "$*";'
    ' if [ "$f" = json ]; then exec qstat -f -F json -x "$@"; fi;'
    ' exec qstat -f "$@"'
)

# qstat(1B) job states.  Running (or finishing / suspended after a start):
_RUNNING = frozenset("REUSB")
# Ended: PBS Pro F (finished, history) and X (subjob ended), Torque C (completed).
_ENDED = frozenset("FXC")

_MAIL = {"begin": "b", "end": "e", "fail": "a", "all": "abe"}

_ID = r"\d+(?:\.[A-Za-z0-9][\w.-]*)?(?:@[A-Za-z0-9][\w.-]*)?"
_UNKNOWN_RE = re.compile(r"^(?:qstat|qdel): Unknown Job Id(?: Error)? (?P<id>\S+)\s*$")
_FINISHED_RE = re.compile(r"^(?:qstat|qdel): (?:(?P<id>\S+) )?Job has finished\b")
_STATE_RE = re.compile(r"^    job_state = (?P<state>\S*)")


def _base(job_id: str) -> tuple[str, str]:
    """``123.srv.dom@other`` -> (``123``, ``srv``): sequence and short server."""
    seq, _, server = job_id.split("@", 1)[0].partition(".")
    return seq, server.split(".", 1)[0]


def _match(wanted: str, candidates: list[str], wanted_all: list[str]) -> str | None:
    """The id among ``candidates`` that names the job qsub called ``wanted``.

    qstat prints ids as the server stores them: without ``@server``, and
    sometimes with another spelling of the server (Torque's messages name the
    server it asked).  Same sequence number and same short server name match;
    so does the sequence number alone when it is unique on both sides.
    """
    if wanted in candidates:
        return wanted
    seq, server = _base(wanted)
    same_seq = [c for c in candidates if _base(c)[0] == seq]
    for c in same_seq:
        c_server = _base(c)[1]
        if not server or not c_server or c_server == server:
            return c
    if len(same_seq) == 1 and sum(_base(w)[0] == seq for w in wanted_all) == 1:
        return same_seq[0]
    return None


def _parse_text(body: str) -> dict[str, str]:
    """``qstat -f`` text: job id -> state letter ('' when no job_state line)."""
    jobs: dict[str, str] = {}
    current: str | None = None
    for line in body.splitlines():
        if line.startswith("Job Id:"):
            current = line[len("Job Id:"):].strip()
            jobs.setdefault(current, "")
            continue
        m = _STATE_RE.match(line)
        if m and current is not None:
            jobs[current] = m.group("state")
    return jobs


def _parse_json(body: str, stderr: str) -> dict[str, str]:
    """``qstat -f -F json`` output: job id -> state letter."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise JobRunnerError(
            f"qstat -F json printed invalid JSON ({exc}); PBS Pro before PP-1240"
            " (openpbs/openpbs#585) printed invalid JSON for several job ids",
            stderr=stderr, transient=True,
        ) from None
    jobs = data.get("Jobs", {}) if isinstance(data, dict) else None
    if not isinstance(jobs, dict):
        raise JobRunnerError("qstat -F json printed no object of jobs",
                             stderr=stderr, transient=True)
    out: dict[str, str] = {}
    for job_id, attrs in jobs.items():
        state = attrs.get("job_state") if isinstance(attrs, dict) else None
        out[str(job_id)] = state if isinstance(state, str) else ""
    return out


class PbsHandler(JobRunnerHandler):
    """PBS Pro / OpenPBS / Torque job runner handler."""

    name = "pbs"
    attach_via_exec_host = True
    directive_prefix = "#PBS"
    job_id_regex = rf"^\s*(?P<id>{_ID})\s*$"
    poll_command = ("/bin/sh", "-c", POLL_PROGRAM, "sshq-pbs-poll", IDS)
    kill_command = ("qdel", IDS)
    ids_sep = None

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        if not spec.job_name[0].isalnum():
            raise InvalidInputError(
                f"job runner 'pbs' cannot use the job name {spec.job_name!r}: qsub -N wants"
                " a name that starts with a letter or a digit; rename the job (--name)"
            )
        p = self.directive_prefix
        out, err = f"{job_log_dir}/job.out", f"{job_log_dir}/job.err"
        if ":" in job_log_dir:
            raise InvalidInputError(
                f"job runner 'pbs' cannot write job output under {job_log_dir!r}: qsub -o"
                " and -e read 'host:path', so the path must not contain ':'"
                " (change the platform's run_dir)"
            )
        lines = [
            f"{p} -N {self.word('name', spec.job_name)}",
            f"{p} -S /bin/bash",
            f"{p} -o {self.word('run-dir', out)}",
            f"{p} -e {self.word('run-dir', err)}",
            f"{p} -j n",
        ]
        if spec.walltime is not None:
            lines.append(f"{p} -l walltime={format_hms(spec.walltime)}")
        select = self._select(spec)
        if select:
            lines.append(f"{p} -l select={select}")
        if spec.nodes is not None:
            lines.append(f"{p} -l place=scatter")
        if spec.queue:
            lines.append(f"{p} -q {self.word('queue', spec.queue)}")
        if spec.account:
            lines.append(f"{p} -A {self.word('account', spec.account)}")
        if spec.mail_user:
            lines.append(f"{p} -M {self.word('mail-user', spec.mail_user)}")
        if spec.mail_events:
            letters = set("".join(_MAIL[e] for e in spec.mail_events))
            lines.append(f"{p} -m {''.join(c for c in 'abe' if c in letters)}")
        lines.extend(f"{p} {self.raw(d)}" for d in spec.directives)
        return lines

    @staticmethod
    def _select(spec: JobSpec) -> str | None:
        """The ``select`` chunk statement for nodes/tasks/cpus/memory, or None."""
        if spec.nodes is None and spec.tasks is None and spec.cpus is None \
                and spec.memory is None:
            return None
        chunks = spec.nodes or 1
        per_chunk: int | None = None
        if spec.tasks is not None:
            if spec.tasks % chunks:
                raise InvalidInputError(
                    f"job runner 'pbs' cannot split tasks={spec.tasks} over nodes={chunks}:"
                    f" it asks for {chunks} identical chunks (select={chunks}:...), so tasks"
                    " must be a multiple of nodes"
                )
            per_chunk = spec.tasks // chunks
        parts = [str(chunks), f"ncpus={(per_chunk or 1) * (spec.cpus or 1)}"]
        if per_chunk is not None:
            parts.append(f"mpiprocs={per_chunk}")
        if spec.cpus is not None:
            parts.append(f"ompthreads={spec.cpus}")
        if spec.memory is not None:
            parts.append(f"mem={format_memory_mib(spec.memory)}mb")
        return ":".join(parts)

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        return ["qsub", job_file]

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        asked: list[str] | None = None
        body = stdout
        first, nl, rest = stdout.partition("\n")
        if first.startswith(POLL_MARK + " "):
            asked = first.split()[2:]
            body = rest if nl else ""
        # What qstat (or qdel) says on stderr: ids it does not know, and anything else.
        gone: list[str] = []
        other: list[str] = []
        for line in stderr.splitlines():
            line = line.strip()
            if not line:
                continue
            m = _UNKNOWN_RE.match(line) or _FINISHED_RE.match(line)
            if m:
                gone.append(m.group("id") or "")
            else:
                other.append(line)
        if exit_status != 0 and (other or not gone):
            raise JobRunnerError(
                f"qstat failed (exit {exit_status}): {one_line(stderr) or 'no message'}",
                stderr=stderr, transient=True,
            )
        if body.lstrip().startswith("{"):
            found = _parse_json(body, stderr)
        else:
            found = _parse_text(body)
        if asked is None:
            return {
                job_id: RunnerJobState(job_id, state in _RUNNING, state)
                for job_id, state in found.items() if state not in _ENDED
            }
        known: dict[str, RunnerJobState] = {}
        silent: list[str] = []
        reported = list(found)
        named_gone = [g for g in gone if g]
        for job_id in asked:
            match = _match(job_id, reported, asked)
            if match is not None:
                state = found[match]
                if state not in _ENDED:
                    known[job_id] = RunnerJobState(job_id, state in _RUNNING, state)
            elif _match(job_id, named_gone, asked) is None and not (
                    len(asked) == 1 and "" in gone):
                silent.append(job_id)
        if silent:
            raise JobRunnerError(
                f"qstat said nothing about job(s) {', '.join(silent)} (no state and no"
                " 'Unknown Job Id'); not taking that for ended jobs (openpbs/openpbs#2672:"
                " qstat -F json may report only the first of several ids)",
                stderr=stderr, transient=True,
            )
        return known


HANDLER = PbsHandler()
