#!/usr/bin/env python3
"""sshq.Executor benchmark: ``map`` of N trivial calls (issue 13).

Variants, each timed from the ``map`` call to the last result:

* ``slurm cs=C``: ``Executor("bench-slurm").map(f, range(N), chunksize=C)``:
  one job array of ceil(N / C) elements on the test bed's Slurm (2 CPUs);
* ``farm cs=C``: the same with ``hosts=["bench-bg"]``: farm tasks on the
  loopback host through the real sshd (a dispatcher with one slot per core);
* ``local pool cs=C``: ``concurrent.futures.ProcessPoolExecutor(max_workers=W)``
  on this machine, W = the Slurm node's CPUs (the limit the jobs share).

For the sshq variants it counts, from the inside (wrapping functions, not
touching src/): submissions (agent ``submit`` calls), agent calls per
operation, SSH channels (remote commands: ``Transport.run``; farm dispatcher
sessions: ``Transport.open_session``) and rsync runs.

The remote interpreter is the test user's venv ``~/sshq-test-venv`` (what the
tests make: the client's Python minor and cloudpickle version); it is made
here if missing.  Run as root on the test bed::

    python bench/executor_bench.py                        # N=1000, cs 1 and 50
    python bench/executor_bench.py --calls 200 --only farm,local

Every run uses a fresh state dir and ``~/sshq-bench/<tag>`` as run dir (removed
at the end); its Slurm jobs are named ``<tag>`` and cancelled at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import benchlib


def trivial(x: int) -> int:
    return x + 1



VENV = "sshq-test-venv"


@contextmanager
def counting() -> Any:
    """Count agent calls by operation, SSH channels, rsync runs and the
    Executor's collection rounds (each a poll of the pending jobs)."""
    import sshq.remote.operations as ops
    import sshq.remote.staging as staging
    from sshq.executor._executor import Executor
    from sshq.transport.asyncssh_ import AsyncSSHTransport

    counts: Counter[str] = Counter()
    orig_encode = ops.encode_request
    orig_run = AsyncSSHTransport.run
    orig_session = getattr(AsyncSSHTransport, "open_session", None)
    orig_rsync = staging._run_rsync
    orig_round = Executor._round

    def encode(op: str, payload: Any, **kw: Any) -> Any:
        counts[f"agent {op}"] += 1
        return orig_encode(op, payload, **kw)

    async def run(self_: Any, argv: Any, **kw: Any) -> Any:
        counts["ssh commands (run)"] += 1
        return await orig_run(self_, argv, **kw)

    async def session(self_: Any, *a: Any, **kw: Any) -> Any:
        counts["ssh sessions (farm dispatchers)"] += 1
        assert orig_session is not None
        return await orig_session(self_, *a, **kw)

    async def rsync(*a: Any, **kw: Any) -> Any:
        counts["rsync runs"] += 1
        return await orig_rsync(*a, **kw)

    async def round_(self_: Any) -> None:
        counts["executor rounds"] += 1
        await orig_round(self_)

    ops.encode_request = encode  # type: ignore[assignment]
    Executor._round = round_  # type: ignore[method-assign]
    AsyncSSHTransport.run = run  # type: ignore[method-assign]
    if orig_session is not None:
        AsyncSSHTransport.open_session = session  # type: ignore[method-assign]
    staging._run_rsync = rsync  # type: ignore[assignment]
    try:
        yield counts
    finally:
        ops.encode_request = orig_encode  # type: ignore[assignment]
        Executor._round = orig_round  # type: ignore[method-assign]
        AsyncSSHTransport.run = orig_run  # type: ignore[method-assign]
        if orig_session is not None:
            AsyncSSHTransport.open_session = orig_session  # type: ignore[method-assign]
        staging._run_rsync = orig_rsync  # type: ignore[assignment]


class ExecutorBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bed = benchlib.Bed(benchlib.load_testbed())
        self.tag = benchlib.new_tag()
        self.remote_base = f"~/sshq-bench/{self.tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="sshq-exbench-"))
        self.rows: list[dict[str, Any]] = []
        self.cpus = 2

    def setup(self) -> None:
        import cloudpickle as cp

        python = f"{self.bed.home}/{VENV}/bin/python"
        probe = f"{shlex.quote(python)} -c 'import cloudpickle; print(cloudpickle.__version__)'"
        got = self.bed.ssh(probe, check=False).stdout.decode().strip()
        if got != cp.__version__:
            q = shlex.quote(f"{self.bed.home}/{VENV}")
            self.bed.ssh(f"rm -rf {q} && python3 -m venv {q} && {q}/bin/pip install -q"
                         f" cloudpickle=={cp.__version__}", timeout=600)
        self.python = python
        cpus = benchlib.subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True,
                                       text=True).stdout.split()
        self.cpus = int(cpus[0]) if cpus and cpus[0].isdigit() else 2
        conf = self.tmp / "platforms.toml"
        conf.write_text(
            self.bed.platform_toml("bench-slurm", job_runner="slurm", run_dir=self.remote_base)
            + self.bed.platform_toml("bench-bg", job_runner="background",
                                     run_dir=self.remote_base))
        self.config = conf

    def _executor(self, platform: str, **kw: Any) -> Any:
        from sshq import Executor

        return Executor(platform, config=self.config, state_dir=self.tmp / f"state-{platform}",
                        python=self.python, name=self.tag, **kw)

    def _sshq_variant(self, label: str, platform: str, cs: int, **kw: Any) -> None:
        n = self.args.calls
        # the pre-flight check and the connection, outside the timing
        with self._executor(platform, **kw) as ex:
            ex.submit(trivial, 0).result(timeout=600)
            with counting() as counts:
                t0 = time.perf_counter()
                values = list(ex.map(trivial, range(n), chunksize=cs))
                wall = time.perf_counter() - t0
            assert values == [i + 1 for i in range(n)], "wrong results"
        self.rows.append({"variant": label, "calls": n, "chunksize": cs, "wall": wall,
                          "counts": dict(counts)})
        print(f"{label}: {wall:.1f} s; {dict(counts)}", file=sys.stderr)

    def _local_variant(self, cs: int) -> None:
        n = self.args.calls
        with concurrent.futures.ProcessPoolExecutor(max_workers=self.cpus) as pool:
            list(pool.map(trivial, range(self.cpus)))   # workers started outside the timing
            t0 = time.perf_counter()
            values = list(pool.map(trivial, range(n), chunksize=cs))
            wall = time.perf_counter() - t0
        assert values == [i + 1 for i in range(n)]
        self.rows.append({"variant": f"local pool ({self.cpus} workers)", "calls": n,
                          "chunksize": cs, "wall": wall, "counts": {}})

    def run(self) -> None:
        only = set(self.args.only.split(","))
        for cs in self.args.chunksizes:
            if "local" in only:
                self._local_variant(cs)
            if "slurm" in only and self.bed.slurm:
                self._sshq_variant("slurm job array", "bench-slurm", cs)
                benchlib.cancel_jobs(self.bed.user, self.tag)
            if "farm" in only:
                self._sshq_variant("farm, 1 loopback host", "bench-bg", cs, hosts=["bench-bg"])

    def cleanup(self) -> None:
        if self.bed.slurm:
            benchlib.cancel_jobs(self.bed.user, self.tag)
        self.bed.remove_remote_dir(self.tag)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def report(self) -> str:
        rows = []
        for r in self.rows:
            c = r["counts"]
            ssh = c.get("ssh commands (run)", 0) + c.get("ssh sessions (farm dispatchers)", 0)
            agent = ", ".join(f"{k[6:]} {v}" for k, v in sorted(c.items())
                              if k.startswith("agent "))
            rows.append([r["variant"], r["calls"], r["chunksize"], f"{r['wall']:.1f}",
                         f"{1000 * r['wall'] / r['calls']:.1f}",
                         c.get("agent submit", "") if c else "",
                         ssh if c else "", c.get("executor rounds", "") if c else "",
                         c.get("rsync runs", "") if c else "", agent])
        return benchlib.table(["variant", "calls", "chunksize", "wall s", "ms/call",
                               "submissions", "ssh commands", "poll rounds", "rsync",
                               "agent calls"], rows)

    def raw(self) -> dict[str, Any]:
        return {"rows": self.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--chunksizes", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 50])
    ap.add_argument("--only", default="local,slurm,farm",
                    help="comma-separated subset of local, slurm, farm")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    bench = ExecutorBench(args)
    benchlib.drive(bench, args.json_out, bench.raw)


if __name__ == "__main__":
    main()
