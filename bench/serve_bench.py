#!/usr/bin/env python3
"""sshq serve benchmark (issue 11): the HTTP gateway against the library.

    python bench/serve_bench.py [--jobs 100] [--repeat 3] [--clients 50]
                                [--running 200] [--seconds 30] [--skip-submit]
                                [--wrk] [--json-out FILE]

Run as root on the test bed.  Two parts:

A. POST /api/v1/jobs of ``--jobs`` Slurm jobs vs ``AsyncClient.submit`` of
   the same jobs (goal: within 1.2x).  Both warm (one untimed submit each
   first: connection open, remote-init cached), alternating, median of
   ``--repeat``.  The jobs are submitted held (``--hold``: no CPU used) and
   cancelled after each round.  The server is a real ``sshq serve``
   process on loopback; the HTTP client is httpx in this process.
B. ``--running`` background jobs (``sleep``) run on the test bed while
   ``--clients`` concurrent clients each GET /api/v1/jobs/{id} every 0.5 s
   for ``--seconds``: latency p50/p99 (goal p99 < 50 ms), and the SSH
   sessions the cluster saw per minute, counted on the cluster itself (the
   platform's ``python`` is a shim that logs each agent start), with 1
   client and with ``--clients`` clients (goal: the same).  The load
   generator is httpx coroutines in this process, or with ``--wrk`` the
   compiled ``wrk`` (Debian: ``apt-get install wrk``) running
   bench/serve_wrk.lua: one connection per client, two threads, each
   connection a GET of a random job then 500 ms of delay after the
   response (a period of 0.5 s plus the latency; so this process, and its
   CPU, is out of the way).  Both report the server's own time per
   request (its ``Server-Timing`` header), and the server's event-loop lag
   over the run (its probe, ``SSHQ_SERVE_LAG_PROBE``: a timer task waking
   every 10 ms, read from ``/api/v1/debug/loop-lag``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
from benchlib import Bed, cancel_jobs, drive, load_testbed, median, new_tag, table

from sshq import AsyncClient, JobSpec

SSHQ = [sys.executable, "-m", "sshq"]
#: The wrk script of part B with --wrk.
WRK_SCRIPT = Path(__file__).resolve().parent / "serve_wrk.lua"
#: The server's event-loop lag probe: a wake-up every 10 ms.
LAG_PROBE_PERIOD = "0.01"


class ServeBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bed = Bed(load_testbed())
        self.tag = new_tag()
        self.remote_base = f"~/sshq-bench/{self.tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="sshq-serve-bench-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.token = ""
        self.submit_times: dict[str, list[float]] = {"POST /api/v1/jobs": [],
                                                     "AsyncClient.submit": []}
        self.load: list[dict[str, Any]] = []
        self.wrk_output: list[str] = []

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        shim = f"{self.bed.home}/sshq-bench/{self.tag}/pyshim"
        self.sessions_log = f"{self.bed.home}/sshq-bench/{self.tag}/sessions.log"
        self.bed.ssh(f"mkdir -p ~/sshq-bench/{self.tag} && printf '%s\\n' '#!/bin/sh'"
                     f" 'date +%s.%N >> {self.sessions_log}' 'exec python3 \"$@\"' > {shim}"
                     f" && chmod +x {shim}")
        cfg = (self.bed.platform_toml("slurm", job_runner="slurm",
                                      run_dir=f"{self.remote_base}/serve")
               + self.bed.platform_toml("bg", job_runner="background",
                                        run_dir=f"{self.remote_base}/bg", python=shim))
        (self.tmp / "platforms.toml").write_text(cfg)
        (self.tmp / "api.toml").write_text(self.bed.platform_toml(
            "slurm", job_runner="slurm", run_dir=f"{self.remote_base}/api"))
        self.env = dict(os.environ, SSHQ_CONFIG=str(self.tmp / "platforms.toml"),
                        SSHQ_STATE_DIR=str(self.tmp / "state"))
        r = subprocess.run([*SSHQ, "token", "create", "bench"], env=self.env,
                           capture_output=True, check=True)
        self.token = r.stdout.decode().strip()
        self.log = open(self.tmp / "serve.log", "wb")
        from sshq.server.lagprobe import ENV as LAG_PROBE_ENV

        self.proc = subprocess.Popen([*SSHQ, "serve", "--listen", "127.0.0.1:0"],
                                     env=dict(self.env, **{LAG_PROBE_ENV: LAG_PROBE_PERIOD}),
                                     stdout=subprocess.DEVNULL, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.url:
            m = re.search(r"listening on (http://\S+)",
                          (self.tmp / "serve.log").read_text(errors="replace"))
            if m:
                self.url = m.group(1)
            elif time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("sshq serve did not start: "
                                   + (self.tmp / "serve.log").read_text()[-2000:])
            time.sleep(0.05)

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        cancel_jobs(self.bed.user, self.tag)
        self.bed.ssh("pkill -u $(id -u) -f 'sshq-bench/" + self.tag + "' ; true", check=False)
        self.bed.remove_remote_dir(self.tag)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------ part A

    def _jobs(self, round_: str) -> list[dict[str, Any]]:
        return [{"command": "true", "name": f"{self.tag}{round_}_{i}", "directives": ["--hold"]}
                for i in range(self.args.jobs)]

    async def part_a(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=600) as http, \
                AsyncClient(self.tmp / "api.toml", state_dir=self.tmp / "api-state") as client:
            async def post(round_: str) -> float:
                t0 = time.perf_counter()
                r = await http.post("/api/v1/jobs", json={"platform": "slurm",
                                                          "jobs": self._jobs(round_)})
                dt = time.perf_counter() - t0
                assert r.status_code == 201, r.text
                assert all(j["job_id"] for j in r.json()), r.text[:500]
                return dt

            async def api(round_: str) -> float:
                specs = [JobSpec(command=j["command"], name=j["name"],
                                 directives=tuple(j["directives"]))
                         for j in self._jobs(round_)]
                t0 = time.perf_counter()
                jobs = await client.submit(specs, platform="slurm")
                dt = time.perf_counter() - t0
                assert all(j.job_id for j in jobs)
                return dt

            # warm-up (connections, remote-init), untimed
            await http.post("/api/v1/jobs", json={"platform": "slurm", "jobs": [
                {"command": "true", "name": f"{self.tag}warm", "directives": ["--hold"]}]})
            await client.submit(JobSpec(command="true", name=f"{self.tag}warm",
                                        directives=("--hold",)), platform="slurm")
            cancel_jobs(self.bed.user, self.tag)
            for n in range(self.args.repeat):
                order = [("POST /api/v1/jobs", post), ("AsyncClient.submit", api)]
                if n % 2:
                    order.reverse()
                for label, fn in order:
                    self.submit_times[label].append(await fn(f"r{n}{label[0]}"))
                    cancel_jobs(self.bed.user, self.tag)

    # ------------------------------------------------------------ part B

    def _sessions(self) -> list[float]:
        out = self.bed.ssh(f"cat {self.sessions_log} 2>/dev/null; true").stdout.decode()
        return [float(x) for x in out.split()]

    async def part_b(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        limits = httpx.Limits(max_connections=self.args.clients + 10)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60,
                                     limits=limits) as http:
            jobs = []
            for i in range(0, self.args.running, 100):
                n = min(100, self.args.running - i)
                r = await http.post("/api/v1/jobs", json={"platform": "bg", "jobs": [
                    {"command": f"sleep {3 * self.args.seconds + 60}",
                     "name": f"{self.tag}b{i + k}"} for k in range(n)]})
                assert r.status_code == 201, r.text
                jobs += r.json()
            ids = [j["id"] for j in jobs]
            while True:  # all running (the poller saw them start)
                r = await http.get("/api/v1/jobs", params={"platform": "bg"})
                if all(j["state"] == "running" for j in r.json()):
                    break
                await asyncio.sleep(1)
            for clients in (1, self.args.clients):
                await http.get("/api/v1/debug/loop-lag", params={"reset": "true"})
                if self.args.wrk:
                    x = await self._load_wrk(ids, clients)
                else:
                    x = await self._load(http, ids, clients)
                r = await http.get("/api/v1/debug/loop-lag")
                r.raise_for_status()
                x["lag"] = r.json()
                self.load.append(x)

    async def _load_wrk(self, ids: list[int], clients: int) -> dict[str, Any]:
        """Part B's load by wrk (bench/serve_wrk.lua): ``clients`` connections."""
        ids_file = self.tmp / "ids.txt"
        ids_file.write_text("".join(f"{i}\n" for i in ids))
        threads = min(2, clients)
        argv = ["wrk", "-t", str(threads), "-c", str(clients),
                "-d", f"{max(1, round(self.args.seconds))}s", "--latency", "--timeout", "10s",
                "-s", str(WRK_SCRIPT), self.url, "--", str(ids_file), str(clients // threads)]
        start_sessions = len(self._sessions())
        t_start = time.time()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=dict(os.environ, SSHQ_BENCH_TOKEN=self.token),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        elapsed = time.time() - t_start
        text = out.decode(errors="replace")
        m = re.search(r"^SSHQ-WRK-JSON (\{.*\})$", text, re.M)
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-2000:]}"
                               f" {err.decode(errors='replace')[-2000:]}")
        w = json.loads(m.group(1))
        sessions = [t for t in self._sessions()[start_sessions:] if t >= t_start]
        self.wrk_output.append(text)
        return {"generator": "wrk", "clients": clients, "requests": w["requests"],
                "errors": w["not_200"] + w["socket_errors"] + w["timeouts"],
                "seconds": w["duration_s"], "p50_ms": w["p50_ms"], "p99_ms": w["p99_ms"],
                "max_ms": w["max_ms"], "app_p50_ms": w["app_p50_ms"],
                "app_p99_ms": w["app_p99_ms"],
                "load": Path("/proc/loadavg").read_text().split()[0],
                "sessions": len(sessions), "sessions_per_min": len(sessions) * 60 / elapsed,
                "wrk": w}

    async def _load(self, http: httpx.AsyncClient, ids: list[int], clients: int
                    ) -> dict[str, Any]:
        lat: list[float] = []
        app: list[float] = []  # the server's own time (Server-Timing)
        errors = 0
        start_sessions = len(self._sessions())
        t_start = time.time()
        stop = time.monotonic() + self.args.seconds

        async def one() -> None:
            nonlocal errors
            await asyncio.sleep(random.uniform(0, 0.5))
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await http.get(f"/api/v1/jobs/{random.choice(ids)}")
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors += 1
                lat.append(dt)
                m = re.search(r"dur=([0-9.]+)", r.headers.get("server-timing", ""))
                if m:
                    app.append(float(m.group(1)) / 1000)
                await asyncio.sleep(max(0.0, 0.5 - dt))

        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.time() - t_start
        sessions = [t for t in self._sessions()[start_sessions:] if t >= t_start]
        q = statistics.quantiles(lat, n=100)
        qa = statistics.quantiles(app, n=100)
        return {"generator": "httpx", "clients": clients, "requests": len(lat),
                "errors": errors,
                "seconds": elapsed, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
                "max_ms": max(lat) * 1000, "app_p50_ms": qa[49] * 1000,
                "app_p99_ms": qa[98] * 1000,
                "load": Path("/proc/loadavg").read_text().split()[0],
                "sessions": len(sessions), "sessions_per_min": len(sessions) * 60 / elapsed}

    def run(self) -> None:
        if not self.args.skip_submit:
            asyncio.run(self.part_a())
        asyncio.run(self.part_b())

    def report(self) -> str:
        out = []
        if self.submit_times["AsyncClient.submit"]:  # (not with --skip-submit)
            a = {k: median(v) for k, v in self.submit_times.items()}
            ratio = a["POST /api/v1/jobs"] / a["AsyncClient.submit"]
            out += [f"A. submit {self.args.jobs} held Slurm jobs, warm, median of"
                    f" {self.args.repeat}:",
                    table(["how", "median s", "all runs s"],
                          [(k, f"{a[k]:.3f}", " ".join(f"{x:.3f}" for x in v))
                           for k, v in self.submit_times.items()]),
                    f"POST / API = {ratio:.2f}x (goal: within 1.2x)", ""]
        generator = "wrk" if self.args.wrk else "httpx in this process"
        out += [f"B. {self.args.running} background jobs running; each client GETs"
                f" /api/v1/jobs/{{id}} every 0.5 s for {self.args.seconds} s"
                f" (load generator: {generator}):",
                table(["clients", "requests", "errors", "p50 ms", "p99 ms", "max ms",
                       "server p50 ms", "server p99 ms", "loop lag p50/p99/max ms",
                       "SSH sessions", "sessions/min", "load (1 min)"],
                      [(x["clients"], x["requests"], x["errors"], f"{x['p50_ms']:.1f}",
                        f"{x['p99_ms']:.1f}", f"{x['max_ms']:.1f}", f"{x['app_p50_ms']:.2f}",
                        f"{x['app_p99_ms']:.2f}", _lag(x.get("lag")), x["sessions"],
                        f"{x['sessions_per_min']:.1f}", x["load"]) for x in self.load])]
        for x in self.load:
            if x["clients"] == 50:
                met = "MET" if x["p99_ms"] < 50 else "NOT MET"
                out.append(f"p99 with 50 clients: {x['p99_ms']:.1f} ms: {met}"
                           " (goal: under 50 ms)")
        return "\n".join(out)


def _lag(lag: dict[str, Any] | None) -> str:
    if not lag or not lag.get("samples"):
        return "-"
    return f"{lag['p50_ms']:.2f}/{lag['p99_ms']:.2f}/{lag['max_ms']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--running", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--skip-submit", action="store_true", help="part B only")
    ap.add_argument("--wrk", action="store_true",
                    help="part B's load from wrk (bench/serve_wrk.lua), not httpx here")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if args.wrk and shutil.which("wrk") is None:
        sys.exit("--wrk needs wrk: apt-get install -y wrk")
    b = ServeBench(args)
    drive(b, args.json_out, lambda: {"submit": b.submit_times, "load": b.load,
                                     "wrk_output": b.wrk_output, "args": vars(args)})


if __name__ == "__main__":
    main()
