#!/usr/bin/env python3
"""Task-farm benchmark: sshq farm vs GNU Parallel over SSH vs local xargs, one loopback host.

    python bench/farm_bench.py [--tasks 5000] [--parallel-tasks 1000] [--repeat 3]
                               [--slots N] [--parallel-jobs 2,8] [--memory-tasks 100000]
                               [--skip-sshq] [--json-out FILE]

The issue: "Run 5,000 x ``true`` and 5,000 x ``sleep 0.01`` to one loopback
host over SSH, comparing in the same run: sshq farm; GNU Parallel
``--sshlogin`` over an OpenSSH ControlMaster connection; local ``xargs -P`` on
that host, which is the limit.  Goals: at least 10x GNU Parallel's tasks/s
over SSH; at least 50% of the local xargs rate; client peak memory flat in
the number of tasks: report the peak RSS at 5,000 and at 100,000 tasks."

Run as root on the test bed (``/var/lib/sshq-testbed/testbed.env``: sshd on
127.0.0.1:2222, user sshqtest).  Every tool runs the same batch file, one
shell command a line, with the same number of slots (``--slots``, default:
``nproc`` on the host) against the same host, key and known_hosts:

sshq   ``python -m sshq --config PLATFORMS.toml farm BATCH --hosts bench
       --slots N --format jsonl > out.jsonl`` with SSHQ_STATE_DIR a fresh
       temporary directory (one per benchmark run, warmed by an untimed
       10-task farm); platform ``bench``: job_runner background, transport
       asyncssh, run_dir ``~/sshq-bench/<tag>/run``.  Timed: wall time of the
       whole command, start-up included.  Peak RSS: ``ru_maxrss`` of the
       child from ``os.wait4`` (kB on Linux).  Checked: exit status 0, exactly
       N JSON lines, every seq 1..N once, every exit_status 0, command as in
       the batch file.
parallel  an OpenSSH ControlMaster (``ssh -M -S SOCK -fN``, untimed), then
       ``parallel --will-cite --joblog JL -j J --sshlogin "J/ssh -S SOCK -p
       PORT USER@HOST" < BATCH`` for each J of ``--parallel-jobs`` (default:
       the slots).  GNU Parallel over SSH manages ~50-80 tasks/s, so it runs
       only ``--parallel-tasks`` (default 1,000) tasks and rates (tasks/s)
       are compared.  Checked: exit status 0, joblog has seq 1..N, every
       Exitval and Signal 0.
xargs  the limit, on the host itself: one ssh runs ``sh -c`` with
       ``t0=$(date +%s.%N); xargs -d "\\n" -P N -I{} sh -c {} < BATCH;
       t1=$(date +%s.%N)``; only t1 - t0 is timed (ssh start-up is not).
       The batch file was copied to ``~/sshq-bench/<tag>/`` first (untimed).
       Checked: xargs exit status 0 (123 if any command failed) and the
       remote batch file has N lines.

Workloads: ``true`` and ``sleep 0.01``, ``--tasks`` each (default 5,000).
Variants run round-robin in each of ``--repeat`` repeats; figures are
medians.  Memory: sshq's peak RSS for ``--tasks`` x ``true`` (from the
throughput runs) and for ``--memory-tasks`` x ``true`` (one extra run).
``--skip-sshq`` runs only the comparators (for when ``sshq farm`` is not
there).  At the end the ControlMaster is closed and ``~/sshq-bench/<tag>``
removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Bed, drive, load_testbed, median, new_tag, table

WORKLOADS: dict[str, str] = {"true": "true", "sleep": "sleep 0.01"}
SLEEP_S = {"sleep": 0.01}  # known task duration, for the ideal rate
GOAL_VS_PARALLEL = 10.0
GOAL_VS_XARGS = 0.5
WARM_TASKS = 10


@dataclass
class Rec:
    """One timed run of one tool."""

    tool: str  # "sshq" | "parallel -jJ" | "xargs"
    workload: str
    n: int
    slots: int
    wall_s: float
    rss_kb: int | None  # peak RSS of the client process (largest of its tree); None: remote
    rep: int
    span_s: float | None = None  # sshq: first task start to last task end (its JSON)
    retried: int = 0  # sshq: tasks with attempts > 1 (retries, speculation)

    @property
    def rate(self) -> float:
        return self.n / self.wall_s


# ---------------------------------------------------------------- validation


def check_sshq_jsonl(path: Path, n: int, command: str) -> tuple[float, int]:
    """sshq farm --format jsonl: exactly n lines, seq 1..n each once, all exit_status 0.

    Returns (first start to last end in s, number of tasks with attempts > 1);
    raises RuntimeError when the output is wrong.
    """
    seqs: set[int] = set()
    lines = retried = 0
    t_min, t_max = float("inf"), float("-inf")
    bad: list[str] = []
    with path.open("rb") as f:
        for raw in f:
            lines += 1
            try:
                rec = json.loads(raw)
            except ValueError:
                bad.append(f"line {lines} is not JSON: {raw[:200]!r}")
                continue
            missing = {"seq", "command", "host", "exit_status", "signal", "start", "end",
                       "attempts"} - set(rec)
            if missing:
                bad.append(f"line {lines} lacks {sorted(missing)}: {raw[:200]!r}")
                continue
            seq = rec["seq"]
            if not isinstance(seq, int) or seq in seqs or not 1 <= seq <= n:
                bad.append(f"line {lines}: bad or repeated seq {seq!r}")
            seqs.add(seq)
            t_min, t_max = min(t_min, rec["start"]), max(t_max, rec["end"])
            retried += rec["attempts"] != 1
            if rec["exit_status"] != 0 or rec["command"] != command:
                bad.append(f"line {lines}: {raw[:300]!r}")
            if len(bad) > 5:
                break
    if lines != n and not bad:
        bad.append(f"{lines} lines, expected {n}")
    if len(seqs) != n and not bad:
        bad.append(f"{len(seqs)} distinct seqs, expected {n}")
    if bad:
        raise RuntimeError(f"sshq farm output {path} is wrong (--keep keeps it):\n  "
                           + "\n  ".join(bad[:6]))
    return t_max - t_min, retried


def check_joblog(path: Path, n: int, command: str) -> None:
    """GNU Parallel --joblog (tab-separated; Host holds the ssh command, with spaces)."""
    rows = path.read_text().splitlines()
    if not rows or not rows[0].startswith("Seq\t"):
        raise RuntimeError(f"joblog {path} has no header")
    seqs: set[int] = set()
    bad = []
    for r in rows[1:]:
        f = r.split("\t")
        if len(f) < 9:
            bad.append(r)
            continue
        seqs.add(int(f[0]))
        if f[6] != "0" or f[7] != "0" or f[8] != command:
            bad.append(r)
    if bad or seqs != set(range(1, n + 1)) or len(rows) - 1 != n:
        raise RuntimeError(f"joblog {path}: {len(rows) - 1} rows, {len(seqs)} seqs (want {n});"
                           f" {len(bad)} bad, e.g. {bad[:3]}")


# ---------------------------------------------------------------- running


# Linux carries the peak RSS across exec(): a child's ru_maxrss is at least the
# RSS its parent had when it forked (fs/exec.c: exec_mmap -> setmax_mm_hiwater_rss).
# Measured here: `true` spawned from a 13.9 MiB python reported 13.9 MiB, from a
# 214 MiB one 214 MiB.  So the measured command is not spawned by this (large)
# process but by a small stdlib-only helper, which forks, execs, os.wait4()s it
# and writes "wall_s exit_code ru_maxrss_kB" to a file.  What remains is the
# helper's own RSS at fork (~7 MiB, measured at setup and reported as the floor).
HELPER = """\
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
dt = time.perf_counter() - t0
with open(out, "w") as f:
    f.write("%r %d %d\\n" % (dt, os.waitstatus_to_exitcode(status), ru.ru_maxrss))
