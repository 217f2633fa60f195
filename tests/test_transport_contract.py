"""One contract suite, run over every transport: asyncssh, openssh and local.

Each transport is built from :class:`HostParams` pointing at the real test bed
(sshd on loopback); the local transport ignores them.  Whatever the
transport, an argument vector reaches the program byte-exact, stdin/stdout/
stderr are raw bytes, exit statuses come back, and output can be streamed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sshq.remote.operations import call_agent
from sshq.transport import HostParams, Transport
from sshq.transport.asyncssh_ import AsyncSSHTransport
from sshq.transport.local import LocalTransport
from sshq.transport.openssh import OpenSSHTransport

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(60)]

TRANSPORT_NAMES = ("asyncssh", "openssh", "local")

#: A program printing its arguments NUL-separated, exactly as it received them.
ECHO_ARGV = (
    "import sys,os; "
    'sys.stdout.buffer.write(b"\\0".join(os.fsencode(a) for a in sys.argv[1:]))'
)


def host_params(testbed: dict[str, str]) -> HostParams:
    return HostParams(
        host=testbed["SSHQ_TEST_HOST"],
        port=int(testbed["SSHQ_TEST_PORT"]),
        user=testbed["SSHQ_TEST_USER"],
        identity_file=testbed["SSHQ_TEST_KEY"],
        known_hosts=testbed["SSHQ_TEST_KNOWN_HOSTS"],
        connect_timeout=10.0,
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for ControlMaster sockets (sun_path holds ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sshq-cm-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def stop_master(t: OpenSSHTransport) -> None:
    """End the ControlMaster this test started (it would linger ControlPersist s)."""
    subprocess.run(
        ["ssh", *t.ssh_options(), "-O", "exit", "--", t.params.host],
        capture_output=True, timeout=15, check=False,
    )


def make_transport(name: str, params: HostParams, control_dir: Path) -> Transport:
    if name == "asyncssh":
        return AsyncSSHTransport(params)
    if name == "openssh":
        return OpenSSHTransport(params, control_dir=str(control_dir / "cm"))
    return LocalTransport(params)


@pytest.fixture(params=TRANSPORT_NAMES)
async def transport(request: pytest.FixtureRequest, testbed: dict[str, str],
                    short_dir: Path) -> AsyncIterator[Transport]:
    """Each transport in turn, closed (and its ControlMaster stopped) afterwards."""
    t = make_transport(request.param, host_params(testbed), short_dir)
    try:
        yield t
    finally:
        await t.close()
        if isinstance(t, OpenSSHTransport):
            stop_master(t)


@pytest.fixture
def canary_dir() -> Iterator[Path]:
    """A directory both this user and the remote test user can create files in."""
    d = Path(tempfile.mkdtemp(prefix="sshq-canary-", dir="/tmp"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def hostile_words(canary: Path) -> list[str]:
    c = str(canary)
    return [
        "",
        "plain",
        "two words",
        "  leading and trailing spaces  ",
        "'",
        '"',
        "it's",
        'say "hi"',
        "'\"'\"'",
        f"$(touch {c})",
        f"`touch {c}`",
        f"${{IFS}}touch${{IFS}}{c}",
        "$HOME",
        "${HOME}",
        "$$",
        "$0",
        f"; touch {c}",
        f"| touch {c}",
        f"& touch {c} &",
        f"&& touch {c}",
        f"|| touch {c}",
        f"'; touch {c}; '",
        f'"; touch {c}; "',
        f"\ntouch {c}\n",
        "line1\nline2\n",
        "\r\n",
        "tab\there",
        "\t",
        "*",
        "*.py",
        "?",
        "[a-z]*",
        "{a,b}",
        "~",
        "~root",
        "~/x",
        "-",
        "--",
        "-c",
        "--help",
        "-n",
        "-e",
        "<",
        "> out",
        f">{c}",
        "2>&1",
        "\\",
        "\\n",
        "back\\slash\\",
        "!",
        "!!",
        "#comment",
        "%s%n",
        "héllo wörld",
        "日本語 ✓ \u00e9\u0301",
        "emoji 🚀",
        "\x01\x02\x1b[31mred",
        "",
    ]


# ---------------------------------------------------------------- argv


async def test_hostile_argv_reaches_program_byte_exact(transport: Transport,
                                                       canary_dir: Path) -> None:
    canary = canary_dir / "CANARY"
    words = hostile_words(canary)
    result = await transport.run(["python3", "-c", ECHO_ARGV, *words], timeout=30)
    assert result.exit_status == 0, result.stderr
    assert result.stdout == b"\0".join(w.encode("utf-8") for w in words)
    assert result.stdout.split(b"\0") == [w.encode("utf-8") for w in words]
    assert not canary.exists(), "a hostile word was interpreted by a shell"
    assert not list(canary_dir.iterdir()), "a hostile word created a file"

    # Control: the canary *can* be created by a command on this transport, so
    # its absence above means something.
    control = await transport.run(["sh", "-c", 'touch "$1"', "sh", str(canary)], timeout=30)
    assert control.exit_status == 0, control.stderr
    assert canary.exists()


@pytest.mark.parametrize("word", ["", " ", "\n", "'", "$(id)", "-", "*", "~", "é"])
async def test_single_hostile_word(transport: Transport, word: str) -> None:
    result = await transport.run(["python3", "-c", ECHO_ARGV, word], timeout=30)
    assert result.exit_status == 0, result.stderr
    assert result.stdout == word.encode("utf-8")


# ---------------------------------------------------------------- stdin / stdout / stderr


async def test_stdin_2mb_round_trips_through_cat(transport: Transport) -> None:
    data = os.urandom(2 * 1024 * 1024)
    result = await transport.run(["cat"], stdin=data, timeout=60)
    assert result.exit_status == 0, result.stderr
    assert len(result.stdout) == len(data)
    assert result.stdout == data
    assert result.stderr == b""


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param("asyncssh"),
        "openssh",
        "local",
    ],
    indirect=True,
)
async def test_empty_stdin_is_eof(transport: Transport) -> None:
    # Transport.run: "stdin: bytes fed to the command's standard input, then EOF"
    # (default b"": an immediate EOF).
    result = await transport.run(["cat"], timeout=5)
    assert result == type(result)(0, b"", b"")


@pytest.mark.parametrize("status", [0, 1, 42])
async def test_exit_status_returned(transport: Transport, status: int) -> None:
    result = await transport.run(["sh", "-c", f"exit {status}"], timeout=30)
    assert result.exit_status == status
    assert isinstance(result.exit_status, int)


@pytest.mark.parametrize(
    "transport",
    [
        "asyncssh",
        pytest.param("openssh"),
        "local",
    ],
    indirect=True,
)
async def test_killed_by_signal_is_minus_one(transport: Transport) -> None:
    # base.CommandResult: "exit_status: -1 if it died of a signal" (the openssh
    # transport reports 255, as ssh does: it cannot tell the two apart).
    result = await transport.run(["sh", "-c", "echo before; kill -9 $$"], timeout=30)
    assert result.exit_status == (255 if transport.name == "openssh" else -1)
    assert result.stdout == b"before\n"


async def test_stderr_separate_from_stdout(transport: Transport) -> None:
    result = await transport.run(
        ["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3"], timeout=30
    )
    assert result.exit_status == 3
    assert result.stdout == b"out1\nout2\n"
    assert result.stderr == b"err1\nerr2\n"


async def test_invalid_utf8_returned_unchanged(transport: Transport) -> None:
    out = b"\xff\xfe\x80 ok \xc3\x28 \xed\xa0\x80 \x00 end"
    err = b"\xc0\xaf\xf5\x80\x80 \x00 \xe2\x82"
    code = (
        "import sys; "
        f"sys.stdout.buffer.write({out!r}); sys.stdout.buffer.flush(); "
        f"sys.stderr.buffer.write({err!r}); sys.stderr.buffer.flush()"
    )
    result = await transport.run(["python3", "-c", code], timeout=30)
    assert result.exit_status == 0
    assert isinstance(result.stdout, bytes) and isinstance(result.stderr, bytes)
    assert result.stdout == out
    assert result.stderr == err


async def test_invalid_utf8_stdin_returned_unchanged(transport: Transport) -> None:
    data = bytes(range(256)) * 64
    result = await transport.run(["cat"], stdin=data, timeout=30)
    assert result.stdout == data


# ---------------------------------------------------------------- stream


async def test_stream_yields_incrementally(transport: Transport) -> None:
    chunks: list[tuple[float, bytes]] = []
    start = time.monotonic()
    async for chunk in transport.stream(
        ["sh", "-c", "echo first; sleep 0.5; echo second"]
    ):
        chunks.append((time.monotonic(), chunk))
    end = time.monotonic()
    assert b"".join(c for _, c in chunks) == b"first\nsecond\n"
    first_at = chunks[0][0]
    assert chunks[0][1].startswith(b"first\n")
    # The first chunk arrived well before the command (which sleeps 0.5 s) ended.
    assert end - first_at >= 0.35, (first_at - start, end - start)
    assert b"second" not in chunks[0][1]


async def test_stream_passes_stdin_and_bytes(transport: Transport) -> None:
    data = b"\xff\x00abc\n" * 1000
    got = b""
    async for chunk in transport.stream(["cat"], stdin=data):
        got += chunk
    assert got == data


# ---------------------------------------------------------------- remote agent


async def test_agent_init_runs(transport: Transport, tmp_path: Path) -> None:
    if isinstance(transport, LocalTransport):
        run_dir = str(tmp_path / "agent-run")
        expected_home = os.path.expanduser("~")
    else:
        run_dir = f"~/sshq-test/contract-{uuid.uuid4().hex[:10]}"
        expected_home = None
    try:
        reply = await call_agent(transport, "python3", "init", {"run_dir": run_dir}, timeout=60)
        assert os.path.isabs(reply["run_dir"])
        assert reply["python"].startswith("3.")
        if expected_home is None:
            user = transport.params.user
            assert reply["user"] == user
            assert reply["run_dir"] == f"{reply['home']}/{run_dir[2:]}"
        else:
            assert reply["home"] == expected_home
            assert reply["run_dir"] == run_dir
            assert os.path.isdir(run_dir)
        # The run directory exists on the host now.
        check = await transport.run(["test", "-d", reply["run_dir"]], timeout=30)
        assert check.exit_status == 0
    finally:
        if expected_home is None:
            # run_dir is "~/<rel>": remove <rel> from the remote home.
            await transport.run(["sh", "-c", 'cd && rm -rf -- "$1"', "sh", run_dir[2:]],
                                timeout=30)


# ---------------------------------------------------------------- asyncssh: one connection


def established_from_me(port: int) -> list[str]:
    """Established TCP connections from this process to ``port`` (``ss -tnp``)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    me = f"pid={os.getpid()},"
    return [line for line in out.splitlines() if me in line]


