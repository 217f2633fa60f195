"""Shared fixtures: the real test bed (sshd on loopback, Slurm), platforms, clients.

The test bed is made by ``.ci/setup-testbed.sh``, which writes
``/var/lib/sshq-testbed/testbed.env``.  Without it, tests that need it are
skipped, unless ``SSHQ_REQUIRE_TESTBED=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from helpers import SSHQ, stop_control_masters
from testbed import SETUP_HINT, TESTBED_ENV, load_testbed, require_part, skip_or_fail

from sshq import AsyncClient


def pytest_configure(config: pytest.Config) -> None:
    """Undo signals ignored by whatever started the tests (``nohup``, ``cmd &``
    in a shell without job control): the processes the tests start inherit an
    ignored signal, and a shell cannot trap one ignored at its start, so tests
    that send SIGINT or SIGHUP to job wrappers and to ``sshq`` would fail for
    the way the suite was launched.  A handled signal is reset to the default
    in a child at exec; an ignored one is not."""
    for sig, handler in ((signal.SIGINT, signal.default_int_handler),
                         (signal.SIGHUP, signal.SIG_DFL), (signal.SIGQUIT, signal.SIG_DFL)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def testbed() -> dict[str, str]:
    """The test bed's facts (host, port, user, key, known_hosts, ...): tests/testbed.py."""
    env = load_testbed()
    if env is None:
        skip_or_fail(f"no test bed ({SETUP_HINT})",
                     f"test bed required but {TESTBED_ENV} is missing")
    return env


@pytest.fixture(scope="session")
def slurm_testbed(testbed: dict[str, str]) -> dict[str, str]:
    """The test bed, with Slurm."""
    require_part(testbed, "SSHQ_TEST_SLURM", "Slurm")
    return testbed


def platform_toml(testbed: dict[str, str], name: str, *, job_runner: str, transport: str,
                  run_dir: str, user: str | None = None, **extra: object) -> str:
    """One [platforms.NAME] table pointing at the test bed's sshd.

    ``user``: the login user (default: the test bed's ``SSHQ_TEST_USER``);
    ``extra``: more keys (strings quoted, other values as Python ``repr``).
    """
    lines = [f"[platforms.{name}]"]
    if transport == "local":
        lines += ['hosts = ["localhost"]']
    else:
        lines += [
            f'hosts = ["{testbed["SSHQ_TEST_HOST"]}"]',
            f"port = {testbed['SSHQ_TEST_PORT']}",
            f'user = "{user or testbed["SSHQ_TEST_USER"]}"',
            f'identity_file = "{testbed["SSHQ_TEST_KEY"]}"',
            f'known_hosts = "{testbed["SSHQ_TEST_KNOWN_HOSTS"]}"',
        ]
    lines += [f'job_runner = "{job_runner}"', f'transport = "{transport}"',
              f'run_dir = "{run_dir}"']
    for k, v in extra.items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def run_id() -> str:
    """A unique name for this test's remote run directory."""
    return uuid.uuid4().hex[:10]


def bed_platforms_toml(testbed: dict[str, str], run_dir: str, local_run_dir: str) -> str:
    """The platforms every test bed test may use (:func:`config_file`'s).

    ``slurm`` (asyncssh), ``slurm-openssh``, ``bg`` (asyncssh, background),
    ``bg-openssh``, all with ``run_dir``; ``local`` (local transport,
    background) with ``local_run_dir``.
    """
    return "".join([
        platform_toml(testbed, "slurm", job_runner="slurm", transport="asyncssh",
                      run_dir=run_dir),
        platform_toml(testbed, "slurm-openssh", job_runner="slurm", transport="openssh",
                      run_dir=run_dir),
        platform_toml(testbed, "bg", job_runner="background", transport="asyncssh",
                      run_dir=run_dir),
        platform_toml(testbed, "bg-openssh", job_runner="background", transport="openssh",
                      run_dir=run_dir),
        platform_toml(testbed, "local", job_runner="background", transport="local",
                      run_dir=local_run_dir),
    ])


@pytest.fixture
def config_file(tmp_path: Path, testbed: dict[str, str], run_id: str) -> Path:
    """A platforms file with every combination the tests use (:func:`bed_platforms_toml`)."""
    p = tmp_path / "platforms.toml"
    p.write_text(bed_platforms_toml(testbed, f"~/sshq-test/{run_id}",
                                    str(tmp_path / "local-run")))
    return p


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh, SHORT sshq state directory.

    Short (under /tmp, not pytest's long tmp_path) so that openssh ControlMaster
    sockets live in <state_dir>/cm, private to the test (a long state dir falls
    back to a socket directory shared by every sshq run of this user); the
    test's masters are stopped at the end.
    """
    d = Path(tempfile.mkdtemp(prefix="sq-", dir="/tmp"))
    yield d
    stop_control_masters(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def client(config_file: Path, state_dir: Path) -> AsyncIterator[AsyncClient]:
    """An AsyncClient on the test bed's platforms."""
    c = AsyncClient(config_file, state_dir=state_dir)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def cli_env(config_file: Path, state_dir: Path) -> dict[str, str]:
    """Environment for running the ``sshq`` command on the test bed."""
    env = dict(os.environ)
    env["SSHQ_CONFIG"] = str(config_file)
    env["SSHQ_STATE_DIR"] = str(state_dir)
    return env


@pytest.fixture
def sshq(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """Run the real ``sshq`` command (as a user would), capturing its output.

    ``run(*args, input=None, timeout=180, env=None)``: stdin is ``input``, or
    /dev/null.
    """

    def run(*args: str, input: bytes | None = None, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*SSHQ, *args], input=input, capture_output=True, timeout=timeout,
            env=env or cli_env, stdin=subprocess.DEVNULL if input is None else None,
        )

    return run


# ---- network-namespace hosts (tests/netns.py) ------------------------------
from netns import NetnsHosts  # noqa: E402  (kept here, with its fixture)


@pytest.fixture(scope="session")
def netns_hosts(testbed: dict[str, str]) -> Iterator[NetnsHosts]:
    """Three real hosts sqh1..sqh3: network namespaces, each with its own sshd.

    Shared by the session: a test that crashes a host or cuts its link calls
    ``netns_hosts.restore()`` when done.  See tests/netns.py.
    """
    with NetnsHosts(3, testbed=testbed) as hosts:
        yield hosts
# ---- end of network-namespace hosts ----------------------------------------
