#!/usr/bin/env python3
"""Submit benchmark: N trivial Slurm jobs, sshq vs the alternatives, on the real test bed.

    python bench/submit_bench.py [--jobs 100] [--repeat 3]

Run as root on the test bed (``/var/lib/sshq-testbed/testbed.env``): root
cancels the benchmark's Slurm jobs between variants.  Variants (each timed
as wall time, median of ``--repeat``):

a. ``sshq submit -p tb <N files>`` (one CLI invocation; warm: remote-init
   cached by an untimed warm-up submit; cold: fresh SSHQ_STATE_DIR and run
   dir; each also "bytecode cached": the CLI given a bytecode cache of its
   own, ``PYTHONPYCACHEPREFIX`` in the run's temporary dir, warmed untimed,
   as ``pip install`` gives, where the environment says
   PYTHONDONTWRITEBYTECODE=1 and sshq is an editable install), the Python
   API (``AsyncClient.submit`` with N JobSpecs; a fresh client that
   connects, and a client already connected), and the CLI with
   ``submit_concurrency`` = each value of ``--sweep``;
b. a loop of N ``ssh -S <ctl> ... sbatch`` over one OpenSSH ControlMaster;
c. a loop of N fresh ``ssh ... sbatch`` (no multiplexing);
d. the limit: one ssh runs ``for f in ...; do sbatch $f; done`` on the login
   node, timed inside the remote shell with ``date +%s.%N``; with ``--diag``
   (default) also ``xargs -P K sbatch`` for each K of ``--sweep``.

Every job is ``#!/bin/bash\\ntrue``; the scripts for b-d are copied to the
remote run dir once, untimed.  Between variants the run's jobs are cancelled
(by job name prefix: only this run's jobs; ``--scancel-user`` does
``scancel -u sshqtest``) and the script waits until squeue no longer shows
them.  Diagnostics (``--diag``) break the sshq time down: CLI start-up,
asyncssh connect, the agent's wall time on the remote side, ``python3``
start-up remotely, and a cProfile of the client side.  At the end every job
is cancelled, the ControlMaster closed and ``~/sshq-bench/<tag>`` removed.
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
import resource
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
    SUBMITTED_RE,
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
from sshq.config import load_config

SCRIPT = b"#!/bin/bash\ntrue\n"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.jobs
        self.bed = Bed(load_testbed())
        if not self.bed.slurm:
            sys.exit("the test bed has no Slurm (SSHQ_TEST_SLURM != 1)")
        self.tag = new_tag()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sshq-{self.tag}-"))
        self.remote_base = f"~/sshq-bench/{self.tag}"
        self.raw_dir = f"{self.bed.home}/sshq-bench/{self.tag}/raw"
        self.sshq = shutil.which("sshq") or sys.exit("sshq is not on PATH")
        # the console script itself, when `sshq` on PATH is a wrapper (pyenv shim)
        direct = Path(sys.executable).parent / "sshq"
        self.sshq_direct = (str(direct) if direct.is_file()
                            and direct.resolve() != Path(self.sshq).resolve() else None)
        self.ctl = str(self.tmp / "ctl")
        self.cm_started = False
        self.times: dict[str, list[float]] = {}
        self.loads: list[float] = []  # 1-minute load average before each timed run
        self.cpu: dict[str, list[float]] = {}  # CLI variants: the CLI's CPU s
        self.last_cpu = float("nan")
        self.notes: dict[str, Any] = {}
        self.runner = asyncio.Runner()
        self.api_conn: AsyncClient | None = None

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        sdir = self.tmp / "scripts"
        sdir.mkdir()
        self.files = []
        for i in range(1, self.n + 1):
            p = sdir / f"{self.tag}_{i:04d}.sh"
            p.write_bytes(SCRIPT)
            p.chmod(0o755)
            self.files.append(str(p))
        self.warm_file = self.tmp / f"{self.tag}_warm.sh"
        self.warm_file.write_bytes(SCRIPT)
        self.specs = [JobSpec.from_file(f) for f in self.files]
        # platforms: every sshq identity gets its own run dir, so that submit
        # numbers from different state databases never meet in one log dir.
        self.sweep = [int(k) for k in self.args.sweep.split(",") if k.strip()]
        parts = [
            self.bed.platform_toml("tb", job_runner="slurm", run_dir=f"{self.remote_base}/cli"),
            self.bed.platform_toml("tb_apif", job_runner="slurm",
                                   run_dir=f"{self.remote_base}/apif"),
            self.bed.platform_toml("tb_apic", job_runner="slurm",
                                   run_dir=f"{self.remote_base}/apic"),
            self.bed.platform_toml("tb_ossh", job_runner="slurm", transport="openssh",
                                   run_dir=f"{self.remote_base}/ossh"),
        ]
        for k in self.sweep:
            parts.append(self.bed.platform_toml(f"tb_c{k}", job_runner="slurm",
                                                run_dir=f"{self.remote_base}/c{k}",
                                                submit_concurrency=k))
        self.toml = self.tmp / "platforms.toml"
        self.toml.write_text("".join(parts))
        self.state = self.tmp / "state"
        cfg = load_config(self.toml, must_exist=True)
        self.concurrency = cfg.platform("tb").submit_concurrency
        self.notes["submit_concurrency (platform tb, default)"] = self.concurrency
        # raw scripts for b-d, one ssh + tar, untimed
        tar = subprocess.run(["tar", "cf", "-", "-C", str(sdir), "."], capture_output=True,
                             check=True).stdout
        self.bed.ssh(f"mkdir -p {shlex.quote(self.raw_dir)} && tar xf - -C "
                     f"{shlex.quote(self.raw_dir)}", input=tar)
        # OpenSSH ControlMaster for b (untimed)
        subprocess.run([*self.bed.ssh_argv("-M", "-N", "-f", "-o", f"ControlPath={self.ctl}",
                                           "-o", "ControlPersist=900")],
                       check=True, stdin=subprocess.DEVNULL, timeout=30)
        self.cm_started = True
        # warm-ups: remote-init cached for every warm platform (untimed)
        for plat in ["tb", "tb_ossh", *(f"tb_c{k}" for k in self.sweep)]:
            self.cli([str(self.warm_file)], plat, self.cli_env(self.state))
        # ... and the bytecode cache of the "bytecode cached" variants (untimed)
        self.cli([str(self.warm_file)], "tb", self.cli_env(self.state, cached=True))
        if self.args.compare_src:
            env = self.cli_env(self.tmp / "state-other", cached=True)
            env["PYTHONPATH"] = str(Path(self.args.compare_src).resolve())
            self.cli([str(self.warm_file)], "tb", env, exe=[sys.executable, "-m", "sshq"])
        self.runner.run(self._api_warm())
        self.clean()

    async def _api_warm(self) -> None:
        warm = [JobSpec.from_file(self.warm_file)]
        async with AsyncClient(self.toml, state_dir=self.state) as c:
            await c.submit(warm, platform="tb_apif")
        self.api_conn = AsyncClient(self.toml, state_dir=self.state)
        await self.api_conn.submit(warm, platform="tb_apic")

    def cli_env(self, state: Path, toml: Path | None = None,
                cached: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env["SSHQ_CONFIG"] = str(toml or self.toml)
        env["SSHQ_STATE_DIR"] = str(state)
        if cached:  # a bytecode cache of the CLI's own (as an installed package has)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.tmp / "pycache")
        return env

    def clean(self) -> float:
        return cancel_jobs(self.bed.user, self.tag, whole_user=self.args.scancel_user)

    # ------------------------------------------------------------ variants

    def cli(self, files: list[str], platform: str, env: dict[str, str],
            exe: str | list[str] | None = None) -> float:
        exe = [exe] if isinstance(exe, str) else exe or [self.sshq]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run([*exe, "submit", "--json", "-p", platform, *files],
                           capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=600)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # the CLI process's CPU time (and its children's: ctypes' ldconfig/gcc probes)
        self.last_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        if p.returncode != 0:
            raise RuntimeError(f"sshq submit failed ({p.returncode}): {p.stderr.decode()}")
        jobs = json.loads(p.stdout)
        ok = [j for j in jobs if j["state"] == "submitted"]
        if len(ok) != len(files):
            raise RuntimeError(f"only {len(ok)}/{len(files)} submitted: {p.stdout[:500]!r}")
        return dt

    def v_cli_warm(self, rep: int, platform: str = "tb", cached: bool = False) -> float:
        return self.cli(self.files, platform, self.cli_env(self.state, cached=cached))

    def v_cli_direct(self, rep: int) -> float:
        return self.cli(self.files, "tb", self.cli_env(self.state), exe=self.sshq_direct)

    def v_cli_cold(self, rep: int, cached: bool = False, other: bool = False) -> float:
        name = f"cold{'c' if cached else ''}{'o' if other else ''}{rep}"
        toml = self.tmp / f"{name}.toml"
        toml.write_text(self.bed.platform_toml("tb", job_runner="slurm",
                                               run_dir=f"{self.remote_base}/{name}"))
        env = self.cli_env(self.tmp / f"state-{name}", toml, cached=cached)
        if not other:
            return self.cli(self.files, "tb", env)
        # another sshq source tree (--compare-src), e.g. an earlier commit's
        env["PYTHONPATH"] = str(Path(self.args.compare_src).resolve())
        return self.cli(self.files, "tb", env, exe=[sys.executable, "-m", "sshq"])

    def v_api_fresh(self, rep: int) -> float:
        async def go() -> float:
            t0 = time.perf_counter()
            c = AsyncClient(self.toml, state_dir=self.state)
            try:
                jobs = await c.submit(self.specs, platform="tb_apif")
            finally:
                await c.close()
            dt = time.perf_counter() - t0
            assert all(j.job_id for j in jobs), "some jobs not submitted"
            return dt
        return self.runner.run(go())

    def v_api_conn(self, rep: int) -> float:
        async def go() -> float:
            assert self.api_conn is not None
            t0 = time.perf_counter()
            jobs = await self.api_conn.submit(self.specs, platform="tb_apic")
            dt = time.perf_counter() - t0
            assert all(j.job_id for j in jobs), "some jobs not submitted"
            return dt
        return self.runner.run(go())

    def _ssh_loop(self, extra: list[str]) -> float:
        base = self.bed.ssh_argv(*extra)
        ids = 0
        t0 = time.perf_counter()
        for f in self.files:
            name = os.path.basename(f)
            p = subprocess.run([*base, f"cd {shlex.quote(self.raw_dir)} && sbatch {name}"],
                               capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
            if p.returncode == 0 and SUBMITTED_RE.search(p.stdout.decode()):
                ids += 1
        dt = time.perf_counter() - t0
        if ids != self.n:
            raise RuntimeError(f"ssh loop submitted {ids}/{self.n}")
        return dt

    def v_controlmaster(self, rep: int) -> float:
        return self._ssh_loop(["-S", self.ctl])

    def v_fresh_ssh(self, rep: int) -> float:
        return self._ssh_loop(["-o", "ControlMaster=no", "-o", "ControlPath=none"])

    def _remote_timed(self, loop: str) -> float:
        cmd = (f"cd {shlex.quote(self.raw_dir)} || exit 1; t0=$(date +%s.%N); {loop};"
               " t1=$(date +%s.%N); echo \"BENCH_T $t0 $t1\"")
        p = self.bed.ssh(cmd)
        out = p.stdout.decode()
        n = len(SUBMITTED_RE.findall(out))
        if n != self.n:
            raise RuntimeError(f"remote loop submitted {n}/{self.n}: {p.stderr.decode()[:500]}")
        m = re.search(r"BENCH_T (\S+) (\S+)", out)
        assert m
        return float(m.group(2)) - float(m.group(1))

    def v_local(self, rep: int) -> float:
        return self._remote_timed(f'for f in {self.tag}_*.sh; do sbatch "$f"; done')

    def v_local_par(self, k: int) -> Any:
        def f(rep: int) -> float:
            return self._remote_timed(f"ls {self.tag}_*.sh | xargs -P {k} -n 1 sbatch")
        return f

    def v_remote_pool(self, rep: int) -> float:
        prog = (
            "import glob,subprocess,sys,time\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "fs=sorted(glob.glob(sys.argv[1]+'_*.sh'))\n"
            "def one(f):\n"
            " p=subprocess.Popen(['sbatch',f],stdin=subprocess.DEVNULL,"
            "stdout=subprocess.PIPE,stderr=subprocess.PIPE)\n"
            " return p.communicate()[0].decode()\n"
            "with ThreadPoolExecutor(int(sys.argv[2])) as ex:\n"
            " sys.stdout.write(''.join(ex.map(one,fs)))\n"
        )
        return self._remote_timed(f"python3 -c {shlex.quote(prog)} {self.tag}"
                                  f" {self.concurrency}")

    # ------------------------------------------------------------ diagnostics

    def diag(self) -> None:
        """Where sshq's time goes."""
        d: dict[str, Any] = {}
        # CLI start-up (imports everything sshq submit imports)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([self.sshq, "--version"], capture_output=True, check=True)
            ts.append(time.perf_counter() - t0)
        d["cli_startup_s (sshq --version)"] = median(ts)
        for label, argv in [
            ("local_python_startup_s (python -c pass)", [sys.executable, "-c", "pass"]),
            ("local_import_s (python -c 'import sshq.cli.main')",
             [sys.executable, "-c", "import sshq.cli.main"]),
        ] + ([("cli_startup_direct_s (console script --version)", [self.sshq_direct,
              "--version"])] if self.sshq_direct else []):
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                subprocess.run(argv, capture_output=True, check=True)
                ts.append(time.perf_counter() - t0)
            d[label] = median(ts)
        # remote python3 start-up, timed remotely
        out = self.bed.ssh(
            "for i in 1 2 3 4 5; do t0=$(date +%s.%N); python3 -c pass; t1=$(date +%s.%N);"
            " echo \"T $t0 $t1\"; done").stdout.decode()
        ts = [float(b) - float(a) for a, b in re.findall(r"T (\S+) (\S+)", out)]
        d["remote_python3_startup_s"] = median(ts)
        # a fresh ssh doing nothing (connect + auth + session), from here
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.bed.ssh("true")
            ts.append(time.perf_counter() - t0)
        d["fresh_openssh_true_s"] = median(ts)
        # asyncssh connect from a fresh client
        connects = []
        for _ in range(3):
            connects.append(self.runner.run(self._connect_time()))
        d["asyncssh_connect_s"] = median(connects)
        # agent wall time on the remote side, transport.run wall time, total
        d.update(self.runner.run(self._agent_breakdown()))
        self.clean()
        self.notes["diagnostics"] = d

    async def _connect_time(self) -> float:
        async with AsyncClient(self.toml, state_dir=self.state) as c:
            plat = c.config.platform("tb_apic")
            t = c.transport(plat, plat.hosts[0])
            t0 = time.perf_counter()
            await t.connection()  # type: ignore[attr-defined]
            return time.perf_counter() - t0

    async def _agent_breakdown(self) -> dict[str, Any]:
        rows = []
        prof = cProfile.Profile()
        assert self.api_conn is not None
        with timed_agent() as records:
            for rep in range(self.args.repeat):
                records.clear()
                if rep == 0:
                    prof.enable()
                t0 = time.perf_counter()
                await self.api_conn.submit(self.specs, platform="tb_apic")
                total = time.perf_counter() - t0
                if rep == 0:
                    prof.disable()
                (chan, agent, _nbytes), = records
                rows.append((total, chan, agent))
                self.clean()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("cumulative").print_stats(r"sshq|sqlite3|asyncssh", 18)
        self.notes["client_profile"] = s.getvalue()
        tot = median([r[0] for r in rows])
        chan = median([r[1] for r in rows])
        agent = median([r[2] for r in rows])
        return {
            "api_submit_total_s": tot,
            "client_side_local_s (total - channel)": tot - chan,
            "channel_wall_s (asyncssh run: open..exit)": chan,
            "ssh_overhead_s (channel - remote agent)": chan - agent,
            "remote_agent_wall_s (python3 start..exit, incl. sbatch)": agent,
        }

    # ------------------------------------------------------------ run

    def run(self) -> None:
        variants: list[tuple[str, Any]] = [
            (f"a. sshq CLI warm (submit_concurrency={self.concurrency})", self.v_cli_warm),
            ("a. sshq CLI cold (fresh state dir + run dir)", self.v_cli_cold),
            ("a. sshq CLI cold, bytecode cached", lambda rep: self.v_cli_cold(rep, True)),
            ("a. sshq CLI warm, bytecode cached", lambda rep: self.v_cli_warm(rep, cached=True)),
        ]
        if self.args.compare_src:
            variants += [
                ("a. sshq CLI cold, --compare-src", lambda rep: self.v_cli_cold(rep, other=True)),
                ("a. sshq CLI cold, bytecode cached, --compare-src",
                 lambda rep: self.v_cli_cold(rep, cached=True, other=True)),
            ]
        if self.sshq_direct:
            variants.append(("a. sshq CLI warm, console script (no pyenv shim)",
                             self.v_cli_direct))
        variants.append(("a. sshq CLI warm, transport=openssh (ControlPersist master)",
                         lambda rep: self.v_cli_warm(rep, "tb_ossh")))
        variants += [
            ("a. sshq API, fresh client (connect+submit+close)", self.v_api_fresh),
            ("a. sshq API, connected client", self.v_api_conn),
        ]
        for k in self.sweep:
            variants.append((f"a. sshq CLI warm, submit_concurrency={k}",
                             lambda rep, k=k: self.v_cli_warm(rep, f"tb_c{k}")))
        variants += [
            ("b. ssh ControlMaster loop", self.v_controlmaster),
            ("d. local sbatch loop (login node)", self.v_local),
        ]
        if self.args.diag:
            for k in sorted({self.concurrency, *self.sweep}):
                variants.append((f"d. local xargs -P {k} sbatch", self.v_local_par(k)))
            variants.append((f"d. remote python3 ThreadPool({self.concurrency}) x"
                             " subprocess sbatch (agent's mechanism, no file I/O)",
                             self.v_remote_pool))
        if not self.args.skip_fresh:
            variants.append(("c. fresh ssh per job", self.v_fresh_ssh))
        for rep in range(self.args.repeat):
            for name, fn in variants:
                load = Path("/proc/loadavg").read_text().split()[0]
                self.loads.append(float(load))
                dt = fn(rep)
                self.times.setdefault(name, []).append(dt)
                if name.startswith("a. sshq CLI"):
                    self.cpu.setdefault(name, []).append(self.last_cpu)
                print(f"  rep {rep + 1}: {name}: {dt:.3f} s (load {load})", file=sys.stderr,
                      flush=True)
                self.clean()
        if self.args.diag:
            self.diag()

    def report(self) -> str:
        ref_name = next(iter(self.times))
        ref = median(self.times[ref_name])
        rows = []
        for name, ts in self.times.items():
            m = median(ts)
            rows.append((name, f"{m:.3f}", f"{min(ts):.3f}", f"{max(ts):.3f}",
                         f"{self.n / m:.0f}", f"{m / ref:.2f}"))
        out = [f"sshq submit benchmark: {self.n} jobs, median of {self.args.repeat};"
               f" platform submit_concurrency = {self.concurrency} (default);"
               f" 1-minute load average before the timed runs: median"
               f" {median(self.loads):.2f}, {min(self.loads):.2f}..{max(self.loads):.2f}",
               "", table(["variant", "median s", "min s", "max s", "jobs/s",
                          "ratio vs sshq"], rows), ""]

        def get(prefix: str) -> float | None:
            for name, ts in self.times.items():
                if name.startswith(prefix):
                    return median(ts)
            return None

        cm, fresh, local = get("b."), get("c."), get("d. local sbatch loop")
        goals = []
        clis = [n for n in self.times if n.startswith("a. sshq CLI")
                and ("cold" in n or n == ref_name or "bytecode cached" in n)]
        for label, t in [*((n, median(self.times[n])) for n in clis),
                         ("a. sshq API, connected client",
                          get("a. sshq API, connected client"))]:
            if t is None:
                continue
            if cm:
                goals.append((label, ">= 2x faster than ControlMaster loop", f"{cm / t:.2f}x",
                              "MET" if cm / t >= 2 else "MISSED"))
            if fresh:
                goals.append((label, ">= 20x faster than fresh ssh per job",
                               f"{fresh / t:.2f}x", "MET" if fresh / t >= 20 else "MISSED"))
            if local:
                goals.append((label, "<= 1.5x the local sbatch loop", f"{t / local:.2f}x",
                              "MET" if t / local <= 1.5 else "MISSED"))
        out += ["Goals:", "", table(["sshq variant", "goal", "measured", "status"], goals), ""]
        # The same, repeat by repeat (the variants of one repeat ran one after
        # another, so a ratio within a repeat shares the machine's state)
        cm_ts = next((ts for n, ts in self.times.items() if n.startswith("b.")), None)
        loc_ts = self.times.get("d. local sbatch loop (login node)")
        paired = []
        for n in clis:
            ts = self.times[n]
            row: list[object] = [n]
            for ref_ts, faster in ((cm_ts, True), (loc_ts, False)):
                if ref_ts is None:
                    row.append("")
                    continue
                rs = [c / x if faster else x / c for c, x in zip(ref_ts, ts, strict=True)]
                met = sum(r >= 2 if faster else r <= 1.5 for r in rs)
                row.append(f"{median(rs):.2f}x (met in {met}/{len(rs)})")
            paired.append(row)
        out += ["Goals per repeat (median of the per-repeat ratios; repeats meeting the goal):",
                "", table(["CLI variant", "CM loop / CLI (>= 2)", "CLI / local loop (<= 1.5)"],
                          paired), ""]
        if self.cpu:
            out += ["CPU time of the CLI process (user + sys, with its children; less"
                    " sensitive to the machine's load than wall time):", "",
                    table(["CLI variant", "median CPU s", "min", "max"],
                          [(n, f"{median(v):.3f}", f"{min(v):.3f}", f"{max(v):.3f}")
                           for n, v in self.cpu.items()]), ""]
        d = self.notes.get("diagnostics")
        if d:
            out += ["Diagnostics (medians):", ""]
            out += [table(["quantity", "seconds"], [(k, f"{v:.3f}") for k, v in d.items()]), ""]
        if "client_profile" in self.notes:
            out += ["Client-side cProfile of one API submit (connected client), cumulative:",
                    "", self.notes["client_profile"]]
        return "\n".join(out)

    def cleanup(self) -> None:
        try:
            self.clean()
        except Exception as exc:  # keep cleaning
            print(f"warning: cancel failed: {exc}", file=sys.stderr)
        if self.api_conn is not None:
            try:
                self.runner.run(self.api_conn.close())
            except Exception:
                pass
        self.runner.close()
        if self.cm_started:
            subprocess.run([*self.bed.ssh_argv("-o", f"ControlPath={self.ctl}", "-O", "exit")],
                           capture_output=True, stdin=subprocess.DEVNULL)
        cm_dir = self.state / "cm"
        if cm_dir.is_dir():  # sshq's openssh transport leaves a ControlPersist master
            for sock in cm_dir.iterdir():
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                               capture_output=True, stdin=subprocess.DEVNULL)
        if not self.args.keep:
            self.bed.remove_remote_dir(self.tag)
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep", default="1,2,8,16",
                    help="submit_concurrency values to try besides the default (comma list)")
    ap.add_argument("--no-diag", dest="diag", action="store_false",
                    help="skip diagnostics (xargs -P floors, time breakdown, profile)")
    ap.add_argument("--skip-fresh", action="store_true", help="skip variant c (slow)")
    ap.add_argument("--scancel-user", action="store_true",
                    help="cancel ALL of the test user's jobs between variants (scancel -u),"
                    " not only this run's")
    ap.add_argument("--keep", action="store_true", help="keep remote and local files")
    ap.add_argument("--json-out", help="also write the raw figures as JSON here")
    ap.add_argument("--compare-src", metavar="DIR",
                    help="also run the CLI cold from another sshq source tree (DIR holds the"
                    " sshq package, e.g. `git archive COMMIT src | tar x` then DIR=src), as"
                    " `python -m sshq` with PYTHONPATH=DIR")
    args = ap.parse_args()
    b = Bench(args)
    drive(b, args.json_out, lambda: {
        "jobs": args.jobs, "repeat": args.repeat, "times": b.times, "loads": b.loads,
        "cli_cpu": b.cpu,
        "notes": {k: v for k, v in b.notes.items() if k != "client_profile"}})

if __name__ == "__main__":
    main()
