"""Running a job's script inside a container image (``JobSpec.container_image``).

The platform's ``container_runtime`` says how:

* ``apptainer`` / ``singularity`` (HPC sites): ``apptainer exec --pwd WORK
  --bind LOGDIR IMAGE job.user ARGS`` (``apptainer exec`` in the Apptainer
  user guide); the home directory, /tmp and the environment pass through
  by default.
* ``podman``: ``podman run --rm --name NAME --network=host --userns=keep-id
  --env-host -v LOGDIR:LOGDIR -v WORK:WORK -w WORK IMAGE job.user ARGS``
  (podman-run(1)); the container gets a unique name so that
  ``sshq ssh-to-job`` can ``podman exec`` into the very same container.

The wrapper records the runtime, the command it resolved to (with the
wrapper's PATH), the image and (podman) the container name in the job
status file, under the keys :data:`sshq.shipped.sshq_jobstatus.CONTAINER_PREFIX` +
``RUNTIME``, ``COMMAND``, ``IMAGE`` and ``NAME``.  A killed
podman job's container is stopped by the wrapper's signal handler (``podman
stop -t 2``: the container's processes live under conmon, outside the
job's process group).
"""

from __future__ import annotations

from ..quoting import quote
from ..shipped import sshq_jobstatus as js

__all__ = ["CONTAINER_RUNTIMES", "USER_SCRIPT", "container_launch"]

#: Accepted values of a platform's ``container_runtime``.
CONTAINER_RUNTIMES = ("apptainer", "singularity", "podman")

#: The user's script in the job log directory, as the wrapper names it.
USER_SCRIPT = f'"$SSHQ_JOB_LOG_DIR/{js.USER_SCRIPT_FILE}"'


def container_launch(runtime: str, image: str) -> tuple[str, str]:
    """Shell text for running the user script in ``image``.

    Args:
        runtime: one of :data:`CONTAINER_RUNTIMES`.
        image: the image reference or path (validated by ``JobSpec``).

    Returns:
        ``(prologue, command)``: lines that record the container in the job
        status file, and the command that replaces the plain
        ``"$SSHQ_JOB_LOG_DIR/job.user"`` (the script's arguments follow it).

    Raises:
        ValueError: unknown runtime.
    """
    if runtime not in CONTAINER_RUNTIMES:
        raise ValueError(f"unknown container runtime {runtime!r}")
    img = quote(image)
    key = js.CONTAINER_PREFIX
    # found with the wrapper's PATH, not the job's (which is meant for the image)
    prologue = (f"sshq__rt=$(PATH=$sshq__path command -v {runtime}) || sshq__rt={runtime}\n"
                f"sshq__record {key}RUNTIME {runtime}\n"
                f'sshq__record {key}COMMAND "$sshq__rt"\n'
                f"sshq__record {key}IMAGE {img}\n")
    if runtime == "podman":
        prologue += ('sshq__ctr="sshq-$(hostname -s 2>/dev/null || uname -n)-$$-$RANDOM"\n'
                     f'sshq__record {key}NAME "$sshq__ctr"\n')
        # --init: PID 1 forwards signals, so a TERM ends the user's script
        command = ('"$sshq__rt" run --rm --init --name "$sshq__ctr" --network=host'
                   ' --userns=keep-id --env-host -v "$SSHQ_JOB_LOG_DIR:$SSHQ_JOB_LOG_DIR"'
                   ' -v "$SSHQ_WORK_DIR:$SSHQ_WORK_DIR" -w "$SSHQ_WORK_DIR"'
                   f" {img} {USER_SCRIPT}")
    else:
        command = ('"$sshq__rt" exec --pwd "$SSHQ_WORK_DIR" --bind "$SSHQ_JOB_LOG_DIR"'
                   f" {img} {USER_SCRIPT}")
    return prologue, command
