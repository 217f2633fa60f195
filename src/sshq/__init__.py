"""sshq: manage jobs on remote clusters and hosts you can only reach by SSH.

Quick start::

    from sshq import Client, JobSpec

    with Client() as client:
        (job,) = client.submit(JobSpec(command="echo hello"), platform="localhost")
        (job,) = client.wait([job.id])
        print(job.state, client.cat_log(job.id).decode())
"""

from typing import TYPE_CHECKING

from .client import AsyncClient, Client
from .config import Config, Platform, load_config
from .exceptions import (
    AuthenticationError,
    CommandError,
    ConfigError,
    EnvironmentMismatchError,
    HostKeyError,
    HostUnreachableError,
    InvalidInputError,
    JobFailedError,
    JobNotRunningError,
    JobRunnerError,
    RemoteError,
    RemoteFunctionError,
    RestrictedError,
    RestrictedPlatformError,
    SshqError,
    TransportError,
    UnknownJobError,
    WaitTimeoutError,
)
from .model import Job, JobSpec, JobState

if TYPE_CHECKING:
    from .executor import CallFuture, Executor

#: The one version source (pyproject.toml reads it; ``sshq --version`` prints it).
__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Config",
    "Platform",
    "load_config",
    "Job",
    "JobSpec",
    "JobState",
    "SshqError",
    "ConfigError",
    "InvalidInputError",
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
    "RestrictedPlatformError",
    "WaitTimeoutError",
    "EnvironmentMismatchError",
    "RemoteFunctionError",
    "JobFailedError",
    "Executor",
    "CallFuture",
]


def __getattr__(name: str) -> object:
    # sshq.Executor is imported on first use (the CLI's start-up never needs it)
    if name in ("Executor", "CallFuture"):
        from . import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'sshq' has no attribute {name!r}")
