"""The host pool: transports per host, failover, the bad-host list, agent calls.

One :class:`HostPool` holds the connections of every platform host a client
(or a long-running process serving many clients) talks to, and is the one
way the client's parts run the remote agent: with the platform's
interpreter, login shell and ``path_prepend``, failing over between login
hosts, and caching remote-init's facts in the state database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ..config import Config, Platform
from ..exceptions import RemoteError, TransportError
from ..job_runners import HANDLERS
from ..remote.operations import call_agent, stream_agent
from ..store import RemoteInit, Store
from ..transport import Transport
from ..transport.local import LocalTransport

__all__ = ["HostPool"]

log = logging.getLogger("sshq.client")

_T = TypeVar("_T")


class HostPool:
    """Transports to platform hosts, reused by every operation.

    Args:
        config: the platforms.
        store: the state database (bad hosts, remote-init cache).
        state_dir: where the ``openssh`` transport keeps its ControlMaster
            sockets (``<state_dir>/cm``).
    """

    def __init__(self, config: Config, store: Store, state_dir: Path) -> None:
        self.config = config
        self.store = store
        self.state_dir = state_dir
        self._transports: dict[tuple[str, str], Transport] = {}
        self._init_lock = asyncio.Lock()

    async def close(self) -> None:
        """Close every connection (the pool can be used again afterwards)."""
        transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            try:
                await t.close()
            except Exception:  # closing must not mask the real outcome
                log.debug("closing %s failed", t.host, exc_info=True)

    def transport(self, platform: Platform, host: str) -> Transport:
        """The (cached) transport to one host of a platform."""
        key = (platform.name, host)
        t = self._transports.get(key)
        if t is None:
            params = platform.host_params(host)
            if platform.transport == "local":
                t = LocalTransport(params)
            elif platform.transport == "openssh":
                from ..transport.openssh import OpenSSHTransport  # (only when used)

                t = OpenSSHTransport(
                    params, control_dir=str(self.state_dir / "cm"),
                    batch_mode=platform.batch_mode,
                )
            else:
                from ..transport.asyncssh_ import AsyncSSHTransport  # 0.1 s to import

                t = AsyncSSHTransport(params)
            self._transports[key] = t
        return t

    async def with_failover(self, platform: Platform,
                            op: Callable[[str, Transport], Awaitable[_T]],
                            prefer: str | None = None) -> _T:
        """Run ``op(host, transport)`` on the first usable host of the platform.

        A host whose connection fails before the command was sent goes on the
        bad-host list for ``platform.bad_host_seconds`` (Cylc's behaviour) and
        the next is tried; ``prefer`` is tried first.

        Raises:
            TransportError: every host failed (the last error), or one failed
                after the command was sent (never retried elsewhere).
        """
        bad = self.store.bad_hosts(platform.name)
        hosts = [h for h in platform.hosts if h not in bad] or list(platform.hosts)
        if prefer in hosts:
            hosts.remove(prefer)
            hosts.insert(0, prefer)
        last: TransportError | None = None
        for n, host in enumerate(hosts):
            try:
                return await op(host, self.transport(platform, host))
            except TransportError as exc:
                if not exc.transient or exc.command_sent:
                    raise
                last = exc
                self.store.mark_bad_host(platform.name, host, platform.bad_host_seconds, str(exc))
                if n + 1 < len(hosts):
                    log.warning("%s: %s; trying %s", platform.name, exc, hosts[n + 1])
        assert last is not None
        raise last

    async def remote_init(self, platform: Platform, host: str, t: Transport) -> RemoteInit:
        """Remote-init's facts for the platform: cached, else one ``init`` call."""
        cached = self.store.remote_init(platform.name, platform.run_dir)
        if cached is not None:
            return cached
        async with self._init_lock:
            reply = await self.agent(platform, t, "init", {"run_dir": platform.run_dir})
            return self.record_remote_init(platform, t, reply)

    def record_remote_init(self, platform: Platform, t: Transport,
                           reply: object) -> RemoteInit:
        """Check and cache what remote-init replied.

        Raises:
            RemoteError: the reply names no absolute run dir and home.
        """
        run_dir = reply.get("run_dir") if isinstance(reply, dict) else None
        home = reply.get("home") if isinstance(reply, dict) else None
        if not (isinstance(run_dir, str) and run_dir.startswith("/")
                and isinstance(home, str) and "\n" not in run_dir + home):
            raise RemoteError(f"{t.host}: remote-init replied no absolute run directory")
        info = RemoteInit(run_dir, home)
        self.store.set_remote_init(platform.name, platform.run_dir, info)
        return info

    def host_of(self, plat: Platform, job_host: str) -> str:
        """The platform host whose transport label is ``job_host`` (a job's
        ``host``, ``[user@]host[:port]``); the first host if none is."""
        for h in plat.hosts:
            if self.transport(plat, h).host == job_host:
                return h
        return plat.hosts[0]

    def transport_of(self, plat: Platform, job_host: str) -> Transport:
        """The transport to the host a job was submitted through."""
        return self.transport(plat, self.host_of(plat, job_host))

    async def agent_on_group(
        self, plat_name: str, host_label: str, op: str, payload: dict[str, Any],
        timeout: float = 120.0, *, runners: Iterable[str] = (),
    ) -> dict[str, Any]:
        """One agent call for jobs submitted through ``host_label``.

        Jobs of batch systems can be reached from any login host of the
        platform (shared filesystem), so a host that is down fails over to
        the next; background jobs only from the host they run on.
        """
        plat = self.config.platform(plat_name)
        host = self.host_of(plat, host_label)
        if any(HANDLERS[r].runs_on_submit_host for r in runners):
            return await self.agent(plat, self.transport(plat, host), op, payload,
                                    timeout=timeout)

        async def op_on(h: str, t: Transport) -> dict[str, Any]:
            return await self.agent(plat, t, op, payload, timeout=timeout)

        return await self.with_failover(plat, op_on, prefer=host)

    @staticmethod
    async def agent(platform: Platform, t: Transport, op: str, payload: dict[str, Any],
                    timeout: float = 120.0) -> dict[str, Any]:
        """One agent call with the platform's interpreter, login shell, PATH and
        agent (the shipped one, or the one ``sshq agent install`` installed)."""
        return await call_agent(t, platform.python, op, payload, timeout=timeout,
                                login_shell=platform.login_shell,
                                path_prepend=platform.path_prepend,
                                installed=platform.agent == "installed")

    @staticmethod
    def agent_stream(platform: Platform, t: Transport, op: str,
                     payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A streaming agent call (``follow``), with the platform's settings as :meth:`agent`."""
        return stream_agent(t, platform.python, op, payload, login_shell=platform.login_shell,
                            path_prepend=platform.path_prepend,
                            installed=platform.agent == "installed")
