"""SSH to job: a shell (or one command) inside a running job's environment.

After HTCondor's ``condor_ssh_to_job`` (seed 004), for every job runner and
without asking admins for anything:

- the job wrapper saves the job's environment in ``job.env`` (``export -p``
  output, mode 0600) in the job log directory;
- a fixed bash program (:data:`LAUNCH`) loads it, enters the job's work
  directory and runs the user's shell or one command;
- the job runner's handler says how to get *inside* the job: Slurm through
  ``srun --jobid=ID --overlap`` (the job's allocation and cgroup), background
  jobs directly on the host they run on.

Everything user-supplied travels as positional parameters of LAUNCH, never
inside its text.
"""

from __future__ import annotations

from ..quoting import join
from ..shipped import sshq_jobstatus as js

__all__ = ["HOP", "HOP_MARK", "LAUNCH", "NO_ENV_MARK", "hop_argv", "launch_argv"]

#: Printed (on stderr, exit 125) when the job never wrote its environment.
NO_ENV_MARK = "sshq-ssh-to-job: no job environment"

#: $1 env file, $2 work dir, $3 "shell" or "command", $4 the command.  A job
#: the runner reports running may not have reached its wrapper yet: wait up to
#: 30 s for the environment file rather than run without it.  When the job
#: status file (next to the env file) records a container, the shell or
#: command runs there: ``podman exec`` into the job's own container, or
#: ``apptainer exec`` of the job's image (sshq.jobscript.container); inside,
#: the job's $SHELL if the image has it, else /bin/sh.
LAUNCH = (
    'n=0; while [ ! -r "$1" ] && [ $n -lt 60 ]; do sleep 0.5; n=$((n+1)); done; '
    f'[ -r "$1" ] || {{ echo "{NO_ENV_MARK} ($1): the job has not started its script yet"'
    ' >&2; exit 125; }; '
    'set -a; . "$1" 2>/dev/null; set +a; cd "$2" || exit 1; '
    f's="${{1%/*}}/{js.STATUS_FILE}"; '
    f'k() {{ sed -n "s/^{js.CONTAINER_PREFIX}$1=//p" "$s" 2>/dev/null | tail -n 1; }}; '
    'rt=$(k RUNTIME); '
    'if [ -n "$rt" ]; then '
    '  if [ "$3" = shell ]; then '
    """    set -- "$1" "$2" "$3" 'if [ -x "$SHELL" ]; then exec "$SHELL"; fi; exec /bin/sh'; """
    '  fi; '
    '  x=$(k COMMAND); x=${x:-$rt}; '
    '  if [ "$rt" = podman ]; then c=$(k NAME); n=0; '
    """    while [ "$("$x" container inspect -f '{{.State.Running}}' "$c" 2>/dev/null)" != true ]"""
    '    && [ $n -lt 60 ]; do sleep 0.5; n=$((n+1)); done; '
    f'    [ $n -lt 60 ] || {{ echo "{NO_ENV_MARK} ($c): the job\'s container is not running"'
    ' >&2; exit 125; }; '
    '    t=-i; [ -t 0 ] && t=-it; '
    '    exec "$x" exec $t -w "$2" "$c" /bin/sh -c "$4"; fi; '
    '  exec "$x" exec --pwd "$2" "$(k IMAGE)" /bin/sh -c "$4"; '
    'fi; '
    'if [ "$3" = shell ]; then exec "${SHELL:-/bin/bash}"; fi; exec /bin/bash -c "$4"'
)


def launch_argv(env_file: str, work_dir: str, command: str | None) -> list[str]:
    """The argv that runs a shell (``command`` None) or ``command`` in the job's env.

    Args:
        env_file: absolute path of the job's ``job.env``.
        work_dir: absolute work directory of the job.
        command: a shell command line, or None for an interactive shell.
    """
    mode = "shell" if command is None else "command"
    return ["/bin/bash", "-c", LAUNCH, "sshq-ssh-to-job", env_file, work_dir, mode,
            command or ""]


#: Printed (stderr, exit 255) when the login node cannot reach the execution host.
HOP_MARK = "sshq-ssh-to-job: execution host unreachable"

#: Run on the login node: $1 the execution host, $2 -tt or -T, $3 the command
#: line for the execution host's shell (quoted by sshq.quoting.join), then the
#: same command as an argv.  Where the execution host is this host the argv
#: runs here; otherwise ssh from the login node takes it there (the login
#: node's keys, known_hosts and host-based auth: nothing sshq stores).
HOP = (
    'h=$1; t=$2; c=$3; shift 3; '
    'if [ "$h" = "$(hostname)" ] || [ "$h" = "$(hostname -s 2>/dev/null)" ]'
    ' || [ "$h" = localhost ]; then exec "$@"; fi; '
    'ssh -o BatchMode=yes -o ConnectTimeout=10 $t "$h" "$c"; rc=$?; '
    f'[ $rc -eq 255 ] && echo "{HOP_MARK} from $(hostname): $h" >&2; exit $rc'
)


def hop_argv(exec_host: str, inner: list[str], *, tty: bool) -> list[str]:
    """The argv (for the login node) that runs ``inner`` on ``exec_host``.

    Args:
        exec_host: the job's execution host (``JobStatus.host``).
        inner: the argv to run there.
        tty: allocate a terminal on the second hop.
    """
    return ["/bin/sh", "-c", HOP, "sshq-hop", exec_host, "-tt" if tty else "-T",
            join(inner), *inner]
