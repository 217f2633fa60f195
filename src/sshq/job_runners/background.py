"""Background jobs: detached on the login host, the process id as job id.

Submission runs the job file under ``setsid`` (so the job has its own
session and outlives the SSH channel), stdin from ``/dev/null`` and stdout /
stderr into the job log directory, and prints the pid.  Polling asks ``ps``
for the pids; killing sends ``TERM`` to the job wrapper, which forwards it to
the user's processes and records the signal in the job status file.
"""

from __future__ import annotations

from ..exceptions import JobRunnerError
from ..model.job_spec import JobSpec
from .base import IDS, JobRunnerHandler, RunnerJobState, one_line

__all__ = ["BackgroundHandler", "HANDLER"]

# A fixed sh program; the job file and log paths arrive as positional
# parameters, never inside the program text.
_LAUNCH = (
    'if command -v setsid >/dev/null 2>&1; then setsid "$1" </dev/null >"$2" 2>"$3" &'
    ' else nohup "$1" </dev/null >"$2" 2>"$3" & fi; echo "$!"'
)


class BackgroundHandler(JobRunnerHandler):
    """Background (no batch system) job runner handler."""

    name = "background"
    directive_prefix = ""
    job_id_regex = r"^(?P<id>\d+)\s*$"
    poll_command = ("ps", "-o", "pid=,stat=", "-p", IDS)
    kill_command = ("kill", "-s", "TERM", IDS)
    ids_sep = None
    wrapper_walltime = True
    runs_on_submit_host = True

    def directives(self, spec: JobSpec, job_log_dir: str) -> list[str]:
        self.refuse(
            spec, "nodes", "tasks", "cpus", "memory", "queue", "account",
            "mail_user", "mail_events", "directives",
        )
        return []

    def submit_argv(self, job_file: str, job_log_dir: str) -> list[str]:
        return [
            "/bin/sh", "-c", _LAUNCH, "sshq-background",
            job_file, f"{job_log_dir}/job.out", f"{job_log_dir}/job.err",
        ]

    def parse_poll(
        self, exit_status: int, stdout: str, stderr: str
    ) -> dict[str, RunnerJobState]:
        # ps exits 1 with no output when none of the pids exists.
        if exit_status not in (0, 1) or (exit_status == 1 and stderr.strip()):
            raise JobRunnerError(
                f"ps failed (exit {exit_status}): {one_line(stderr)}", stderr=stderr, transient=True
            )
        known: dict[str, RunnerJobState] = {}
        for line in stdout.splitlines():
            parts = line.split()
            if not parts or not parts[0].isdigit():
                continue
            stat = parts[1] if len(parts) > 1 else ""
            if stat.startswith("Z"):  # a zombie has exited already
                continue
            known[parts[0]] = RunnerJobState(parts[0], True, stat)
        return known


HANDLER = BackgroundHandler()
