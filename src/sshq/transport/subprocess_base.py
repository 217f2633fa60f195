"""Transports that run a local program: ``local`` (the argv itself) and
``openssh`` (the argv wrapped in an ``ssh`` command line)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from ..exceptions import CommandError, HostUnreachableError
from .base import CommandResult, Transport

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
        self, argv: Sequence[str], *, stdin: bytes = b"", timeout: float | None = None
    ) -> CommandResult:
        proc = await self._spawn(argv)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise HostUnreachableError(
                f"{self.host}: command timed out after {timeout} s",
                host=self.host, command_sent=True,
            ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
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