def max_sessions(testbed: dict[str, str]) -> int:
    """The test bed sshd's MaxSessions (OpenSSH's default is 10)."""
    conf = Path(testbed.get("SSHQ_TEST_SSHD_CONFIG")
                or Path(os.environ.get("SSHQ_TESTBED_ENV",
                                       "/var/lib/sshq-testbed/testbed.env")).parent
                / "sshd_config")
    try:
        text = conf.read_text()
    except OSError:
        return 10
    m = re.search(r"^\s*MaxSessions\s+(\d+)", text, re.MULTILINE | re.IGNORECASE)
    return int(m.group(1)) if m else 10


@pytest.fixture
async def asyncssh_transport(testbed: dict[str, str]) -> AsyncIterator[AsyncSSHTransport]:
    t = AsyncSSHTransport(host_params(testbed))
    try:
        yield t
    finally:
        await t.close()


async def test_asyncssh_sequential_and_concurrent_calls_share_one_connection(
    asyncssh_transport: AsyncSSHTransport, testbed: dict[str, str]
) -> None:
    t = asyncssh_transport
    port = int(testbed["SSHQ_TEST_PORT"])
    conn = await t.connection()
    local_port = conn.get_extra_info("sockname")[1]

    for i in range(15):
        r = await t.run(["echo", str(i)], timeout=30)
        assert r.stdout == f"{i}\n".encode()
        assert await t.connection() is conn

    results = await asyncio.gather(
        *(t.run(["sh", "-c", f"sleep 0.2; echo {i}"], timeout=60) for i in range(20))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]
    assert all(r.exit_status == 0 for r in results)
    assert await t.connection() is conn
    assert not conn.is_closed()

    mine = established_from_me(port)
    assert len(mine) == 1, mine
    assert f":{local_port} " in mine[0]

    await t.close()
    assert conn.is_closed()
    assert established_from_me(port) == []


