#!/usr/bin/env python3
"""Round trips: what submit and poll cost on a slow link, in RTTs.

    python bench/roundtrips.py [--delay-ms 25] [--jobs 20] [--repeat 3]

A user-space TCP relay between the client and the test bed's sshd holds every
chunk for ``--delay-ms`` in each direction (the kernel here has no netem), so
one round trip costs 2 x delay on top of loopback.  Each variant runs the CLI
in a fresh state directory (as a new user does) against the real Slurm, and
is reported as wall time and as (wall - the same command without delay) / RTT,
so that CPU time (Python start-up, sbatch) is not counted as round trips.
That difference still carries the noise of the CPU-bound parts (imports,
sbatch) of two runs, and on loopback sshd's small writes can wait for a
delayed ACK (40 ms) that the relay's timing does not reproduce; so each
sshq run is also timed from the inside (the stamps of bench/cli_breakdown.py)
and two network-bound spans are counted on their own, as (delayed -
undelayed) / RTT: ``connect`` (asyncssh connect, host key, auth) and the
agent ``call`` (channel open to the end of ``run``, less the remote agent's
own work: from having read its program to its last line).  Variants:

- ``connect+true``: asyncssh connects and runs ``true`` (the floor for any
  command over a new connection);
- ``submit N``: ``sshq submit -p tb`` of N one-line jobs;
- ``poll N``: ``sshq poll`` of those N jobs (rate limit off).

Run as root on the test bed (``/var/lib/sshq-testbed/testbed.env``); it
cancels its own jobs at the end.  Results go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Bed, cancel_jobs, load_testbed, new_tag
from cli_breakdown import CHILD, TIMED_BOOTSTRAP


class Relay:
    """A TCP relay on 127.0.0.1 that delays each direction by ``delay`` seconds."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + self.delay, data))
            if not data:
                break
        await sender

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer),
                             return_exceptions=True)


def platforms_file(bed: Bed, port: int, work: Path, tag: str) -> Path:
    known = work / f"known_hosts_{port}"
    key = Path(bed.env["SSHQ_TEST_HOSTKEY_PUB"]).read_text().split()
    known.write_text(f"[{bed.host}]:{port} {key[0]} {key[1]}\n")
    conf = work / f"platforms_{port}.toml"
    conf.write_text(
        f'[platforms.tb]\nhosts = ["{bed.host}"]\nport = {port}\nuser = "{bed.user}"\n'
        f'identity_file = "{bed.key}"\nknown_hosts = "{known}"\njob_runner = "slurm"\n'
        f'run_dir = "~/sshq-bench/{tag}"\nmin_poll_interval = 0\n')
    return conf


def sshq(*args: str, conf: Path, state: Path) -> tuple[float, str, dict[str, float]]:
    """Run the CLI (with cli_breakdown's stamps); wall s, stdout, and the
    ``connect`` and agent ``call`` spans (s, see the module docstring)."""
    stamps = state.parent / "stamps.json"
    env = dict(os.environ, SSHQ_STATE_DIR=str(state), SSHQ_BENCH_BOOTSTRAP=TIMED_BOOTSTRAP,
               SSHQ_BENCH_STAMPS=str(stamps))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *args, "--config", str(conf)],
                       capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"sshq {args[0]} failed: {p.stderr}")
    t = json.loads(stamps.read_text())
    if t.get("runs") != 1:  # (a fresh state dir and a fresh run dir: one SSH command)
        raise RuntimeError(f"sshq {args[0]}: {t.get('runs')} agent calls, not one")
    r = t["remote"]
    connect = t["connect_end"] - t["connect_start"]  # (inside the first run)
    spans = {"connect": connect,
             "call": (t["run_end"] - t["run_start"]) - connect - (r["t3"] - r["t1"])}
    return wall, p.stdout, spans


