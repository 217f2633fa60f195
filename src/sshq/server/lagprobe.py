"""An event-loop lag probe for benchmarks of ``sshq serve`` (off by default).

With the environment variable ``SSHQ_SERVE_LAG_PROBE`` set to a period in
seconds (e.g. ``0.01``) when the server starts, a task sleeps that period
again and again and records how late each wake-up is: the time the event
loop was busy with something else (a request, a poll reply, a database
write) when it should have run a ready task.  The samples are served, to a
token, by ``GET /api/v1/debug/loop-lag`` (``?reset=true`` empties them after
reading): that route exists only while the probe is on.  Without the
variable nothing of this runs (bench/serve_bench.py sets it).
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections import deque
from typing import Any

__all__ = ["ENV", "LagProbe", "from_env"]

#: The environment variable that turns the probe on: its period, in seconds.
ENV = "SSHQ_SERVE_LAG_PROBE"


class LagProbe:
    """Samples of the event loop's lag.

    Args:
        period: seconds between wake-ups (each sample is how much later
            than ``period`` the sleep ended).
        keep: the most samples kept (the newest).
    """

    def __init__(self, period: float, keep: int = 200_000) -> None:
        self.period = period
        self.samples: deque[float] = deque(maxlen=keep)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling (in the running loop)."""
        self._task = asyncio.create_task(self._run(), name="loop lag probe")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.period)
            self.samples.append(max(0.0, loop.time() - t0 - self.period))

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        """The samples so far.

        Args:
            reset: forget them after reading.

        Returns:
            ``period_s``, ``samples`` (count), and the lag's ``p50_ms``,
            ``p99_ms``, ``max_ms`` (None without samples).
        """
        xs = sorted(self.samples)
        if reset:
            self.samples.clear()
        out: dict[str, Any] = {"period_s": self.period, "samples": len(xs),
                               "p50_ms": None, "p99_ms": None, "max_ms": None}
        if xs:
            q = statistics.quantiles(xs, n=100) if len(xs) > 1 else [xs[0]] * 99
            out.update(p50_ms=q[49] * 1000, p99_ms=q[98] * 1000, max_ms=xs[-1] * 1000)
        return out


def from_env() -> LagProbe | None:
    """The probe :data:`ENV` asks for, or None (unset, empty, or not a
    positive number of seconds)."""
    value = os.environ.get(ENV, "").strip()
    try:
        period = float(value)
    except ValueError:
        return None
    return LagProbe(period) if period > 0 else None