"""


def run_measured(argv: list[str], *, stdin: Path | None, stdout: Path, stderr: Path,
                 env: dict[str, str] | None = None, timeout: float) -> tuple[float, int, int]:
    """Run argv under HELPER; return (wall s, exit code, ru_maxrss kB of argv's process).

    Wall time is fork to wait4 in the helper (the helper's own start-up is not
    counted); the RSS is ``os.wait4``'s ``ru_maxrss`` (kB on Linux): the largest
    of the process and of its descendants it waited for.  On timeout the whole
    process group is killed and RuntimeError raised.
    """
    res = stdout.with_name(stdout.name + ".rusage")
    with (open(stdin, "rb") if stdin else open(os.devnull, "rb")) as fi, \
            stdout.open("wb") as fo, stderr.open("wb") as fe:
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", HELPER, str(res), *argv],
                             stdin=fi, stdout=fo, stderr=fe, env=env, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from None
    if p.returncode != 0 or not res.exists():
        raise RuntimeError(f"measuring helper failed ({p.returncode}) for {shlex.join(argv)}:"
                           f" {tail(stderr)}")
    dt, rc, rss = res.read_text().split()
    res.unlink()
    return float(dt), int(rc), int(rss)


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


class FarmBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bed = Bed(load_testbed())
        self.tag = new_tag()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sshq-{self.tag}-"))
        self.remote_base = f"~/sshq-bench/{self.tag}"
        self.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        for w in self.workloads:
            if w not in WORKLOADS:
                sys.exit(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
        self.ctl = str(self.tmp / "ctl")
        self.cm_started = False
        self.toml = self.tmp / "platforms.toml"
        self.state = self.tmp / "state"
        self.recs: list[Rec] = []
        self.mem: list[Rec] = []
        self.commands: dict[str, str] = {}
        self.notes: dict[str, Any] = {}
        self.slots = 0
        self.pjobs: list[int] = []
        self.ptasks = 0
        self.remote_dir = ""

    # ------------------------------------------------------------ setup

    def batch(self, workload: str, n: int) -> Path:
        """The local batch file: n lines of the workload's command."""
        p = self.tmp / f"{workload}_{n}.txt"
        if not p.exists():
            p.write_text((WORKLOADS[workload] + "\n") * n)
        return p

    def remote_batch(self, workload: str, n: int) -> str:
        return f"{self.remote_dir}/{workload}_{n}.txt"

    def setup(self) -> None:
        a = self.args
        self.remote_dir = f"{self.bed.home}/sshq-bench/{self.tag}"
        host_nproc = int(self.bed.ssh("nproc").stdout.decode().strip())
        self.slots = a.slots or host_nproc
        self.pjobs = ([int(j) for j in a.parallel_jobs.split(",") if j.strip()]
                      if a.parallel_jobs else [self.slots])
        self.ptasks = min(a.parallel_tasks, a.tasks)
        self.notes.update({
            "host": f"{self.bed.user}@{self.bed.host}:{self.bed.port}",
            "host nproc": host_nproc, "slots": self.slots,
            "parallel -j": self.pjobs, "tasks": a.tasks, "parallel tasks": self.ptasks,
            "memory tasks": a.memory_tasks, "repeat": a.repeat,
            "GNU parallel": subprocess.run(["parallel", "--version"], capture_output=True,
                                           text=True).stdout.splitlines()[0],
            "ssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                  text=True).stderr.strip(),
            "xargs (host)": self.bed.ssh("xargs --version | head -1").stdout.decode().strip(),
        })
        # batch files: local for sshq and parallel, remote for xargs (untimed copy)
        self.bed.ssh(f"mkdir -p {shlex.quote(self.remote_dir)}")
        for w in self.workloads:
            local = self.batch(w, a.tasks)
            self.batch(w, self.ptasks)
            rb = self.remote_batch(w, a.tasks)
            self.bed.ssh(f"cat > {shlex.quote(rb)}", input=local.read_bytes())
            n = int(self.bed.ssh(f"wc -l < {shlex.quote(rb)}").stdout.decode())
            if n != a.tasks:
                raise RuntimeError(f"remote batch {rb} has {n} lines, expected {a.tasks}")
        # what the RSS method reports for a process that needs ~1 MiB
        floor = self.tmp / "floor.out"
        _, _, rss = run_measured(["true"], stdin=None, stdout=floor,
                                 stderr=floor.with_suffix(".err"), timeout=30)
        self.notes["RSS floor (method, `true`) kB"] = rss
        # OpenSSH ControlMaster for GNU Parallel
        cm = self.bed.ssh_argv("-M", "-S", self.ctl, "-fN")
        self.commands["ControlMaster (untimed, before)"] = shlex.join(cm)
        subprocess.run(cm, check=True, stdin=subprocess.DEVNULL, timeout=30)
        self.cm_started = True
        self.run_parallel("true", 2, self.pjobs[0], rep=-1)  # untimed warm-up
        if not a.skip_sshq:
            self.toml.write_text(self.bed.platform_toml(
                "bench", job_runner="background", transport="asyncssh",
                run_dir=f"{self.remote_base}/run"))
            self.state.mkdir()
            self.run_sshq("true", WARM_TASKS, rep=-1)  # untimed warm-up + format check

    # ------------------------------------------------------------ the three tools

    def sshq_argv(self, batch: Path) -> list[str]:
        return [sys.executable, "-m", "sshq", "--config", str(self.toml), "farm", str(batch),
                "--hosts", "bench", "--slots", str(self.slots), "--format", "jsonl"]

    def run_sshq(self, workload: str, n: int, rep: int) -> Rec:
        batch = self.batch(workload, n)
        argv = self.sshq_argv(batch)
        out = self.tmp / f"sshq_{workload}_{n}_{rep}.jsonl"
        err = out.with_suffix(".stderr")
        env = dict(os.environ, SSHQ_STATE_DIR=str(self.state))
        env.pop("SSHQ_CONFIG", None)
        if rep >= 0:
            self.commands.setdefault(
                f"sshq, {workload} x{n}", f"SSHQ_STATE_DIR={self.state} {shlex.join(argv)}"
                f" > {out.name}")
        dt, rc, rss = run_measured(argv, stdin=None, stdout=out, stderr=err, env=env,
                                   timeout=max(600.0, n / 20))
        if rc != 0:
            raise RuntimeError(f"sshq farm exited {rc}: {shlex.join(argv)}\n{tail(err)}")
        span, retried = check_sshq_jsonl(out, n, WORKLOADS[workload])
        if not self.args.keep:
            out.unlink()
        return Rec("sshq", workload, n, self.slots, dt, rss, rep, span, retried)

    def parallel_argv(self, j: int, joblog: Path) -> list[str]:
        login = f"{j}/ssh -S {self.ctl} -p {self.bed.port} {self.bed.user}@{self.bed.host}"
        return ["parallel", "--will-cite", "--joblog", str(joblog), "-j", str(j),
                "--sshlogin", login]

    def run_parallel(self, workload: str, n: int, j: int, rep: int) -> Rec:
        batch = self.batch(workload, n)
        jl = self.tmp / f"par_{workload}_{n}_j{j}_{rep}.joblog"
        jl.unlink(missing_ok=True)  # --joblog appends
        argv = self.parallel_argv(j, jl)
        if rep >= 0:
            self.commands.setdefault(f"parallel -j{j}, {workload} x{n}",
                                     f"{shlex.join(argv)} < {batch}")
        out = jl.with_suffix(".out")
        dt, rc, rss = run_measured(argv, stdin=batch, stdout=out, stderr=out.with_suffix(
            ".err"), timeout=120 + n * 0.5)
        if rc != 0:
            raise RuntimeError(f"parallel exited {rc}\n{tail(out.with_suffix('.err'))}")
        check_joblog(jl, n, WORKLOADS[workload])
        return Rec(f"parallel -j{j}", workload, n, j, dt, rss, rep)

    def xargs_script(self, workload: str, n: int) -> str:
        rb = shlex.quote(self.remote_batch(workload, n))
        return (f't0=$(date +%s.%N); xargs -d "\\n" -P {self.slots} -I{{}} sh -c {{}} < {rb};'
                ' rc=$?; t1=$(date +%s.%N); echo "BENCH_T $t0 $t1 $rc"')

    def run_xargs(self, workload: str, n: int, rep: int) -> Rec:
        remote = f"sh -c {shlex.quote(self.xargs_script(workload, n))}"
        ssh = self.bed.ssh_argv("-o", "ControlMaster=no", "-o", "ControlPath=none")
        self.commands.setdefault(
            f"xargs, {workload} x{n} (timed inside: t1 - t0)",
            f"{shlex.join([*ssh, remote])}\n    #   i.e. on the host: sh -c SCRIPT, SCRIPT ="
            f"\n    {self.xargs_script(workload, n)}")
        p = self.bed.ssh(remote, timeout=120 + n * 0.1)
        m = re.search(rb"BENCH_T (\S+) (\S+) (\d+)", p.stdout)
        if not m:
            raise RuntimeError(f"xargs: no timing line: {p.stdout[-500:]!r} {p.stderr[-500:]!r}")
        if m.group(3) != b"0":
            raise RuntimeError(f"xargs exited {m.group(3).decode()}: {p.stderr[-500:]!r}")
        return Rec("xargs", workload, n, self.slots, float(m.group(2)) - float(m.group(1)),
                   None, rep)

    # ------------------------------------------------------------ run

    def note(self, r: Rec) -> None:
        rss = f", peak RSS {r.rss_kb / 1024:.1f} MiB" if r.rss_kb else ""
        print(f"  rep {r.rep + 1}: {r.tool:12s} {r.workload:5s} x{r.n}: {r.wall_s:7.3f} s,"
              f" {r.rate:7.1f} tasks/s{rss}", file=sys.stderr, flush=True)

    def run(self) -> None:
        a = self.args
        for rep in range(a.repeat):
            for w in self.workloads:
                runs: list[Callable[[], Rec]] = [partial(self.run_xargs, w, a.tasks, rep)]
                runs += [partial(self.run_parallel, w, self.ptasks, j, rep) for j in self.pjobs]
                if not a.skip_sshq:
                    runs.append(partial(self.run_sshq, w, a.tasks, rep))
                for fn in runs:
                    r = fn()
                    self.recs.append(r)
                    self.note(r)
        if not a.skip_sshq and a.memory_tasks:
            r = self.run_sshq("true", a.memory_tasks, 0)
            self.mem.append(r)
            self.note(r)

    # ------------------------------------------------------------ report

    def medians(self) -> dict[tuple[str, str], dict[str, Any]]:
        groups: dict[tuple[str, str], list[Rec]] = {}
        for r in self.recs:
            groups.setdefault((r.tool, r.workload), []).append(r)
        out = {}
        for key, rs in groups.items():
            walls = [r.wall_s for r in rs]
            m = median(walls)
            rss = [r.rss_kb for r in rs if r.rss_kb]
            out[key] = {"n": rs[0].n, "slots": rs[0].slots, "median_s": m, "min_s": min(walls),
                        "max_s": max(walls), "rate": rs[0].n / m,
                        "rss_mib": max(rss) / 1024 if rss else None, "runs": len(rs)}
        return out

    def goals(self) -> list[dict[str, Any]]:
        med = self.medians()
        goals: list[dict[str, Any]] = []
        for w in self.workloads:
            s = med.get(("sshq", w))
            par = [v for (t, ww), v in med.items() if ww == w and t.startswith("parallel")]
            best_par = max((v["rate"] for v in par), default=None)
            x = med.get(("xargs", w))
            if s and best_par:
                q = s["rate"] / best_par
                goals.append({"workload": w, "goal": f">= {GOAL_VS_PARALLEL:g}x GNU Parallel"
                              " tasks/s (its best -j)", "measured": f"{q:.1f}x",
                              "met": q >= GOAL_VS_PARALLEL})
            if s and x:
                q = s["rate"] / x["rate"]
                goals.append({"workload": w, "goal": f">= {GOAL_VS_XARGS:.0%} of local xargs"
                              " tasks/s", "measured": f"{q:.0%}", "met": q >= GOAL_VS_XARGS})
        small = [r for r in self.recs if r.tool == "sshq" and r.workload == "true"]
        if small and self.mem:
            lo = max(r.rss_kb or 0 for r in small)
            hi = self.mem[0].rss_kb or 0
            q = hi / lo
            goals.append({"workload": "true", "goal": f"peak RSS flat: {self.mem[0].n} tasks"
                          f" <= {1 + self.args.rss_tolerance:.2f} x {small[0].n} tasks",
                          "measured": f"{hi / 1024:.1f} / {lo / 1024:.1f} MiB = {q:.2f}x",
                          "met": q <= 1 + self.args.rss_tolerance})
        return goals

    def report(self) -> str:
        a = self.args
        med = self.medians()
        out = [f"sshq farm benchmark: one host ({self.notes.get('host')}), {self.slots} slots"
               f" (host nproc {self.notes.get('host nproc')}), median of {a.repeat}.",
               f"GNU Parallel ran {self.ptasks} tasks per workload, the others {a.tasks}:"
               " compare tasks/s, not seconds.", ""]
        rows = []
        for (tool, w), v in med.items():
            rows.append((tool, WORKLOADS[w], v["n"], v["slots"], f"{v['median_s']:.3f}",
                         f"{v['min_s']:.3f}", f"{v['max_s']:.3f}", f"**{v['rate']:.0f}**",
                         f"{v['rss_mib']:.1f}" if v["rss_mib"] else "-"))
        for w in self.workloads:
            if w in SLEEP_S:
                rows.append(("(ideal: slots / task time)", WORKLOADS[w], "", self.slots, "",
                             "", "", f"{self.slots / SLEEP_S[w]:.0f}", ""))
        out += [table(["tool", "task", "tasks", "slots/-j", "median s", "min s", "max s",
                       "tasks/s", "client peak RSS MiB"], rows), ""]
        if a.skip_sshq:
            out += ["(--skip-sshq: sshq not run, goals not evaluated)", ""]
        else:
            small = [r for r in self.recs if r.tool == "sshq" and r.workload == "true"]
            mem_rows = [(r.n, f"{(r.rss_kb or 0) / 1024:.1f}", f"{r.wall_s:.2f}",
                         f"{r.rate:.0f}") for r in [
                             *sorted(small, key=lambda r: -(r.rss_kb or 0))[:1], *self.mem]]
            floor = self.notes.get("RSS floor (method, `true`) kB", 0) / 1024
            if mem_rows:
                out += ["sshq client peak RSS (ru_maxrss of `python -m sshq ... farm` from"
                        " os.wait4, `true`; at --tasks the largest of the repeats;"
                        f" the method's floor is {floor:.1f} MiB, see HELPER):",
                        "", table(["tasks", "peak RSS MiB", "wall s", "tasks/s"], mem_rows), ""]
            diag = [(WORKLOADS[r.workload], r.n, r.rep + 1, f"{r.wall_s:.2f}",
                     f"{r.span_s:.2f}", f"{r.wall_s - r.span_s:.2f}",
                     f"{r.n / r.span_s:.0f}", r.retried)
                    for r in [*self.recs, *self.mem] if r.tool == "sshq" and r.span_s]
            out += ["sshq runs: wall time vs the span of its tasks (first start to last end,"
                    " from its JSON): the rest is start-up, connection and shutdown.", "",
                    table(["task", "tasks", "rep", "wall s", "task span s", "wall - span s",
                           "tasks/s in span", "attempts > 1"], diag), ""]
            out += ["Goals:", "", table(["workload", "goal", "measured", "status"], [
                (g["workload"], g["goal"], g["measured"], "✓" if g["met"] else "✗")
                for g in self.goals()]), ""]
        out += ["Exact commands (batch files: one command a line; SOCK, paths as run):", ""]
        out += [f"    # {k}\n    {v}" for k, v in self.commands.items()]
        out += ["", "Versions: " + "; ".join(
            f"{k}: {self.notes[k]}" for k in ("GNU parallel", "ssh", "xargs (host)"))]
        return "\n".join(out)

    def raw(self) -> dict[str, Any]:
        return {
            "notes": self.notes,
            "commands": self.commands,
            "runs": [dict(asdict(r), rate=r.rate) for r in self.recs],
            "memory_runs": [dict(asdict(r), rate=r.rate) for r in self.mem],
            "medians": [{"tool": t, "workload": w, **v} for (t, w), v in self.medians().items()],
            "goals": [] if self.args.skip_sshq else self.goals(),
        }

    def cleanup(self) -> None:
        if self.cm_started:
            subprocess.run(["ssh", "-S", self.ctl, "-O", "exit", "x"], capture_output=True,
                           stdin=subprocess.DEVNULL)
        if not self.args.keep:
            self.bed.remove_remote_dir(self.tag)
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=5000, help="tasks per workload (sshq, xargs)")
    ap.add_argument("--parallel-tasks", type=int, default=1000,
                    help="tasks per workload for GNU Parallel (slow over SSH)")
    ap.add_argument("--workloads", default="true,sleep",
                    help=f"comma list of {', '.join(f'{k} ({v!r})' for k, v in WORKLOADS.items())}")
    ap.add_argument("--slots", type=int, default=0,
                    help="concurrent tasks for all tools (default: nproc on the host)")
    ap.add_argument("--parallel-jobs", default="",
                    help="comma list of -j values for GNU Parallel (default: the slots);"
                    " the goal compares against the best")
    ap.add_argument("--memory-tasks", type=int, default=100000,
                    help="sshq-only run of this many `true` for peak RSS (0: skip)")
    ap.add_argument("--rss-tolerance", type=float, default=0.25,
                    help="'flat' memory: peak RSS at --memory-tasks <= (1 + this) x at --tasks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-sshq", action="store_true",
                    help="run only GNU Parallel and xargs")
    ap.add_argument("--keep", action="store_true", help="keep remote and local files")
    ap.add_argument("--json-out", help="also write the raw figures as JSON here")
    args = ap.parse_args()
    b = FarmBench(args)
    drive(b, args.json_out, b.raw)


if __name__ == "__main__":
    main()
