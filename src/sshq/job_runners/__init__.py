"""Job runner handlers, one small pure module each.

Adding a job runner: write ``job_runners/NAME.py`` with a
:class:`~sshq.job_runners.base.JobRunnerHandler` subclass and ``HANDLER``,
then add it to :data:`HANDLERS` below.
"""

from __future__ import annotations

from ..exceptions import ConfigError
from . import background, slurm
from .base import JobRunnerHandler, RunnerJobState

__all__ = ["HANDLERS", "get_handler", "JobRunnerHandler", "RunnerJobState"]

HANDLERS: dict[str, JobRunnerHandler] = {
    h.name: h for h in (slurm.HANDLER, background.HANDLER)
}


def get_handler(name: str) -> JobRunnerHandler:
    """The handler for a job runner name.

    Raises:
        ConfigError: no such job runner.
    """
    try:
        return HANDLERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown job runner {name!r}; known: {', '.join(sorted(HANDLERS))}"
        ) from None
