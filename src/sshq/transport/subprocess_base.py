"""Transports that run a local program: ``local`` (the argv itself) and
``openssh`` (the argv wrapped in an ``ssh`` command line)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Sequence

from ..exceptions import CommandError, HostUnreachableError
from .base import CommandResult, Session, Transport
from .bounded import MAX_OUTPUT, read_bounded

__all__ = ["SubprocessTransport"]


class SubprocessTransport(Transport):
    """Base for transports whose commands are local processes."""

    def local_argv(self, argv: Sequence[str]) -> list[str]:
        """The local argv that runs ``argv`` on the host."""
        raise NotImplementedError

    async def check_result(self, result: CommandResult) -> CommandResult:
        """Turn transport-level failures into exceptions (hook)."""
        return result

    async def _spawn(self, argv: Sequence[str]) -> asyncio.subprocess.Process:
        local = self.local_argv(argv)
        try:
            return await asyncio.create_subprocess_exec(
                *local,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandError(f"cannot run {local[0]!r}: {exc.strerror}", host=self.host) from None

    async def run(
        self, argv: Sequence[str], *, stdin: bytes = b"", timeout: float | None = None,
        max_output: int | None = MAX_OUTPUT,
    ) -> CommandResult:
        proc = await self._spawn(argv)
        assert proc.stdin and proc.stdout and proc.stderr

        async def feed() -> None:
            assert proc.stdin
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()

        async def communicate() -> tuple[bytes, bytes]:
            assert proc.stdout and proc.stderr
            writer = asyncio.ensure_future(feed())
            try:
                out, err = await read_bounded(proc.stdout, proc.stderr,
                                              max_output=max_output, host=self.host)
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            await proc.wait()
            return out, err

        try:
            out, err = await asyncio.wait_for(communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise HostUnreachableError(
                f"{self.host}: command timed out after {timeout} s",
                host=self.host, command_sent=True,
            ) from None
        except BaseException:  # the output cap, a cancelled caller: end the command
            await _abandon(proc)
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        return await self.check_result(CommandResult(rc if rc >= 0 else -1, out, err))

    async def stream(self, argv: Sequence[str], *, stdin: bytes = b"") -> AsyncIterator[bytes]:
        proc = await self._spawn(argv)
        assert proc.stdin and proc.stdout and proc.stderr
        try:
            proc.stdin.write(stdin)
            await proc.stdin.drain()
            proc.stdin.close()
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    break
                yield chunk
            err = await proc.stderr.read()
            rc = await proc.wait()
            await self.check_result(CommandResult(rc if rc >= 0 else -1, b"", err))
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def open_session(self, argv: Sequence[str]) -> Session:
        return _ProcessSession(self, await self._spawn(argv))


async def _abandon(proc: asyncio.subprocess.Process) -> None:
    """Kill a command and what it started (its own process group: it was
    started in a new session), discard what is left in its pipes, and reap it,
    so that nothing keeps writing into a pipe nobody reads."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)

    async def discard() -> None:
        for stream in (proc.stdout, proc.stderr):
            while stream is not None and await stream.read(65536):
                pass
        await proc.wait()

    with contextlib.suppress(BaseException):  # best effort: the caller's error goes on
        await asyncio.wait_for(discard(), 10)


class _ProcessSession(Session):
    """A local process (``ssh`` for openssh) with its pipes open."""

    def __init__(self, transport: SubprocessTransport, proc: asyncio.subprocess.Process):
        assert proc.stdin and proc.stdout and proc.stderr
        self._t = transport
        self._proc = proc
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._stderr = proc.stderr
        self._err = bytearray()
        self._err_task = asyncio.ensure_future(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        while chunk := await self._stderr.read(65536):
            self._err += chunk
            del self._err[:-8192]

    async def read(self) -> bytes:
        return await self._stdout.read(262144)

    async def write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise HostUnreachableError(
                f"{self._t.host}: connection lost: {exc}", host=self._t.host,
                command_sent=True) from None

    def stderr_tail(self) -> bytes:
        return bytes(self._err)

    async def close(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        self._err_task.cancel()
