"""The ``local`` transport: commands run on this machine, no SSH."""

from __future__ import annotations

from collections.abc import Sequence

from .subprocess_base import SubprocessTransport

__all__ = ["LocalTransport"]


class LocalTransport(SubprocessTransport):
    """Runs argument vectors as local processes (no shell, no quoting needed)."""

    name = "local"
    is_local = True

    def local_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def interactive_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)
