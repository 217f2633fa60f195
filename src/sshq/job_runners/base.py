"""What a job runner handler is: a small, stateless, pure description.

The shape follows Cylc's job runner handlers (``cylc/flow/job_runner_handlers``,
seed 001): a directive prefix, a submit command, a regular expression that
finds the job id in the submit output, one poll command for many ids, and a
kill command for many ids.  A handler never imports a transport: it builds
argument vectors and parses text.  The remote agent runs the commands.

Poll and kill commands are *templates*: the element ``"{ids}"`` stands for
the job ids, expanded by the agent either into one argument per id
(``ids_sep is None``) or into one argument joined with ``ids_sep``.  The agent
fills them only with the ids of jobs whose job status file records no exit,
so finished jobs never cost a job runner query.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..exceptions import InvalidInputError
from ..model.job_spec import JobSpec
from ..quoting import UNVERIFIED_SYNTAX, DirectiveSyntax, check_directive_value, directive_word

__all__ = ["JobRunnerHandler", "RunnerJobState", "IDS", "GROUP", "one_line"]

#: The placeholder for job ids in poll and kill command templates.
IDS = "{ids}"

#: The placeholder for a group of jobs' own words (e.g. ``--clusters=c2``),
#: from :meth:`JobRunnerHandler.job_id_parts`; jobs are queried per group.
GROUP = "{group}"


def one_line(text: str, limit: int = 1000) -> str:
    """Text from a job runner's output for a one-line message: stripped, its
    lines joined with `` | ``, cut to ``limit`` characters (``...`` after)."""
    flat = " | ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
    return flat if len(flat) <= limit else flat[:limit] + "..."


@dataclass(frozen=True, slots=True)
class RunnerJobState:
    """What the job runner says of a job it still knows.

    Attributes:
        job_id: the job runner's id.
        running: True when the runner reports it running (or finishing).
        raw: the runner's own state code (``PENDING``, ``R``, ...).
    """

    job_id: str
    running: bool
    raw: str


class JobRunnerHandler:
    """Base class for job runner handlers; subclasses set the class attributes.

    Attributes:
        name: the job runner's name in platform configs (``slurm``).
        directive_prefix: prefix of directive lines (``#SBATCH``); '' for none.
        job_id_regex: finds the job id in the submit command's stdout; must
            have a named group ``id`` (Python ``re``, searched, MULTILINE).
        poll_command: poll command template (see module docstring).
        kill_command: kill command template.
        ids_sep: how ``{ids}`` expands: None for separate arguments, else the
            separator of one joined argument.
        wrapper_walltime: True when the runner cannot enforce a walltime, so
            the job wrapper enforces it (sends itself ``XCPU``).
        submit_stdin: True when the submit command reads the job file on its
            standard input (LSF's ``bsub < job``).
        runs_on_submit_host: True when jobs run on the login host they were
            submitted through (background), so only that host can poll them;
            batch system jobs can be polled from any login host.
        array_index_var: the environment variable holding an array element's
            index in the job (``SLURM_ARRAY_TASK_ID``); None when sshq does not
            submit arrays to this runner yet.
        array_element_id: how an element's job id is spelt, from the array's
            job id and the index (``{id}_{index}``: Slurm).
        attach_via_exec_host: ``ssh-to-job`` reaches the job by SSH from the
            login node to its execution host (the execution host its
            wrapper recorded), as for batch systems with no step-into-job
            command.
        directive_syntax: how the runner's directive parser reads a value
            (:class:`~sshq.quoting.DirectiveSyntax`); every value a handler
            writes on a directive line goes through :meth:`word` with it.
    """

    name: str = ""
    directive_prefix: str = ""
    job_id_regex: str = r"(?P<id>\S+)"
    poll_command: tuple[str, ...] = ()
    kill_command: tuple[str, ...] = ()
    ids_sep: str | None = None
    wrapper_walltime: bool = False
    submit_stdin: bool = False
    runs_on_submit_host: bool = False
    array_index_var: str | None = None
    array_element_id: str = "{id}_{index}"
    attach_via_exec_host: bool = False
    directive_syntax: DirectiveSyntax = UNVERIFIED_SYNTAX

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        """Directive lines (with prefix) for a normalized job spec.

        Args:
            spec: a spec that went through :meth:`JobSpec.normalized`.
            job_log_dir: absolute job log directory, for stdout/stderr paths.

        Raises:
            InvalidInputError: the spec asks for something this runner cannot
                express (never silently dropped).
        """
        raise NotImplementedError

    def word(self, field: str, value: str, syntax: DirectiveSyntax | None = None,
             *, tail: str = "") -> str:
        """``value`` as one word of a directive line, read back byte-exact by the runner.

        Args:
            field: the job spec field, for messages (``queue``, ``run-dir``).
            value: the value.
            syntax: the parser's rules for this field, if not
                :attr:`directive_syntax` (paths often have more).
            tail: runner syntax appended inside the word (see
                :func:`~sshq.quoting.directive_word`).

        Raises:
            InvalidInputError: the runner cannot carry the value (naming the
                field, the runner and the value).
        """
        return directive_word(value, field=field, runner=self.name,
                              syntax=syntax or self.directive_syntax, tail=tail)

    def raw(self, directive: str) -> str:
        """A raw directive of the spec, as written (runner syntax), on one line.

        Raises:
            InvalidInputError: it holds a newline or another control character.
        """
        return check_directive_value("directive", directive)

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        """The argv that submits ``job_file`` (absolute path) to the runner."""
        raise NotImplementedError

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        """Parse one poll command's output into the jobs the runner still knows.

        Raises:
            JobRunnerError: the command failed in a way that says nothing about
                the jobs (the poll is then transient and changes no state).
        """
        raise NotImplementedError

    def job_id_from_submit(self, groups: dict[str, str]) -> str:
        """The job id from the named groups of :attr:`job_id_regex`'s match."""
        return groups["id"]

    def job_id_parts(self, job_id: str) -> tuple[tuple[str, ...], str]:
        """Split a job id into the words its group's commands need and the
        bare id the runner's commands print (default: no words)."""
        return (), job_id

    def job_id_join(self, group: tuple[str, ...], bare: str) -> str:
        """Inverse of :meth:`job_id_parts`."""
        return bare

    def check_array(self, spec: JobSpec) -> None:
        """Refuse an array job if this runner cannot submit one.

        Raises:
            InvalidInputError: naming the runner.
        """
        if spec.array is not None and self.array_index_var is None:
            raise InvalidInputError(
                f"job runner {self.name!r} cannot express array (asked for {spec.array!r});"
                " submit the elements as separate jobs in one `sshq submit`")

    def attach_argv(self, job_id: str, inner: list[str], *, tty: bool) -> list[str]:
        """The argv that runs ``inner`` inside the running job (``ssh-to-job``).

        Run on the host the job was submitted through.  The default runs
        ``inner`` right there (the job runs on that host).

        Args:
            job_id: the job runner's id.
            inner: the argv to run in the job's environment.
            tty: whether an interactive terminal is wanted.
        """
        return list(inner)

    def attach_error(self, exit_status: int, stderr: str) -> str | None:
        """Explain a failure of :meth:`attach_argv`'s command, or None."""
        return None

    def refuse(self, spec: JobSpec, *fields: str) -> None:
        """Raise InvalidInputError if ``spec`` sets any of ``fields``."""
        for f in fields:
            value = getattr(spec, f)
            if value not in (None, (), "", {}):
                raise InvalidInputError(
                    f"job runner {self.name!r} cannot express {f.replace('_', '-')}"
                    f" (asked for {value!r}); remove it or use another job runner"
                )
