"""How bytes reach a host: asyncssh (default), openssh, local."""

from .base import CommandResult, HostParams, Session, Transport, check_host

__all__ = ["CommandResult", "HostParams", "Session", "Transport", "check_host", "TRANSPORTS"]

#: Transport names accepted in platform configs.
TRANSPORTS = ("asyncssh", "openssh", "local")
