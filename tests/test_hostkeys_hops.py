"""Host keys without exception: every ProxyJump hop is checked like the target.

A second real sshd, the jump host, listens on 127.0.0.2 with a host key of its
own.  The user's ~/.ssh is the test's: the real ``sshq`` command runs in a
private mount namespace where the test's home directory is laid over the
user's passwd home (read by the system ssh; asyncssh reads $HOME, the same
directory) as an overlay, with an ``.ssh`` of its own.  The machine's own
home is never written to.

Covered: a jump host whose config says ``StrictHostKeyChecking accept-new``
or ``no`` (or ``UserKnownHostsFile /dev/null``) is refused, not trusted on
first use, and nothing is written; hops are checked against the target's
known_hosts; a host name whose key is recorded only under its address, or
only without its port, is unknown (as OpenSSH says); errors name the host
whose key failed and its fingerprint; an ``@revoked`` key says revoked.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from sshq.exceptions import HostKeyError
from sshq.transport import HostParams, Transport
from sshq.transport.asyncssh_ import AsyncSSHTransport
from sshq.transport.openssh import OpenSSHTransport

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(120)]

TRANSPORTS = ("asyncssh", "openssh")


# ---------------------------------------------------------------- helpers


def keygen(path: Path) -> Path:
    """A fresh ed25519 key pair at ``path`` (and ``path.pub``)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshq-test",
                    "-f", str(path)], check=True, capture_output=True, timeout=30)
    return path


