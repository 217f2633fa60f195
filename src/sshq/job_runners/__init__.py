"""Job runner handlers, one small pure module each.

:data:`JOB_RUNNERS` lists every job runner by name; the handler of ``NAME``
is ``HANDLER`` in ``job_runners/NAME.py``, imported on first use (no plugin
scanning).  Adding a job runner: write that module (a
:class:`~sshq.job_runners.base.JobRunnerHandler` subclass and ``HANDLER``),
add its name here, and its tests; the runner contract suite
(``tests/test_runner_contract.py``) covers it automatically.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping
from functools import cache

from ..exceptions import ConfigError
from .base import JobRunnerHandler, RunnerJobState

__all__ = ["HANDLERS", "JOB_RUNNERS", "get_handler", "JobRunnerHandler", "RunnerJobState"]

#: Every job runner sshq knows, by name.
JOB_RUNNERS = ("background", "slurm", "sge", "pbs", "lsf", "htcondor")


@cache
def _available() -> tuple[str, ...]:
    return tuple(n for n in JOB_RUNNERS if importlib.util.find_spec(f"{__name__}.{n}"))


@cache
def _load(name: str) -> JobRunnerHandler:
    handler: JobRunnerHandler = importlib.import_module(f"{__name__}.{name}").HANDLER
    return handler


class _Registry(Mapping[str, JobRunnerHandler]):
    """Read-only mapping of job runner name to handler, importing on first use."""

    def __getitem__(self, name: str) -> JobRunnerHandler:
        if name not in _available():
            raise KeyError(name)
        return _load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_available())

    def __len__(self) -> int:
        return len(_available())

    def __contains__(self, name: object) -> bool:
        return name in _available()


#: name -> handler for every available job runner.
HANDLERS: Mapping[str, JobRunnerHandler] = _Registry()


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