def connect_true(bed: Bed, port: int, known: Path) -> float:
    code = (
        "import asyncio, asyncssh, sys, time\n"
        "async def main():\n"
        f"    async with asyncssh.connect({bed.host!r}, port={port}, username={bed.user!r},"
        f" client_keys=[{bed.key!r}], known_hosts={str(known)!r}) as c:\n"
        "        await c.run('true', check=True)\n"
        "t=time.perf_counter(); asyncio.run(main()); print(time.perf_counter()-t)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True)
    return float(p.stdout)


def measure(bed: Bed, relay: Relay, jobs: int, work: Path, tag: str,
            spans: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    # a fresh run dir too: with a run dir that earlier runs used, a fresh state
    # dir's submit numbers exist there already and submit goes again (2 calls)
    conf = platforms_file(bed, relay.port, work, f"{tag}/{secrets.token_hex(4)}")
    state = Path(tempfile.mkdtemp(dir=work)) / "state"
    scripts = []
    for i in range(jobs):
        f = work / f"{tag}_{i:03d}.sh"
        f.write_text("#!/bin/bash\ntrue\n")
        scripts.append(str(f))
    out: dict[str, float] = {}
    out["connect+true"] = connect_true(bed, relay.port, work / f"known_hosts_{relay.port}")
    out[f"submit {jobs}"], text, sp = sshq("submit", "-p", "tb", "--json", *scripts,
                                           conf=conf, state=state)
    for k, v in sp.items():
        spans.setdefault(f"submit {jobs}", {}).setdefault(k, []).append(v)
    ids = [str(j["id"]) for j in json.loads(text)]
    out[f"poll {jobs}"], _, sp = sshq("poll", *ids, conf=conf, state=state)
    for k, v in sp.items():
        spans.setdefault(f"poll {jobs}", {}).setdefault(k, []).append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, default=25.0,
                    help="delay per direction, ms (RTT = 2 x delay)")
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    bed = Bed(load_testbed())
    tag = new_tag()
    rtt = 2 * args.delay_ms / 1000
    fast, slow = Relay(int(bed.port), 0.0), Relay(int(bed.port), args.delay_ms / 1000)
    runs: dict[str, dict[str, list[float]]] = {"fast": {}, "slow": {}}
    spans: dict[str, dict[str, dict[str, list[float]]]] = {"fast": {}, "slow": {}}
    print(f"load average at the start: {Path('/proc/loadavg').read_text().strip()}")
    try:
        with tempfile.TemporaryDirectory() as d:
            for _ in range(args.repeat):
                for name, relay in (("fast", fast), ("slow", slow)):
                    for k, v in measure(bed, relay, args.jobs, Path(d), tag,
                                        spans[name]).items():
                        runs[name].setdefault(k, []).append(v)
    finally:
        cancel_jobs(bed.user, tag)
        bed.ssh(f"rm -rf ~/sshq-bench/{tag}", check=False)
    print(f"RTT {rtt * 1000:.0f} ms (delay {args.delay_ms:g} ms each way), {args.jobs} jobs,"
          f" median of {args.repeat}, fresh state dir each time")
    print(f"load average at the end: {Path('/proc/loadavg').read_text().strip()}")
    print(f"{'variant':<14} {'no delay s':>10} {'delayed s':>10} {'extra RTTs':>10}"
          f" {'connect RTTs':>12} {'call RTTs':>10}")
    for k in runs["fast"]:
        f, s = statistics.median(runs["fast"][k]), statistics.median(runs["slow"][k])
        line = f"{k:<14} {f:>10.3f} {s:>10.3f} {(s - f) / rtt:>10.1f}"
        if k in spans["fast"]:
            d = {n: (statistics.median(spans["slow"][k][n])
                     - statistics.median(spans["fast"][k][n])) / rtt for n in ("connect", "call")}
            line += f" {d['connect']:>12.1f} {d['call']:>10.1f}"
        print(line)


if __name__ == "__main__":
    main()
