"""Several real SSH hosts on one machine: network namespaces, each with its own sshd.

A :class:`NetnsHosts` context manager makes N "hosts".  Host ``i`` of slot ``s``
is a network namespace (``sqh1``, ``sqh2``, ... in slot 0; ``sq<s>h1`` ... in
slot ``s`` > 0) joined to this machine by a veth pair::

    root namespace   ve-sqh1  10.200.K.1/24  <-->  eth0  10.200.K.2/24   namespace sqh1

with ``K = 16 * s + i``, and an OpenSSH sshd of its own listening on
``10.200.K.2:22`` with the test bed's host key, config and user (``sshqtest``).
An SSH login to ``10.200.K.2`` lands in that namespace; every process a session
starts stays in it, so :meth:`NetnsHost.kill_all` is a real host crash and
:meth:`NetnsHost.link_down` a real network partition.  The hosts share this
machine's file system, users and home directories: only the network (and so
the set of processes reachable through each sshd) is separate.

Safety:

* Only addresses of the namespaces made here are ever targeted.  A *guard*
  route for each host's /24 points at a sink (a veth whose peer stays down,
  without ARP: it drops everything silently) with a high metric, so that while
  a host's link is down (its connected route is gone) packets to it are dropped
  here - connection attempts time out as in a real partition - and never follow
  the default route out of the machine.
* Concurrent test sessions do not collide: each :class:`NetnsHosts` takes a
  *slot* (an exclusive ``flock`` on ``/run/sshq-netns/slot<s>.lock``, released by
  the kernel if the process dies) and uses only that slot's names and subnets.
  Whatever a crashed earlier run left in a slot (namespaces, their processes,
  veths, the sink, its temporary directory) is removed when the slot is next
  taken; a slot whose subnets are in use on this machine for anything else is
  passed over.
* On exit everything is torn down (processes in the namespaces SIGKILLed,
  veths, sink and namespaces deleted, temporary directory removed), whether or
  not the test failed.

Without root, ``ip netns`` or the test bed, :class:`NetnsHosts` skips the test
(``pytest.skip``), or fails it when ``SSHQ_REQUIRE_TESTBED=1``.

Note: OpenSSH's ``ssh`` reads ``~/.ssh/config`` from the passwd home directory,
not ``$HOME``; :meth:`NetnsHosts.ssh_home` (a ``$HOME`` with ``.ssh/config``)
therefore serves asyncssh, and the system ``ssh`` needs ``-F`` with
:meth:`NetnsHosts.ssh_config`'s file (or :meth:`NetnsHost.ssh_args`).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from testbed import SETUP_HINT, TESTBED_ENV, load_testbed, skip_or_fail

SSHD = "/usr/sbin/sshd"
LOCK_DIR = Path("/run/sshq-netns")
#: Hosts per slot (subnets 10.200.16s+1 ... 10.200.16s+15) and number of slots.
MAX_HOSTS = 15
MAX_SLOTS = 15
SSH_PORT = 22
#: Metric of the guard routes (the kernel's connected routes have metric 0).
GUARD_METRIC = 4242
#: sshd_config keywords replaced by command-line options (-o) for each host.
_REPLACED_KEYWORDS = frozenset({"port", "listenaddress", "pidfile"})


class NetnsError(RuntimeError):
    """A network-namespace host could not be set up, changed or torn down."""


# ---------------------------------------------------------------- helpers

def _ip(*args: str, check: bool = True, timeout: float = 30) -> str:
    """Run ``ip ARGS``; its stdout. Raise :class:`NetnsError` if it fails and ``check``."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def _netns_names() -> set[str]:
    """Names of the existing named network namespaces (``ip netns list``)."""
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def _link_names() -> set[str]:
    """Names of the network interfaces of the root namespace."""
    names = set()
    for line in _ip("-o", "link", "show").splitlines():
        # "12: ve-sqh1@if2: <BROADCAST,...> ..."
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@", 1)[0])
    return names


def _netns_pids(name: str) -> list[int]:
    """Pids of the processes in namespace ``name`` (``ip netns pids``); [] if it is gone."""
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    return [int(tok) for tok in r.stdout.split() if tok.isdigit()]


