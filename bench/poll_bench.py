#!/usr/bin/env python3
"""Poll benchmark: "poll 1,000 jobs in one sshq poll in under 1 s on loopback".

    python bench/poll_bench.py [--jobs 1000] [--repeat 5] [--running 200]

Run as root on the test bed.  Scenarios (each: ``sshq poll <ids>`` through
the CLI, and ``AsyncClient.poll`` in-process with a connected client and
with a fresh one; median of ``--repeat``):

i/ii. ``--jobs`` finished background jobs (``true``, job runner
      ``background`` over the test bed's sshd, submitted through the API in
      batches of 250, then waited for): every job status file records an
      exit, so the agent reads status files only and queries no job runner.
iii.  the job runner query path, for jobs whose status file records no exit:
      (a) ``--jobs`` Slurm jobs submitted held (``--directive=--hold``), so
          they stay PENDING at no cost (no process, no CPU; slurmctld holds a
          record each): the agent reads the status files and runs ONE
          ``squeue -j <1000 ids>``;
      (b) ``--running`` background jobs running ``sleep 300`` (idle bash
          wrappers; 1,000 would mean 2,000 processes on a 2-core box, so the
          default is 200): the agent runs ``ps -p <pids>``.

For reference the bare runner queries (``squeue``/``ps`` for the same ids)
are timed inside the remote shell, and one API poll of each scenario is
broken down (client side vs SSH channel vs remote agent) and profiled.
At the end background jobs are killed through sshq (by pid), Slurm jobs
cancelled, and ``~/sshq-bench/<tag>`` removed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    Bed,
    cancel_jobs,
    drive,
    load_testbed,
    median,
    new_tag,
    table,
    timed_agent,
)

from sshq import AsyncClient, JobSpec

BATCH = 250


class PollBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bed = Bed(load_testbed())
        self.tag = new_tag()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sshq-{self.tag}-"))
        self.remote_base = f"~/sshq-bench/{self.tag}"
        self.sshq = shutil.which("sshq") or sys.exit("sshq is not on PATH")
        self.toml = self.tmp / "platforms.toml"
        self.toml.write_text(
            self.bed.platform_toml("bg", job_runner="background",
                                   run_dir=f"{self.remote_base}/bg")
            + self.bed.platform_toml("sl", job_runner="slurm",
                                     run_dir=f"{self.remote_base}/sl"))
        self.state = self.tmp / "state"
        self.env = dict(os.environ, SSHQ_CONFIG=str(self.toml), SSHQ_STATE_DIR=str(self.state))
        self.runner = asyncio.Runner()
        self.client: AsyncClient | None = None
        self.results: list[tuple[str, int, str, list[float]]] = []
        self.notes: dict[str, Any] = {}
        self.running_ids: list[int] = []
        self.running_pids: list[str] = []

    def arun(self, coro: Any) -> Any:
        return self.runner.run(coro)

    # ------------------------------------------------------------ creating jobs

    async def _submit_batches(self, specs: list[JobSpec], platform: str, *,
                              wait_each: bool = False) -> list[int]:
        """Submit in batches of BATCH; ``wait_each``: let each batch finish first, so
        that at most BATCH job wrappers run at once on the 2-core box."""
        assert self.client is not None
        ids: list[int] = []
        for i in range(0, len(specs), BATCH):
            t0 = time.perf_counter()
            jobs = await self.client.submit(specs[i:i + BATCH], platform=platform)
            bad = [j for j in jobs if not j.job_id]
            if bad:
                raise RuntimeError(f"{len(bad)} job(s) not submitted: {bad[0].message}")
            ids += [j.id for j in jobs]
            print(f"  submitted {len(ids)}/{len(specs)} to {platform}"
                  f" ({time.perf_counter() - t0:.2f} s for this batch)", file=sys.stderr,
                  flush=True)
            if wait_each:
                await self.client.wait([j.id for j in jobs], timeout=300, interval=0.5,
                                       max_interval=2.0)
        return ids

    def make_finished(self) -> list[int]:
        n = self.args.jobs
        specs = [JobSpec(command="true", name=f"{self.tag}_f{i:04d}") for i in range(n)]

        async def go() -> list[int]:
            assert self.client is not None
            ids = await self._submit_batches(specs, "bg", wait_each=True)
            t0 = time.perf_counter()
            jobs = await self.client.wait(ids, timeout=300, interval=1.0, max_interval=3.0)
            print(f"  all {n} final after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            bad = [j for j in jobs if j.state.value != "succeeded"]
            if bad:
                raise RuntimeError(f"{len(bad)} job(s) did not succeed: {bad[0]}")
            return ids
        ids: list[int] = self.arun(go())
        return ids

    def make_held(self) -> list[int]:
        specs = [JobSpec(command="true", name=f"{self.tag}_h{i:04d}", directives=("--hold",))
                 for i in range(self.args.jobs)]
        ids: list[int] = self.arun(self._submit_batches(specs, "sl"))
        return ids

    def make_running(self) -> list[int]:
        specs = [JobSpec(command="sleep 300", name=f"{self.tag}_r{i:04d}")
                 for i in range(self.args.running)]

        async def go() -> list[int]:
            assert self.client is not None
            ids = await self._submit_batches(specs, "bg")
            self.running_ids = ids
            deadline = time.monotonic() + 120
            while True:
                jobs = await self.client.poll(ids)
                self.running_pids = [j.job_id for j in jobs if j.job_id]
                n = sum(j.state.value == "running" for j in jobs)
                if n == len(ids):
                    return ids
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {n}/{len(ids)} running after 120 s")
                await asyncio.sleep(1.0)
        ids: list[int] = self.arun(go())
        return ids

    # ------------------------------------------------------------ measuring

    def cli_poll(self, ids: list[int], expect: str) -> float:
        t0 = time.perf_counter()
        p = subprocess.run([self.sshq, "poll", "--json", *map(str, ids)], capture_output=True,
                           env=self.env, stdin=subprocess.DEVNULL, timeout=300)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"sshq poll failed: {p.stderr.decode()[:500]}")
        jobs = json.loads(p.stdout)
        bad = [j for j in jobs if j["state"] != expect]
        if len(jobs) != len(ids) or bad:
            raise RuntimeError(f"sshq poll: {len(bad)} job(s) not {expect}: {bad[:1]}")
        return dt

    async def api_poll(self, ids: list[int], expect: str, fresh: bool) -> float:
        t0 = time.perf_counter()
        if fresh:
            async with AsyncClient(self.toml, state_dir=self.state) as c:
                jobs = await c.poll(ids)
        else:
            assert self.client is not None
            jobs = await self.client.poll(ids)
        dt = time.perf_counter() - t0
        bad = [j for j in jobs if j.state.value != expect]
        if bad:
            raise RuntimeError(f"API poll: {len(bad)} job(s) not {expect}: {bad[0]}")
        return dt

    def measure(self, label: str, ids: list[int], expect: str) -> None:
        r = self.args.repeat
        cli = [self.cli_poll(ids, expect) for _ in range(r)]
        conn = [self.arun(self.api_poll(ids, expect, False)) for _ in range(r)]
        fresh = [self.arun(self.api_poll(ids, expect, True)) for _ in range(r)]
        for how, ts in [("CLI `sshq poll <ids>`", cli), ("API poll, connected client", conn),
                        ("API poll, fresh client (connect+poll+close)", fresh)]:
            self.results.append((label, len(ids), how, ts))
            print(f"  {label} / {how}: median {median(ts):.3f} s", file=sys.stderr, flush=True)
        self.notes[f"breakdown: {label}"] = self.arun(self.breakdown(ids))

    async def breakdown(self, ids: list[int]) -> dict[str, Any]:
        """One API poll with the remote agent timed and the client side profiled."""
        assert self.client is not None
        prof = cProfile.Profile()
        with timed_agent() as records:
            t0 = time.perf_counter()
            prof.enable()
            await self.client.poll(ids)
            prof.disable()
            total = time.perf_counter() - t0
        (chan, agent, nbytes), = records
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(r"sshq|sqlite3", 8)
        return {
            "api poll total s": total,
            "client side s (total - channel)": total - chan,
            "SSH channel wall s": chan,
            "ssh overhead s (channel - agent)": chan - agent,
            "remote agent wall s (python3 start..exit)": agent,
            "bytes over the channel (request + reply)": nbytes,
            "profile": s.getvalue(),
        }

    def bare_query(self, label: str, argv_tail: str) -> None:
        """Time a bare runner query inside the remote shell (median of repeat)."""
        out = self.bed.ssh(
            f"for i in $(seq {self.args.repeat}); do t0=$(date +%s.%N); {argv_tail}"
            " >/dev/null 2>&1; t1=$(date +%s.%N); echo \"T $t0 $t1\"; done").stdout.decode()
        ts = [float(b) - float(a) for a, b in re.findall(r"T (\S+) (\S+)", out)]
        self.notes[f"bare runner query: {label}"] = median(ts)

    # ------------------------------------------------------------ run

    def run(self) -> None:
        self.client = AsyncClient(self.toml, state_dir=self.state)
        print(f"creating {self.args.jobs} finished background jobs...", file=sys.stderr)
        fin = self.make_finished()
        self.measure("i/ii. finished jobs (status files only)", fin, "succeeded")

        if self.bed.slurm and self.args.jobs:
            print(f"submitting {self.args.jobs} held Slurm jobs...", file=sys.stderr)
            held = self.make_held()
            self.measure("iii-a. held Slurm jobs (status files + 1 squeue)", held, "submitted")
            jobs = self.arun(self.client.jobs(held))
            self.bare_query(f"squeue -h -o '%i^^^%T' -j <{len(held)} ids>",
                            "squeue -h -o '%i^^^%T' -j "
                            + shlex.quote(",".join(j.job_id for j in jobs)))
            cancel_jobs(self.bed.user, self.tag)

        if self.args.running:
            print(f"starting {self.args.running} background `sleep 300` jobs...",
                  file=sys.stderr)
            run_ids = self.make_running()
            self.measure("iii-b. running background jobs (status files + 1 ps)", run_ids,
                         "running")
            self.bare_query(f"ps -o pid=,stat= -p <{len(self.running_pids)} pids>",
                            "ps -o pid=,stat= -p " + " ".join(self.running_pids))
            self.kill_running()

    def kill_running(self) -> None:
        if not self.running_ids or self.client is None:
            return
        jobs = []
        for i in range(0, len(self.running_ids), 50):  # 50 wrappers' traps at a time
            jobs += self.arun(self.client.kill(self.running_ids[i:i + 50], settle=10))
        left = [j for j in jobs if not j.state.is_final]
        if left:
            print(f"warning: {len(left)} background job(s) not final after kill",
                  file=sys.stderr)
        # belt and braces: the job wrappers' pids (the job ids), by id
        self.bed.ssh("kill -TERM " + " ".join(self.running_pids) + " 2>/dev/null; true",
                     check=False)
        self.running_ids = []

    def report(self) -> str:
        rows = []
        for label, n, how, ts in self.results:
            m = median(ts)
            rows.append((label, n, how, f"{m:.3f}", f"{min(ts):.3f}", f"{max(ts):.3f}",
                         f"{n / m:.0f}", "MET" if m < 1.0 else "MISSED"))
        out = [f"sshq poll benchmark: median of {self.args.repeat}", "",
               table(["scenario", "jobs", "how", "median s", "min s", "max s", "jobs/s",
                      "< 1 s"], rows), ""]
        for k, v in self.notes.items():
            if isinstance(v, dict):
                out += [f"{k}:", ""]
                out += [table(["quantity", "value"],
                              [(q, f"{x:.3f}" if isinstance(x, float) else x)
                               for q, x in v.items() if q != "profile"]), ""]
                out += ["client-side profile (tottime):", v["profile"]]
            else:
                out.append(f"{k}: {v:.3f} s (remote shell, median)")
        return "\n".join(out)

    def cleanup(self) -> None:
        try:
            self.kill_running()
        except Exception as exc:
            print(f"warning: kill failed: {exc}", file=sys.stderr)
        cancel_jobs(self.bed.user, self.tag)
        if self.client is not None:
            try:
                self.arun(self.client.close())
            except Exception:
                pass
        self.runner.close()
        if not self.args.keep:
            self.bed.remove_remote_dir(self.tag)
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--running", type=int, default=200,
                    help="running background `sleep 300` jobs for iii-b (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep remote and local files")
    ap.add_argument("--json-out", help="also write the raw figures as JSON here")
    args = ap.parse_args()
    b = PollBench(args)
    drive(b, args.json_out, lambda: {
        "results": b.results,
        "notes": {k: ({q: x for q, x in v.items() if q != "profile"}
                      if isinstance(v, dict) else v) for k, v in b.notes.items()}})

if __name__ == "__main__":
    main()
