"""Short-lived SSH user certificates on both transports (issue 12).

A test CA (``ssh-keygen -s``) and a second real sshd on 127.0.0.3 that trusts
it (``TrustedUserCAKeys``) and nothing else (``AuthorizedKeysFile none``):
only a valid certificate gets in.  Certificates last about 30 s.  A ``wait``
on a Slurm job that outlives its first certificate succeeds, reconnecting
after every poll, with ``identity_command`` renewing the certificate; with
no ``identity_command`` an open connection keeps working after expiry and
the next connection fails with an error that says when it expired.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SSHQ, stop_control_masters
from test_hostkeys_hops import Sshd, keygen, running_sshd

from sshq import AsyncClient, JobSpec, JobState
from sshq.config import parse_config
from sshq.exceptions import AuthenticationError, ConfigError
from sshq.transport import HostParams
from sshq.transport.certificates import (
    ensure_certificate,
    parse_certificate,
    read_certificate,
)

TRANSPORTS = ("asyncssh", "openssh")
USER = "sshqtest"
KEY_ID = "sshq-cert-test-id"

#: The identity_command: signs the key again (``-V -1m:+SECONDS``), counts its
#: runs, prints a marker (which only --debug may show).
RENEW = f"""\
import subprocess, sys
ca, key, seconds, counter = sys.argv[1:5]
with open(counter, "a") as fh:
    fh.write("renewed\\n")
subprocess.run(["ssh-keygen", "-q", "-s", ca, "-I", "{KEY_ID}", "-n", "{USER}",
                "-V", "-1m:+" + seconds + "s", key + ".pub"], check=True)
