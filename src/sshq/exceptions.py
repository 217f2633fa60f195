"""The exceptions sshq raises.

Every exception derives from :class:`SshqError`. Each class says whether the
failure is *transient* (worth retrying later: a host down, a job runner that
timed out) and carries the ``exit_code`` the command-line interface exits
with.  A failure of one job inside a batch is data in the result (its
``state`` and ``message``); only a failure of the whole batch raises.

::

    SshqError                       exit 1
    ├── ConfigError                 exit 2   bad platforms file or unknown platform
    ├── InvalidInputError           exit 2   a job spec field refused before anything is sent
    │   └── RestrictedPlatformError exit 2   the client refused it: the key is restricted
    ├── UnknownJobError             exit 2   an sshq id not in the local store
    ├── JobNotRunningError          exit 2   ssh-to-job on a job that is not running
    ├── TransportError              exit 3   bytes could not reach the host
    │   ├── HostUnreachableError    exit 3   transient: refused, timed out, DNS, link down
    │   ├── AuthenticationError     exit 4   the server refused every credential we offered
    │   ├── HostKeyError            exit 5   host key unknown or changed (strict checking)
    │   └── CommandError            exit 3   the remote command could not be started
    ├── RemoteError                 exit 6   the remote agent failed or replied nonsense
    │   ├── JobRunnerError          exit 6   the job runner's command failed for the batch
    │   └── RestrictedError         exit 6   a restricted key's agent refused the request
    ├── WaitTimeoutError            exit 124 ``sshq wait --timeout`` ran out
    ├── EnvironmentMismatchError    exit 2   Executor: the remote Python or cloudpickle differs
    ├── RemoteFunctionError         exit 1   Executor: a remote call raised an exception
    │                                        that cannot be rebuilt here
    └── JobFailedError              exit 1   Executor: a call's job ended without a result
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Job

__all__ = [
    "SshqError",
    "ConfigError",
    "InvalidInputError",
    "RestrictedPlatformError",
    "UnknownJobError",
    "JobNotRunningError",
    "TransportError",
    "HostUnreachableError",
    "AuthenticationError",
    "HostKeyError",
    "CommandError",
    "RemoteError",
    "JobRunnerError",
    "RestrictedError",
    "WaitTimeoutError",
    "EnvironmentMismatchError",
    "RemoteFunctionError",
    "JobFailedError",
]


class SshqError(Exception):
    """Root of every sshq error.

    Attributes:
        transient: True when retrying later may succeed.
        exit_code: the CLI's exit status for this error.
    """

    transient: bool = False
    exit_code: int = 1


class ConfigError(SshqError):
    """The platforms file is invalid, or a platform name is unknown."""

    exit_code = 2


class InvalidInputError(SshqError):
    """A job spec, name, environment key or directive value was refused.

    Raised before anything is sent to a host.
    """

    exit_code = 2


class RestrictedPlatformError(InvalidInputError):
    """Refused by the client, before connecting: the platform's agent is
    installed (``agent = "installed"``), so its key may only manage sshq jobs
    under its run directory, and the request is something that key's agent
    would refuse (a direct farm, ``farm find``/``killall``, ssh-to-job, a path
    leaving the run directory, ...).  The remote counterpart, when only the
    host can tell, is :class:`RestrictedError`.  Raised by
    :func:`sshq.remote.installed.refuse_if_restricted`.
    """


class UnknownJobError(SshqError):
    """An sshq job id is not in the local state database."""

    exit_code = 2


class JobNotRunningError(SshqError):
    """The operation needs a running job (``ssh-to-job``); the message says its state."""

    exit_code = 2


class TransportError(SshqError):
    """Bytes could not reach a host, or the remote command could not run.

    Attributes:
        host: the host (as configured) the failure is about.
        command_sent: True when the command may have started before the
            failure (then re-running it could repeat its effects).
    """

    exit_code = 3

    def __init__(self, message: str, *, host: str = "", command_sent: bool = False) -> None:
        super().__init__(message)
        self.host = host
        self.command_sent = command_sent


class HostUnreachableError(TransportError):
    """Connection refused, timed out, name not resolved or link lost."""

    transient = True


class AuthenticationError(TransportError):
    """The SSH server refused every key (and method) offered."""

    exit_code = 4


class HostKeyError(TransportError):
    """The host key is not in known_hosts, or differs from the recorded one.

    Attributes:
        fingerprint: the SHA256 fingerprint the server offered ('' if unknown).
        changed: True when known_hosts holds a *different* key for the host.
    """

    exit_code = 5

    def __init__(
        self, message: str, *, host: str = "", fingerprint: str = "", changed: bool = False
    ) -> None:
        super().__init__(message, host=host)
        self.fingerprint = fingerprint
        self.changed = changed


class CommandError(TransportError):
    """The remote command could not be started (e.g. python3 not found)."""


class RemoteError(SshqError):
    """The remote agent failed, or its reply could not be read."""

    exit_code = 6


class JobRunnerError(RemoteError):
    """The job runner's command failed for the whole batch.

    Attributes:
        stderr: the command's standard error, decoded with replacement characters.
    """

    def __init__(self, message: str, *, stderr: str = "", transient: bool = False) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.transient = transient


class RestrictedError(RemoteError):
    """The installed agent behind a restricted key (``sshq agent install``;
    :mod:`sshq.shipped.sshq_restricted`) refused the request: an operation
    it never carries out (``procs``, installing the agent, ...) or a path,
    job runner or command outside what the key may do.  Nothing was done.
    Raised where the client reads the agent's reply (the refusal is its
    error frame, marked ``restricted``); the message is
    ``"<host>: refused by the restricted sshq agent: <why>"``, where the
    agent's reason starts with ``restricted``.  Not transient: asking again
    is refused again.

    Attributes:
        reason: the agent's own one-line reason (``"restricted: ..."``).
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class WaitTimeoutError(SshqError):
    """Jobs were still not final when the wait timeout ran out."""

    exit_code = 124