def _kill_netns_processes(name: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in namespace ``name`` until none is left; the pids killed.

    Repeats, since a process may fork between listing and killing; a killed
    process leaves the namespace when it exits (a zombie is no longer listed).
    """
    deadline = time.monotonic() + timeout
    killed: list[int] = []
    while True:
        pids = _netns_pids(name)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() > deadline:
            raise NetnsError(f"processes still in namespace {name} after SIGKILL: {pids}")
        time.sleep(0.01)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _tcp_accepts(address: str, port: int, timeout: float = 0.5) -> bool:
    """Whether ``address:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _toml_str(value: str) -> str:
    """``value`` as a TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


def unavailable_reason() -> str | None:
    """Why network-namespace hosts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    try:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"ip netns list: {e}"
    if r.returncode != 0:
        return f"ip netns unavailable: {r.stderr.strip()}"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} missing"
    return None


def _slot_names(slot: int) -> tuple[str, str]:
    """The (sink, sink peer) interface names of ``slot``."""
    return f"sqsink{slot}", f"sqsink{slot}p"


def _host_name(slot: int, index: int) -> str:
    """Namespace name of host ``index`` (1-based) of ``slot``."""
    return f"sqh{index}" if slot == 0 else f"sq{slot}h{index}"


def _subnet(slot: int, index: int) -> ipaddress.IPv4Network:
    """The /24 of host ``index`` (1-based) of ``slot``."""
    return ipaddress.IPv4Network(f"10.200.{16 * slot + index}.0/24")


# ---------------------------------------------------------------- one host