print("RENEW-OUTPUT-MARKER the new certificate is in place")
"""


def sign(ca: Path, key: Path, seconds: int) -> Path:
    """``key-cert.pub``, valid from a minute ago for ``seconds`` more."""
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", KEY_ID, "-n", USER,
                    "-V", f"-1m:+{seconds}s", f"{key}.pub"], check=True, capture_output=True,
                   timeout=30)
    return Path(f"{key}-cert.pub")


# ---------------------------------------------------------------- the format


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_parse_agrees_with_ssh_keygen(tmp_path: Path, kind: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ca")],
                   check=True, timeout=30)
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(tmp_path / "k")],
                   check=True, timeout=60)
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "the id",
                    "-n", "alice,bob", "-V", "20300101000000:20300201123456",
                    str(tmp_path / "k.pub")], check=True, timeout=30,
                   env=dict(os.environ, TZ="UTC"))
    listed = subprocess.run(["ssh-keygen", "-L", "-f", str(tmp_path / "k-cert.pub")],
                            capture_output=True, text=True, check=True, timeout=30,
                            env=dict(os.environ, TZ="UTC")).stdout
    assert "from 2030-01-01T00:00:00 to 2030-02-01T12:34:56" in listed, listed
    cert = parse_certificate((tmp_path / "k-cert.pub").read_bytes())
    assert cert.key_id == "the id" and cert.principals == ("alice", "bob")
    assert cert.valid_after == 1893456000 and cert.valid_before == 1896179696
    assert cert.expires == "2030-02-01 12:34:56 UTC"
    assert kind in cert.key_type or (kind == "ecdsa" and cert.key_type.startswith("ecdsa"))


def test_parse_refuses_what_is_no_user_certificate(tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    with pytest.raises(ValueError, match="unknown certificate type"):
        parse_certificate((tmp_path / "k.pub").read_bytes())  # a plain key
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "k"), "-h", "-I", "h",
                    str(tmp_path / "k.pub")], check=True, timeout=30)
    with pytest.raises(ValueError, match="host certificate"):
        parse_certificate((tmp_path / "k-cert.pub").read_bytes())
    for junk in (b"", b"ssh-ed25519-cert-v01@openssh.com", b"ssh-ed25519-cert-v01@openssh.com !!",
                 b"ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQtdjAx"):
        with pytest.raises(ValueError):
            parse_certificate(junk)
    (tmp_path / "bad").write_bytes(b"nonsense here\n")
    with pytest.raises(ConfigError, match="certificate file"):
        read_certificate(str(tmp_path / "bad"))
    assert read_certificate(str(tmp_path / "missing")) is None


async def test_expired_without_identity_command_says_when(tmp_path: Path) -> None:
    ca, key = keygen(tmp_path / "ca"), keygen(tmp_path / "key")
    utc = dict(os.environ, TZ="UTC")
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "x", "-n", USER,
                    "-V", "20200101000000:20200102000000", f"{key}.pub"], check=True, timeout=30,
                   env=utc)
    p = HostParams(host="h", identity_file=str(key), certificate_file=f"{key}-cert.pub")
    with pytest.raises(AuthenticationError, match=r"expired at 2020-01-02 00:00:00 UTC \(\d+ h"
                                                  r" ago\); renew it, or set identity_command"):
        await ensure_certificate(p, label="h")
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "x", "-n", USER,
                    "-V", "20990101000000:21000101000000", f"{key}.pub"], check=True, timeout=30,
                   env=utc)
    with pytest.raises(AuthenticationError, match="not valid before 2099-01-01 00:00:00 UTC"):
        await ensure_certificate(p, label="h")
    os.unlink(f"{key}-cert.pub")
    with pytest.raises(AuthenticationError, match="does not exist"):
        await ensure_certificate(p, label="h")


async def test_a_failing_identity_command_is_an_authentication_error(tmp_path: Path) -> None:
    p = HostParams(host="h", identity_file=str(tmp_path / "k"),
                   certificate_file=str(tmp_path / "k-cert.pub"),
                   identity_command=(sys.executable, "-c", "print('secret'); raise SystemExit(3)"))
    with pytest.raises(AuthenticationError, match=r"failed \(exit 3\); its output is logged"
                                                  r" with --debug") as info:
        await ensure_certificate(p, label="h")
    assert "secret" not in str(info.value)
    p = HostParams(host="h", identity_file=str(tmp_path / "k"),
                   certificate_file=str(tmp_path / "k-cert.pub"), identity_command=("true",))
    with pytest.raises(AuthenticationError, match="ran, yet the SSH certificate .* does not"
                                                  " exist"):
        await ensure_certificate(p, label="h")


@pytest.mark.parametrize("text, match", [
    ('certificate_file = "/c"\n', "certificate_file needs identity_file"),
    ('identity_file = "/k"\nidentity_command = ["x"]\n', "identity_command needs"),
    ('identity_file = "/k"\ncertificate_file = "/c"\nidentity_command = []\n', "non-empty"),
    ('identity_file = "/k"\ncertificate_file = "/c"\nidentity_command = [1]\n', "non-empty"),
    ('identity_file = "/k"\ncertificate_file = "/c"\ncertificate_min_validity = -1\n',
     "number of seconds"),
    ('transport = "local"\nidentity_file = "/k"\ncertificate_file = "/c"\n',
     "need an SSH transport"),
])
def test_config_checks_the_certificate_keys(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config("[platforms.x]\n" + text)


def test_config_reads_the_certificate_keys() -> None:
    p = parse_config('[platforms.x]\nidentity_file = "/k"\ncertificate_file = "~/c"\n'
                     'identity_command = "step ssh login \'me@example.org\'"\n'
                     "certificate_min_validity = 300\n")["x"]
    assert p.certificate_file == os.path.expanduser("~/c")
    assert p.identity_command == ("step", "ssh", "login", "me@example.org")
    params = p.host_params("x")
    assert params.certificate_min_validity == 300.0 and params.identity_command
    assert parse_config("[platforms.y]\n")["y"].certificate_min_validity == 60.0


# ---------------------------------------------------------------- on a real sshd


class CertBed:
    def __init__(self, root: Path, sshd: Sshd, ca: Path) -> None:
        self.root = root
        self.sshd = sshd
        self.ca = ca
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(sshd.known_line())

    def platforms(self, tmp: Path, *, renew: bool, seconds: int = 30) -> tuple[Path, Path]:
        """A platforms file (``c-asyncssh``, ``c-openssh``) and the key's counter file."""
        key = keygen(tmp / "id_user")
        counter = tmp / "renewals"
        script = tmp / "renew.py"
        script.write_text(RENEW)
        lines = []
        for transport in TRANSPORTS:
            lines += [f"[platforms.c-{transport}]", f'hosts = ["{self.sshd.host}"]',
                      f"port = {self.sshd.port}", f'user = "{USER}"',
                      f'identity_file = "{key}"', f'certificate_file = "{key}-cert.pub"',
                      f'known_hosts = "{self.known_hosts}"', 'job_runner = "slurm"',
                      f'transport = "{transport}"', 'run_dir = "~/sshq-test/certificates"',
                      "certificate_min_validity = 10"]
            if renew:
                argv = [sys.executable, str(script), str(self.ca), str(key), str(seconds),
                        str(counter)]
                lines.append(f"identity_command = {json.dumps(argv)}")
        cfg = tmp / "platforms.toml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg, key