def fingerprint_of(pub: str | Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    fp = out.split()[1]
    assert fp.startswith("SHA256:"), out
    return fp


def pub_words(pub: str | Path) -> str:
    """``algo base64`` of a public key file."""
    algo, blob = Path(pub).read_text().split()[:2]
    return f"{algo} {blob}"


@dataclass(frozen=True)
class Sshd:
    """A real sshd: where it listens and its host key."""

    host: str
    port: int
    pub: Path
    fp: str

    @property
    def name(self) -> str:
        """How it appears in known_hosts."""
        return f"[{self.host}]:{self.port}"

    def known_line(self) -> str:
        return f"{self.name} {pub_words(self.pub)}\n"


@pytest.fixture(scope="module")
def target(testbed: dict[str, str]) -> Sshd:
    """The test bed's sshd: the host behind the jump host."""
    pub = Path(testbed["SSHQ_TEST_HOSTKEY_PUB"])
    return Sshd(testbed["SSHQ_TEST_HOST"], int(testbed["SSHQ_TEST_PORT"]), pub,
                fingerprint_of(pub))


@contextmanager
def running_sshd(address: str, extra_config: str = "", *, prefix: str = "sq-sshd-"
                 ) -> Iterator[Sshd]:
    """A second real sshd on loopback ``address`` (a free port, its own host key),
    with ``extra_config`` lines; stopped and removed at the end.  Needs root."""
    if os.geteuid() != 0:
        pytest.skip("starting a second sshd needs root")
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    keygen(d / "hostkey")
    with socket.socket() as s:
        s.bind((address, 0))
        port = int(s.getsockname()[1])
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {address}\nHostKey {d / 'hostkey'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n" + extra_config)
    log = (d / "sshd.log").open("wb")
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=log, stderr=log)
    try:
        for _ in range(200):  # until it listens (bounded: 10 s)
            assert proc.poll() is None, (d / "sshd.log").read_text()
            with socket.socket() as s:
                if s.connect_ex((address, port)) == 0:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"the sshd on {address} did not start listening")
        pub = d / "hostkey.pub"
        yield Sshd(address, port, pub, fingerprint_of(pub))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def jump(testbed: dict[str, str]) -> Iterator[Sshd]:
    """A second sshd on 127.0.0.2 (root starts it; stopped at the end)."""
    with running_sshd("127.0.0.2", prefix="sq-jump-") as sshd:
        yield sshd


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """What the CLI adds to the user's home: an empty ~/.ssh of its own (an
    opaque overlay directory: the machine's ~/.ssh, if any, does not show)."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True, mode=0o700)
    os.setxattr(h / ".ssh", "trusted.overlay.opaque", b"y")
    return h


def host_block(alias: str, host: str, port: int, testbed: dict[str, str], *extra: str) -> str:
    lines = [f"Host {alias}", f"    HostName {host}", f"    Port {port}",
             f"    User {testbed['SSHQ_TEST_USER']}",
             f"    IdentityFile {testbed['SSHQ_TEST_KEY']}", "    IdentitiesOnly yes",
             *(f"    {e}" for e in extra)]
    return "\n".join(lines) + "\n"


CliRun = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def cli(home: Path, tmp_path: Path, state_dir: Path, run_id: str) -> CliRun:
    """Run the real ``sshq`` with ``home`` laid over the user's home (private mount
    namespace).

    ``cli(transport, platform_host, *args, known_hosts=None)``: platform ``p``
    (background runner) on ``platform_host``.
    """
    passwd_home = pwd.getpwuid(os.getuid()).pw_dir

    def run(transport: str, platform_host: str, *args: str, known_hosts: Path | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        cfg = tmp_path / "platforms.toml"
        cfg.write_text("[platforms.p]\n"
                       f'hosts = ["{platform_host}"]\n'
                       'job_runner = "background"\n'
                       f'transport = "{transport}"\n'
                       f'run_dir = "~/sshq-test/{run_id}"\n'
                       "connect_timeout = 10\n"
                       + (f'known_hosts = "{known_hosts}"\n' if known_hosts else ""))
        env = dict(os.environ, HOME=passwd_home, SSHQ_CONFIG=str(cfg),
                   SSHQ_STATE_DIR=str(state_dir))
        env.pop("SSH_AUTH_SOCK", None)
        work = tmp_path / "overlay-work"
        work.mkdir(exist_ok=True)
        script = ('mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$1"'
                  ' && shift 3 && exec "$@"')
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             passwd_home, str(home), str(work), sys.executable, "-m", "sshq", *args],
            env=env, capture_output=True, timeout=100, stdin=subprocess.DEVNULL)

    return run


def run_echo(cli: CliRun, transport: str, platform_host: str, *,
             known_hosts: Path | None = None) -> bytes:
    """Submit ``echo via`` and wait; its log."""
    p = cli(transport, platform_host, "submit", "-p", "p", "--wait", "--json", "--command",
            "echo via", known_hosts=known_hosts)
    assert p.returncode == 0, p.stderr.decode()
    (job,) = json.loads(p.stdout)
    p = cli(transport, platform_host, "cat-log", str(job["id"]), known_hosts=known_hosts)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def error_line(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sshq: error:"), err
    return lines[0]


# ---------------------------------------------------------------- ProxyJump: every hop


JUMP_LAX = {
    "accept-new": ["StrictHostKeyChecking accept-new"],
    "no": ["StrictHostKeyChecking no"],
    "devnull": ["StrictHostKeyChecking no", "UserKnownHostsFile /dev/null"],
    "none": ["StrictHostKeyChecking no", "UserKnownHostsFile none"],
}


@pytest.mark.parametrize("lax", sorted(JUMP_LAX))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_jump_host_not_trusted_on_first_use(
        transport: str, lax: str, cli: CliRun, home: Path, tmp_path: Path,
        testbed: dict[str, str], jump: Sshd, target: Sshd) -> None:
    """The jump host's own config section cannot loosen its check."""
    (home / ".ssh" / "config").write_text(
        host_block("jump", jump.host, jump.port, testbed, *JUMP_LAX[lax])
        + host_block("behind", target.host, target.port, testbed, "ProxyJump jump"))
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line())  # the target is known, the jump host is not
    p = cli(transport, "behind", "submit", "-p", "p", "--command", "true", known_hosts=kh)
    assert p.returncode == HostKeyError.exit_code, p.stderr.decode()
    line = error_line(p)
    assert jump.name in line and jump.fp in line, line
    assert target.fp not in line, line
    assert "CHANGED" not in line
    assert kh.read_text() == target.known_line()
    assert not (home / ".ssh" / "known_hosts").exists(), "a host key was recorded silently"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hops_use_the_targets_known_hosts(
        transport: str, cli: CliRun, home: Path, tmp_path: Path, testbed: dict[str, str],
        jump: Sshd, target: Sshd) -> None:
    """A jump host recorded only in ~/.ssh/known_hosts, while the platform's
    known_hosts holds the target only: the hop is unknown."""
    (home / ".ssh" / "config").write_text(
        host_block("jump", jump.host, jump.port, testbed)
        + host_block("behind", target.host, target.port, testbed, "ProxyJump jump"))
    (home / ".ssh" / "known_hosts").write_text(jump.known_line())
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line())
    p = cli(transport, "behind", "submit", "-p", "p", "--command", "true", known_hosts=kh)
    assert p.returncode == HostKeyError.exit_code, p.stderr.decode()
    line = error_line(p)
    assert jump.name in line and jump.fp in line, line
    assert str(kh) in line, line  # where the key was looked for


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hops_use_the_known_hosts_of_the_targets_ssh_config(
        transport: str, cli: CliRun, home: Path, tmp_path: Path, testbed: dict[str, str],
        jump: Sshd, target: Sshd) -> None:
    """No platform known_hosts: the target's UserKnownHostsFile is every hop's."""
    kh = tmp_path / "target_known_hosts"
    kh.write_text(target.known_line())
    jump_kh = tmp_path / "jump_known_hosts"
    jump_kh.write_text(jump.known_line())
    (home / ".ssh" / "config").write_text(
        host_block("jump", jump.host, jump.port, testbed, f"UserKnownHostsFile {jump_kh}")
        + host_block("behind", target.host, target.port, testbed, "ProxyJump jump",
                     f"UserKnownHostsFile {kh}"))
    p = cli(transport, "behind", "submit", "-p", "p", "--command", "true")
    assert p.returncode == HostKeyError.exit_code, p.stderr.decode()
    line = error_line(p)
    assert jump.name in line and jump.fp in line and str(kh) in line, line

    # Recorded there, the same jump works.
    with kh.open("a") as f:
        f.write(jump.known_line())
    assert run_echo(cli, transport, "behind") == b"via\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_jump_host_known_works(transport: str, cli: CliRun, home: Path, tmp_path: Path,
                               testbed: dict[str, str], jump: Sshd, target: Sshd) -> None:
    (home / ".ssh" / "config").write_text(
        host_block("jump", jump.host, jump.port, testbed, "StrictHostKeyChecking accept-new")
        + host_block("behind", target.host, target.port, testbed, "ProxyJump jump"))
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line() + jump.known_line())
    assert run_echo(cli, transport, "behind", known_hosts=kh) == b"via\n"
    assert not (home / ".ssh" / "known_hosts").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_second_hop_of_a_chain_is_checked_and_named(
        transport: str, cli: CliRun, home: Path, tmp_path: Path, testbed: dict[str, str],
        jump: Sshd, target: Sshd) -> None:
    """``ProxyJump tb,jump``: tb is known, jump (reached through tb) is not."""
    (home / ".ssh" / "config").write_text(
        host_block("tb", target.host, target.port, testbed)
        + host_block("jump", jump.host, jump.port, testbed, "StrictHostKeyChecking no")
        + host_block("behind", target.host, target.port, testbed, "ProxyJump tb,jump"))
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line())
    p = cli(transport, "behind", "submit", "-p", "p", "--command", "true", known_hosts=kh)
    assert p.returncode == HostKeyError.exit_code, p.stderr.decode()
    line = error_line(p)
    assert jump.name in line and jump.fp in line, line
    assert not (home / ".ssh" / "known_hosts").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_changed_jump_host_key_is_named_with_its_fingerprint(
        transport: str, cli: CliRun, home: Path, tmp_path: Path, testbed: dict[str, str],
        jump: Sshd, target: Sshd) -> None:
    other = keygen(tmp_path / "other")
    (home / ".ssh" / "config").write_text(
        host_block("jump", jump.host, jump.port, testbed, "StrictHostKeyChecking no")
        + host_block("behind", target.host, target.port, testbed, "ProxyJump jump"))
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line() + f"{jump.name} {pub_words(other.with_suffix('.pub'))}\n")
    before = kh.read_bytes()
    p = cli(transport, "behind", "submit", "-p", "p", "--command", "true", known_hosts=kh)
    assert p.returncode == HostKeyError.exit_code, p.stderr.decode()
    line = error_line(p)
    assert "CHANGED" in line and jump.name in line and jump.fp in line, line
    assert target.fp not in line
    assert kh.read_bytes() == before