async def test_asyncssh_concurrency_beyond_max_sessions(
    asyncssh_transport: AsyncSSHTransport, testbed: dict[str, str]
) -> None:
    t = asyncssh_transport
    port = int(testbed["SSHQ_TEST_PORT"])
    n = max_sessions(testbed) + 16
    conn = await t.connection()
    results = await asyncio.gather(
        *(t.run(["sh", "-c", f"sleep 0.05; echo {i}"], timeout=60) for i in range(n))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(n)]
    assert all(r.exit_status == 0 for r in results)
    assert await t.connection() is conn
    assert len(established_from_me(port)) == 1


async def test_asyncssh_channel_limit_above_max_sessions_keeps_one_connection(
    testbed: dict[str, str]
) -> None:
    # A site whose MaxSessions is lower than the transport's channel bound
    # (e.g. MaxSessions 4 with the default max_channels=8): refused channel
    # opens must neither fail the calls nor abandon the live connection.
    port = int(testbed["SSHQ_TEST_PORT"])
    limit = max_sessions(testbed)
    t = AsyncSSHTransport(host_params(testbed), max_channels=limit + 40)
    conn = await t.connection()
    try:
        n = limit + 20
        results = await asyncio.gather(
            *(t.run(["sh", "-c", f"sleep 0.2; echo {i}"], timeout=60) for i in range(n)),
            return_exceptions=True,
        )
        assert [r.stdout if not isinstance(r, BaseException) else r for r in results] == [
            f"{i}\n".encode() for i in range(n)
        ]
        assert await t.connection() is conn
        assert len(established_from_me(port)) == 1
    finally:
        await t.close()
        # Close the first connection if the transport abandoned it, so the
        # leak does not surface as a ResourceWarning in another test.
        if not conn.is_closed():
            conn.close()
            await conn.wait_closed()


