"""``sshq hosts trust``: show a host key's fingerprint, record it only when told to.

Runs the real ``sshq`` command against the test bed's sshd.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(120)]

Run = Callable[..., subprocess.CompletedProcess[bytes]]


# ---------------------------------------------------------------- helpers


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "other",
                    "-f", str(path)], check=True, capture_output=True, timeout=30)
    return path


def keygen_fingerprint(pub: str | Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return out.split()[1]


def pub_words(pub: str | Path) -> str:
    """``algo base64`` of a public key file."""
    algo, blob = Path(pub).read_text().split()[:2]
    return f"{algo} {blob}"


@pytest.fixture
def entry(testbed: dict[str, str]) -> str:
    """How the test bed's sshd appears in known_hosts."""
    return f"[{testbed['SSHQ_TEST_HOST']}]:{testbed['SSHQ_TEST_PORT']}"


@pytest.fixture
def expected_line(testbed: dict[str, str], entry: str) -> str:
    """The one line ``hosts trust`` should append for the test bed."""
    line = f"{entry} {pub_words(testbed['SSHQ_TEST_HOSTKEY_PUB'])}\n"
    assert line.split()[1] == "ssh-ed25519" and line.split()[2].startswith("AAAA")
    return line


@pytest.fixture
def host_fp(testbed: dict[str, str]) -> str:
    return keygen_fingerprint(testbed["SSHQ_TEST_HOSTKEY_PUB"])


@pytest.fixture
def unrelated_line(tmp_path: Path) -> str:
    """A known_hosts line for some other host."""
    k = keygen(tmp_path / "unrelated")
    return f"unrelated.example.org {pub_words(k.with_suffix('.pub'))}\n"