class NetnsHost:
    """One host: a network namespace with its own sshd, reached at ``address:22``.

    Made by :class:`NetnsHosts`; the attributes are read-only by convention.

    Attributes:
        name: namespace name (``sqh1``; ``sq<slot>h1`` in slots > 0).
        alias: its ``Host`` alias in :meth:`NetnsHosts.ssh_config` (``sqh1``, any slot).
        address: the host's address (``10.200.K.2``).
        gateway: this machine's address on the host's link (``10.200.K.1``).
        veth: host-side (root namespace) interface of the link.
        port: sshd port (22).
        user: login user (the test bed's, ``sshqtest``).
        identity_file: client private key.
        known_hosts: known_hosts file listing every host of the set with the host key.
        sshd_config: sshd config file (the test bed's, without Port/ListenAddress/PidFile).
        pid_file, log_file: the sshd's pid file and log (``sshd -E``).
    """

    def __init__(self, *, name: str, alias: str, subnet: ipaddress.IPv4Network, user: str,
                 identity_file: str, known_hosts: Path, sshd_config: Path,
                 workdir: Path) -> None:
        hosts = list(subnet.hosts())
        self.name = name
        self.alias = alias
        self.subnet = subnet
        self.gateway = str(hosts[0])
        self.address = str(hosts[1])
        self.veth = f"ve-{name}"
        self.port = SSH_PORT
        self.user = user
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.sshd_config = sshd_config
        self.pid_file = workdir / f"{name}.pid"
        self.log_file = workdir / f"{name}.log"
        assert len(self.veth) <= 15, self.veth

    def __repr__(self) -> str:
        return f"NetnsHost({self.name!r}, {self.address!r})"

    @property
    def destination(self) -> str:
        """``user@address``, e.g. ``sshqtest@10.200.1.2``."""
        return f"{self.user}@{self.address}"

    # -------------------------------------------------------- set-up / tear-down

    def _create(self) -> None:
        """Make the namespace and its link (the guard route must exist already)."""
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
            "netns", self.name)
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/{self.subnet.prefixlen}",
            "dev", "eth0")
        _ip("-n", self.name, "link", "set", "eth0", "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def _destroy(self) -> None:
        """Kill everything in the namespace, delete the link and the namespace."""
        _destroy_host(self.name, self.veth)
        self.pid_file.unlink(missing_ok=True)

    # -------------------------------------------------------- processes

    def pids(self) -> list[int]:
        """Pids of every process in the namespace (sshd listener, sessions, their children)."""
        return _netns_pids(self.name)

    def sshd_pid(self) -> int | None:
        """Pid of the live sshd listener, or None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) and pid in self.pids() else None

    def kill_all(self, timeout: float = 10.0) -> list[int]:
        """The host crashes: SIGKILL every process in its namespace; the pids killed.

        Sessions run as ``sshqtest`` but are killed all the same (we are root),
        and so is anything they started, detached or not (``setsid``,
        ``nohup``, the background job runner): they all stay in the namespace.
        """
        killed = _kill_netns_processes(self.name, timeout)
        self.pid_file.unlink(missing_ok=True)
        return killed

    def start_sshd(self, timeout: float = 10.0) -> int:
        """(Re)start the host's sshd and wait until its port accepts TCP connections.

        A live listener is stopped first (SIGTERM, as a restart; its sessions
        live on).  Returns the new listener's pid.  While the link is down
        (:meth:`link_down`) the port cannot be reached from here: then only the
        pid file is waited for (sshd writes it once it listens), and
        :meth:`link_up` waits for the port.
        """
        old = self.sshd_pid()
        if old is not None:
            os.kill(old, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(old) and time.monotonic() < deadline:
                time.sleep(0.01)
            if _pid_alive(old):
                os.kill(old, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        cmd = ["ip", "netns", "exec", self.name, SSHD, "-f", str(self.sshd_config),
               "-o", f"ListenAddress={self.address}", "-o", f"Port={self.port}",
               "-o", f"PidFile={self.pid_file}", "-E", str(self.log_file)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise NetnsError(f"sshd of {self.name} did not start (exit {r.returncode}):"
                             f" {r.stderr.strip()} {self._log_tail()}")
        if self.link_is_up():
            self.wait_accepting(timeout)
        deadline = time.monotonic() + timeout
        while (pid := self.sshd_pid()) is None:
            if time.monotonic() > deadline:
                raise NetnsError(f"sshd of {self.name}: no live pid in {self.pid_file}")
            time.sleep(0.01)
        return pid

    def accepting(self, timeout: float = 0.5) -> bool:
        """Whether the host's sshd port accepts a TCP connection now."""
        return _tcp_accepts(self.address, self.port, timeout)

    def wait_accepting(self, timeout: float = 10.0) -> None:
        """Wait until the host's sshd port accepts TCP connections."""
        deadline = time.monotonic() + timeout
        while not self.accepting(0.5):
            if time.monotonic() > deadline:
                link = "" if self.link_is_up() else " (its link is down)"
                raise NetnsError(f"{self.address}:{self.port} of {self.name} does not accept"
                                 f" connections after {timeout} s{link} {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "sshd log: " + " | ".join(text.splitlines()[-lines:])

    # -------------------------------------------------------- network

    def link_down(self) -> None:
        """Network partition: set the host-side veth down.

        Packets to the host are then dropped silently (guard route): connection
        attempts time out, established connections hang.
        """
        _ip("link", "set", self.veth, "down")

    def link_up(self, timeout: float = 10.0) -> None:
        """End the partition: set the host-side veth up (waits for sshd, if it runs)."""
        _ip("link", "set", self.veth, "up")
        if self.sshd_pid() is not None:
            self.wait_accepting(timeout)

    def link_is_up(self) -> bool:
        """Whether the host-side veth is administratively up."""
        out = _ip("-o", "link", "show", "dev", self.veth, check=False)
        flags = out.partition("<")[2].partition(">")[0].split(",")
        return "UP" in flags

    def restore(self) -> None:
        """Undo :meth:`link_down` and :meth:`kill_all`: link up, sshd listening."""
        if not self.link_is_up():
            self.link_up()
        if self.sshd_pid() is None or not self.accepting(2.0):
            self.start_sshd()

    # -------------------------------------------------------- clients

    def ssh_args(self, connect_timeout: float = 10) -> list[str]:
        """argv of the system ``ssh`` to this host (append the remote command).

        No ssh_config (``-F /dev/null``), the test key only, strict host-key
        checking against :attr:`known_hosts`, never a prompt.
        """
        return ["ssh", "-F", "/dev/null", "-i", self.identity_file, "-p", str(self.port),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"ConnectTimeout={connect_timeout:g}",
                self.destination]

    def platform_toml(self, name: str, run_dir: str, **extra: object) -> str:
        """A ``[platforms.NAME]`` table for sshq: this host, asyncssh, background runner.

        ``extra`` adds keys (strings quoted, other values as Python ``repr``).
        """
        return _platform_toml(name, [self], run_dir, **extra)


def _platform_toml(name: str, hosts: list[NetnsHost], run_dir: str, **extra: object) -> str:
    h = hosts[0]
    lines = [
        f"[platforms.{name}]",
        "hosts = [" + ", ".join(_toml_str(x.address) for x in hosts) + "]",
        f"port = {h.port}",
        f"user = {_toml_str(h.user)}",
        f"identity_file = {_toml_str(h.identity_file)}",
        f"known_hosts = {_toml_str(str(h.known_hosts))}",
        'job_runner = "background"',
        'transport = "asyncssh"',
        f"run_dir = {_toml_str(run_dir)}",
    ]
    for k, v in extra.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        else:
            lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else v!r}")
    return "\n".join(lines) + "\n"


def _destroy_host(name: str, veth: str) -> None:
    """Kill the processes of namespace ``name``, delete ``veth`` and the namespace."""
    if name in _netns_names():
        _kill_netns_processes(name)
    if veth in _link_names():
        _ip("link", "del", veth)
    if name in _netns_names():
        _ip("netns", "del", name)


# ---------------------------------------------------------------- the set

class NetnsHosts:
    """N network-namespace hosts with their own sshd (a context manager).

    ``with NetnsHosts(3) as hosts:`` makes ``hosts[0]`` ... ``hosts[2]`` (also
    ``hosts["sqh1"]``, by name or alias), all sshds listening; leaving the block
    tears everything down.

    Args:
        n: number of hosts (1 to 15).
        testbed: the test bed's facts (``testbed.env``); read from
            :data:`TESTBED_ENV` if None.
        sshd_config: the sshd config to derive the hosts' from (default: the
            ``sshd_config`` next to ``testbed.env``).
        slot: use this slot (waiting up to ``slot_wait`` s for it); None: the
            first free one.
        slot_wait: seconds to wait for an explicit ``slot``.
    """

    def __init__(self, n: int = 3, *, testbed: Mapping[str, str] | None = None,
                 sshd_config: str | Path | None = None, slot: int | None = None,
                 slot_wait: float = 60.0) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"n must be 1..{MAX_HOSTS}, not {n}")
        if slot is not None and not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot must be 0..{MAX_SLOTS - 1}, not {slot}")
        self.n = n
        self._testbed = dict(testbed) if testbed is not None else None
        self._sshd_config_src = Path(sshd_config) if sshd_config is not None else None
        self._want_slot = slot
        self._slot_wait = slot_wait
        self.slot: int = -1
        self.hosts: list[NetnsHost] = []
        self.workdir: Path = Path()
        self.known_hosts: Path = Path()
        self.setup_seconds: float = 0.0
        self._lock_fd: int | None = None
        self._sink_made = False

    # -------------------------------------------------------- container protocol

    def __iter__(self) -> Iterator[NetnsHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, key: int | str) -> NetnsHost:
        """A host by index, or by namespace name or ssh_config alias."""
        if isinstance(key, int):
            return self.hosts[key]
        for h in self.hosts:
            if key in (h.name, h.alias):
                return h
        raise KeyError(key)

    # -------------------------------------------------------- context manager

    def __enter__(self) -> NetnsHosts:
        self.setup()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.teardown()
        except Exception as e:
            if exc is None:
                raise
            # Do not hide the test's own failure; the next run cleans up the slot.
            exc.add_note(f"also: NetnsHosts tear-down failed: {e}")

    def setup(self) -> None:
        """Make the hosts and start their sshds (skips/fails the test if impossible)."""
        t0 = time.monotonic()
        reason = unavailable_reason()
        if reason is None and self._testbed is None:
            self._testbed = load_testbed()
            if self._testbed is None:
                reason = f"no test bed ({TESTBED_ENV}; {SETUP_HINT})"
        if reason is not None:
            skip_or_fail(f"no network-namespace hosts: {reason}",
                         f"network-namespace hosts required but unavailable: {reason}")
        assert self._testbed is not None
        try:
            self._setup(self._testbed)
        except BaseException:
            self.teardown()
            raise
        self.setup_seconds = time.monotonic() - t0

    def _setup(self, tb: dict[str, str]) -> None:
        src = self._sshd_config_src or Path(TESTBED_ENV).parent / "sshd_config"
        self._take_slot()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sqnetns-s{self.slot}-", dir="/tmp"))
        config = self.workdir / "sshd_config"
        self._write_sshd_config(src, config)
        self.known_hosts = self.workdir / "known_hosts"
        self.hosts = [
            NetnsHost(name=_host_name(self.slot, i), alias=f"sqh{i}",
                      subnet=_subnet(self.slot, i), user=tb["SSHQ_TEST_USER"],
                      identity_file=tb["SSHQ_TEST_KEY"], known_hosts=self.known_hosts,
                      sshd_config=config, workdir=self.workdir)
            for i in range(1, self.n + 1)
        ]
        key_type, key = Path(tb["SSHQ_TEST_HOSTKEY_PUB"]).read_text().split()[:2]
        self.known_hosts.write_text("".join(f"{h.address} {key_type} {key}\n"
                                            for h in self.hosts))
        # The sink and its guard routes first: no moment where a host's
        # address could be routed anywhere but to the host or the sink.
        sink, peer = _slot_names(self.slot)
        self._sink_made = True
        _ip("link", "add", sink, "type", "veth", "peer", "name", peer)
        _ip("link", "set", sink, "arp", "off")
        _ip("link", "set", sink, "up")
        for h in self.hosts:
            _ip("route", "add", str(h.subnet), "dev", sink, "metric", str(GUARD_METRIC))
        for h in self.hosts:
            h._create()
        for h in self.hosts:
            h.start_sshd()

    def _write_sshd_config(self, src: Path, dst: Path) -> None:
        """The test bed's sshd config minus the keywords given per host with ``-o``."""
        kept = []
        for line in src.read_text().splitlines():
            word = line.strip().replace("=", " ").split(maxsplit=1)
            if word and word[0].lower() in _REPLACED_KEYWORDS:
                continue
            kept.append(line)
        head = [f"# derived from {src} by tests/netns.py: Port, ListenAddress and PidFile"
                " are given per host with -o"]
        dst.write_text("\n".join(head + kept) + "\n")
        # OpenSSH >= 9.8 penalises addresses whose sessions crash or fail: not
        # for hosts that the tests crash on purpose.
        probe = subprocess.run([SSHD, "-t", "-f", str(dst), "-o", "PerSourcePenalties=no"],
                               capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        if probe.returncode == 0:
            dst.write_text("\n".join([*head, "PerSourcePenalties no", *kept]) + "\n")
        r = subprocess.run([SSHD, "-t", "-f", str(dst)], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise NetnsError(f"sshd rejects {dst}: {r.stderr.strip()}")

    # -------------------------------------------------------- slots

    def _take_slot(self) -> None:
        """Lock a slot whose subnets are free here; clean up what a crashed run left in it."""
        LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        deadline = time.monotonic() + self._slot_wait
        candidates = [self._want_slot] if self._want_slot is not None else range(MAX_SLOTS)
        while True:
            for slot in candidates:
                fd = os.open(LOCK_DIR / f"slot{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    _cleanup_slot(slot)
                    conflict = _subnet_conflict(slot)
                except BaseException:
                    os.close(fd)
                    raise
                if conflict is None:
                    self.slot, self._lock_fd = slot, fd
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return
                os.close(fd)
                if self._want_slot is not None:
                    raise NetnsError(f"slot {slot}: {conflict}")
            if self._want_slot is None:
                raise NetnsError(f"no free slot in {LOCK_DIR} (all {MAX_SLOTS} busy or"
                                 " their subnets in use)")
            if time.monotonic() > deadline:
                raise NetnsError(f"slot {self._want_slot} still busy after"
                                 f" {self._slot_wait} s")
            time.sleep(0.2)

    # -------------------------------------------------------- tear-down

    def teardown(self) -> None:
        """Remove everything this set made (idempotent; tries every step)."""
        errors: list[str] = []
        for h in self.hosts:
            try:
                h._destroy()
            except Exception as e:
                errors.append(f"{h.name}: {e}")
        self.hosts = []
        if self._sink_made:
            # Last: the guard routes keep the hosts' subnets here until now.
            try:
                sink, _ = _slot_names(self.slot)
                if sink in _link_names():
                    _ip("link", "del", sink)
                self._sink_made = False
            except Exception as e:
                errors.append(f"sink: {e}")
        if self.workdir != Path() and self.workdir.is_dir():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_fd is not None:
            # Whatever is left over is removed by the next run that takes the slot.
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise NetnsError("tear-down incomplete: " + "; ".join(errors))

    # -------------------------------------------------------- conveniences

    def restore(self) -> None:
        """:meth:`NetnsHost.restore` every host (for tests sharing one set)."""
        for h in self.hosts:
            h.restore()

    def ssh_config(self, path: str | Path) -> Path:
        """Write an ssh_config with ``Host`` aliases ``sqh1`` ... ``sqhN``; its path.

        Each alias has HostName, Port, User, IdentityFile, UserKnownHostsFile
        and ``StrictHostKeyChecking yes`` (plus IdentitiesOnly and BatchMode).
        """
        p = Path(path)
        blocks = [
            f"Host {h.alias}\n"
            f"    HostName {h.address}\n"
            f"    Port {h.port}\n"
            f"    User {h.user}\n"
            f"    IdentityFile {h.identity_file}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {h.known_hosts}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    BatchMode yes\n"
            for h in self.hosts
        ]
        p.write_text("\n".join(blocks))
        p.chmod(0o600)
        return p

    def ssh_home(self, home: str | Path) -> Path:
        """Make ``home/.ssh/config`` (:meth:`ssh_config`) for ``HOME=home``; its path.

        asyncssh (so sshq's asyncssh transport) reads ``$HOME/.ssh/config``;
        the system ``ssh`` does not (it uses the passwd home): give it ``-F``.
        """
        d = Path(home) / ".ssh"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.ssh_config(d / "config")

    def platform_toml(self, name: str, run_dir: str, **extra: object) -> str:
        """A ``[platforms.NAME]`` table listing every host (sshq tries them in order)."""
        return _platform_toml(name, self.hosts, run_dir, **extra)


def _cleanup_slot(slot: int) -> None:
    """Remove whatever an earlier (crashed) run left in ``slot``; its lock must be held."""
    namespaces = _netns_names()
    links = _link_names()
    for i in range(1, MAX_HOSTS + 1):
        name = _host_name(slot, i)
        if name in namespaces or f"ve-{name}" in links:
            _destroy_host(name, f"ve-{name}")
    sink, peer = _slot_names(slot)
    for link in (sink, peer):
        if link in _link_names():
            _ip("link", "del", link)
    for d in Path("/tmp").glob(f"sqnetns-s{slot}-*"):
        shutil.rmtree(d, ignore_errors=True)


def _subnet_conflict(slot: int) -> str | None:
    """Why ``slot``'s subnets cannot be used here (a route or address there), or None."""
    ours = [_subnet(slot, i) for i in range(1, MAX_HOSTS + 1)]
    for line in (_ip("-4", "-o", "route", "show", "table", "all").splitlines()
                 + _ip("-4", "-o", "addr", "show").splitlines()):
        toks = line.split()
        if "inet" in toks:  # "2: eth0    inet 192.0.2.2/24 brd ..."
            dest = toks[toks.index("inet") + 1]
        else:               # "[type] DEST ..." (type: local, broadcast, blackhole, ...)
            dest = toks[0] if toks and toks[0][0].isdigit() else (toks[1:2] or [""])[0]
        if not dest or not dest[0].isdigit():
            continue  # default, multicast without prefix, ...
        try:
            net = ipaddress.IPv4Network(dest, strict=False)
        except ValueError:
            continue
        if net.prefixlen == 0:
            continue
        for s in ours:
            if net.overlaps(s):
                return f"{s} overlaps {line.strip()!r}"
    return None
