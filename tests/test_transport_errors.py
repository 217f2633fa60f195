"""Each failure point gets its own clear error, over asyncssh and openssh.

Unknown host key, changed host key, refused authentication, unreachable
host, missing remote interpreter; then the same through the real ``sshq``
command: one ``sshq: error:`` line, no traceback unless ``--debug``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sshq.exceptions import (
    AuthenticationError,
    CommandError,
    HostKeyError,
    HostUnreachableError,
    TransportError,
)
from sshq.remote.operations import call_agent
from sshq.transport import HostParams, Transport
from sshq.transport.asyncssh_ import AsyncSSHTransport
from sshq.transport.local import LocalTransport
from sshq.transport.openssh import OpenSSHTransport

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(60)]

SSH_TRANSPORTS = ("asyncssh", "openssh")


# ---------------------------------------------------------------- helpers


def host_params(testbed: dict[str, str], **changes: object) -> HostParams:
    p = HostParams(
        host=testbed["SSHQ_TEST_HOST"],
        port=int(testbed["SSHQ_TEST_PORT"]),
        user=testbed["SSHQ_TEST_USER"],
        identity_file=testbed["SSHQ_TEST_KEY"],
        known_hosts=testbed["SSHQ_TEST_KNOWN_HOSTS"],
        connect_timeout=10.0,
    )
    return replace(p, **changes)  # type: ignore[arg-type]


def keygen(path: Path) -> Path:
    """A fresh ed25519 key pair at ``path`` (and ``path.pub``)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshq-test",
                    "-f", str(path)], check=True, capture_output=True, timeout=30)
    return path


