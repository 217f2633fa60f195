"""The task farm's entry points: the farm part of :class:`sshq.AsyncClient`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the farm is imported only when used: CLI start-up)
    from ..farm.backend import FarmBackend
    from ..farm.engine import FarmStats
    from ..farm.output import ResultSink

log = logging.getLogger("sshq.client")


class Farm:
    """farm, farm_attach (the farm itself is :mod:`sshq.farm`).

    Args:
        backend: what the farm needs of the client (its config, state dir,
            transports, submit and poll): the :class:`sshq.AsyncClient`.
    """

    def __init__(self, backend: FarmBackend) -> None:
        self.backend = backend

    async def farm(
        self, batch_file: str | Path | None = None, *, hosts: Sequence[str] = (),
        out: ResultSink, run: str | None = None, resume: str | None = None,
        slots: int | None = None, retries: int = 0, timeout: float | None = None,
        speculate: bool = True, keep_order: bool = False,
        output_dir: str | Path | None = None, deps: str | Path | None = None,
        detach: bool = False, via: str | None = None, nodes: int = 1,
        walltime: str | None = None, fmt: str = "jsonl",
        on_name: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> tuple[str, FarmStats]:
        """Run a batch of shell commands over hosts' cores (``sshq farm``).

        Each task's result is reported exactly once, as soon as it is
        final; the run's journal lives in the state directory, so a run cut
        short can be resumed.

        Args:
            batch_file: one shell command per line (None with ``resume``).
            hosts: platform names or ``[user@]host[:port]`` destinations
                (``~/.ssh/config`` aliases work); ignored with ``via``.
            out: a binary stream for results in ``fmt``, or a callable given
                each :class:`sshq.farm.output.TaskResult` as soon as it is
                final.
            run: the run's name (default: generated).
            resume: resume this run: only tasks without a reported result
                (its other options are the recorded ones unless given).
            slots: tasks at once per host (default: its cores).
            retries: re-runs of a failed task.
            timeout: seconds before a task is killed; None for no limit.
            speculate: start stragglers again on idle hosts (the first copy
                to finish wins, the others are killed).
            keep_order: report in input order.
            output_dir: local directory; each task's output goes to files
                there instead of into the results.  Without it, a stream
                longer than 4 MiB (:data:`sshq.farm.output.INLINE_MAX`) goes
                to ``<state dir>/farm/<run>/output/<seq>.stdout`` (or
                ``.stderr``), named in the result (``stdout_file``) instead of
                carried in it: memory stays bounded whatever a task prints.
            deps: local directory rsynced to every host first; tasks run in
                its copy (under the platform's ``run_dir``).
            detach: leave the tasks with detached workers on the hosts and
                return at once (collect with :meth:`farm_attach`).
            via: a platform whose job runner runs ``nodes`` pilot jobs
                instead of ``hosts``.
            nodes: with ``via``: the number of pilot jobs.
            walltime: with ``via``: the pilot jobs' walltime, ``HH:MM:SS``.
            fmt: the results' format on a stream ``out``: ``jsonl`` (one JSON
                object a line) or ``anet`` (ANet's binary framing).
            on_name: called with the run's name before anything runs.
            warn: called with one-line warnings (a host dropped, ...).

        Returns:
            ``(run name, sshq.farm.engine.FarmStats)``; with ``detach``, the
            stats count only the tasks handed to the workers.

        Raises:
            ConfigError: the run is in use by another client (its pid and
                host named), bad options, unknown hosts, no such run to resume,
                a detached run to resume (use :meth:`farm_attach`), an
                unreadable batch file or ``deps`` not a directory.
            RemoteError: a host's dispatcher did not start, or (``via``) the
                job runner refused the pilot jobs.
            SshqError: every host failed; tasks without a result stay in the
                journal (resume later).
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
        return await run_farm(self.backend, req, out, on_name=on_name or (lambda n: None),
                              warn=warn or (lambda m: None))

    async def farm_attach(self, name: str, *, out: ResultSink, fmt: str | None = None,
                          warn: Callable[[str], None] | None = None) -> FarmStats:
        """Collect the results of detached farm run ``name`` (each reported once).

        Args:
            name: the run.
            out: as for :meth:`farm`.
            fmt: ``jsonl`` or ``anet`` for a stream ``out`` (None: the run's format).
            warn: called with warnings (unreachable hosts, bogus results in a
                spool, output written to files).

        Returns:
            The run's ``sshq.farm.engine.FarmStats``.

        Raises:
            ConfigError: no such run, it was not detached, or it is in use
                by another client (its pid and host named).
            SshqError: a host stayed unreachable (attach again later).
        """
        from ..farm.run import attach_run

        return await attach_run(self.backend, name, out, fmt=fmt, warn=warn or (lambda m: None))