# ---------------------------------------------------------------- openssh: ControlMaster


async def test_openssh_control_master_socket_reused(testbed: dict[str, str],
                                                    short_dir: Path) -> None:
    control_dir = short_dir / "cm"
    t = OpenSSHTransport(host_params(testbed), control_dir=str(control_dir))
    try:
        assert control_dir.is_dir()
        assert (control_dir.stat().st_mode & 0o777) == 0o700
        assert list(control_dir.iterdir()) == []

        r1 = await t.run(["echo", "one"], timeout=30)
        assert r1 == type(r1)(0, b"one\n", b"")
        sockets = [p for p in control_dir.iterdir() if p.is_socket()]
        assert len(sockets) == 1, list(control_dir.iterdir())
        sock = sockets[0]

        # The master answers a check on that socket.
        check = subprocess.run(["ssh", *t.ssh_options(), "-O", "check", "--", t.params.host],
                               capture_output=True, timeout=15)
        assert check.returncode == 0, check.stderr
        master_pid = re.search(rb"pid=(\d+)", check.stderr)
        assert master_pid, check.stderr

        # A second command goes through the same master: same socket, no new
        # socket, and ssh -O check still names the same master process.
        r2 = await t.run(["sh", "-c", "echo two; echo $SSH_CONNECTION"], timeout=30)
        assert r2.exit_status == 0
        assert r2.stdout.startswith(b"two\n")
        assert [p for p in control_dir.iterdir() if p.is_socket()] == [sock]
        check2 = subprocess.run(["ssh", *t.ssh_options(), "-O", "check", "--", t.params.host],
                                capture_output=True, timeout=15)
        assert check2.returncode == 0
        pid2 = re.search(rb"pid=(\d+)", check2.stderr)
        assert pid2 and pid2.group(1) == master_pid.group(1)

        # And the master's connection is the one both commands used: the same
        # client-side port in SSH_CONNECTION for a third command.
        r3 = await t.run(["sh", "-c", "echo $SSH_CONNECTION"], timeout=30)
        assert r3.stdout.split()[:2] == r2.stdout.split(b"\n")[1].split()[:2]
    finally:
        await t.close()
        stop_master(t)


async def test_command_that_exits_without_reading_stdin(transport: Transport) -> None:
    # e.g. "python3: not found" while sshq still sends the agent: the exit
    # status is the answer, not a lost connection.
    for _ in range(5):
        result = await transport.run(["sh", "-c", "echo gone >&2; exit 7"],
                                     stdin=b"x" * (8 * 1024 * 1024), timeout=60)
        assert result.exit_status == 7
        assert result.stderr == b"gone\n"
