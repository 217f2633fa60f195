"""The parts of :class:`sshq.AsyncClient` (private; import from :mod:`sshq`)."""
