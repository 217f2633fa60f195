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

__all__ = ["LAUNCH", "NO_ENV_MARK", "launch_argv"]

#: Printed (on stderr, exit 125) when the job never wrote its environment.
NO_ENV_MARK = "sshq-ssh-to-job: no job environment"

#: $1 env file, $2 work dir, $3 "shell" or "command", $4 the command.  A job
#: the runner reports running may not have reached its wrapper yet: wait up to
#: 30 s for the environment file rather than run without it.
LAUNCH = (
    'n=0; while [ ! -r "$1" ] && [ $n -lt 60 ]; do sleep 0.5; n=$((n+1)); done; '
    f'[ -r "$1" ] || {{ echo "{NO_ENV_MARK} ($1): the job has not started its script yet"'
    ' >&2; exit 125; }; '
    'set -a; . "$1" 2>/dev/null; set +a; cd "$2" || exit 1; '
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
