"""Tests of tests/netns.py: real hosts in network namespaces, each with its own sshd.

Everything goes through the real system ``ssh`` (or the real ``sshq``) to the
real sshds; the hosts' link is a real veth, their crash a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import MAX_SLOTS, NetnsHost, NetnsHosts

from sshq.config import parse_config

pytestmark = pytest.mark.sshd

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _restored(netns_hosts: NetnsHosts) -> Iterator[None]:
    """Every test leaves the shared hosts up (link up, sshd listening)."""
    yield
    netns_hosts.restore()


def _ssh(host: NetnsHost, command: str, connect_timeout: float = 5,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*host.ssh_args(connect_timeout), command], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks after boot); None if it is gone or a zombie.

    A process is (pid, start time): a pid alone may be reused by another one.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _alive(pid: int) -> bool:
    """Live and not a zombie (a killed orphan may stay a zombie until reaped)."""
    return _start_time(pid) is not None


def _still_running(procs: list[tuple[int, str]]) -> list[int]:
    """Those of ``procs`` (pid, start time) that still run."""
    return [pid for pid, started in procs if _start_time(pid) == started]


def _long_lived(host: NetnsHost) -> list[tuple[int, str]]:
    """The host's sshd listener and a process a session left running, as (pid, start time).

    Not ``host.pids()``: that may list a short-lived sshd child forked for a
    connection (the port probe's), gone a moment later.
    """
    r = _ssh(host, "nohup sleep 987653 >/dev/null 2>&1 </dev/null & echo $!")
    assert r.returncode == 0, r.stderr
    procs = []
    for pid in (host.sshd_pid(), int(r.stdout)):
        assert pid is not None
        started = _start_time(pid)
        assert started is not None, f"{pid} is not running"
        procs.append((pid, started))
    return procs


def _links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                          check=True).stdout


def test_echo_ok_on_every_host_lands_in_its_namespace(netns_hosts: NetnsHosts) -> None:
    assert len(netns_hosts) == 3
    assert [h.alias for h in netns_hosts] == ["sqh1", "sqh2", "sqh3"]
    assert len({h.name for h in netns_hosts}) == 3
    assert len({h.address for h in netns_hosts}) == 3
    for h in netns_hosts:
        r = _ssh(h, "echo ok; id -un; readlink /proc/self/ns/net")
        assert r.returncode == 0, r.stderr
        ok, user, ns = r.stdout.split()
        assert (ok, user) == ("ok", "sshqtest")
        assert ns == f"net:[{_netns_inode(h.name)}]"
        assert h.destination == f"sshqtest@{h.address}"
        assert h.address.startswith("10.200.") and h.address.endswith(".2")
        assert len(h.veth) <= 15
        route = subprocess.run(["ip", "-o", "route", "get", h.address], capture_output=True,
                               text=True, check=True).stdout
        assert f" dev {h.veth} " in route
        assert netns_hosts[h.name] is h and netns_hosts[h.alias] is h


def test_known_hosts_lists_every_host_with_the_test_bed_key(
        netns_hosts: NetnsHosts, testbed: dict[str, str]) -> None:
    key = Path(testbed["SSHQ_TEST_HOSTKEY_PUB"]).read_text().split()[:2]
    lines = [ln.split() for ln in netns_hosts.known_hosts.read_text().splitlines()]
    assert lines == [[h.address, *key] for h in netns_hosts]
    assert all(h.known_hosts == netns_hosts.known_hosts for h in netns_hosts)


def test_ssh_config_aliases(netns_hosts: NetnsHosts, tmp_path: Path) -> None:
    cfg = netns_hosts.ssh_config(tmp_path / "ssh_config")
    text = cfg.read_text()
    assert "StrictHostKeyChecking yes" in text
    for h in netns_hosts:
        r = subprocess.run(["ssh", "-F", str(cfg), h.alias, "readlink /proc/self/ns/net"],
                           capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"net:[{_netns_inode(h.name)}]"
    assert netns_hosts.ssh_home(tmp_path / "home").read_text() == text


def test_sshq_through_platform_toml_and_ssh_config_alias(
        netns_hosts: NetnsHosts, tmp_path: Path, state_dir: Path, run_id: str) -> None:
    h1, h2 = netns_hosts[0], netns_hosts[1]
    rd = f"~/sshq-test/netns-{run_id}"
    cfg = tmp_path / "platforms.toml"
    # h2 through its ~/.ssh/config alias (asyncssh reads $HOME/.ssh/config).
    cfg.write_text(h1.platform_toml("n1", rd)
                   + f'[platforms.n2]\nhosts = ["{h2.alias}"]\njob_runner = "background"\n'
                     f'run_dir = "{rd}"\n')
    home = tmp_path / "home"
    netns_hosts.ssh_home(home)
    env = dict(os.environ, HOME=str(home), SSHQ_CONFIG=str(cfg),
               SSHQ_STATE_DIR=str(state_dir))
    for n, (platform, host) in enumerate([("n1", h1), ("n2", h2)], start=1):
        r = subprocess.run([sys.executable, "-m", "sshq", "submit", "-p", platform, "--wait",
                            "--command", "readlink /proc/self/ns/net"],
                           capture_output=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-m", "sshq", "cat-log", str(n)],
                           capture_output=True, env=env, timeout=120)
        assert r.stdout.decode().strip() == f"net:[{_netns_inode(host.name)}]"
    _ssh(h1, f"rm -rf {rd}")


def test_platform_toml_tables_parse(netns_hosts: NetnsHosts) -> None:
    h = netns_hosts[2]
    text = h.platform_toml("one", "~/rd", connect_timeout=3) + netns_hosts.platform_toml(
        "all", "~/rd")
    table = tomllib.loads(text)["platforms"]["one"]
    assert table == {"hosts": [h.address], "port": 22, "user": "sshqtest",
                     "identity_file": h.identity_file, "known_hosts": str(h.known_hosts),
                     "job_runner": "background", "transport": "asyncssh", "run_dir": "~/rd",
                     "connect_timeout": 3}
    platforms = parse_config(text)
    assert platforms["one"].hosts == (h.address,)
    assert platforms["all"].hosts == tuple(x.address for x in netns_hosts)


def test_kill_all_kills_sessions_and_everything_they_started(
        netns_hosts: NetnsHosts) -> None:
    h = netns_hosts[0]
    # A detached child (its session is over) and a foreground one (session live).
    r = _ssh(h, "nohup sleep 987651 >/dev/null 2>&1 </dev/null & echo $!")
    assert r.returncode == 0, r.stderr
    detached = int(r.stdout)
    live = subprocess.Popen([*h.ssh_args(), "sleep 987652"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        attached = None
        while attached is None:
            for pid in h.pids():
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00987652\x00":
                        attached = pid
                except OSError:
                    pass
            assert time.monotonic() < deadline, "the foreground sleep did not start"
            time.sleep(0.05)
        in_ns = h.pids()
        assert detached in in_ns and attached in in_ns
        assert os.stat(f"/proc/{detached}").st_uid != 0  # runs as sshqtest
        listener = h.sshd_pid()
        assert listener in in_ns

        killed = h.kill_all()

        assert {detached, attached, listener} <= set(killed)
        assert h.pids() == []
        assert not _alive(detached) and not _alive(attached) and not _alive(listener)
        pg = subprocess.run(["pgrep", "-f", "^sleep 98765[12]$"], capture_output=True,
                            text=True)
        assert pg.stdout == ""
        assert live.wait(timeout=10) != 0  # its connection died with the host
    finally:
        live.kill()
        live.wait()
    r = _ssh(h, "echo ok", connect_timeout=2)
    assert r.returncode == 255 and "Connection refused" in r.stderr
    assert h.sshd_pid() is None and not h.accepting()

    pid = h.start_sshd()
    assert pid == h.sshd_pid() and h.accepting()
    r = _ssh(h, "echo ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_start_sshd_restarts_a_running_sshd(netns_hosts: NetnsHosts) -> None:
    h = netns_hosts[2]
    old = h.sshd_pid()
    assert old is not None
    new = h.start_sshd()
    assert new != old and not _alive(old)
    assert _ssh(h, "echo ok").stdout == "ok\n"


def test_link_down_times_out_and_link_up_restores(netns_hosts: NetnsHosts) -> None:
    h, other = netns_hosts[1], netns_hosts[2]
    h.link_down()
    assert not h.link_is_up()
    # Packets to the host go to the slot's sink (dropped), never out of the machine.
    route = subprocess.run(["ip", "-o", "route", "get", h.address], capture_output=True,
                           text=True, check=True).stdout
    assert f" dev sqsink{netns_hosts.slot} " in route
    t0 = time.monotonic()
    r = _ssh(h, "echo ok", connect_timeout=2)
    took = time.monotonic() - t0
    assert r.returncode == 255 and "timed out" in r.stderr, r.stderr
    assert 1.5 < took < 10
    assert _ssh(other, "echo ok").stdout == "ok\n"  # the others are not cut off
    assert h.sshd_pid() is not None                  # the host itself lives on

    h.link_up()
    assert h.link_is_up()
    r = _ssh(h, "echo ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_host_restarted_while_partitioned(netns_hosts: NetnsHosts) -> None:
    h = netns_hosts[1]
    h.link_down()
    h.kill_all()
    t0 = time.monotonic()
    pid = h.start_sshd()  # cannot probe the port: waits for the pid file only
    assert time.monotonic() - t0 < 5 and pid == h.sshd_pid()
    h.link_up()           # ... and this waits for the port
    assert h.accepting()
    assert _ssh(h, "echo ok").stdout == "ok\n"


def test_teardown_removes_everything(netns_hosts: NetnsHosts) -> None:
    with NetnsHosts(2) as hs:
        assert hs.slot != netns_hosts.slot  # a second set takes another slot
        assert {h.address for h in hs}.isdisjoint(h.address for h in netns_hosts)
        names = [h.name for h in hs]
        links = [h.veth for h in hs] + [f"sqsink{hs.slot}"]
        procs = [p for h in hs for p in _long_lived(h)]
        assert {pid for pid, _ in procs} <= {p for h in hs for p in h.pids()}
        workdir = hs.workdir
        assert _ssh(hs[1], "echo ok").stdout == "ok\n"
        hs[0].link_down()  # torn down whatever state it is in
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not set(names) & {ln.split()[0] for ln in netns.splitlines() if ln}
    assert not any(f" {link}:" in _links() or f" {link}@" in _links() for link in links)
    assert _still_running(procs) == []
    assert not workdir.exists()
    # ... and the shared set is untouched.
    assert _ssh(netns_hosts[0], "echo ok").stdout == "ok\n"


def test_teardown_after_a_failure_midway(netns_hosts: NetnsHosts) -> None:
    with pytest.raises(ZeroDivisionError):
        with NetnsHosts(1) as hs:
            name, procs = hs[0].name, _long_lived(hs[0])
            1 / 0  # noqa: B018
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split()
    assert _still_running(procs) == []


def test_stale_slot_of_a_crashed_run_is_cleaned_up(netns_hosts: NetnsHosts) -> None:
    slot = MAX_SLOTS - 1
    child = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from netns import NetnsHosts\n"
        f"hs = NetnsHosts(1, slot={slot}).__enter__()\n"
        "print(hs[0].name, hs[0].sshd_pid(), hs.workdir, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    name, old_pid, old_workdir = r.stdout.split()
    assert _alive(int(old_pid)) and Path(old_workdir).is_dir()  # left behind

    with NetnsHosts(1, slot=slot) as hs:
        assert hs[0].name == name
        assert not _alive(int(old_pid)) and not Path(old_workdir).exists()
        assert _ssh(hs[0], "echo ok").stdout == "ok\n"


def test_skips_without_root_or_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("SSHQ_REQUIRE_TESTBED", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not root"):
        NetnsHosts(1).__enter__()
    monkeypatch.setenv("SSHQ_REQUIRE_TESTBED", "1")
    with pytest.raises(pytest.fail.Exception, match="not root"):
        NetnsHosts(1).__enter__()
    with pytest.raises(ValueError):
        NetnsHosts(0)