@pytest.fixture
def trust(sshq: Run, testbed: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """``sshq hosts trust <host> --port <port> --known-hosts <kh> ...``, stdin not a tty."""

    def run(kh: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return sshq("hosts", "trust", testbed["SSHQ_TEST_HOST"],
                    "--port", testbed["SSHQ_TEST_PORT"], "--known-hosts", str(kh), *extra,
                    input=b"", timeout=60)

    return run


def text(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stdout.decode("utf-8", "replace") + p.stderr.decode("utf-8", "replace")


def assert_error_line(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, text(p)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sshq: error:")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------- refusing


def test_refuses_without_yes_and_without_tty(trust: Run, tmp_path: Path,
                                             unrelated_line: str, host_fp: str) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(unrelated_line)
    before = kh.read_bytes()
    p = trust(kh)
    line = assert_error_line(p)
    assert "--yes" in line or "confirm" in line
    # The user is shown what to check.
    assert host_fp in p.stderr.decode()
    assert kh.read_bytes() == before


def test_refuses_without_tty_and_creates_no_file(trust: Run, tmp_path: Path) -> None:
    kh = tmp_path / "sub" / "known_hosts"
    p = trust(kh)
    assert p.returncode != 0
    assert not kh.exists()


def test_unreachable_host_is_one_error_line(sshq: Run, testbed: dict[str, str],
                                            tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    p = sshq("hosts", "trust", testbed["SSHQ_TEST_HOST"], "--port", str(port),
             "--known-hosts", str(kh), "--yes", input=b"", timeout=60)
    assert_error_line(p)
    assert p.returncode == 3
    assert kh.read_bytes() == b""


# ---------------------------------------------------------------- on a terminal


@pytest.mark.parametrize("answer", ["y", "n"])
def test_terminal_confirmation(answer: str, cli_env: dict[str, str], testbed: dict[str, str],
                               tmp_path: Path, expected_line: str, host_fp: str) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sshq", "hosts", "trust", testbed["SSHQ_TEST_HOST"],
             "--port", testbed["SSHQ_TEST_PORT"], "--known-hosts", str(kh)],
            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env,
        )
        os.write(master, f"{answer}\n".encode())
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert host_fp.encode() in err
    if answer == "y":
        assert proc.returncode == 0, err
        assert kh.read_text() == expected_line
    else:
        assert proc.returncode != 0
        assert kh.read_bytes() == b""


# ---------------------------------------------------------------- adding


def test_yes_appends_exactly_one_line(trust: Run, tmp_path: Path, unrelated_line: str,
                                      expected_line: str, host_fp: str, entry: str) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(unrelated_line)
    p = trust(kh, "--yes")
    assert p.returncode == 0, text(p)
    assert host_fp in text(p)
    assert kh.read_text() == unrelated_line + expected_line

    # OpenSSH itself finds the recorded key.
    found = subprocess.run(["ssh-keygen", "-F", entry, "-f", str(kh)], capture_output=True,
                           text=True, timeout=30)
    assert found.returncode == 0
    assert expected_line.split()[2] in found.stdout


def test_yes_creates_missing_file_private(trust: Run, tmp_path: Path,
                                          expected_line: str) -> None:
    kh = tmp_path / "new-dir" / "known_hosts"
    p = trust(kh, "--yes")
    assert p.returncode == 0, text(p)
    assert kh.read_text() == expected_line
    assert stat.S_IMODE(kh.stat().st_mode) & 0o077 == 0


def test_again_says_already_trusted_and_does_not_duplicate(
    trust: Run, tmp_path: Path, expected_line: str, host_fp: str
) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    assert trust(kh, "--yes").returncode == 0
    after_first = kh.read_bytes()
    assert after_first.decode() == expected_line

    p = trust(kh, "--yes")
    assert p.returncode == 0, text(p)
    assert "already trusted" in text(p)
    assert kh.read_bytes() == after_first

    # Without --yes too: nothing to confirm, nothing written.
    p = trust(kh)
    assert p.returncode == 0, text(p)
    assert "already trusted" in text(p)
    assert kh.read_bytes() == after_first


def test_already_trusted_in_hashed_known_hosts(trust: Run, tmp_path: Path,
                                               expected_line: str) -> None:
    # Debian's ssh_config sets HashKnownHosts yes: real files are hashed.
    kh = tmp_path / "known_hosts"
    kh.write_text(expected_line)
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True,
                   timeout=30)
    assert kh.read_text().startswith("|1|")
    before = kh.read_bytes()
    p = trust(kh, "--yes")
    assert p.returncode == 0, text(p)
    assert "already trusted" in text(p)
    assert kh.read_bytes() == before


def test_fingerprint_right_value_adds(trust: Run, tmp_path: Path, expected_line: str,
                                      host_fp: str) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    p = trust(kh, "--fingerprint", host_fp)
    assert p.returncode == 0, text(p)
    assert kh.read_text() == expected_line


def test_fingerprint_wrong_value_refuses(trust: Run, tmp_path: Path,
                                         unrelated_line: str, host_fp: str) -> None:
    other = keygen(tmp_path / "other")
    wrong = keygen_fingerprint(other.with_suffix(".pub"))
    assert wrong != host_fp
    kh = tmp_path / "known_hosts"
    kh.write_text(unrelated_line)
    before = kh.read_bytes()
    for extra in (("--fingerprint", wrong), ("--fingerprint", wrong, "--yes")):
        p = trust(kh, *extra)
        line = assert_error_line(p)
        assert wrong in line and host_fp in line
        assert kh.read_bytes() == before


# ---------------------------------------------------------------- changed key


def test_different_key_present_refuses_changed(trust: Run, tmp_path: Path, entry: str,
                                               host_fp: str) -> None:
    other = keygen(tmp_path / "other")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{entry} {pub_words(other.with_suffix('.pub'))}\n")
    before = kh.read_bytes()
    for extra in ((), ("--yes",), ("--fingerprint", host_fp)):
        p = trust(kh, *extra)
        line = assert_error_line(p)
        assert "CHANGED" in line
        assert host_fp in line
        assert kh.read_bytes() == before


def test_different_key_for_other_port_is_no_conflict(trust: Run, tmp_path: Path,
                                                     testbed: dict[str, str],
                                                     expected_line: str) -> None:
    # A key recorded for the same address on port 22 is another host entry.
    other = keygen(tmp_path / "other")
    kh = tmp_path / "known_hosts"
    first = f"{testbed['SSHQ_TEST_HOST']} {pub_words(other.with_suffix('.pub'))}\n"
    kh.write_text(first)
    p = trust(kh, "--yes")
    assert p.returncode == 0, text(p)
    assert kh.read_text() == first + expected_line


# ---------------------------------------------------------------- --json


def test_json_output(trust: Run, tmp_path: Path, testbed: dict[str, str],
                     host_fp: str) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_bytes(b"")
    p = trust(kh, "--yes", "--json")
    assert p.returncode == 0, text(p)
    data = json.loads(p.stdout)
    assert isinstance(data, list) and len(data) == 1
    (obj,) = data
    assert obj["host"] == testbed["SSHQ_TEST_HOST"]
    assert obj["port"] == int(testbed["SSHQ_TEST_PORT"])
    assert obj["fingerprint"] == host_fp
    assert obj["added"] is True

    p = trust(kh, "--yes", "--json")
    assert p.returncode == 0, text(p)
    (obj,) = json.loads(p.stdout)
    assert obj["fingerprint"] == host_fp
    assert obj["added"] is False
    assert len(kh.read_text().splitlines()) == 1


# ---------------------------------------------------------------- trusted, then used


def platform_config(path: Path, testbed: dict[str, str], known_hosts: Path,
                    run_id: str) -> Path:
    path.write_text("\n".join([
        "[platforms.trusted-bg]",
        f'hosts = ["{testbed["SSHQ_TEST_HOST"]}"]',
        f"port = {testbed['SSHQ_TEST_PORT']}",
        f'user = "{testbed["SSHQ_TEST_USER"]}"',
        f'identity_file = "{testbed["SSHQ_TEST_KEY"]}"',
        f'known_hosts = "{known_hosts}"',
        'job_runner = "background"',
        'transport = "asyncssh"',
        f'run_dir = "~/sshq-test/{run_id}"',
        "",
    ]))
    return path


def test_after_trusting_a_platform_runs_a_job(sshq: Run, cli_env: dict[str, str],
                                              tmp_path: Path, testbed: dict[str, str],
                                              run_id: str, expected_line: str) -> None:
    kh = tmp_path / "trusted_known_hosts"
    kh.write_bytes(b"")
    cfg = platform_config(tmp_path / "trusted.toml", testbed, kh, run_id)
    env = dict(cli_env, SSHQ_CONFIG=str(cfg))

    # Not trusted yet: refused for the host key, nothing recorded.
    p = sshq("submit", "-p", "trusted-bg", "--command", "true", input=b"", env=env,
             timeout=60)
    assert p.returncode == 5, text(p)
    assert kh.read_bytes() == b""

    # Trust it by platform name: its host, port and known_hosts are used.
    p = sshq("hosts", "trust", "trusted-bg", "--yes", input=b"", env=env, timeout=60)
    assert p.returncode == 0, text(p)
    assert kh.read_text() == expected_line

    p = sshq("submit", "-p", "trusted-bg", "--command", "true", "--wait", "--timeout", "60",
             input=b"", env=env, timeout=90)
    assert p.returncode == 0, text(p)
    assert kh.read_text() == expected_line

    # Tidy the remote run directory.
    key = testbed["SSHQ_TEST_KEY"]
    subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={kh}", "-i", key,
         "-o", "IdentitiesOnly=yes", "-p", testbed["SSHQ_TEST_PORT"],
         "-l", testbed["SSHQ_TEST_USER"], testbed["SSHQ_TEST_HOST"],
         f"rm -rf -- sshq-test/{run_id}"],
        capture_output=True, timeout=30, check=False, env={**os.environ},
    )


# ---------------------------------------------------------------- answers on stdin


@pytest.mark.parametrize(("answer", "added"), [(b"y\n", True), (b"yes\n", True),
                                               (b"n\n", False), (b"\n", False),
                                               (b"maybe\n", False)])
def test_answer_read_from_stdin(sshq: Run, testbed: dict[str, str], tmp_path: Path,
                                host_fp: str, answer: bytes, added: bool) -> None:
    kh = tmp_path / "known_hosts"
    p = sshq("hosts", "trust", testbed["SSHQ_TEST_HOST"], "--port", testbed["SSHQ_TEST_PORT"],
             "--known-hosts", str(kh), input=answer, timeout=60)
    assert host_fp in p.stderr.decode(), text(p)  # the fingerprint is shown before asking
    if added:
        assert p.returncode == 0, text(p)
        assert kh.read_text().startswith(f"[{testbed['SSHQ_TEST_HOST']}]:")
    else:
        assert_error_line(p)
        assert not kh.exists() or kh.read_text() == ""
