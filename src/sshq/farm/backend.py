"""What the farm needs of the client: a narrow, typed seam.

:class:`sshq.AsyncClient` satisfies :class:`FarmBackend`; the farm's modules
(:mod:`sshq.farm.run`, :mod:`sshq.farm.detached`) take one instead of the
whole client, and use nothing else of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..config import Config, Platform
from ..model import Job, JobSpec
from ..transport import Transport

__all__ = ["FarmBackend"]


class FarmBackend(Protocol):
    """Configuration, state, transports, and pilot-job submission for the farm."""

    @property
    def config(self) -> Config:
        """The platforms (``--hosts`` and ``--via`` name them)."""
        ...

    @property
    def state_dir(self) -> Path:
        """The state directory: runs live under ``<state_dir>/farm/``."""
        ...

    def transport(self, platform: Platform, host: str) -> Transport:
        """The transport to one host of a platform (shared, not closed by the farm)."""
        ...

    async def submit(self, specs: Sequence[JobSpec], *, platform: str) -> list[Job]:
        """Submit jobs to a platform's job runner (``--via``'s pilot jobs), one
        :class:`~sshq.model.Job` per spec, in order (a refusal is a job in a
        final state with a message, not an exception).

        Raises:
            SshqError: the whole batch could not be submitted.
        """
        ...

    async def poll(self, ids: Sequence[int]) -> list[Job]:
        """The current state of jobs by sshq id (the pilot jobs).

        Raises:
            SshqError: the states could not be read.
        """
        ...
