"""Operations on a platform host through the remote agent.

Each call is one SSH command (one agent call), whatever the number of jobs.
The agent's operations (``OPS`` in :mod:`sshq.shipped.agent`):

- ``init``: remote-init: resolve the run directory, write its UUID file;
- ``submit``: write job files and run the job runner's submit command;
- ``poll``: read job status files, query the job runner for the others;
- ``kill``: run the job runner's kill command, wait for the status files;
- ``read``: bytes of one file from an offset (``cat_log``);
- ``follow``: stream appended bytes until the job records an exit
  (:func:`stream_agent`; every other operation is :func:`call_agent`);
- ``listing``: sizes and times of the files under a directory (SFTP install);
- ``tidy``: remove sshq's service files from the run directory.
- ``procs``: the login user's processes whose command line holds a pattern,
  signalled on request (``sshq farm find``/``killall``, :mod:`sshq.farm.procs`).
- ``pyenv``: the Python and cloudpickle versions of an interpreter, and
  optionally remote-init's facts (:class:`sshq.Executor`'s pre-flight check);
- ``read_many``: bounded bytes of several files in one call (the results of
  :class:`sshq.Executor`'s calls and the tails of their ``job.err``).
- ``install_agent``: write the installed agent's files into ``~/.sshq``,
  checked by sha256 (``sshq agent install``, :mod:`sshq.remote.installed`).
- ``fs``: one filesystem operation (ls, stat, read, mkdir, rm, upload) confined
  to the directories named (symbolic links resolved): ``sshq serve``'s
  FirecREST ``ops`` routes (:mod:`sshq.server.firecrest`).

With ``installed`` (a platform's ``agent = "installed"``) each call runs the
agent installed by ``sshq agent install`` and sends only the request; behind
a restricted key (:mod:`sshq.shipped.sshq_restricted`) it refuses what is not
job management under its run directory, and the error says so.

Inputs and outputs are plain data; deciding states is
:mod:`sshq.remote.status`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..exceptions import CommandError, RemoteError
from ..job_runners import JobRunnerHandler
from ..transport import Transport
from .protocol import INSTALLED_AGENT, MAX_REPLY, FrameParser, agent_argv, encode_request

__all__ = ["call_agent", "stream_agent", "runner_templates"]

log = logging.getLogger(__name__)


def _no_reply(transport: Transport, python: str, exit_status: int, stderr: bytes,
              installed: bool = False) -> Exception:
    err = stderr.decode("utf-8", "replace").strip()
    if installed and INSTALLED_AGENT in err and ("No such file" in err or "can't open" in err):
        return CommandError(
            f"{transport.host}: no sshq agent is installed ({err or 'no output'}); run"
            " `sshq agent install` for the platform", host=transport.host)
    if exit_status == 127 or "not found" in err.lower() or "No such file" in err:
        return CommandError(
            f"{transport.host}: cannot start the remote agent with {python!r}"
            f" (exit {exit_status}): {err or 'no output'}; set `python` in the platform"
            " to a Python 3.6+ interpreter",
            host=transport.host,
        )
    return RemoteError(
        f"{transport.host}: the remote agent gave no reply (exit {exit_status}):"
        f" {err or 'no output'}"
    )


async def call_agent(
    transport: Transport,
    python: str,
    op: str,
    payload: dict[str, Any],
    *,
    timeout: float | None = 300.0,
    login_shell: bool = False,
    path_prepend: Sequence[str] = (),
    installed: bool = False,
) -> dict[str, Any]:
    """Run one agent operation and return its single reply frame.

    Args:
        transport: the host's transport.
        python: remote interpreter.
        op: an operation of the agent but ``follow`` (see the module
            docstring).
        payload: the request's fields.
        timeout: seconds for the whole call.
        login_shell: start the agent from ``bash -l``.
        path_prepend: absolute remote directories the agent puts before its PATH
            (the platform's ``path_prepend``).
        installed: call the installed agent, sending only the request.

    Raises:
        TransportError: the host could not be reached.
        CommandError: the agent could not start (no Python).
        RemoteError: the agent failed or replied nonsense, or its reply passed
            :data:`~sshq.remote.protocol.MAX_REPLY` bytes (the error names the
            host and the cap); a restricted agent refused the request
            (:class:`~sshq.exceptions.RestrictedError`), or an installed agent
            is older than this client needs (the error says to run ``sshq
            agent install``).
    """
    nonce, stdin = encode_request(op, payload, path_prepend=path_prepend, installed=installed)
    result = await transport.run(
        agent_argv(python, login_shell=login_shell, installed=installed), stdin=stdin,
        timeout=timeout, max_output=MAX_REPLY,
    )
    parser = FrameParser(nonce, host=transport.host)
    frames = list(parser.feed(result.stdout))
    if not parser.finished or not frames:
        if not parser.started:
            raise _no_reply(transport, python, result.exit_status, result.stderr, installed)
        raise RemoteError(f"{transport.host}: the remote agent's reply was cut short")
    log.debug("%s: agent %s ok", transport.host, op)
    return frames[0]


async def stream_agent(
    transport: Transport, python: str, op: str, payload: dict[str, Any],
    *, login_shell: bool = False, path_prepend: Sequence[str] = (), installed: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """Run a streaming agent operation (``follow``), yielding frames as they come.

    Arguments as for :func:`call_agent`.

    Raises:
        the same errors as :func:`call_agent`.
    """
    nonce, stdin = encode_request(op, payload, path_prepend=path_prepend, installed=installed)
    parser = FrameParser(nonce, host=transport.host)
    async for chunk in transport.stream(
        agent_argv(python, login_shell=login_shell, installed=installed), stdin=stdin
    ):
        for frame in parser.feed(chunk):
            yield frame
        if parser.finished:
            return
    if not parser.started:
        raise _no_reply(transport, python, -1, b"")
    if not parser.finished:
        raise RemoteError(f"{transport.host}: the remote agent's stream was cut short")


def runner_templates(handlers: Sequence[JobRunnerHandler]) -> dict[str, Any]:
    """The ``runners`` field of poll and kill requests."""
    return {
        h.name: {"poll": list(h.poll_command), "kill": list(h.kill_command), "sep": h.ids_sep}
        for h in handlers
    }