class EnvironmentMismatchError(SshqError):
    """The remote interpreter of :class:`sshq.Executor` cannot run this client's calls.

    Raised by the pre-flight check, before anything is queued: the remote
    Python's major.minor version or its cloudpickle version differs from this
    client's (or it cannot be started, or has no cloudpickle).

    Attributes:
        host: the host checked (as the transport labels it).
        python: the remote interpreter (as configured or given).
        remote_python: its version (``"3.11.2"``), '' if unknown.
        remote_cloudpickle: its cloudpickle version, '' if none.
        local_python: this client's Python version.
        local_cloudpickle: this client's cloudpickle version.
    """

    exit_code = 2

    def __init__(self, message: str, *, host: str = "", python: str = "",
                 remote_python: str = "", remote_cloudpickle: str = "",
                 local_python: str = "", local_cloudpickle: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.python = python
        self.remote_python = remote_python
        self.remote_cloudpickle = remote_cloudpickle
        self.local_python = local_python
        self.local_cloudpickle = local_cloudpickle


class RemoteFunctionError(SshqError):
    """A call run by :class:`sshq.Executor` raised, and its exception could
    not be rebuilt here (not picklable there, or its class not importable here);
    also a return value that could not be pickled or passed the size limit.

    Attributes:
        remote_type: the remote exception's class, ``module.QualName``.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback, as text.
    """

    def __init__(self, message: str, *, remote_type: str = "", remote_message: str = "",
                 remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class JobFailedError(SshqError):
    """A call of :class:`sshq.Executor` ended without a result: its job was
    refused, killed, ran out of walltime or memory, or its node failed (or,
    with ``hosts``, its farm task failed).

    Attributes:
        id: the sshq id of the job (None for a farm task).
        state: the job's final state (``failed``, ``submit-failed``, ...).
        exit_status: the job's exit status, None when a signal ended it or
            none was recorded.
        signal: the signal's name (``TERM``, ``KILL``, ``XCPU``) or None.
        err_tail: the last bytes of the job's ``job.err`` (the task's stderr),
            decoded with replacement characters; '' if none could be read.
        job: the latest :class:`~sshq.model.Job` (None for a farm task).
    """

    def __init__(self, message: str, *, id: int | None = None, state: str = "",
                 exit_status: int | None = None, signal: str | None = None,
                 err_tail: str = "", job: Job | None = None) -> None:
        super().__init__(message)
        self.id = id
        self.state = state
        self.exit_status = exit_status
        self.signal = signal
        self.err_tail = err_tail
        self.job = job
