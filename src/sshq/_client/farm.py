"""The task farm's entry points (part of :class:`sshq.AsyncClient`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core import ClientCore

log = logging.getLogger("sshq.client")


class FarmClient(ClientCore):
    """farm, farm_attach (the farm itself is :mod:`sshq.farm`)."""

    async def farm(
        self, batch_file: str | Path | None = None, *, hosts: Sequence[str] = (),
        out: Any, run: str | None = None, resume: str | None = None,
        slots: int | None = None, retries: int = 0, timeout: float | None = None,
        speculate: bool = True, keep_order: bool = False,
        output_dir: str | Path | None = None, deps: str | Path | None = None,
        detach: bool = False, via: str | None = None, nodes: int = 1,
        walltime: str | None = None, fmt: str = "jsonl",
        on_name: Any = None, warn: Any = None,
    ) -> Any:
        """Run a batch of shell commands over hosts' cores (``sshq farm``).

        Args:
            batch_file: one shell command per line (None with ``resume``).
            hosts: platform names or ``[user@]host[:port]`` destinations.
            out: a binary stream for results in ``fmt`` (``jsonl``, ``anet``),
                or a callable given each :class:`sshq.farm.output.TaskResult`
                as soon as it is final.
            run: the run's name (default: generated).
            resume: resume this run: only tasks without a reported result.
            slots: tasks at once per host (default: its cores).
            retries: re-runs of a failed task.
            timeout: seconds before a task is killed.
            speculate: start stragglers again on idle hosts.
            keep_order: report in input order.
            output_dir: write outputs to files there.
            deps: directory rsynced to every host first; tasks run in its copy.
            detach: leave the tasks with detached workers (see :meth:`farm_attach`).
            via: a platform whose job runner runs ``nodes`` pilot jobs
                (walltime ``walltime``) instead of ``hosts``.
            on_name: called with the run's name before anything runs.
            warn: called with warnings (a host dropped, ...).

        Returns:
            ``(run name, sshq.farm.engine.FarmStats)``.

        Raises:
            ConfigError: bad options, unknown hosts or run.
            SshqError: every host failed (resume later).
        """
        from ..farm.engine import FarmOptions
        from ..farm.run import FarmRequest, run_farm

        req = FarmRequest(
            batch=Path(batch_file) if batch_file is not None else None, hosts=list(hosts),
            run=run, resume=resume, fmt=fmt, deps=Path(deps) if deps is not None else None,
            detach=detach, via=via, nodes=nodes, walltime=walltime,
            options=FarmOptions(slots=slots, retries=retries, timeout=timeout,
                                speculate=speculate, keep_order=keep_order,
                                output_dir=Path(output_dir) if output_dir else None))
        return await run_farm(self, req, out, on_name=on_name or (lambda n: None),
                              warn=warn or (lambda m: None))

    async def farm_attach(self, name: str, *, out: Any, warn: Any = None) -> Any:
        """Collect the results of detached farm run ``name`` (each reported once).

        Args:
            name: the run.
            out: as for :meth:`farm`.
            warn: called with warnings.

        Returns:
            The run's ``sshq.farm.engine.FarmStats``.

        Raises:
            ConfigError: no such run, or it was not detached.
            SshqError: a host stayed unreachable (attach again later).
        """
        from ..farm.run import attach_run

        return await attach_run(self, name, out, warn=warn or (lambda m: None))
