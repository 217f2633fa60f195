#!/usr/bin/env python3
"""Where the time of one ``sshq submit`` of N jobs goes, on a fresh state dir.

    python bench/cli_breakdown.py [--jobs 100] [--repeat 5] [--pycache both]

Runs the real CLI (``sshq.cli.main.main``, unchanged) in a child Python that
notes ``time.monotonic()`` at each phase boundary, by wrapping functions from
the outside (nothing in ``src/`` is changed).  The remote agent is started by
a timed bootstrap that reads the same program from stdin, notes when it got
it, loaded it (decompress + compile + the module-level code and imports), ran
remote-init and the submissions, and writes its stamps to stderr.  The test
bed's "remote" host is this machine, so both sides share one monotonic
clock.  Each repeat uses a fresh ``SSHQ_STATE_DIR`` and a fresh run dir
(remote-init travels inside the submit call), as a new user's first submit.

Phases (seconds, median of ``--repeat``):

- ``interpreter``: process spawn until the child's first line (interpreter
  and ``site``);
- ``sshq imports``: ``import sshq.cli.main``;
- ``cli before transport``: click, reading the scripts, the platforms file,
  creating the state database, reserving the jobs;
- ``transport (asyncssh import)``: the first ``HostPool.transport`` call,
  which imports asyncssh;
- ``render + request``: job scripts, state rows and the agent's request
  (compressing the agent program once per process);
- ``connect``: asyncssh connect, host key check and authentication;
- ``channel open``: until asyncssh has the session channel open and the
  command accepted;
- ``remote python start``: from there until the remote interpreter runs the
  bootstrap's first line (its start-up and ``site``);
- ``remote stdin``: reading the program from stdin;
- ``remote load``: decompress, compile and run the agent's module-level code
  (its imports);
- ``remote-init``: in the agent;
- ``sbatch x N``: the agent's submissions, first start to last end, at the
  platform's ``submit_concurrency``, with the agent's own file writes;
- ``remote rest``: the agent's other work (reading the request, writing the
  reply frame);
- ``remote exit + channel close``: from the agent's last line until the
  client's ``run`` returns (interpreter exit, sshd's EOF, exit status and
  close);
- ``client after reply``: recording the results, closing the connection,
  printing the JSON;
- ``interpreter exit``: from ``main`` raising ``SystemExit`` to the process's
  end.

``--pycache``: ``env`` runs the child as the environment says (here root's
environment sets PYTHONDONTWRITEBYTECODE=1 and sshq is an editable install
without ``__pycache__``, so sshq's modules are compiled at every start);
``cached`` gives the child a bytecode cache of its own (``PYTHONPYCACHEPREFIX``
in the run's temporary dir, warmed by an untimed run), as ``pip install``
gives; ``both`` alternates them.  ``--compare-src DIR`` adds the same modes
with another sshq source tree first on ``PYTHONPATH`` (e.g. an earlier
commit's ``src``, from ``git archive``), interleaved, for before/after.
Run as root on the test bed; the run's jobs are cancelled after each repeat
and its remote dir removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Bed, cancel_jobs, load_testbed, new_tag, table

#: The remote bootstrap with stamps: reads the program exactly as
#: sshq.remote.protocol.BOOTSTRAP does, runs it without running main, wraps
#: remote_init/submit_one, runs main, and writes the stamps on stderr.
TIMED_BOOTSTRAP = """\
import sys, time
t0 = time.monotonic()
b = sys.stdin.buffer
s = b.read(int(b.readline()))
t1 = time.monotonic()
g = {"__name__": "sshq_bench", "__builtins__": __builtins__}
exec(compile(s, "sshq-agent", "exec"), g)
t2 = time.monotonic()
st = {}
def wrap(name):
    f = g[name]
    def w(*a, **k):
        s0 = time.monotonic()
        try:
            return f(*a, **k)
        finally:
            e0 = time.monotonic()
            st.setdefault(name + "_first", s0)
            st[name + "_last"] = max(st.get(name + "_last", 0.0), e0)
            st[name + "_sum"] = st.get(name + "_sum", 0.0) + e0 - s0
    g[name] = w
for n in ("remote_init", "submit_one", "run"):
    wrap(n)
g["main"]()
t3 = time.monotonic()
st.update(t0=t0, t1=t1, t2=t2, t3=t3)
sys.stderr.write("SSHQBENCH-REMOTE " + repr(st) + "\\n")
"""

#: The child: the real CLI with stamps around it (argv: the sshq arguments).
CHILD = """\
import time
T = {"begin": time.monotonic()}
import json, os, sys, ast, re
import sshq.cli.main as climain
T["imported"] = time.monotonic()
import sshq._client.core as core
import sshq.remote.operations as ops

