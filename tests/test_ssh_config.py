"""~/.ssh/config is honoured (Host aliases, User, Port, IdentityFile, ProxyJump,
UserKnownHostsFile), and host keys stay strict whatever it says.

asyncssh reads ~/.ssh/config from $HOME, so each test runs the real CLI with a
HOME of its own (the system ssh reads the passwd home instead: openssh is
covered by the other suites).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _home(tmp_path: Path, testbed: dict[str, str], known_hosts: str, extra: str = "") -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host tb\n"
        f"    HostName {testbed['SSHQ_TEST_HOST']}\n"
        f"    Port {testbed['SSHQ_TEST_PORT']}\n"
        f"    User {testbed['SSHQ_TEST_USER']}\n"
        f"    IdentityFile {testbed['SSHQ_TEST_KEY']}\n"
        f"    UserKnownHostsFile {known_hosts}\n" + extra
    )
    return home


def _run(home: Path, tmp_path: Path, platform_hosts: str, *args: str
         ) -> subprocess.CompletedProcess[bytes]:
    cfg = tmp_path / "platforms.toml"
    cfg.write_text(f'[platforms.p]\nhosts = ["{platform_hosts}"]\njob_runner = "background"\n'
                   f'run_dir = "~/sshq-test/cfg-{tmp_path.name}"\n')
    env = dict(os.environ, HOME=str(home), SSHQ_CONFIG=str(cfg),
               SSHQ_STATE_DIR=str(tmp_path / "state"))
    return subprocess.run([sys.executable, "-m", "sshq", *args], env=env,
                          capture_output=True, timeout=120)


def test_alias_user_port_identity_and_known_hosts_from_ssh_config(
        tmp_path: Path, testbed: dict[str, str]) -> None:
    home = _home(tmp_path, testbed, testbed["SSHQ_TEST_KNOWN_HOSTS"])
    r = _run(home, tmp_path, "tb", "submit", "-p", "p", "--wait", "--command", "id -un")
    assert r.returncode == 0, r.stderr
    r = _run(home, tmp_path, "tb", "cat-log", "1")
    assert r.stdout == f"{testbed['SSHQ_TEST_USER']}\n".encode()


def test_proxyjump_from_ssh_config(tmp_path: Path, testbed: dict[str, str]) -> None:
    # The jump host is the test bed's sshd itself; the target is reached through it.
    home = _home(tmp_path, testbed, testbed["SSHQ_TEST_KNOWN_HOSTS"],
                 "Host behind\n"
                 f"    HostName {testbed['SSHQ_TEST_HOST']}\n"
                 f"    Port {testbed['SSHQ_TEST_PORT']}\n"
                 f"    User {testbed['SSHQ_TEST_USER']}\n"
                 f"    IdentityFile {testbed['SSHQ_TEST_KEY']}\n"
                 f"    UserKnownHostsFile {testbed['SSHQ_TEST_KNOWN_HOSTS']}\n"
                 "    ProxyJump tb\n")
    r = _run(home, tmp_path, "behind", "submit", "-p", "p", "--wait", "--command", "echo via")
    assert r.returncode == 0, r.stderr
    r = _run(home, tmp_path, "behind", "cat-log", "1")
    assert r.stdout == b"via\n"


@pytest.mark.parametrize("setting", ["none", "/dev/null"])
def test_ssh_config_cannot_switch_host_key_checking_off(
        tmp_path: Path, testbed: dict[str, str], setting: str) -> None:
    home = _home(tmp_path, testbed, setting, "    StrictHostKeyChecking no\n")
    r = _run(home, tmp_path, "tb", "submit", "-p", "p", "--command", "true")
    assert r.returncode == 5, r.stderr
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "host key" in err and "SHA256:" in err, err
    assert not (home / ".ssh" / "known_hosts").exists()  # nothing written silently