@pytest.mark.parametrize("failure", ["auth", "unreachable"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_other_jump_host_failures_name_the_jump_host(
        transport: str, failure: str, cli: CliRun, home: Path, tmp_path: Path,
        testbed: dict[str, str], jump: Sshd, target: Sshd) -> None:
    """A jump host that refuses our key, or cannot be reached: the right exit
    status, and the jump host's own words (a ControlMaster would hide them)."""
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line() + jump.known_line())
    if failure == "auth":
        block = host_block("jump", jump.host, jump.port, testbed)
        block = block.replace(testbed["SSHQ_TEST_KEY"], str(keygen(tmp_path / "stranger")))
    else:
        with socket.socket() as s:
            s.bind((jump.host, 0))
            closed = int(s.getsockname()[1])
        block = host_block("jump", jump.host, closed, testbed)
    (home / ".ssh" / "config").write_text(
        block + host_block("behind", target.host, target.port, testbed, "ProxyJump jump"))
    p = cli(transport, "behind", "submit", "-p", "p", "--command", "true", known_hosts=kh)
    line = error_line(p)
    assert p.returncode == (4 if failure == "auth" else 3), line
    assert jump.host in line, line
    assert ("Permission denied" if failure == "auth" else "onnect") in line, line


# ---------------------------------------------------------------- lookups as OpenSSH's


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for ControlMaster sockets (sun_path holds ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sq-hk-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def make(short_dir: Path) -> AsyncIterator[Callable[[str, HostParams], Transport]]:
    """Build transports by name; all are closed (masters stopped) at the end."""
    made: list[Transport] = []

    def build(name: str, params: HostParams) -> Transport:
        t: Transport
        if name == "asyncssh":
            t = AsyncSSHTransport(params, backoff=0.05)
        else:
            t = OpenSSHTransport(params, control_dir=str(short_dir / f"cm{len(made)}"))
        made.append(t)
        return t

    try:
        yield build
    finally:
        for t in made:
            await t.close()
            if isinstance(t, OpenSSHTransport):
                subprocess.run(["ssh", *t.ssh_options(), "-O", "exit", "--", t.params.host],
                               capture_output=True, timeout=15, check=False)


def params(testbed: dict[str, str], kh: Path, **changes: object) -> HostParams:
    p = HostParams(host=testbed["SSHQ_TEST_HOST"], port=int(testbed["SSHQ_TEST_PORT"]),
                   user=testbed["SSHQ_TEST_USER"], identity_file=testbed["SSHQ_TEST_KEY"],
                   known_hosts=str(kh), connect_timeout=10.0)
    return replace(p, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_name_known_only_under_its_address_is_unknown(
        transport: str, make: Callable[[str, HostParams], Transport], testbed: dict[str, str],
        tmp_path: Path, target: Sshd) -> None:
    """``localhost`` reaches 127.0.0.1, whose key is recorded under the address only."""
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_line())
    t = make(transport, params(testbed, kh, host="localhost"))
    with pytest.raises(HostKeyError) as ei:
        await t.run(["true"], timeout=30)
    assert ei.value.changed is False
    assert ei.value.fingerprint == target.fp
    msg = str(ei.value)
    assert f"[localhost]:{target.port}" in msg and target.fp in msg and "CHANGED" not in msg
    assert kh.read_text() == target.known_line()


@pytest.mark.parametrize("same_key", [True, False])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_entry_without_port_as_openssh_reads_it(
        transport: str, same_key: bool, make: Callable[[str, HostParams], Transport],
        testbed: dict[str, str], tmp_path: Path, target: Sshd) -> None:
    """Nothing recorded for [host]:port: OpenSSH accepts the key recorded for
    the bare host if it is the one offered; another key there is no "changed"."""
    pub = target.pub if same_key else keygen(tmp_path / "other").with_suffix(".pub")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{target.host} {pub_words(pub)}\n")
    t = make(transport, params(testbed, kh))
    if same_key:
        assert (await t.run(["echo", "ok"], timeout=30)).stdout == b"ok\n"
        return
    with pytest.raises(HostKeyError) as ei:
        await t.run(["true"], timeout=30)
    assert ei.value.changed is False
    assert target.name in str(ei.value) and target.fp in str(ei.value)
    assert "CHANGED" not in str(ei.value)


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_name_recorded_under_the_name_works(
        transport: str, hashed: bool, make: Callable[[str, HostParams], Transport],
        testbed: dict[str, str], tmp_path: Path, target: Sshd) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[localhost]:{target.port} {pub_words(target.pub)}\n")
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True,
                       timeout=30)
        assert kh.read_text().startswith("|1|")
    t = make(transport, params(testbed, kh, host="localhost"))
    r = await t.run(["echo", "ok"], timeout=30)
    assert r.stdout == b"ok\n"


# ---------------------------------------------------------------- revoked keys


@pytest.mark.parametrize("also_trusted", [False, True])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_revoked_key_says_revoked(
        transport: str, also_trusted: bool, make: Callable[[str, HostParams], Transport],
        testbed: dict[str, str], tmp_path: Path, target: Sshd) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"@revoked {target.known_line()}"
                  + (target.known_line() if also_trusted else ""))
    before = kh.read_bytes()
    t = make(transport, params(testbed, kh))
    with pytest.raises(HostKeyError) as ei:
        await t.run(["true"], timeout=30)
    msg = str(ei.value)
    assert "revoked" in msg.lower() and "CHANGED" not in msg and "unknown" not in msg, msg
    assert target.name in msg and target.fp in msg, msg
    assert ei.value.fingerprint == target.fp
    assert ei.value.changed is False
    assert kh.read_bytes() == before


def test_hosts_trust_refuses_a_revoked_key(sshq: CliRun, tmp_path: Path, target: Sshd) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(f"@revoked {target.known_line()}")
    before = kh.read_bytes()
    for extra in ((), ("--yes",), ("--fingerprint", target.fp)):
        p = sshq("hosts", "trust", target.host, "--port", str(target.port), "--known-hosts",
                 str(kh), *extra, input=b"y\n", timeout=60)
        line = error_line(p)
        assert "revoked" in line and target.fp in line, line
        assert kh.read_bytes() == before