TIMED = os.environ["SSHQ_BENCH_BOOTSTRAP"]
def timed_argv(python="python3", *, login_shell=False, installed=False):
    assert not (login_shell or installed)
    return [python, "-c", TIMED]
ops.agent_argv = timed_argv

orig_transport = core.HostPool.transport
def transport(self, plat, host):
    first = (plat.name, host) not in self._transports
    if first:
        T.setdefault("transport_start", time.monotonic())
    t = orig_transport(self, plat, host)
    cls = type(t)
    if first and not getattr(cls, "_bench", False):
        T.setdefault("transport_made", time.monotonic())
        cls._bench = True
        oc, orun, oopen = cls._connect_once, cls.run, cls._open
        async def open_(self_, argv):
            proc = await oopen(self_, argv)
            T.setdefault("opened", time.monotonic())
            return proc
        async def connect_once(self_):
            T.setdefault("connect_start", time.monotonic())
            try:
                return await oc(self_)
            finally:
                T.setdefault("connect_end", time.monotonic())
        async def run(self_, argv, **kw):
            T.setdefault("run_start", time.monotonic())
            res = await orun(self_, argv, **kw)
            T.setdefault("run_end", time.monotonic())
            T["runs"] = T.get("runs", 0) + 1  # (the phases are the first call's)
            m = re.search(rb"SSHQBENCH-REMOTE (\\{.*\\})", res.stderr)
            if m:
                T.setdefault("remote", ast.literal_eval(m.group(1).decode()))
            return res
        cls._connect_once, cls.run, cls._open = connect_once, run, open_
    return t
core.HostPool.transport = transport

try:
    climain.main(sys.argv[1:])
except SystemExit as exc:
    T["main_end"] = time.monotonic()
    with open(os.environ["SSHQ_BENCH_STAMPS"], "w") as fh:
        json.dump(T, fh)
    raise