@pytest.fixture(scope="module")
def certbed(slurm_testbed: dict[str, str], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[CertBed]:
    root = tmp_path_factory.mktemp("certs")
    ca = keygen(root / "ca")
    os.chmod(root, 0o755)
    with running_sshd("127.0.0.3", f"TrustedUserCAKeys {ca}.pub\nAuthorizedKeysFile none\n",
                      prefix="sq-cert-") as sshd:
        yield CertBed(root, sshd, ca)


def renewals(tmp_path: Path) -> int:
    try:
        return len((tmp_path / "renewals").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_wait_outlives_its_certificate(certbed: CertBed, tmp_path: Path,
                                               state_dir: Path, transport: str) -> None:
    cfg, key = certbed.platforms(tmp_path, renew=True)
    plat = f"c-{transport}"
    async with AsyncClient(cfg, state_dir=state_dir) as client:
        # no certificate yet: identity_command gets the first one
        (job,) = await client.submit(JobSpec(command="sleep 45; echo done"), platform=plat)
        assert renewals(tmp_path) == 1
        first = read_certificate(f"{key}-cert.pub")
        assert first is not None

        closing: list[asyncio.Future[None]] = []

        def reconnect(jobs: object) -> None:  # every poll on a new connection
            if transport == "openssh":
                stop_control_masters(state_dir)
            else:  # (closed during the pause before the next poll)
                closing.append(asyncio.ensure_future(client.pool.close()))

        (job,) = await client.wait([job.id], timeout=200, interval=5, max_interval=5,
                                   on_poll=reconnect)
        await asyncio.gather(*closing)
        assert job.state is JobState.SUCCEEDED, job
        assert job.exit_time is not None and job.exit_time.timestamp() > first.valid_before
        assert renewals(tmp_path) >= 2
        assert await client.cat_log(job.id) == b"done\n"
    # nothing about certificates in sshq's state
    for f in state_dir.rglob("*"):
        if f.is_file() and not f.is_socket():
            data = f.read_bytes()
            assert KEY_ID.encode() not in data and b"-cert.pub" not in data, f


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reconnection_after_expiry_renews_first(certbed: CertBed, tmp_path: Path,
                                                        state_dir: Path, transport: str) -> None:
    cfg, key = certbed.platforms(tmp_path, renew=True)
    cert = read_certificate(str(sign(certbed.ca, key, 16)))
    assert cert is not None
    plat = f"c-{transport}"
    async with AsyncClient(cfg, state_dir=state_dir) as client:
        await client.tidy(platform=plat)     # valid for more than 10 s: used as it is
        assert renewals(tmp_path) == 0
        await asyncio.sleep(max(0.0, cert.valid_before + 1 - time.time()))
        await client.tidy(platform=plat)     # the open connection: nothing renewed
        assert renewals(tmp_path) == 0
        if transport == "openssh":
            stop_control_masters(state_dir)
        await client.pool.close()
        await client.tidy(platform=plat)     # a new connection: renewed first
        assert renewals(tmp_path) == 1
    renewed = read_certificate(f"{key}-cert.pub")
    assert renewed is not None and renewed.valid_before > cert.valid_before


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_expiry_without_identity_command(certbed: CertBed, tmp_path: Path,
                                               state_dir: Path, transport: str) -> None:
    cfg, key = certbed.platforms(tmp_path, renew=False)
    cert = read_certificate(str(sign(certbed.ca, key, 20)))
    assert cert is not None
    plat = f"c-{transport}"
    async with AsyncClient(cfg, state_dir=state_dir) as client:
        await client.tidy(platform=plat)          # connects with the certificate
        await asyncio.sleep(max(0.0, cert.valid_before + 1 - time.time()))
        assert time.time() > cert.valid_before
        await client.tidy(platform=plat)          # the open connection keeps working
        if transport == "openssh":
            stop_control_masters(state_dir)
        await client.pool.close()
        with pytest.raises(AuthenticationError) as info:
            await client.tidy(platform=plat)
    msg = str(info.value)
    assert f"the SSH certificate {key}-cert.pub expired at {cert.expires}" in msg, msg
    assert "identity_command" in msg
    r = subprocess.run([*SSHQ, "tidy", "-p", plat], capture_output=True, timeout=60,
                       env=dict(os.environ, SSHQ_CONFIG=str(cfg), SSHQ_STATE_DIR=str(state_dir)),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 4 and b"expired at" in r.stderr, r.stderr


def test_identity_command_output_is_logged_only_with_debug(certbed: CertBed, tmp_path: Path,
                                                          state_dir: Path) -> None:
    cfg, key = certbed.platforms(tmp_path, renew=True)
    env = dict(os.environ, SSHQ_CONFIG=str(cfg), SSHQ_STATE_DIR=str(state_dir))
    outputs = []
    for debug in ([], ["--debug"]):
        Path(f"{key}-cert.pub").unlink(missing_ok=True)  # missing: renewed first
        r = subprocess.run([*SSHQ, *debug, "tidy", "-p", "c-asyncssh"], capture_output=True,
                           timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout + r.stderr)
    assert renewals(tmp_path) == 2
    assert b"RENEW-OUTPUT-MARKER" not in outputs[0]
    assert b"RENEW-OUTPUT-MARKER" in outputs[1]


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ssh_to_job_renews_before_its_ssh(certbed: CertBed, tmp_path: Path,
                                               state_dir: Path, transport: str) -> None:
    """The interactive ssh-to-job runs a system ssh: a new connection, which a
    certificate that expired while the client's connection stayed open would
    not authenticate.  asyncssh: renewed first; openssh: its ControlMaster
    (authenticated already) carries the ssh, nothing renewed."""
    import shlex

    from helpers import wait_for_state

    cfg, key = certbed.platforms(tmp_path, renew=True)
    cert = read_certificate(str(sign(certbed.ca, key, 20)))
    assert cert is not None
    plat = f"c-{transport}"
    async with AsyncClient(cfg, state_dir=state_dir) as client:
        (job,) = await client.submit(JobSpec(command="sleep 150", name="sshq-cert-attach"),
                                     platform=plat)
        try:
            await wait_for_state(client, job.id, JobState.RUNNING, timeout=60)
            assert renewals(tmp_path) == 0
            await asyncio.sleep(max(0.0, cert.valid_before + 1 - time.time()))
            argv = await client.ssh_to_job_argv(job.id)   # on the open connection
            assert renewals(tmp_path) == (1 if transport == "asyncssh" else 0)
            # the argv in a terminal (script's pty): a shell in the job
            r = subprocess.run(["script", "-qec", shlex.join(argv), "/dev/null"],
                               input=b"echo IN-JOB-$SLURM_JOB_ID; exit\n", capture_output=True,
                               timeout=90)
            out = (r.stdout + r.stderr).decode("utf-8", "replace")
            assert f"IN-JOB-{job.job_id}" in out, out
            assert "Permission denied" not in out, out
        finally:
            await client.kill([job.id], settle=0)
