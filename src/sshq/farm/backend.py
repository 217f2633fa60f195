"""What the farm needs of the client: a narrow, typed seam.

:class:`sshq.AsyncClient` satisfies :class:`FarmBackend`; the farm's modules
(:mod:`sshq.farm.run`, :mod:`sshq.farm.detached`) take one instead of the
whole client.
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
    """Configuration, state, transports, and pilot-job submission for the farm.

    Attributes:
        config: the platforms.
        state_dir: the state directory (runs' journals live under it).
    """

    config: Config
    state_dir: Path

    def transport(self, platform: Platform, host: str) -> Transport:
        """The (cached) transport to one host of a platform."""
        ...

    async def submit(self, specs: JobSpec | Sequence[JobSpec], *,
                     platform: str = "localhost") -> list[Job]:
        """Submit jobs (pilot jobs, with ``via``)."""
        ...

    async def poll(self, ids: Sequence[int] | None = None, *, all: bool = False) -> list[Job]:
        """Update jobs' states (pilot jobs)."""
        ...