"""

PHASES = [
    "interpreter", "sshq imports", "cli before transport", "transport (asyncssh import)",
    "render + request", "connect", "channel open (client sees it)",
    "remote python start (after channel open)", "remote stdin",
    "remote load", "remote-init", "sbatch x N", "remote rest (request, reply frame)",
    "remote exit + channel close", "client after reply",
    "interpreter exit",
]


def phases(spawn: float, end: float, t: dict[str, Any]) -> dict[str, float]:
    """The phases of one run from its stamps (spawn and end: the parent's clock)."""
    r = t["remote"]
    return {
        "interpreter": t["begin"] - spawn,
        "sshq imports": t["imported"] - t["begin"],
        "cli before transport": t["transport_start"] - t["imported"],
        "transport (asyncssh import)": t["transport_made"] - t["transport_start"],
        "render + request": t["run_start"] - t["transport_made"],
        "connect": t["connect_end"] - t["connect_start"],
        "channel open (client sees it)": t["opened"] - t["connect_end"],
        "remote python start (after channel open)": r["t0"] - t["opened"],
        "remote stdin": r["t1"] - r["t0"],
        "remote load": r["t2"] - r["t1"],
        "remote-init": r.get("remote_init_sum", 0.0),
        "sbatch x N": r["submit_one_last"] - r["submit_one_first"],
        "remote rest (request, reply frame)": (r["t3"] - r["t2"])
        - r.get("remote_init_sum", 0.0) - (r["submit_one_last"] - r["submit_one_first"]),
        "remote exit + channel close": t["run_end"] - r["t3"],
        "client after reply": t["main_end"] - t["run_end"],
        "interpreter exit": end - t["main_end"],
    }


class Breakdown:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bed = Bed(load_testbed())
        self.tag = new_tag()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sshq-{self.tag}-"))
        self.files: list[str] = []
        for i in range(1, args.jobs + 1):
            p = self.tmp / f"{self.tag}_{i:04d}.sh"
            p.write_bytes(b"#!/bin/bash\ntrue\n")
            self.files.append(str(p))
        self.pycache = self.tmp / "pycache"
        self.results: dict[str, list[dict[str, float]]] = {}
        self.walls: dict[str, list[float]] = {}

    def env(self, mode: str, state: Path) -> dict[str, str]:
        env = dict(os.environ, SSHQ_STATE_DIR=str(state),
                   SSHQ_BENCH_BOOTSTRAP=TIMED_BOOTSTRAP,
                   SSHQ_BENCH_STAMPS=str(self.tmp / "stamps.json"))
        if mode.endswith(" other"):  # --compare-src: another sshq source tree
            env["PYTHONPATH"] = str(Path(self.args.compare_src).resolve())
        if mode.startswith("cached"):
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        return env

    def once(self, mode: str, name: str) -> tuple[float, dict[str, float]]:
        conf = self.tmp / f"{name}.toml"
        conf.write_text(self.bed.platform_toml(
            "tb", job_runner="slurm", run_dir=f"~/sshq-bench/{self.tag}/{name}"))
        state = self.tmp / f"state-{name}"
        argv = [sys.executable, "-c", CHILD, "--config", str(conf), "submit", "--json",
                "-p", "tb", *self.files]
        t0 = time.monotonic()
        p = subprocess.run(argv, env=self.env(mode, state), capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=600)
        t1 = time.monotonic()
        if p.returncode != 0:
            raise RuntimeError(f"sshq submit failed ({p.returncode}): {p.stderr.decode()}")
        jobs = json.loads(p.stdout)
        if sum(j["state"] == "submitted" for j in jobs) != len(self.files):
            raise RuntimeError(f"not all submitted: {p.stdout[:300]!r}")
        stamps = json.loads((self.tmp / "stamps.json").read_text())
        if stamps.get("runs") != 1:
            raise RuntimeError(f"{stamps.get('runs')} agent calls, not one")
        ph = phases(t0, t1, stamps)
        ph["(remote sbatch run() total / N, s)"] = stamps["remote"]["run_sum"] / len(self.files)
        return t1 - t0, ph

    def run(self) -> None:
        modes = ["env", "cached"] if self.args.pycache == "both" else [self.args.pycache]
        if self.args.compare_src:
            modes += [m + " other" for m in modes]
        for mode in modes:
            if mode.startswith("cached"):  # warm the bytecode cache (untimed)
                self.once(mode, "warm" + mode.replace(" ", "_"))
                cancel_jobs(self.bed.user, self.tag)
        for rep in range(self.args.repeat):
            for mode in modes:
                load = Path("/proc/loadavg").read_text().split()[0]
                wall, ph = self.once(mode, f"{mode.replace(' ', '_')}{rep}")
                cancel_jobs(self.bed.user, self.tag)
                self.walls.setdefault(mode, []).append(wall)
                self.results.setdefault(mode, []).append(ph)
                print(f"  rep {rep + 1} {mode}: {wall:.3f} s (load {load})", file=sys.stderr,
                      flush=True)

    def report(self) -> str:
        modes = list(self.results)
        rows = []
        keys = [*PHASES, "(remote sbatch run() total / N, s)"]
        for k in keys:
            rows.append([k] + [f"{statistics.median(r[k] for r in self.results[m]):.3f}"
                               for m in modes])
        rows.append(["sum of the phases"] + [
            f"{statistics.median(sum(r[k] for k in PHASES) for r in self.results[m]):.3f}"
            for m in modes])
        own = {m: [w - r["sbatch x N"] for w, r in zip(self.walls[m], self.results[m],
                                                          strict=True)] for m in modes}
        rows.append(["wall - sbatch x N (sshq's own cost)"]
                    + [f"{statistics.median(own[m]):.3f}" for m in modes])
        rows.append(["wall (median)"] + [f"{statistics.median(self.walls[m]):.3f}"
                                         for m in modes])
        rows.append(["wall (min..max)"] + [f"{min(self.walls[m]):.3f}..{max(self.walls[m]):.3f}"
                                           for m in modes])
        head = (f"sshq submit of {self.args.jobs} jobs, fresh state dir + run dir, median of"
                f" {self.args.repeat}; columns: --pycache mode")
        return head + "\n\n" + table(["phase (s)", *modes], rows)

    def cleanup(self) -> None:
        cancel_jobs(self.bed.user, self.tag)
        self.bed.remove_remote_dir(self.tag)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pycache", choices=("env", "cached", "both"), default="both")
    ap.add_argument("--json-out", help="also write the raw phases as JSON here")
    ap.add_argument("--compare-src", metavar="DIR",
                    help="also run each mode with another sshq source tree (the directory"
                    " holding its sshq package) first on PYTHONPATH: columns '<mode> other'")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root on the test bed (it cancels the benchmark's Slurm jobs)")
    b = Breakdown(args)
    print(f"load average at the start: {Path('/proc/loadavg').read_text().strip()}")
    try:
        b.run()
    finally:
        b.cleanup()
    print(f"load average at the end: {Path('/proc/loadavg').read_text().strip()}")
    print(b.report())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"walls": b.walls, "phases": b.results},
                                                  indent=2))


if __name__ == "__main__":
    main()
