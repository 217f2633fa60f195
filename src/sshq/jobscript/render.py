"""Render a job script: directives, then the wrapper, then the user's script.

The wrapper follows Cylc's job script (seed 001): it records the job's life
in the *job status file* ``job.status`` as ``KEY=VALUE`` lines, so that a poll
can tell how the job ended even after the job runner has forgotten it.  The
keys, and which side writes each, are defined once in
:mod:`sshq.shipped.sshq_jobstatus`; the wrapper template below names them by
``@KEY@`` placeholders that :func:`render_job_script` fills from there.

The wrapper also writes ``job.env`` (mode 0600): the job's environment as
``export -p`` prints it, so that ``sshq ssh-to-job`` can open a shell with
the same variables.

Traps on EXIT, ERR, TERM, XCPU, INT, HUP, USR1 and USR2 make a killed job
record how it ended (LSF sends USR2 at a run limit, Slurm can send USR1/USR2
before a time limit with ``--signal``).  The user's script is embedded as a
quoted here-document, written to ``job.user`` in the job log directory and
run with its arguments in the job's work directory, with the requested
environment; inside a container image when the spec names one
(:mod:`sshq.jobscript.container`).  Every value that
reaches the shell goes through :mod:`sshq.quoting`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from ..job_runners.base import JobRunnerHandler
from ..model.job_spec import JobSpec
from ..quoting import check_directive_value, join, quote
from ..shipped import sshq_jobstatus as js
from .container import USER_SCRIPT, container_launch

__all__ = ["render_job_script", "STATUS_FILE"]

STATUS_FILE = js.STATUS_FILE

#: The wrapper's ``@NAME@`` placeholders: key and file names, all from
#: :mod:`sshq.shipped.sshq_jobstatus`.
_NAMES = {
    "@STATUS_FILE@": js.STATUS_FILE, "@USER_SCRIPT@": js.USER_SCRIPT_FILE,
    "@ENV_FILE@": js.ENV_FILE, "@PID@": js.PID, "@HOST@": js.HOST,
    "@INIT_TIME@": js.INIT_TIME, "@EXIT_STATUS@": js.EXIT_STATUS,
    "@EXIT_SIGNAL@": js.EXIT_SIGNAL, "@EXIT_TIME@": js.EXIT_TIME,
}


def _fill(template: str) -> str:
    for name, value in _NAMES.items():
        template = template.replace(name, value)
    return template

_WRAPPER = r"""
# ---- sshq job wrapper: records this job's life in job.status ----
sshq__status="$SSHQ_JOB_LOG_DIR/@STATUS_FILE@"
sshq__child=
sshq__ctr=
sshq__ended=
sshq__sig=
sshq__signum=
sshq__watchdog=
sshq__path=$PATH
sshq__now() { PATH=$sshq__path date -u +%Y-%m-%dT%H:%M:%SZ; }
sshq__record() { printf '%s=%s\n' "$1" "$2" >>"$sshq__status"; }
sshq__end() {
    [ -n "$sshq__ended" ] && return 0
    sshq__ended=1
    if [ -n "$sshq__watchdog" ]; then
        PATH=$sshq__path pkill -P "$sshq__watchdog" 2>/dev/null
        kill "$sshq__watchdog" 2>/dev/null
    fi
    sshq__t=$(sshq__now)
    # A batch system's cancel signals every process of the job: the user's
    # may die of it, and the wait return, a moment before the wrapper gets
    # it, here.  The signal is what ended the job if the status says so.
    if [ "$1" = @EXIT_STATUS@ ] && [ -n "$sshq__sig" ] \
            && [ "$2" = "$((128 + sshq__signum))" ]; then
        set -- @EXIT_SIGNAL@ "$sshq__sig"
    fi
    # One write, so that a poll never sees the exit without its time.
    printf '%s=%s\n@EXIT_TIME@=%s\n' "$1" "$2" "$sshq__t" >>"$sshq__status"
}
sshq__on_signal() {
    if [ -n "$sshq__ended" ]; then
        # the exit is being recorded (EXIT trap): let that finish, with this
        # signal (an exit here would leave the job with no end recorded)
        sshq__sig=$1 sshq__signum=$2
        return 0
    fi
    trap '' TERM XCPU INT HUP USR1 USR2
    trap - ERR
    # a podman container lives under conmon, outside our process group
    [ -n "$sshq__ctr" ] && "$sshq__rt" stop -t 2 "$sshq__ctr" >/dev/null 2>&1
    # The user's processes: our children (even one forked a moment ago, before
    # $! was known), and the whole process group when we lead it.
    [ -n "$sshq__child" ] && kill -s TERM "$sshq__child" 2>/dev/null
    PATH=$sshq__path pkill -TERM -P $$ 2>/dev/null
    sshq__pgid=$(PATH=$sshq__path ps -o pgid= -p $$ 2>/dev/null)
    if [ "${sshq__pgid// /}" = "$$" ]; then
        kill -s TERM -- "-$$" 2>/dev/null
    fi
    sshq__end @EXIT_SIGNAL@ "$1"
    exit $((128 + $2))
}
trap 'sshq__end @EXIT_STATUS@ "$?"' EXIT
trap 'sshq__on_signal TERM 15' TERM
trap 'sshq__on_signal XCPU 24' XCPU
trap 'sshq__on_signal INT 2' INT
trap 'sshq__on_signal HUP 1' HUP
trap 'sshq__on_signal USR1 10' USR1
trap 'sshq__on_signal USR2 12' USR2
trap 'sshq__rc=$?; sshq__end @EXIT_STATUS@ "$sshq__rc"; exit "$sshq__rc"' ERR
sshq__record @PID@ "$$"
sshq__record @HOST@ "$(hostname 2>/dev/null || uname -n)"
sshq__record @INIT_TIME@ "$(sshq__now)"
mkdir -p "$SSHQ_WORK_DIR"
cd "$SSHQ_WORK_DIR"
"""

_WRAPPER = _fill(_WRAPPER)

_RUN = r"""chmod 700 "$SSHQ_JOB_LOG_DIR/@USER_SCRIPT@"
trap - ERR
{env}# snapshot of the job's environment, for `sshq ssh-to-job` (bash syntax, mode 0600)
( umask 077; export -p >"$SSHQ_JOB_LOG_DIR/@ENV_FILE@" )
{container}{launch}{args} &
sshq__child=$!
wait "$sshq__child"
exit $?
"""

_RUN = _fill(_RUN)

_WATCHDOG = r"""# walltime {seconds} s, enforced by the wrapper: XCPU as a batch system would send
( sleep {seconds} && kill -s XCPU $$ ) >/dev/null 2>&1 &
sshq__watchdog=$!
"""


def _heredoc_delimiter(body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest()[:16]
    n = 0
    while True:
        delim = f"SSHQ_USER_SCRIPT_{digest}_{n}"
        if delim.encode() not in body:
            return delim
        n += 1


def render_job_script(
    spec: JobSpec,
    handler: JobRunnerHandler,
    *,
    job_log_dir: str,
    work_dir: str,
    extra_env: Mapping[str, str] | None = None,
    container_runtime: str = "apptainer",
) -> bytes:
    """Render the job file for one job.

    Args:
        spec: a normalized job spec (:meth:`JobSpec.normalized`).
        handler: the job runner handler (gives the directives).
        job_log_dir: absolute job log directory ``<run_dir>/log/job/<name>/<NN>``.
        work_dir: absolute work directory.
        extra_env: sshq's own variables (``SSHQ_ID``...), exported before the
            user's environment.
        container_runtime: runs ``spec.container_image``, if any
            (:mod:`sshq.jobscript.container`).

    Returns:
        The job file's bytes (``#!/bin/bash``).

    Raises:
        InvalidInputError: the handler cannot express a field of the spec, or
            a directive line holds a control character.
    """
    lines: list[str] = ["#!/bin/bash"]
    for directive in handler.directives(spec, job_log_dir):
        # each directive is one line: a newline would start another directive
        lines.append(check_directive_value("directive", directive))
    lines.append("#")
    lines.append("# Job script written by sshq.  Job status file: job.status (KEY=VALUE).")
    env: dict[str, str] = {
        "SSHQ_JOB_LOG_DIR": job_log_dir,
        "SSHQ_WORK_DIR": work_dir,
        "SSHQ_JOB_NAME": spec.job_name,
    }
    env.update(extra_env or {})
    for k, v in env.items():
        lines.append(f"export {k}={quote(v)}")
    if spec.array is not None and handler.array_index_var:
        # an array element records its life in its own <NN>/<index>/ directory
        lines.append(f'export SSHQ_ARRAY_INDEX="${{{handler.array_index_var}}}"')
        lines.append('export SSHQ_JOB_LOG_DIR="$SSHQ_JOB_LOG_DIR/$SSHQ_ARRAY_INDEX"')
    head = "\n".join(lines) + "\n" + _WRAPPER
    if handler.wrapper_walltime and spec.walltime is not None:
        head += _WATCHDOG.format(seconds=math.ceil(spec.walltime.total_seconds()))
    body = spec.user_script()
    if not body.endswith(b"\n"):
        body += b"\n"
    delim = _heredoc_delimiter(body)
    args = (" " + join(spec.arguments)) if spec.arguments else ""
    # The job's environment is exported last, so that a PATH of the user's
    # cannot break the wrapper's own commands.
    env_lines = "".join(f"export {k}={quote(v)}\n" for k, v in spec.environment.items())
    if env_lines:
        env_lines = "# ---- the job's environment ----\n" + env_lines
    container, launch = "", USER_SCRIPT
    if spec.container_image is not None:
        container, launch = container_launch(container_runtime, spec.container_image)
        container = "# ---- the job runs in a container image ----\n" + container
    return (
        head.encode("utf-8", "surrogateescape")
        + b"# ---- the user's script ----\n"
        + f"cat >{USER_SCRIPT} <<'{delim}'\n".encode()
        + body
        + f"{delim}\n".encode()
        + _RUN.format(args=args, env=env_lines, container=container,
                      launch=launch).encode("utf-8", "surrogateescape")
    )