def keygen_fingerprint(pub: str | Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    fp = out.split()[1]
    assert fp.startswith("SHA256:"), out
    return fp


def closed_port() -> int:
    """A loopback TCP port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for ControlMaster sockets (sun_path holds ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sshq-cm-", dir="/tmp"))
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
        elif name == "openssh":
            t = OpenSSHTransport(params, control_dir=str(short_dir / f"cm{len(made)}"))
        else:
            t = LocalTransport(params)
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


@pytest.fixture
def host_fp(testbed: dict[str, str]) -> str:
    """The test bed host key's fingerprint, per ssh-keygen."""
    return keygen_fingerprint(testbed["SSHQ_TEST_HOSTKEY_PUB"])


def known_hosts_line(host_port: str, pub: Path | str) -> str:
    algo, blob = Path(pub).read_text().split()[:2]
    return f"{host_port} {algo} {blob}\n"


# ---------------------------------------------------------------- host keys


@pytest.mark.parametrize("name", SSH_TRANSPORTS)
async def test_unknown_host_key(name: str, make: Callable[[str, HostParams], Transport],
                                testbed: dict[str, str], tmp_path: Path,
                                host_fp: str) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    t = make(name, host_params(testbed, known_hosts=str(kh)))
    with pytest.raises(HostKeyError) as ei:
        await t.run(["true"], timeout=30)
    exc = ei.value
    assert exc.changed is False
    assert exc.fingerprint == host_fp
    msg = str(exc)
    assert testbed["SSHQ_TEST_HOST"] in msg
    assert host_fp in msg
    assert "CHANGED" not in msg
    assert exc.transient is False
    assert exc.command_sent is False
    assert kh.read_bytes() == b"", "known_hosts was written to"


@pytest.mark.parametrize("name", SSH_TRANSPORTS)
async def test_changed_host_key(name: str, make: Callable[[str, HostParams], Transport],
                                testbed: dict[str, str], tmp_path: Path,
                                host_fp: str) -> None:
    other = keygen(tmp_path / "other_hostkey")
    port = testbed["SSHQ_TEST_PORT"]
    kh = tmp_path / "known_hosts"
    kh.write_text(known_hosts_line(f"[{testbed['SSHQ_TEST_HOST']}]:{port}",
                                   other.with_suffix(".pub")))
    before = kh.read_bytes()
    assert keygen_fingerprint(other.with_suffix(".pub")) != host_fp

    t = make(name, host_params(testbed, known_hosts=str(kh)))
    with pytest.raises(HostKeyError) as ei:
        await t.run(["true"], timeout=30)
    exc = ei.value
    assert exc.changed is True
    assert "CHANGED" in str(exc)
    assert testbed["SSHQ_TEST_HOST"] in str(exc)
    assert exc.fingerprint == host_fp
    assert host_fp in str(exc)
    assert exc.transient is False
    assert kh.read_bytes() == before, "known_hosts was modified"


@pytest.mark.parametrize("name", SSH_TRANSPORTS)
async def test_host_key_error_from_stream_and_agent(
    name: str, make: Callable[[str, HostParams], Transport], testbed: dict[str, str],
    tmp_path: Path, host_fp: str
) -> None:
    """The same error whichever entry point meets the unknown key first."""
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    t = make(name, host_params(testbed, known_hosts=str(kh)))
    with pytest.raises(HostKeyError) as ei:
        async for _ in t.stream(["echo", "x"]):
            pass
    assert ei.value.fingerprint == host_fp
    with pytest.raises(HostKeyError):
        await call_agent(t, "python3", "init", {"run_dir": "~/sshq-test/never"}, timeout=30)
    assert kh.read_bytes() == b""


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("name", SSH_TRANSPORTS)
async def test_authentication_refused(name: str, make: Callable[[str, HostParams], Transport],
                                      testbed: dict[str, str], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # only the key we give
    stranger = keygen(tmp_path / "stranger_key")
    t = make(name, host_params(testbed, identity_file=str(stranger)))
    with pytest.raises(AuthenticationError) as ei:
        await t.run(["true"], timeout=30)
    exc = ei.value
    assert not isinstance(exc, (HostKeyError, HostUnreachableError))
    assert exc.transient is False
    assert exc.command_sent is False
    assert exc.exit_code == 4
    assert testbed["SSHQ_TEST_HOST"] in str(exc)


# ---------------------------------------------------------------- unreachable


@pytest.mark.parametrize("name", SSH_TRANSPORTS)
async def test_host_unreachable(name: str, make: Callable[[str, HostParams], Transport],
                                testbed: dict[str, str]) -> None:
    port = closed_port()
    t = make(name, host_params(testbed, port=port, connect_timeout=5.0))
    with pytest.raises(HostUnreachableError) as ei:
        await t.run(["true"], timeout=30)
    exc = ei.value
    assert exc.transient is True
    assert exc.command_sent is False, "nothing ran: the connection was refused"
    assert exc.exit_code == 3
    assert str(port) in str(exc)


# ---------------------------------------------------------------- the agent's interpreter


@pytest.mark.parametrize("name", [*SSH_TRANSPORTS, "local"])
async def test_agent_interpreter_missing(name: str,
                                         make: Callable[[str, HostParams], Transport],
                                         testbed: dict[str, str]) -> None:
    t = make(name, host_params(testbed))
    with pytest.raises(CommandError) as ei:
        await call_agent(t, "python3-does-not-exist", "init",
                         {"run_dir": "~/sshq-test/never"}, timeout=30)
    assert "python3-does-not-exist" in str(ei.value)
    # The transport itself still works afterwards.
    r = await t.run(["echo", "ok"], timeout=30)
    assert r.stdout == b"ok\n"


# ---------------------------------------------------------------- exc.host


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("asyncssh", "hostkey"),
        ("asyncssh", "auth"),
        ("asyncssh", "unreachable"),
        ("openssh", "hostkey"),
        pytest.param("openssh", "auth"),
        pytest.param("openssh", "unreachable"),
    ],
)
async def test_error_host_attribute_is_the_configured_host(
    name: str, failure: str, make: Callable[[str, HostParams], Transport],
    testbed: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    if failure == "hostkey":
        kh = tmp_path / "kh"
        kh.write_bytes(b"")
        params = host_params(testbed, known_hosts=str(kh))
    elif failure == "auth":
        params = host_params(testbed, identity_file=str(keygen(tmp_path / "k")))
    else:
        params = host_params(testbed, port=closed_port(), connect_timeout=5.0)
    t = make(name, params)
    with pytest.raises(TransportError) as ei:
        await t.run(["true"], timeout=30)
    # The same failure carries the same host whichever transport met it.
    assert ei.value.host == testbed["SSHQ_TEST_HOST"]


# ---------------------------------------------------------------- through the CLI


def write_config(path: Path, testbed: dict[str, str], known_hosts: Path, run_id: str) -> Path:
    rd = f"~/sshq-test/{run_id}"
    blocks = []
    for name, transport in (("bg", "asyncssh"), ("bg-openssh", "openssh")):
        blocks.append("\n".join([
            f"[platforms.{name}]",
            f'hosts = ["{testbed["SSHQ_TEST_HOST"]}"]',
            f"port = {testbed['SSHQ_TEST_PORT']}",
            f'user = "{testbed["SSHQ_TEST_USER"]}"',
            f'identity_file = "{testbed["SSHQ_TEST_KEY"]}"',
            f'known_hosts = "{known_hosts}"',
            'job_runner = "background"',
            f'transport = "{transport}"',
            f'run_dir = "{rd}"',
            "connect_timeout = 5",
            "",
        ]))
    path.write_text("\n".join(blocks))
    return path


@pytest.fixture
def cli_unknown_key(tmp_path: Path, testbed: dict[str, str], cli_env: dict[str, str],
                    run_id: str, short_dir: Path) -> tuple[dict[str, str], Path]:
    """CLI environment whose platforms use an empty known_hosts file."""
    kh = tmp_path / "empty_known_hosts"
    kh.write_bytes(b"")
    cfg = write_config(tmp_path / "errors.toml", testbed, kh, run_id)
    # A short state dir: the openssh platform puts ControlMaster sockets in it.
    env = dict(cli_env, SSHQ_CONFIG=str(cfg), SSHQ_STATE_DIR=str(short_dir / "state"))
    return env, kh


@pytest.mark.parametrize("platform", ["bg", "bg-openssh"])
def test_cli_host_key_error_is_one_line(
    platform: str, sshq: Callable[..., subprocess.CompletedProcess[bytes]],
    cli_unknown_key: tuple[dict[str, str], Path], host_fp: str
) -> None:
    env, kh = cli_unknown_key
    p = sshq("submit", "-p", platform, "--command", "true", input=b"", env=env, timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0
    assert p.returncode == HostKeyError.exit_code
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sshq: error:"), err
    assert "Traceback" not in err
    assert host_fp in lines[0]
    assert "127.0.0.1" in lines[0]
    assert kh.read_bytes() == b""


@pytest.mark.parametrize("platform", ["bg", "bg-openssh"])
def test_cli_host_key_error_debug_shows_traceback(
    platform: str, sshq: Callable[..., subprocess.CompletedProcess[bytes]],
    cli_unknown_key: tuple[dict[str, str], Path]
) -> None:
    env, kh = cli_unknown_key
    p = sshq("submit", "-p", platform, "--command", "true", "--debug", input=b"", env=env,
             timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0
    assert "Traceback (most recent call last)" in err
    assert "HostKeyError" in err
    assert kh.read_bytes() == b""


def test_cli_unreachable_is_one_line(
    sshq: Callable[..., subprocess.CompletedProcess[bytes]], cli_env: dict[str, str],
    tmp_path: Path, testbed: dict[str, str], run_id: str
) -> None:
    port = closed_port()
    cfg = tmp_path / "unreach.toml"
    cfg.write_text("\n".join([
        "[platforms.down]",
        f'hosts = ["{testbed["SSHQ_TEST_HOST"]}"]',
        f"port = {port}",
        f'user = "{testbed["SSHQ_TEST_USER"]}"',
        f'identity_file = "{testbed["SSHQ_TEST_KEY"]}"',
        f'known_hosts = "{testbed["SSHQ_TEST_KNOWN_HOSTS"]}"',
        'job_runner = "background"',
        'transport = "asyncssh"',
        f'run_dir = "~/sshq-test/{run_id}"',
        "connect_timeout = 5",
        "",
    ]))
    env = dict(cli_env, SSHQ_CONFIG=str(cfg))
    p = sshq("submit", "-p", "down", "--command", "true", input=b"", env=env, timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == HostUnreachableError.exit_code, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sshq: error:")
    assert "Traceback" not in err


# ---------------------------------------------------------------- ControlPath length


async def test_openssh_long_control_dir_is_not_a_transient_host_failure(
    testbed: dict[str, str], short_dir: Path
) -> None:
    long_dir = short_dir / ("state-dir-of-a-user-with-a-long-home-" + "x" * 40) / "cm"
    assert len(str(long_dir)) + 1 + 40 >= 108
    t2 = OpenSSHTransport(host_params(testbed), control_dir=str(long_dir))
    try:
        r = await t2.run(["echo", "ok"], timeout=30)
    except TransportError as exc:
        # At the very least: a clear, permanent error, not "host down, retry".
        assert not exc.transient, exc
        assert not exc.command_sent, exc
        assert "ControlPath" in str(exc)
    else:
        assert r.stdout == b"ok\n"
    finally:
        await t2.close()
        subprocess.run(["ssh", *t2.ssh_options(), "-O", "exit", "--", t2.params.host],
                       capture_output=True, timeout=15, check=False)
